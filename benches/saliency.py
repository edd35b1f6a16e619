"""Attention mass of a prefill chunk (what the ``saliency`` and ``akvq`` policies read):
rotatekv's kernel against torch computing the same from attention maps.

Shapes: the default model's (SmolLM2-135M: 9 query / 3 KV heads of 64 channels), causal
prefill chunks of ``--tokens`` tokens, ``--batch`` sequences, every query counted (lag 0).
Variants:

* ``rotatekv``: :func:`rotatekv.saliency.attention_mass` on CPU tensors (the Rust kernel: one
  score row per query, never a map);
* ``torch dense``: ``softmax(q k^T / sqrt(D) + causal mask)`` materialized per batch
  (``[B, Hq, T, T]`` float32), summed over heads and queries.

Timing: one warm-up call per variant (also checks agreement with the dense result), then
``--repeats`` rounds in which every variant runs once, in an order rotated each round; the
table shows the best and median time and the speedup ``t_dense / t`` (above 1: faster than
the dense torch baseline). ``map MB`` is the attention map the dense baseline holds at once.

Run: ``.venv/bin/python benches/saliency.py [--tokens 512,2048] [--batch 8] [--repeats 5]``.
"""

from __future__ import annotations

import os

# See attend_cpu.py: idle OpenMP workers would slow the call after a torch op.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import functools
import platform
import statistics
import time
from collections.abc import Callable

import torch

from rotatekv.saliency import attention_mass

HQ, HKV, D = 9, 3, 64


def dense(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    b, hq, t, d = q.shape
    kx = k.repeat_interleave(hq // k.shape[1], dim=1)
    s = (q @ kx.transpose(-1, -2)) * d**-0.5
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1).sum(dim=(1, 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="512,2048")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); B={args.batch}, Hq={HQ}, Hkv={HKV}, D={D}"
    )
    print("| tokens | variant | best ms | median ms | x dense | map MB | max rel diff |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for t in (int(x) for x in args.tokens.split(",")):
        q = torch.randn(args.batch, HQ, t, D, generator=g)
        k = torch.randn(args.batch, HKV, t, D, generator=g)
        variants: dict[str, Callable[[], torch.Tensor]] = {
            "torch dense": functools.partial(dense, q, k),
            "rotatekv": functools.partial(lambda a, b: attention_mass(a, b).mass, q, k),
        }
        ref = variants["torch dense"]()
        diff = {n: float((f() - ref).abs().max() / ref.abs().max()) for n, f in variants.items()}
        times: dict[str, list[float]] = {n: [] for n in variants}
        names = list(variants)
        for r in range(args.repeats):
            for n in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                variants[n]()
                times[n].append(time.perf_counter() - t0)
        base = min(times["torch dense"])
        map_mb = args.batch * HQ * t * t * 4 / 1e6
        for n in names:
            best = min(times[n])
            print(
                f"| {t} | {n} | {1e3 * best:.1f} | {1e3 * statistics.median(times[n]):.1f} | "
                f"{base / best:.2f} | {map_mb if n == 'torch dense' else 0:.0f} | "
                f"{diff[n]:.1e} |"
            )


if __name__ == "__main__":
    main()
