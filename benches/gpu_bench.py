"""GPU benchmarks of the CUDA backend, each a ratio against a baseline measured in the same
run (torch SDPA over bf16 K/V, a device-to-device copy of the same bytes).

    python benches/gpu_bench.py --json bench-out/gpu_bench.json

- decode attention over a 2-bit store (pre-RoPE grouped Hadamard and post-RoPE per-head
  plans) and over a 2-bit caller-owned pool (``rotatekv.paged``, blocks of 64 in random
  order, block tables read on the device, as a serving engine calls it) against
  ``F.scaled_dot_product_attention`` over bf16 K/V, 32 query / 8 KV heads of 128, contexts
  4k..128k, batch 1..64 (cases whose bf16 cache would not fit are skipped);
- achieved bandwidth of that attention on the store's packed bytes, as a fraction of the
  measured copy bandwidth;
- the Hadamard kernel against a copy of the same bytes;
- append (rotate + quantize + pack) throughput.

Prints a markdown table and writes JSON. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

import rotatekv
import rotatekv.cuda as rc
from rotatekv import KVStore, RotationPlan, paged

HQ, HKV, D = 32, 8, 128


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn` over `repeats` runs (CUDA events), after two warm-ups."""
    fn()
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def copy_bandwidth(nbytes: int) -> float:
    """Bytes/s of a device-to-device copy (read + write counted once each as nbytes)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), 20)
    return nbytes / t


def make_store(mode: str, batch: int, ctx: int, chunk: int = 4096) -> KVStore:
    plan = RotationPlan.hadamard(1, HKV, D, mode=mode)
    inv = (1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)).tolist()
    s = KVStore(
        1,
        HKV,
        D,
        batch_size=batch,
        config=dict(bits=2, group_size=128),
        plan=plan,
        rope_inv_freq=inv if mode == "pre_rope" else None,
        device="cuda",
    )
    g = torch.Generator(device="cuda").manual_seed(0)
    for t0 in range(0, ctx, chunk):
        t = min(chunk, ctx - t0)
        k = torch.randn(batch, HKV, t, D, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(batch, HKV, t, D, device="cuda", dtype=torch.bfloat16, generator=g)
        s.append(0, k, v)
    return s


def make_pool(batch: int, ctx: int, device: str = "cuda", chunk: int = 4096):
    """A 2-bit pool of `batch` requests of `ctx` tokens (post-RoPE per-head plan), blocks in
    random order; returns (pool, fmt, plan, block_table, seq_lens, query_start_loc)."""
    dev = "cpu" if device == "emu" else device
    fmt = paged.BlockFormat(HKV, D, bits=2, block_size=64)
    plan = RotationPlan.hadamard(1, HKV, D, mode="post_rope")
    per = math.ceil(ctx / 64)
    pool = fmt.new_pool(batch * per, device=dev)
    table = torch.randperm(batch * per, device=dev).to(torch.int32).reshape(batch, per)
    g = torch.Generator(device=dev).manual_seed(0)
    for b in range(batch):
        for t0 in range(0, ctx, chunk):
            j = torch.arange(t0, min(ctx, t0 + chunk), device=dev)
            k = torch.randn(len(j), HKV, D, device=dev, dtype=torch.bfloat16, generator=g)
            v = torch.randn(len(j), HKV, D, device=dev, dtype=torch.bfloat16, generator=g)
            slots = table[b, j // 64].long() * 64 + j % 64
            paged.write(pool, fmt, k, v, slots, plan=plan, device=device)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    return pool, fmt, plan, table, lens, qsl


def bench_decode(contexts: list[int], batches: list[int], repeats: int, budget: float) -> list:
    rows = []
    free = torch.cuda.mem_get_info()[0]
    for ctx in contexts:
        for b in batches:
            kv_bytes = 2 * b * HKV * ctx * D * 2
            if kv_bytes * 1.3 > min(budget, free * 0.6):
                rows.append({"context": ctx, "batch": b, "skipped": "bf16 cache too large"})
                continue
            k = torch.randn(b, HKV, ctx, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            q = torch.randn(b, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
            t_sdpa = timed(
                lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                repeats,
            )
            del k, v
            for mode in ("post_rope", "pre_rope"):
                s = make_store(mode, b, ctx)
                t_store = timed(lambda s=s, q=q: s.attend(0, q), repeats)
                rows.append(
                    {
                        "context": ctx,
                        "batch": b,
                        "mode": mode,
                        "sdpa_ms": t_sdpa * 1e3,
                        "store_ms": t_store * 1e3,
                        "speedup": t_sdpa / t_store,
                        "store_bytes": s.nbytes,
                        "bf16_bytes": kv_bytes,
                        "store_gbps": s.nbytes / t_store / 1e9,
                        "sdpa_gbps": kv_bytes / t_sdpa / 1e9,
                    }
                )
                del s
                torch.cuda.empty_cache()
            pool, fmt, plan, table, lens, qsl = make_pool(b, ctx)
            qp = q[:, :, 0].contiguous()  # [B, Hq, D]: one query per request, token-major

            def run(pool=pool, fmt=fmt, plan=plan, table=table, lens=lens, qsl=qsl, qp=qp):
                paged.attend(pool, fmt, qp, table, lens, qsl, plan=plan, max_query_len=1)

            t_pool = timed(run, repeats)
            rows.append(
                {
                    "context": ctx,
                    "batch": b,
                    "mode": "paged",
                    "sdpa_ms": t_sdpa * 1e3,
                    "store_ms": t_pool * 1e3,
                    "speedup": t_sdpa / t_pool,
                    "store_bytes": pool.numel(),
                    "bf16_bytes": kv_bytes,
                    "store_gbps": pool.numel() / t_pool / 1e9,
                    "sdpa_gbps": kv_bytes / t_sdpa / 1e9,
                }
            )
            del pool
            torch.cuda.empty_cache()
    return rows


def bench_fwht(repeats: int) -> list:
    rows = []
    for n, rows_n in ((128, 1 << 20), (1024, 1 << 17), (4096, 1 << 15), (96, 1 << 20)):
        x = torch.randn(rows_n, n, device="cuda", dtype=torch.bfloat16)
        y = torch.empty_like(x)
        t_h = timed(lambda x=x: rc.hadamard(x), repeats)
        t_c = timed(lambda x=x, y=y: y.copy_(x), repeats)
        rows.append(
            {"n": n, "rows": rows_n, "fwht_ms": t_h * 1e3, "copy_ms": t_c * 1e3, "ratio": t_h / t_c}
        )
    return rows


def bench_append(repeats: int) -> list:
    rows = []
    for mode in ("post_rope", "pre_rope"):
        b, t = 8, 4096
        k = torch.randn(b, HKV, t, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)

        def run(mode: str = mode, b: int = b, k: torch.Tensor = k, v: torch.Tensor = v) -> None:
            s = make_store(mode, b, 0)
            s.append(0, k, v)

        secs = timed(run, repeats)
        rows.append({"mode": mode, "tokens": b * t, "seconds": secs, "tokens_per_s": b * t / secs})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="4096,32768,131072")
    ap.add_argument("--batches", default="1,8,16,64")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--budget-gib", type=float, default=60.0, help="largest bf16 cache to build")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not rc.is_available():
        raise SystemExit("gpu_bench: needs a CUDA GPU (rotatekv.cuda.is_available() is False)")
    t0 = time.time()
    copy_bw = copy_bandwidth(1 << 30)
    res = {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "rotatekv": rotatekv.__version__,
        "copy_gbps": copy_bw / 1e9,
        "decode": bench_decode(
            [int(x) for x in a.contexts.split(",")],
            [int(x) for x in a.batches.split(",")],
            a.repeats,
            a.budget_gib * 2**30,
        ),
        "fwht": bench_fwht(a.repeats),
        "append": bench_append(max(3, a.repeats // 3)),
    }
    res["seconds"] = time.time() - t0
    print(f"# GPU benchmarks ({res['gpu']}, {res['date']}, torch {res['torch']})\n")
    print(f"copy bandwidth: {res['copy_gbps']:.0f} GB/s\n")
    print("| context | batch | plan | SDPA bf16 ms | 2-bit ms | speedup | store GB/s | of copy |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res["decode"]:
        if "skipped" in r:
            print(f"| {r['context']} | {r['batch']} | - | skipped: {r['skipped']} | | | | |")
            continue
        frac = r["store_gbps"] * 1e9 / copy_bw
        print(
            f"| {r['context']} | {r['batch']} | {r['mode']} | {r['sdpa_ms']:.3f} | "
            f"{r['store_ms']:.3f} | {r['speedup']:.2f}x | {r['store_gbps']:.0f} | {frac:.0%} |"
        )
    print("\n| FWHT n | rows | ms | copy ms | ratio |\n|---|---|---|---|---|")
    for r in res["fwht"]:
        print(
            f"| {r['n']} | {r['rows']} | {r['fwht_ms']:.3f} | {r['copy_ms']:.3f} "
            f"| {r['ratio']:.2f} |"
        )
    print("\n| append plan | tokens | tokens/s |\n|---|---|---|")
    for r in res["append"]:
        print(f"| {r['mode']} | {r['tokens']} | {r['tokens_per_s']:.3g} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    assert math.isfinite(res["copy_gbps"])


if __name__ == "__main__":
    main()
