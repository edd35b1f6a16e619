"""Decode attention on the CPU: rotatekv's fused kernel over packed stores against torch over
float32 and bfloat16 K/V.

Shapes: 32 query / 8 KV heads of 128 channels, one query token (decode), every configuration
of ``--contexts`` x ``--batches``. Variants:

* rotatekv 2-bit, post-RoPE Hadamard (``RotationPlan.hadamard(mode="post_rope")``);
* rotatekv 2-bit, pre-RoPE grouped Hadamard (keys appended before RoPE, RoPE applied inside);
* rotatekv 4-bit, post-RoPE Hadamard;
* rotatekv 16-bit (float16, identity plan);
* rotatekv 2-bit post-RoPE paged: the same tokens in a caller-owned pool
  (``rotatekv.paged``, blocks of 64 in random order, read through a block table), the layout
  a serving engine hands the kernel; skipped on builds without ``rotatekv.paged``;
* torch ``scaled_dot_product_attention(..., enable_gqa=True)`` and a grouped
  matmul-softmax-matmul, each over float32 and over bfloat16 K/V.

The baseline of a dtype is the faster of the two torch variants over K/V of that dtype;
``x fp32`` and ``x bf16`` are speedups ``t_baseline / t`` (above 1: faster than torch).
``GB/s`` is bytes of cache read per second (``store.nbytes`` for rotatekv, K+V for torch),
``GFLOP/s`` counts ``4 * B * Hq * S * D`` flops per call, ``rel err`` is the relative L2 error
of the output against torch SDPA over float32 K/V (a sanity check: on these i.i.d. Gaussian
inputs 2-bit quantization alone gives errors near 1, as in ``rotatekv demo``; the kernel itself
matches attention over the store's dequantized tokens to ~1e-6).

Timing: one warm-up call per variant (which also gives ``rel err``), then ``--repeats``
rounds in which every variant runs once, in an order rotated each round so that drift (other
work, frequency, caches) hits all variants alike; the table shows the best time and the median.

Run: ``.venv/bin/python benches/attend_cpu.py [--contexts 4096,16384,65536] [--batches 1,8]
[--repeats 5] [--json PATH]``. Batch 8 at 64k holds about 10 GB at once (fp32 and bf16 K/V and
the four stores).
"""

from __future__ import annotations

import os

# libgomp's idle worker threads spin for a while after each torch op; on a 2-core machine
# they take a core away from whatever runs next (a rotatekv call right after a torch call ran
# 1.3-1.5x slower). Sleeping idle threads leave torch's own times unchanged (measured).
# Must be set before torch starts its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

import rotatekv
from rotatekv import KVStore
from rotatekv.tools import demo

HQ, HKV, D = 32, 8, 128
GQA = HQ // HKV
CHUNK = 4096  # tokens appended at a time while a store is built
ROPE_THETA = 500000.0


@dataclass
class Variant:
    """One measured implementation in one configuration."""

    name: str
    kind: str  # "rotatekv" or "torch"
    dtype: str  # K/V element type of torch variants; the store's bits for rotatekv
    nbytes: int
    fn: Callable[[], torch.Tensor]
    times: list[float] = field(default_factory=list)
    rel_err: float = float("nan")

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def parse_ints(s: str) -> list[int]:
    out = [int(x) for x in s.split(",") if x.strip()]
    if not out or any(x <= 0 for x in out):
        raise argparse.ArgumentTypeError(f"expected positive ints separated by commas: {s!r}")
    return out


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_inputs(
    batch: int, context: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys with a few outlier channels (what rotation is for), values, one query token."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, HKV, context, D, generator=gen)
    k[..., 5] *= 12.0
    k[..., 77] += 6.0
    v = torch.randn(batch, HKV, context, D, generator=gen)
    q = torch.randn(batch, HQ, 1, D, generator=gen)
    return k, v, q


def inv_freq() -> torch.Tensor:
    return 1.0 / (ROPE_THETA ** (torch.arange(0, D, 2, dtype=torch.float32) / D))


def build_store(k: torch.Tensor, v: torch.Tensor, bits: int, mode: str) -> KVStore:
    """A one-layer store of ``k, v`` appended ``CHUNK`` tokens at a time."""
    return demo.build_store(k, v, bits, mode, inv_freq(), chunk=CHUNK)


def sdpa_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    return run


def matmul_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Grouped attention: the 4 query heads of a KV head share one matmul against its keys."""
    b, hq, tq, d = q.shape
    qg = q.reshape(b, HKV, GQA * tq, d)
    kt = k.transpose(-1, -2)
    scale = d**-0.5

    def run() -> torch.Tensor:
        s = torch.matmul(qg, kt) * scale
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(v.dtype)
        return torch.matmul(p, v).reshape(b, hq, tq, d)

    return run


def build_pool(k: torch.Tensor, v: torch.Tensor, seed: int) -> tuple[Any, ...]:
    """The tokens of ``k, v`` in a 2-bit pool of blocks of 64 in random order, written with
    the post-RoPE Hadamard plan: (pool, fmt, plan, block_table, seq_lens)."""
    from rotatekv import RotationPlan, paged

    batch, hkv, context, d = k.shape
    fmt = paged.BlockFormat(hkv, d, bits=2, block_size=64)
    plan = RotationPlan.hadamard(1, hkv, d, mode="post_rope")
    per = -(-context // 64)
    ids = torch.randperm(batch * per, generator=torch.Generator().manual_seed(seed))
    table = ids.reshape(batch, per).to(torch.int32)
    pool = fmt.new_pool(batch * per)
    for b in range(batch):
        for t0 in range(0, context, CHUNK):
            t1 = min(context, t0 + CHUNK)
            j = torch.arange(t0, t1)
            slots = table[b, j // 64].long() * 64 + j % 64
            kt = k[b, :, t0:t1].transpose(0, 1)
            vt = v[b, :, t0:t1].transpose(0, 1)
            paged.write(pool, fmt, kt, vt, slots, plan=plan)
    return pool, fmt, plan, table, torch.full((batch,), context, dtype=torch.int32)


def paged_fn(parts: tuple[Any, ...], q: torch.Tensor) -> Callable[[], torch.Tensor]:
    from rotatekv import paged

    pool, fmt, plan, table, lens = parts
    b = q.shape[0]
    qt = q[:, :, 0].contiguous()  # [B, Hq, D]: one query token per request
    qsl = torch.arange(b + 1, dtype=torch.int32)

    def run() -> torch.Tensor:
        out = paged.attend(pool, fmt, qt, table, lens, qsl, plan=plan)
        return out[:, :, None]

    return run


def store_fn(store: KVStore, q: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        return store.attend(0, q)

    return run


def _has_paged() -> bool:
    try:
        import rotatekv.paged  # noqa: F401
    except ImportError:
        return False
    return True


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def measure(variants: list[Variant], repeats: int) -> None:
    """``repeats`` rounds of one call per variant, each round in a rotated order."""
    n = len(variants)
    for r in range(repeats):
        for i in range(n):
            var = variants[(i + r) % n]
            t0 = time.perf_counter()
            out = var.fn()
            var.times.append(time.perf_counter() - t0)
            del out


def run_config(context: int, batch: int, repeats: int, seed: int) -> dict[str, Any]:
    t_start = time.perf_counter()
    k, v, q = make_inputs(batch, context, seed)
    variants: list[Variant] = []
    for name, bits, mode in (
        ("rotatekv 2-bit post-RoPE", 2, "post_rope"),
        ("rotatekv 2-bit pre-RoPE", 2, "pre_rope"),
        ("rotatekv 4-bit post-RoPE", 4, "post_rope"),
        ("rotatekv 16-bit", 16, "none"),
    ):
        t0 = time.perf_counter()
        store = build_store(k, v, bits, mode)
        log(f"  built {name}: {store.nbytes / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")
        variants.append(Variant(name, "rotatekv", f"{bits}-bit", store.nbytes, store_fn(store, q)))
        del store
    if _has_paged():
        t0 = time.perf_counter()
        parts = build_pool(k, v, seed)
        nbytes = parts[0].numel()
        log(f"  built 2-bit paged pool: {nbytes / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")
        variants.append(
            Variant("rotatekv 2-bit post paged", "rotatekv", "2-bit", nbytes, paged_fn(parts, q))
        )
        del parts
    kv: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {
        "fp32": (q, k, v),
        "bf16": (q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)),
    }
    for tag, (qq, kk, vv) in kv.items():
        nbytes = kk.numel() * kk.element_size() + vv.numel() * vv.element_size()
        variants.append(Variant(f"torch SDPA {tag}", "torch", tag, nbytes, sdpa_fn(qq, kk, vv)))
        variants.append(Variant(f"torch matmul {tag}", "torch", tag, nbytes, matmul_fn(qq, kk, vv)))
    del k, v, kv
    # Reference output, and one call of every variant before timing (the warm-up).
    ref = next(var for var in variants if var.name == "torch SDPA fp32").fn()
    for var in variants:
        var.rel_err = rel_err(var.fn(), ref)
    del ref
    log(f"  timing {len(variants)} variants x {repeats} repeats")
    measure(variants, repeats)
    flops = 4.0 * batch * HQ * context * D
    base = {
        tag: min(
            (var for var in variants if var.kind == "torch" and var.dtype == tag),
            key=lambda var: var.best,
        )
        for tag in ("fp32", "bf16")
    }
    rows = []
    for var in variants:
        rows.append(
            {
                "name": var.name,
                "kind": var.kind,
                "dtype": var.dtype,
                "nbytes": var.nbytes,
                "times_s": var.times,
                "best_s": var.best,
                "median_s": var.median,
                "gb_per_s": var.nbytes / var.best / 1e9,
                "gflop_per_s": flops / var.best / 1e9,
                "speedup_vs_fp32": base["fp32"].best / var.best,
                "speedup_vs_bf16": base["bf16"].best / var.best,
                "rel_err_vs_sdpa_fp32": var.rel_err,
            }
        )
    result = {
        "context": context,
        "batch": batch,
        "baseline_fp32": {"name": base["fp32"].name, "best_s": base["fp32"].best},
        "baseline_bf16": {"name": base["bf16"].name, "best_s": base["bf16"].best},
        "variants": rows,
        "wall_s": time.perf_counter() - t_start,
    }
    variants.clear()
    del base, q
    gc.collect()
    return result


HEADER = (
    f"{'context':>7} {'B':>2}  {'variant':<25}{'MB':>9}{'best ms':>10}{'med ms':>10}"
    f"{'GB/s':>8}{'GFLOP/s':>9}{'x fp32':>8}{'x bf16':>8}{'rel err':>10}"
)


def print_config(res: dict[str, Any]) -> None:
    for row in res["variants"]:
        print(
            f"{res['context']:>7} {res['batch']:>2}  {row['name']:<25}"
            f"{row['nbytes'] / 1e6:>9.1f}{row['best_s'] * 1e3:>10.2f}"
            f"{row['median_s'] * 1e3:>10.2f}{row['gb_per_s']:>8.2f}"
            f"{row['gflop_per_s']:>9.2f}{row['speedup_vs_fp32']:>8.2f}"
            f"{row['speedup_vs_bf16']:>8.2f}{row['rel_err_vs_sdpa_fp32']:>10.2e}"
        )
    print(
        f"{'':>11}baselines: fp32 = {res['baseline_fp32']['name']}, "
        f"bf16 = {res['baseline_bf16']['name']}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=parse_ints, default=[4096, 16384, 65536])
    parser.add_argument("--batches", type=parse_ints, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=str, default=None, help="also write every number here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats: expected >= 1")
    info = rotatekv.build_info()
    meta = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "rotatekv": info,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "heads_q": HQ,
        "heads_kv": HKV,
        "head_dim": D,
        "tq": 1,
        "repeats": args.repeats,
        "statistic": "best of repeats (median also given)",
    }
    print(
        f"decode attention, {HQ} query / {HKV} KV heads of {D}, Tq = 1; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), rotatekv {info.get('version')} "
        f"(simd {info.get('simd')}, {info.get('threads')} threads); best of {args.repeats}"
    )
    print("x fp32 / x bf16: speedup t_baseline / t over the faster torch variant of that dtype")
    print(HEADER, flush=True)
    results = []
    for batch in args.batches:
        for context in args.contexts:
            log(f"context {context}, batch {batch}")
            res = run_config(context, batch, args.repeats, args.seed)
            print_config(res)
            results.append(res)
            if args.json:
                write_json(args.json, meta, results)
    return 0


def write_json(path: str, meta: dict[str, Any], results: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())
