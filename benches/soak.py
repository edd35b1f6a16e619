"""Soak: append, attend, save/load, export and drop stores for a bounded time, tracking the
process RSS and the store's bytes. Every cycle runs the same workload, so what a store holds
at the end of a cycle must be the same each time and RSS must stay flat after warm-up.

    python benches/soak.py --seconds 300 --json bench-out/soak.json --check
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import threading
import time

import numpy as np
import torch

import rotatekv
from rotatekv import KVStore, QuantConfig, RotationPlan

LAYERS, BATCH, HKV, HQ, D = 4, 4, 4, 8, 64
PREFILL, DECODE = 256, 48


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cycle(gen: torch.Generator, tmp: str, counts: dict[str, int]) -> int:
    """One store's life; returns its bytes before it is dropped."""
    plan = RotationPlan.hadamard(LAYERS, HKV, D, mode="pre_rope")
    inv = 1.0 / (10000 ** (np.arange(0, D, 2) / D))
    store = KVStore(
        LAYERS,
        HKV,
        D,
        batch_size=BATCH,
        config=QuantConfig(bits=2, residual=16),
        plan=plan,
        rope_inv_freq=inv,
        max_tokens=PREFILL + DECODE,
    )
    k = torch.randn(BATCH, HKV, PREFILL, D, generator=gen)
    v = torch.randn(BATCH, HKV, PREFILL, D, generator=gen)
    protect = torch.zeros(BATCH, PREFILL, dtype=torch.bool)
    protect[:, 0] = True
    for layer in range(LAYERS):
        store.append(layer, k, v, protect=protect)
        counts["appends"] += 1
    # Readers attend while the main thread decodes (appends and attends never tear).
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        q = torch.randn(BATCH, HQ, 1, D)
        pos = torch.full((BATCH, 1), PREFILL + DECODE)
        try:
            while not stop.is_set():
                assert torch.isfinite(store.attend(0, q, positions=pos)).all()
                counts["attends"] += 1
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    th = threading.Thread(target=reader)
    th.start()
    for _ in range(DECODE):
        k1 = torch.randn(BATCH, HKV, 1, D, generator=gen)
        q = torch.randn(BATCH, HQ, 1, D, generator=gen)
        for layer in range(LAYERS):
            store.append(layer, k1, k1)
            out = store.attend(layer, q)
            assert torch.isfinite(out).all()
            counts["appends"] += 1
            counts["attends"] += 1
    stop.set()
    th.join()
    if errors:
        raise errors[0]
    # A full store refuses more and stays as it was.
    try:
        store.append(0, k1, k1)
        raise AssertionError("append past max_tokens succeeded")
    except rotatekv.CapacityError:
        counts["refusals"] += 1
    # Exports: taken, read, dropped.
    for b in range(BATCH):
        for buf in store.page_buffers(LAYERS - 1, b):
            t = torch.from_dlpack(buf)
            counts["export_bytes"] += int(t.numel())
            del t
    path = os.path.join(tmp, "soak.safetensors")
    store.save(path)
    back = KVStore.load(path)
    counts["saves"] += 1
    assert back.nbytes == store.nbytes
    store.reorder(list(reversed(range(BATCH))))
    store.truncate(PREFILL // 2)
    nbytes = back.nbytes
    store.clear()
    return nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--json", default=None, help="write the report here")
    ap.add_argument("--check", action="store_true", help="exit 1 on growth")
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    counts = dict.fromkeys(["appends", "attends", "saves", "refusals", "export_bytes"], 0)
    rss, held = [], []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        while time.perf_counter() - t0 < args.seconds or len(rss) < 6:
            held.append(cycle(gen, tmp, counts))
            gc.collect()
            rss.append(rss_bytes())
    seconds = time.perf_counter() - t0
    # Warm-up: allocator arenas and torch's caches settle in the first cycles.
    warm = max(2, len(rss) // 5)
    base = int(np.median(rss[warm : warm + 3]))
    final = int(np.median(rss[-3:]))
    growth = final - base
    report = {
        "seconds": round(seconds, 1),
        "iterations": len(rss),
        **counts,
        "store_nbytes": sorted(set(held)),
        "rss_start_bytes": rss[0],
        "rss_base_bytes": base,
        "rss_final_bytes": final,
        "rss_max_bytes": max(rss),
        "rss_growth_bytes": growth,
        "version": rotatekv.__version__,
    }
    print(json.dumps(report, indent=1))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    # Bounds: one fixed workload holds the same bytes every cycle; RSS may wobble by a few
    # MiB (allocator), not grow with the number of cycles.
    bad = []
    if len(set(held)) != 1:
        bad.append(f"store bytes differ between identical cycles: {sorted(set(held))}")
    if growth > max(16 << 20, base // 20):
        bad.append(f"RSS grew by {growth / 2**20:.1f} MiB after warm-up")
    for b in bad:
        print("FAIL:", b)
    if args.check and bad:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
