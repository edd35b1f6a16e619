"""One layer's attention with the 16-bit recent window, as vLLM's worker runs it (SmolLM2-135M
shapes: 9 query heads, 3 KV heads of 64, bf16, blocks of 64): the fused kernel
(``recent.attend`` on a CPU pool), the torch composition it replaced
(``recent.attend_composed``) and the packed pool alone (``paged.attend``, no window), for
decode (8 requests at ~2.1k context) and one 2048-token prefill chunk. Times are medians of
repeated calls on one thread, in the same run; ``begin`` (once per step, shared by the
layers) is timed on its own.

    .venv/bin/python benches/recent_bench.py --out benches/results/recent_bench_DATE.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

# One thread for rotatekv's kernels too (vLLM's CPU worker binds one core here); set before
# the extension starts its thread pool.
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import torch  # noqa: E402

from rotatekv import RotationPlan, paged, recent  # noqa: E402

HQ, H, D, BS, R = 9, 3, 64, 64, 32


def timeit(fn: Any, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def case(name: str, lens: list[int], qlen: list[int], reps: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    fmt = paged.BlockFormat(H, D, bits=2, block_size=BS, fp_format="bfloat16")
    plan = RotationPlan.hadamard(1, H, D, mode="post_rope")
    nblk = [-(-n // BS) for n in lens]
    table = torch.zeros(len(lens), max(nblk), dtype=torch.int32)
    slots_all, at = [], 0
    for b, n in enumerate(lens):
        blk = torch.arange(at, at + nblk[b])
        at += nblk[b]
        table[b, : nblk[b]] = blk
        pos = torch.arange(n)
        slots_all.append(blk[pos // BS] * BS + pos % BS)
    pool = fmt.new_pool(at)
    rw = recent.RecentWindow(R, BS, 1, H, D, capacity=256 * (R + 8), dtype=torch.bfloat16)
    step: dict[str, Any] = {}
    for first in (True, False):
        sl = [n - q if first else n for n, q in zip(lens, qlen, strict=True)]
        ql = [n - q if first else q for n, q in zip(lens, qlen, strict=True)]
        qsl = torch.tensor([0] + torch.tensor(ql).cumsum(0).tolist(), dtype=torch.int32)
        slots = torch.cat([s[a - q : a] for s, a, q in zip(slots_all, sl, ql, strict=True)])
        t = int(qsl[-1])
        k = torch.randn(t, H, D, generator=g).bfloat16()
        v = torch.randn(t, H, D, generator=g).bfloat16()
        q = torch.randn(t, HQ, D, generator=g).bfloat16()
        lens_t = torch.tensor(sl, dtype=torch.int32)
        rw.begin(object(), qsl, lens_t, table, slots, pool.shape[0] * BS)
        paged.write(pool, fmt, k, v, slots, plan=plan)
        rw.store(0, k, v)
        step = dict(q=q, k=k, v=v, qsl=qsl, lens=lens_t, slots=slots)
    q, k, v = step["q"], step["k"], step["v"]
    out = torch.empty_like(q)
    args = (rw, 0, pool, fmt, q, k, v, table)
    kw = dict(scale=0.125, plan=plan)
    got = recent.attend(*args, **kw, out=out).float()
    ref = recent.attend_composed(*args, **kw)
    err = float((got - ref).abs().max())
    nslots = pool.shape[0] * BS

    def begin() -> None:
        rw._meta = None
        rw.begin(object(), step["qsl"], step["lens"], table, step["slots"], nslots)

    res = {
        "case": name,
        "requests": len(lens),
        "context": lens,
        "queries": qlen,
        "max_abs_diff_fused_vs_composed": err,
        "ms": {
            "fused": 1e3 * timeit(lambda: recent.attend(*args, **kw, out=out), reps),
            "composed": 1e3 * timeit(lambda: recent.attend_composed(*args, **kw), reps),
            "packed_only": 1e3
            * timeit(
                lambda: paged.attend(
                    pool, fmt, q, table, step["lens"], step["qsl"], plan=plan, scale=0.125, out=out
                ),
                reps,
            ),
            "begin_per_step": 1e3 * timeit(begin, reps),
        },
    }
    print(json.dumps(res), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="JSON file for the results")
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    torch.set_num_threads(1)

    cases = [
        case("decode", [2112 + 7 * i for i in range(8)], [1] * 8, a.reps),
        case("prefill_chunk", [2048], [2048], max(3, a.reps // 6)),
    ]
    doc = {
        "bench": "recent_bench",
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "threads": 1,
        "shapes": {"hq": HQ, "hkv": H, "d": D, "block": BS, "residual": R, "bits": 2},
        "cases": cases,
    }
    if a.out:
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
