"""The demonstration on synthetic data: memory and decode-attention speed of the packed
2-bit store against a 16-bit store and torch's attention over fp32/bf16 K/V, with the
output error of each against a float64 reference."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch

from .. import KVStore, QuantConfig, RotationPlan
from .._rope import unrope

HQ, HKV, D = 32, 8, 128


def _time(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _keys(batch: int, context: int, gen: torch.Generator) -> torch.Tensor:
    # Real keys have a few large outlier channels; rotation is there to spread them.
    k = torch.randn(batch, HKV, context, D, generator=gen)
    k[..., 5] *= 12.0
    k[..., 77] += 6.0
    return k


def run_demo(context: int = 16384, batch: int = 1, repeats: int = 5) -> None:
    """Prints the comparison table."""
    gen = torch.Generator().manual_seed(0)
    k = _keys(batch, context, gen)
    v = torch.randn(batch, HKV, context, D, generator=gen)
    q = torch.randn(batch, HQ, 1, D, generator=gen)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), enable_gqa=True
    )
    print(f"rotatekv demo: batch {batch}, context {context}, {HQ} query / {HKV} KV heads of {D}")
    print(f"{'cache':<34}{'KV bytes':>14}{'bits/elem':>11}{'attend ms':>11}{'rel err':>10}")
    fp32_bytes = k.numel() * 4 * 2
    rows = []
    for name, dtype in (
        ("torch SDPA, fp32 K/V", torch.float32),
        ("torch SDPA, bf16 K/V", torch.bfloat16),
    ):
        kk, vv, qq = k.to(dtype), v.to(dtype), q.to(dtype)
        sdpa = functools.partial(
            torch.nn.functional.scaled_dot_product_attention, qq, kk, vv, enable_gqa=True
        )

        t = _time(sdpa, repeats)
        err = ((sdpa().double() - ref).norm() / ref.norm()).item()
        nbytes = k.numel() * kk.element_size() * 2
        rows.append((name, nbytes, 8.0 * kk.element_size(), t, err))
    for name, bits, mode in (
        ("rotatekv 16-bit", 16, "none"),
        ("rotatekv 4-bit, post-RoPE Hadamard", 4, "post_rope"),
        ("rotatekv 2-bit, post-RoPE Hadamard", 2, "post_rope"),
        ("rotatekv 2-bit, pre-RoPE grouped", 2, "pre_rope"),
    ):
        store = build_store(k, v, bits, mode, inv_freq)

        att = functools.partial(store.attend, 0, q)

        t = _time(att, repeats)
        err = ((att().double() - ref).norm() / ref.norm()).item()
        rows.append((name, store.nbytes, store.bits_per_element(), t, err))
    qg = q.view(batch, HKV, HQ // HKV, D)  # the query heads sharing a KV head, as rows
    scale = D**-0.5

    def matmul_softmax() -> torch.Tensor:
        w = torch.softmax((qg @ k.transpose(-1, -2)) * scale, dim=-1)
        return (w @ v).view(batch, HQ, 1, D)

    t = _time(matmul_softmax, repeats)
    err = ((matmul_softmax().double() - ref).norm() / ref.norm()).item()
    rows.insert(1, ("torch matmul-softmax, fp32 K/V", fp32_bytes, 32.0, t, err))
    for name, nbytes, bpe, t, err in rows:
        print(f"{name:<34}{nbytes:>14,}{bpe:>11.2f}{t * 1e3:>11.2f}{err:>10.4f}")
    # The baseline is the faster of torch's two fp32 attentions.
    base = min(rows[0][3], rows[1][3])
    print(
        "rel err: |out - ref| / |ref| against float64 attention over the unquantized K/V. "
        "I.i.d. Gaussian data\nis the worst case for 2 bits (nothing for rotation to spread); "
        "real-model accuracy is measured on a model, not here."
    )
    print()
    for name, nbytes, _, t, _ in rows[3:]:
        print(
            f"{name:<34} memory {fp32_bytes / nbytes:5.1f}x smaller than fp32, "
            f"attend {base / t:5.2f}x the speed of torch over fp32"
        )


def build_store(
    k: torch.Tensor,
    v: torch.Tensor,
    bits: int,
    mode: str,
    inv_freq: torch.Tensor,
    chunk: int = 4096,
) -> KVStore:
    """A one-layer store of post-RoPE ``k, v`` ``[B, Hkv, T, D]``, appended ``chunk`` tokens at
    a time. Mode ``"none"`` uses no rotation; ``"pre_rope"`` appends the keys with RoPE undone,
    since the store applies RoPE itself at each key's position."""
    batch, hkv, context, d = k.shape
    if mode == "none":
        plan = RotationPlan.identity(1, hkv, d)
    else:
        plan = RotationPlan.hadamard(1, hkv, d, mode=mode)
    store = KVStore(
        1,
        hkv,
        d,
        batch_size=batch,
        config=QuantConfig(bits=bits),
        plan=plan,
        rope_inv_freq=inv_freq if mode == "pre_rope" else None,
    )
    for t0 in range(0, context, chunk):
        t1 = min(context, t0 + chunk)
        kc = k[:, :, t0:t1]
        if mode == "pre_rope":
            kc = unrope(kc, torch.arange(t0, t1)[None], inv_freq)
        store.append(0, kc, v[:, :, t0:t1])
    return store
