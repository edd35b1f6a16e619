"""rotatekv inside vLLM (CPU build): run by ``make test-vllm`` in its own virtualenv
(``.venv-vllm``, requirements-vllm.txt) with ``ROTATEKV_VLLM_MODEL`` naming a transformers
directory of the packaged SmolLM2; skipped where vLLM is not installed."""

from __future__ import annotations

import json
import math
import os
import queue
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from rotatekv import ArgumentError  # noqa: E402
from rotatekv import vllm as rkv_vllm  # noqa: E402

HERE = Path(__file__).parent
BASE = "You are a helpful assistant. Answer briefly and precisely. "
PROMPTS = [
    BASE + "The capital of France is",
    BASE * 3 + "Write a short poem about the sea.",
    "In 1969, astronauts",
    BASE * 6 + "def fibonacci(n):",
]
# Two logits closer than this are a tie for greedy decoding. vLLM's logits are bf16, 0.125
# apart between 16 and 32 (0.25 up to 64): attention summed in another order (vLLM's kernel
# and rotatekv's) moves a logit by an ulp and flips two tokens one or two ulps apart (seen:
# gaps of exactly 0.125 and 0.25). A wrong kernel diverges at gaps of several units.
TIE = 0.26


def test_settings_are_checked_and_name_the_key(monkeypatch):
    monkeypatch.delenv(rkv_vllm.ENV, raising=False)
    assert rkv_vllm.settings({}) is None
    assert rkv_vllm.settings({"rotatekv": {"key_bits": 4, "value_bits": 2}})["key_bits"] == 4
    for cfg, word in [
        ({"bitz": 2}, "bitz"),
        ({"bits": 5}, "bits"),
        ({"value_bits": 1}, "value_bits"),
        ({"residual": -1}, "residual"),
        ({"calibration": "/no/such/file"}, "calibration"),
        ([2], "rotatekv"),
    ]:
        with pytest.raises(ArgumentError, match=word):
            rkv_vllm.settings({"rotatekv": cfg})
    monkeypatch.setenv(rkv_vllm.ENV, '{"bits": 4}')
    assert rkv_vllm.settings(None)["bits"] == 4
    monkeypatch.setenv(rkv_vllm.ENV, "{bits: 4")
    with pytest.raises(ArgumentError, match=rkv_vllm.ENV):
        rkv_vllm.settings(None)


def run_engine(
    config,
    tmp_path: Path,
    plugin: bool = True,
    prompts=None,
    over=None,
    cpu: str | None = None,
    model_env: str = "ROTATEKV_VLLM_MODEL",
) -> subprocess.CompletedProcess:
    """One engine in its own process; ``plugin=False`` keeps vLLM from loading rotatekv's
    entry point at all (vLLM as if rotatekv were not installed); ``cpu`` binds its workers
    to those cores (``"0|1"``: one per tensor-parallel rank); the model is the directory
    ``$model_env`` names."""
    model = os.environ.get(model_env)
    if not model:
        pytest.skip(f"{model_env} not set (make test-vllm sets it)")
    pfile = tmp_path / f"prompts-{uuid.uuid4().hex}.json"
    pfile.write_text(json.dumps(PROMPTS if prompts is None else prompts))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    env.pop(rkv_vllm.ENV, None)
    if cpu is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu
    if not plugin:
        env["VLLM_PLUGINS"] = "none"
    return subprocess.run(
        [
            sys.executable,
            str(HERE / "engine.py"),
            model,
            json.dumps(config),
            str(pfile),
            json.dumps(over or {}),
        ],
        capture_output=True,
        text=True,
        timeout=1500,
        env=env,
    )


def run_engines(jobs: dict[str, tuple], tmp_path: Path) -> dict[str, subprocess.CompletedProcess]:
    """``run_engine(*job)`` for every job, as many at once as there are cores (up to 4),
    each bound to its own core: a CPU engine's worker uses one core, and ten engines one
    after the other would take most of the suite's time."""
    cores = queue.SimpleQueue()
    width = max(1, min(4, os.cpu_count() or 1))
    for c in range(width):
        cores.put(str(c))

    def one(job: tuple) -> subprocess.CompletedProcess:
        cpu = cores.get()
        try:
            return run_engine(job[0], tmp_path, *job[1:], cpu=cpu)
        finally:
            cores.put(cpu)

    with ThreadPoolExecutor(width) as ex:
        futures = {name: ex.submit(one, job) for name, job in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def result(p: subprocess.CompletedProcess) -> dict:
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def model_dims(model_env: str = "ROTATEKV_VLLM_MODEL") -> tuple[int, int, int]:
    cfg = json.loads((Path(os.environ[model_env]) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return cfg["num_hidden_layers"], cfg.get("num_key_value_heads", heads), d


def calibration(path: Path, layers: int, heads: int, d: int) -> str:
    """A pre-RoPE calibration file with random channel orderings (what `rotatekv calibrate`
    writes, without the model run): exercises per-layer plans and the RoPE round trip."""
    import torch

    from rotatekv import RotationPlan
    from rotatekv.calibrate import Calibration

    g = torch.Generator().manual_seed(0)
    perm = torch.stack([torch.randperm(heads * d, generator=g) for _ in range(layers)])
    plan = RotationPlan(
        layers,
        heads,
        d,
        mode="pre_rope",
        group_heads=heads,
        rotate_values=True,
        key_perm=perm.numpy().astype("int32"),
        key_clip=[0.98] * layers,
        value_clip=[1.0] * layers,
    )
    Calibration(plan, [math.inf] * layers).save(path)
    return str(path)


def test_installed_but_not_asked_for_changes_nothing(runs):
    assert runs["installed"] == runs["cpu_attn"]


def same_greedy_tokens(base: dict, ours: dict) -> None:
    """``ours`` gives ``base``'s tokens until the two first differ, which must be at a step
    where ``base``'s two best tokens tie (what follows a tie may differ); most steps of all
    prompts agree."""
    agreed = 0
    for want, got, top2 in zip(base["tokens"], ours["tokens"], base["top2"], strict=True):
        for i, (w, g) in enumerate(zip(want, got, strict=False)):
            if w != g:
                gap = top2[i][0] - top2[i][1]
                assert gap < TIE, f"step {i} (log-probability gap {gap:.3f}): {want} != {got}"
                break
            agreed += 1
        else:
            assert len(want) == len(got), f"{want} != {got}"
    assert agreed >= 0.5 * sum(len(t) for t in base["tokens"]), agreed


def test_16bit_cells_give_vllms_greedy_tokens(runs):
    """Through vLLM's block tables, chunked prefill and shared prefix blocks, 16-bit cells
    give CPU_ATTN's tokens, up to the first step where CPU_ATTN's two best tokens tie."""
    assert runs["rkv16"]["blocks"] == runs["cpu_attn"]["blocks"]  # bf16's K and V
    same_greedy_tokens(runs["cpu_attn"], runs["rkv16"])


def test_pre_rope_calibration_undoes_vllms_rope(runs):
    """A pre-RoPE calibrated plan at 8 bits: keys are packed before RoPE (undone at each
    token's position from the model's config) and RoPE'd again when read, with the 16-bit
    window merged in: greedy tokens stay CPU_ATTN's (a wrong angle would not)."""
    same_greedy_tokens(runs["cpu_attn"], runs["rkv8_pre_rope"])


def test_2bit_cells_hold_over_5x_the_tokens(runs):
    ratio = runs["rkv2"]["blocks"] / runs["cpu_attn"]["blocks"]
    assert ratio >= 5.0, ratio
    # Generation ran through the packed pool (a prompt may end early at EOS).
    assert all(1 <= len(t) <= 32 for t in runs["rkv2"]["tokens"])


def failed_in_the_front_end(p: subprocess.CompletedProcess) -> str:
    """The output of a run that failed where the engine is created: rotatekv's message in
    the caller's process, raised while vLLM builds its configuration (pydantic wraps it in
    its ValidationError there), before any engine core or worker started."""
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-2000:]
    assert "create_engine_config" in out, out[-2000:]
    assert "(EngineCore" not in out and "Engine core initialization" not in out, out[-2000:]
    return out


def test_a_bad_setting_fails_at_engine_start_naming_it(engines):
    assert "bitz" in failed_in_the_front_end(engines["bad_setting"])


def test_a_calibration_for_another_model_fails_at_engine_start(engines):
    out = failed_in_the_front_end(engines["other_model"])
    assert "calibration" in out and "another model" in out, out[-2000:]


# 32 requests of 15-100 prompt tokens and 48 new ones (EOS ignored) in a pool of 8 blocks
# (512 tokens, 3 requests' worth): vLLM must preempt and recompute requests to finish them.
SOAK = [BASE * (1 + i % 7) + f"Question {i}: what is {i} times {i + 3}?" for i in range(32)]
SOAK_BLOCKS = 8
SOAK_OVER = {
    "llm": {
        "num_gpu_blocks_override": SOAK_BLOCKS,
        "max_model_len": 256,
        "max_num_seqs": 32,
        "max_num_batched_tokens": 256,
    },
    "max_tokens": 48,
    "ignore_eos": True,
}


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every engine run of this module, started together (see ``run_engines``)."""
    if not os.environ.get("ROTATEKV_VLLM_MODEL"):
        pytest.skip("ROTATEKV_VLLM_MODEL not set (make test-vllm sets it)")
    tmp = tmp_path_factory.mktemp("vllm")
    layers, heads, d = model_dims()
    cal = calibration(tmp / "cal.safetensors", layers, heads, d)
    other = calibration(tmp / "other.safetensors", layers + 2, heads, d)
    # Longest first, so the short ones fill the gaps at the end.
    jobs = {
        "soak_cpu_attn": (None, False, SOAK, SOAK_OVER),
        "soak_rkv16": ({"bits": 16}, True, SOAK, SOAK_OVER),
        "soak_rkv2": ({"bits": 2}, True, SOAK, SOAK_OVER),
        "cpu_attn": (None, False),
        "installed": (None, True),
        "rkv16": ({"bits": 16}, True),
        "rkv2": ({"bits": 2}, True),
        "rkv8_pre_rope": ({"bits": 8, "calibration": cal}, True),
        "bad_setting": ({"bitz": 2}, True),
        "other_model": ({"bits": 2, "calibration": other}, True),
    }
    return run_engines(jobs, tmp)


@pytest.fixture(scope="module")
def runs(engines) -> dict[str, dict]:
    names = ("cpu_attn", "installed", "rkv16", "rkv2", "rkv8_pre_rope")
    return {n: result(engines[n]) for n in names}


@pytest.fixture(scope="module")
def soak(engines) -> dict[str, dict]:
    return {n: result(engines["soak_" + n]) for n in ("cpu_attn", "rkv16", "rkv2")}


def test_preemption_soak_loses_nothing(soak):
    for name, r in soak.items():
        assert r["blocks"] == SOAK_BLOCKS, name
        assert r["preemptions"] > 0, f"{name}: the pool was large enough to avoid preemption"
        assert [len(t) for t in r["tokens"]] == [48] * len(SOAK), name


def test_16bit_cells_under_preemption_give_vllms_greedy_tokens(soak):
    """Preempted requests are recomputed into fresh blocks: 16-bit cells still give
    CPU_ATTN's tokens (up to ties)."""
    same_greedy_tokens(soak["cpu_attn"], soak["rkv16"])


# Gemma 3 270M: 4 query heads and one KV head of 256, five sliding-window layers (512
# tokens) to each global one, RoPE bases per layer type. The long prompt crosses the window.
TP_PROMPTS = PROMPTS + [BASE * 55 + "Summarize the instructions above in one sentence."]


@pytest.fixture(scope="module")
def tensor_parallel(tmp_path_factory) -> dict[str, dict]:
    """Gemma 3 with a pre-RoPE calibration of the whole model at 8 bits (and the 16-bit
    window), on one rank and on two (each rank's worker on its own core), one after the
    other (the second needs both cores). 8 bits: two ranks add their partial sums in another
    order, which moves activations by bf16 ulps; at 2 bits such a move can flip a code, and
    the tokens then part at a real gap (measured: step 10, 0.75), as a 2-bit cache and any
    other cache computed from slightly different keys would."""
    if not os.environ.get("ROTATEKV_VLLM_GEMMA"):
        pytest.skip("ROTATEKV_VLLM_GEMMA not set (make test-vllm sets it)")
    tmp = tmp_path_factory.mktemp("vllm_tp")
    layers, heads, d = model_dims("ROTATEKV_VLLM_GEMMA")
    cal = calibration(tmp / "gemma.safetensors", layers, heads, d)
    config = {"bits": 8, "calibration": cal}
    out = {}
    for tp, cpus in ((1, "0"), (2, "0|1")):
        over = {"llm": {"tensor_parallel_size": tp}}
        p = run_engine(config, tmp, True, TP_PROMPTS, over, cpus, "ROTATEKV_VLLM_GEMMA")
        out[f"tp{tp}"] = result(p)
    return out


def test_tensor_parallel_2_gives_the_tokens_of_1(tensor_parallel):
    """Each rank holds a replica of Gemma's one KV head, packed with its part of the
    whole-model calibration: two ranks give one rank's greedy tokens (up to ties: vLLM's own
    backend parts at an exact tie, a gap of 0.0, between one rank and two)."""
    one, two = tensor_parallel["tp1"], tensor_parallel["tp2"]
    assert one["blocks"] == two["blocks"], (one["blocks"], two["blocks"])
    same_greedy_tokens(one, two)


def test_readme_example_runs_as_written():
    """The README's vLLM block as written (``DIR``: the packaged model), then a greedy
    continuation from the engine it builds: a 2-bit cache that still knows the answer."""
    import re

    model = os.environ.get("ROTATEKV_VLLM_MODEL")
    if not model:
        pytest.skip("ROTATEKV_VLLM_MODEL not set (make test-vllm sets it)")
    text = (HERE.parents[1] / "README.md").read_text()
    start = text.index("## Serving with vLLM")
    block = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert block, "no python block under '## Serving with vLLM'"
    script = (
        f"DIR = {model!r}\n{block.group(1)}\n"
        "from vllm import SamplingParams\n"
        "sp = SamplingParams(max_tokens=8, temperature=0.0)\n"
        "out = llm.generate(['The capital of France is'], sp)\n"
        "print('TEXT', repr(out[0].outputs[0].text))\n"
    )
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    env.pop(rkv_vllm.ENV, None)
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=1500, env=env
    )
    lines = [x for x in r.stdout.splitlines() if x.startswith("TEXT ")]
    assert r.returncode == 0 and lines, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Paris" in lines[-1], lines[-1]
