"""rotatekv inside vLLM (CPU build): run by ``make test-vllm`` in its own virtualenv
(``.venv-vllm``, requirements-vllm.txt) with ``ROTATEKV_VLLM_MODEL`` naming a transformers
directory of the packaged SmolLM2; skipped where vLLM is not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
# Two logits closer than this are a tie for greedy decoding: bf16 attention summed in another
# order (vLLM's kernel and rotatekv's) may pick either.
TIE = 0.1


def test_settings_are_checked_and_name_the_key(monkeypatch):
    monkeypatch.delenv(rkv_vllm.ENV, raising=False)
    assert rkv_vllm.settings({}) is None
    assert rkv_vllm.settings({"rotatekv": {"key_bits": 4, "value_bits": 2}})["key_bits"] == 4
    for cfg, word in [
        ({"bitz": 2}, "bitz"),
        ({"bits": 5}, "bits"),
        ({"value_bits": 1}, "value_bits"),
        ([2], "rotatekv"),
    ]:
        with pytest.raises(ArgumentError, match=word):
            rkv_vllm.settings({"rotatekv": cfg})
    monkeypatch.setenv(rkv_vllm.ENV, '{"bits": 4}')
    assert rkv_vllm.settings(None)["bits"] == 4
    monkeypatch.setenv(rkv_vllm.ENV, "{bits: 4")
    with pytest.raises(ArgumentError, match=rkv_vllm.ENV):
        rkv_vllm.settings(None)


def run_engine(config, tmp_path: Path, plugin: bool = True) -> subprocess.CompletedProcess:
    """One engine in its own process; ``plugin=False`` keeps vLLM from loading rotatekv's
    entry point at all (vLLM as if rotatekv were not installed)."""
    model = os.environ.get("ROTATEKV_VLLM_MODEL")
    if not model:
        pytest.skip("ROTATEKV_VLLM_MODEL not set (make test-vllm sets it)")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    env.pop(rkv_vllm.ENV, None)
    if not plugin:
        env["VLLM_PLUGINS"] = "none"
    return subprocess.run(
        [sys.executable, str(HERE / "engine.py"), model, json.dumps(config), str(prompts)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )


def result(p: subprocess.CompletedProcess) -> dict:
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm")
    runs = {"cpu_attn": result(run_engine(None, tmp, plugin=False))}
    for name, cfg in [("installed", None), ("rkv16", {"bits": 16}), ("rkv2", {"bits": 2})]:
        runs[name] = result(run_engine(cfg, tmp))
    return runs


def test_installed_but_not_asked_for_changes_nothing(runs):
    assert runs["installed"] == runs["cpu_attn"]


def test_16bit_cells_give_vllms_greedy_tokens(runs):
    """Through vLLM's block tables, chunked prefill and shared prefix blocks, 16-bit cells
    give CPU_ATTN's tokens, up to the first step where CPU_ATTN's two best tokens tie."""
    base, ours = runs["cpu_attn"], runs["rkv16"]
    assert ours["blocks"] == base["blocks"]  # a 16-bit cell is bf16's K and V
    compared = 0
    for want, got, top2 in zip(base["tokens"], ours["tokens"], base["top2"], strict=True):
        for i, (w, g) in enumerate(zip(want, got, strict=True)):
            if top2[i][0] - top2[i][1] < TIE:
                break  # a tie: what follows may differ
            assert w == g, f"step {i}: {want} != {got}"
            compared += 1
    assert compared >= 0.75 * sum(len(t) for t in base["tokens"]), compared


def test_2bit_cells_hold_over_5x_the_tokens(runs):
    ratio = runs["rkv2"]["blocks"] / runs["cpu_attn"]["blocks"]
    assert ratio >= 5.0, ratio
    assert all(len(t) == 32 for t in runs["rkv2"]["tokens"])


def test_a_bad_setting_fails_at_engine_start_naming_it(tmp_path):
    p = run_engine({"bitz": 2}, tmp_path)
    assert p.returncode != 0 and "bitz" in p.stdout + p.stderr
