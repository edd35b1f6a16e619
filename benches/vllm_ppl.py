"""Perplexity of the KV cache inside vLLM (``prompt_logprobs``) against ``rotatekv eval
--protocol decode`` on the same windows of the packaged text (issue 19).

    .venv/bin/python benches/vllm_ppl.py --calibration CAL --out benches/results/F.json

runs, one process each: the windows (main virtualenv, as ``rotatekv eval`` cuts them), vLLM
with its own CPU backend and with rotatekv settings (``.venv-vllm``), then ``rotatekv eval``
of ``fp16`` and ``rotatekv2`` with the same calibration. A calibration for this comparison
is made with ``rotatekv calibrate --key-layout per_token --no-sinks --wider-fraction 0``
(what paged blocks hold today). vLLM runs in float32, as the evaluation does.

``run`` is the vLLM step alone: ``python benches/vllm_ppl.py run MODEL WINDOWS CONFIG``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from vllm_engine import engine, log, progress


def run_vllm(model: str, windows_file: str, config: str) -> None:
    """One engine: the windows' prompt log-probabilities; prints ``RESULT {nll, tokens}``."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    cfg = json.loads(config)
    windows = json.loads(Path(windows_file).read_text())["windows"]
    kw = {} if cfg is None else {"additional_config": {"rotatekv": cfg}}
    llm = LLM(
        model=model,
        enforce_eager=True,
        block_size=64,
        max_model_len=max(len(w) for w in windows) + 8,
        dtype="float32",
        enable_prefix_caching=False,
        max_num_batched_tokens=512,
        seed=0,
        **kw,
    )
    progress(f"engine up; prompt log-probabilities of {len(windows)} windows")
    t0 = time.perf_counter()
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=w) for w in windows],
        SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0),
    )
    nll, n = 0.0, 0
    for w, o in zip(windows, outs, strict=True):
        for tok, d in zip(w[1:], o.prompt_logprobs[1:], strict=True):
            nll -= d[tok].logprob
            n += 1
    blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    res = {"nll": nll, "tokens": n, "seconds": time.perf_counter() - t0, "blocks": blocks}
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--window-len", type=int, default=512)
    a = ap.parse_args()
    import torch

    from rotatekv.tools import models, text

    log("windows: cutting the packaged text as `rotatekv eval` does")
    model_dir = str(models.model_dir())
    _, tok = models.load(None)
    docs = text.load_texts(None)
    windows, _ = text.split_windows(tok, docs, a.windows, 8, a.window_len)
    wfile = Path(a.out).with_suffix(".windows.json")
    wfile.write_text(json.dumps({"windows": windows.tolist()}))
    del tok, docs
    cal = os.path.abspath(a.calibration)
    runs = {
        "cpu_attn": (None, False),
        "rotatekv16": ({"bits": 16}, True),
        "rotatekv2_post_rope_no_window": ({"bits": 2, "residual": 0}, True),
        "rotatekv2_post_rope": ({"bits": 2}, True),
        "rotatekv2_calibrated": ({"bits": 2, "calibration": cal}, True),
    }
    res: dict[str, dict] = {}
    for name, (cfg, plugin) in runs.items():
        log(f"vLLM {name}: engine start (~1-2 min) and {a.windows} windows")
        r = engine(__file__, [model_dir, str(wfile)], cfg, plugin)
        r["ppl"] = math.exp(r["nll"] / r["tokens"])
        res[name] = r
        log(f"  ppl {r['ppl']:.4f} ({r['tokens']} tokens, {r['blocks']} blocks)")
    log("rotatekv eval --protocol decode: fp16 and rotatekv2 with the same calibration")
    ev_json = Path(a.out).with_suffix(".eval.json")
    cmd = [sys.executable, "-m", "rotatekv", "eval", "--methods", "fp16,rotatekv2"]
    cmd += ["--protocol", "decode", "--calibration", cal, "--json", str(ev_json)]
    cmd += ["--windows", str(a.windows), "--window-len", str(a.window_len)]
    subprocess.run(cmd, check=True)
    ev = {r["method"]: r for r in json.loads(ev_json.read_text())["results"]}
    ev_json.unlink()  # kept whole in the output below
    wfile.unlink()
    ours = res["rotatekv2_calibrated"]["ppl"]
    summary = {
        "eval_fp16_ppl": ev["fp16"]["ppl"],
        "eval_rotatekv2_ppl": ev["rotatekv2"]["ppl"],
        "vllm_vs_eval_rotatekv2": ours / ev["rotatekv2"]["ppl"] - 1,
        "vllm_vs_vllm_cpu_attn": ours / res["cpu_attn"]["ppl"] - 1,
        "vllm_vs_eval_fp16": ours / ev["fp16"]["ppl"] - 1,
    }
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}",
        "model": "SmolLM2-135M-Instruct (packaged GGUF, float32)",
        "windows": a.windows,
        "window_len": a.window_len,
        "calibration": os.path.basename(cal),
        "vllm": res,
        "eval": ev,
        "summary": summary,
    }
    Path(a.out).write_text(json.dumps(out, indent=1))
    log(json.dumps(summary, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        run_vllm(*sys.argv[2:5])
    else:
        main()
