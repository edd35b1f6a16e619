"""The main job (``rotatekv demo``): RotateKV on the packaged default model.

Calibrates on Wikipedia text, evaluates ``fp16``, ``kivi2``, ``quarot2`` and ``rotatekv2``
with both protocols on a few windows, generates a short continuation with the 2-bit cache,
and prints the table with the memory each cache holds.
"""

from __future__ import annotations

import time

import torch

from .. import hf as rh
from . import eval as ev
from . import models, text

DEMO_METHODS = "fp16,kivi2,quarot2,rotatekv2"
PROMPT = "The history of the printing press begins"


def run_model_demo(
    windows: int = 4, window_len: int = 512, calib_windows: int = 4, progress: bool = True
) -> None:
    """Runs the demo; ``progress=False``: no progress bars (the steps and results still
    print)."""
    t0 = time.perf_counter()
    print(
        "rotatekv demo: SmolLM2-135M-Instruct (packaged GGUF), Wikipedia text from gensim.\n"
        f"Steps: load the model (the first run converts the GGUF once, ~1 min); calibrate "
        f"rotatekv2 on {calib_windows} windows; perplexity of {DEMO_METHODS} on {windows} "
        f"windows of {window_len} tokens, one forward per window (fake) and token by token "
        "(decode); two continuations, 16-bit and 2-bit. About 9-10 minutes on 2 idle cores.",
        flush=True,
    )
    model, tok = models.load(progress=progress)
    docs = text.load_texts()
    ev_w, cal_w = text.split_windows(tok, docs, windows, calib_windows, window_len)
    print(
        f"{windows} evaluation windows x {window_len} tokens, {calib_windows} calibration "
        f"windows (disjoint text); torch threads {torch.get_num_threads()}",
        flush=True,
    )
    from ..calibrate import collect

    spec = rh.model_spec(model)
    t1 = time.perf_counter()
    data = collect(model, cal_w, progress=progress)
    ours = ev.build(
        ev.METHODS["rotatekv2"], spec, data, progress=progress, model=model, calib=cal_w
    )
    del data
    print(f"calibrated rotatekv2 in {time.perf_counter() - t1:.0f} s", flush=True)
    rows = ev.evaluate(
        model,
        ev_w,
        ev.parse_methods(DEMO_METHODS),
        ["fake", "decode"],
        prebuilt={"rotatekv2": ours},
        batch=min(windows, 8),
        progress=progress,
    )
    print()
    print(ev.table(rows))
    fp = next(r for r in rows if r["method"] == "fp16" and r["protocol"] == "decode")
    rk = next(r for r in rows if r["method"] == "rotatekv2" and r["protocol"] == "decode")
    print(
        f"\nKV cache of one {window_len}-token window: fp16 store {fp['kv_bytes'] / 1e6:.2f} MB, "
        f"rotatekv2 {rk['kv_bytes'] / 1e6:.2f} MB ({fp['kv_bytes'] / rk['kv_bytes']:.1f}x "
        f"less allocated; {rk['effective_bits']:.2f} effective bits per element vs "
        f"{fp['effective_bits']:.2f})"
    )
    # A continuation with the 2-bit cache, beside the 16-bit one.
    enc = tok([PROMPT], return_tensors="pt")
    for name, (plan, cfg) in (
        ("fp16", ev.build(ev.METHODS["fp16"], spec, None)),
        ("rotatekv2", ours),
    ):
        rh.enable(model, plan, cfg)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=40, do_sample=False)
        rh.disable(model)
        cont = tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
        print(f"\n[{name}] {PROMPT}{cont}")
    print(f"\ndone in {time.perf_counter() - t0:.0f} s")
