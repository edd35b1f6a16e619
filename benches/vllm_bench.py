"""Throughput of rotatekv inside vLLM against vLLM's own CPU backend, same run, same settings
(issue 19): offline ``LLM.generate`` of 8 requests of 2048 prompt tokens, 64 new tokens each.

    .venv/bin/python benches/vllm_bench.py --out benches/results/F.json

Each configuration is one engine in its own process (``.venv-vllm``). Prefill: fresh prompts
with ``max_tokens=1``. Decode: the same prompts again (their blocks now in the prefix cache,
so vLLM recomputes only each prompt's last block) with ``max_tokens=65``, less the time of the
same with ``max_tokens=1``: 64 steps of 8 requests at ~2k context. Run it alone: the machine
has 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from vllm_engine import engine, log, progress

REQUESTS, PROMPT, NEW = 8, 2048, 64


def peak_rss_mib() -> dict[str, float]:
    """Peak resident memory (VmHWM) of this process and its children (vLLM's engine core),
    by process name."""
    import psutil

    out: dict[str, float] = {}
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                hwm = next(x for x in f if x.startswith("VmHWM:"))
            out[p.name()] = max(out.get(p.name(), 0.0), int(hwm.split()[1]) / 1024)
        except (OSError, StopIteration, psutil.Error):
            continue
    return out


def run_vllm(model: str, config: str) -> None:
    """One engine: timings of prefill and decode; prints ``RESULT {...}``."""
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    cfg = json.loads(config)
    kw = {} if cfg is None else {"additional_config": {"rotatekv": cfg}}
    llm = LLM(
        model=model,
        enforce_eager=True,
        block_size=64,
        max_model_len=PROMPT + NEW + 64,
        dtype="bfloat16",
        enable_prefix_caching=True,
        max_num_batched_tokens=2048,
        max_num_seqs=REQUESTS,
        seed=0,
        **kw,
    )
    progress("engine up; warm-up")
    g = torch.Generator().manual_seed(0)
    vocab = llm.get_tokenizer().vocab_size

    made: dict[int, list] = {}

    def prompts(salt: int, again: bool = False) -> list:
        # Fresh token ids per salt (nothing cached from another run); again: the same ones.
        if not again:
            ids = torch.randint(100, vocab - 100, (REQUESTS, PROMPT), generator=g) + salt
            made[salt] = [TokensPrompt(prompt_token_ids=r.tolist()) for r in ids]
        return made[salt]

    llm.generate(prompts(0)[:1], SamplingParams(max_tokens=4), use_tqdm=False)  # warm up
    progress(f"prefill of {REQUESTS} x {PROMPT} tokens (minutes on a CPU)")
    t0 = time.perf_counter()
    llm.generate(prompts(1), SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    prefill = time.perf_counter() - t0
    one = SamplingParams(max_tokens=1, temperature=0.0)
    sp = SamplingParams(max_tokens=NEW + 1, temperature=0.0, ignore_eos=True)
    progress(f"prefill {prefill:.0f} s; {NEW} decode steps over the cached prompts")
    t0 = time.perf_counter()
    llm.generate(prompts(1, again=True), one, use_tqdm=False)
    recompute = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = llm.generate(prompts(1, again=True), sp, use_tqdm=False)
    total = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == NEW + 1 for o in outs)
    decode = total - recompute
    res = {
        "prefill_s": prefill,
        "recompute_last_block_s": recompute,
        "decode_s": decode,
        "prefill_tok_s": REQUESTS * PROMPT / prefill,
        "decode_tok_s": REQUESTS * NEW / decode,
        "blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
        "peak_rss_mib": peak_rss_mib(),
    }
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", default=None, help="comma list of run names (default: all)")
    a = ap.parse_args()
    from rotatekv.tools import models

    model = str(models.model_dir())
    runs = {
        "cpu_attn": (None, False),
        "rotatekv2": ({"bits": 2}, True),
        "rotatekv16": ({"bits": 16}, True),
        "rotatekv2_no_window": ({"bits": 2, "residual": 0}, True),
    }
    names = a.runs.split(",") if a.runs else list(runs)
    if "cpu_attn" not in names or any(n not in runs for n in names):
        sys.exit(f"--runs: expected names from {list(runs)}, cpu_attn among them")
    res = {}
    for name in names:
        cfg, plugin = runs[name]
        log(f"{name}: engine start (~1-2 min), {REQUESTS} x {PROMPT} prompt tokens, {NEW} new")
        res[name] = r = engine(__file__, [model], cfg, plugin)
        rss = ", ".join(f"{k} {v:.0f}" for k, v in r["peak_rss_mib"].items())
        log(f"  prefill {r['prefill_tok_s']:.0f} tok/s, decode {r['decode_tok_s']:.1f} tok/s")
        log(f"  peak RSS MiB: {rss}")
    base = res["cpu_attn"]
    for r in res.values():
        r["prefill_vs_cpu_attn"] = r["prefill_tok_s"] / base["prefill_tok_s"]
        r["decode_vs_cpu_attn"] = r["decode_tok_s"] / base["decode_tok_s"]
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPUs (run alone)",
        "model": "SmolLM2-135M-Instruct (packaged GGUF, bfloat16)",
        "requests": REQUESTS,
        "prompt_tokens": PROMPT,
        "new_tokens": NEW,
        "runs": res,
    }
    Path(a.out).write_text(json.dumps(out, indent=1))
    ratios = {k: (v["prefill_vs_cpu_attn"], v["decode_vs_cpu_attn"]) for k, v in res.items()}
    log(f"(prefill, decode) vs CPU_ATTN: {json.dumps(ratios)}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        run_vllm(*sys.argv[2:4])
    else:
        main()
