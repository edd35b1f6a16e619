"""The store's contents (quantization, rotations, precision classes, the recent window) and
its attention, against plain PyTorch references of the same format."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rotatekv
from reference import (
    QUANT_BITS,
    apply_rope,
    assert_same_snapshot,
    attend_reference,
    default_inv_freq,
    fp_round,
    keys_from_stored,
    keys_to_stored,
    make_kv,
    quantize_groups,
    quantize_per_channel,
    sdpa,
    snapshot,
    sorted_by_position,
    tokens,
    tolerance,
    values_to_stored,
)
from rotatekv import KVStore, QuantConfig, RotationPlan


def random_perm(gen: torch.Generator, layers: int, hkv: int, d: int, gh: int) -> np.ndarray:
    """A calibrated-looking key permutation: a random permutation per head group."""
    gl = gh * d
    rows = []
    for _ in range(layers):
        rows.append(
            np.concatenate([torch.randperm(gl, generator=gen).numpy() for _ in range(hkv // gh)])
        )
    return np.stack(rows).astype(np.int32)


# ============================================================================================
# Quantization format with an identity plan: exact
# ============================================================================================


@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("d,group", [(64, None), (64, 32), (128, 8), (128, 64), (256, 128)])
def test_identity_store_dequantizes_exactly_to_the_reference(gen, bits, d, group):
    hkv, t = 3, 37
    store = KVStore(
        2,
        hkv,
        d,
        batch_size=2,
        config=QuantConfig(bits=bits, group_size=group),
        plan=RotationPlan.identity(2, hkv, d),
    )
    k, v = make_kv(gen, 2, hkv, t, d)
    store.append(1, k, v)
    assert store.seq_lens(1) == [t, t]
    assert store.seq_lens(0) == [0, 0]
    for b in range(2):
        pos, kd, vd = store.dequantize(1, b)
        assert pos.dtype == np.int32 and kd.dtype == np.float32 and vd.dtype == np.float32
        assert kd.shape == (t, hkv, d) and vd.shape == (t, hkv, d)
        np.testing.assert_array_equal(pos, np.arange(t))
        rk = quantize_groups(tokens(k, b), bits, group or d)
        rv = quantize_groups(tokens(v, b), bits, group or d)
        np.testing.assert_array_equal(kd, rk.deq.numpy())
        np.testing.assert_array_equal(vd, rv.deq.numpy())
        # The comparison has power: quantization really changed the values, and the
        # reference at another bit width or group size gives different values.
        assert not np.array_equal(kd, tokens(k, b).numpy())
        other = quantize_groups(tokens(k, b), 16 - bits if bits < 8 else 4, group or d)
        assert not np.array_equal(kd, other.deq.numpy())
        # Half a step of error at most (plus the fp16 rounding of scale and zero).
        err = (torch.from_numpy(kd) - tokens(k, b)).abs()
        assert bool((err <= 0.5 * rk.scale + 1e-3 * (1 + tokens(k, b).abs())).all())


def test_clip_ratios_come_from_the_plan_per_layer_or_the_config(gen):
    hkv, d, t = 2, 64, 21
    plan = RotationPlan(
        2,
        hkv,
        d,
        mode="none",
        rotate_values=False,
        key_clip=[1.0, 0.8],
        value_clip=[0.9, 0.7],
    )
    k, v = make_kv(gen, 1, hkv, t, d)
    store = KVStore(2, hkv, d, config=QuantConfig(bits=4, group_size=32), plan=plan)
    over = KVStore(2, hkv, d, config=QuantConfig(bits=4, group_size=32, key_clip=0.6), plan=plan)
    for layer in range(2):
        store.append(layer, k, v)
        over.append(layer, k, v)
    for layer, (kc, vc) in enumerate([(1.0, 0.9), (0.8, 0.7)]):
        _, kd, vd = store.dequantize(layer, 0)
        np.testing.assert_array_equal(kd, quantize_groups(tokens(k, 0), 4, 32, kc).deq.numpy())
        np.testing.assert_array_equal(vd, quantize_groups(tokens(v, 0), 4, 32, vc).deq.numpy())
        _, kd2, vd2 = over.dequantize(layer, 0)
        np.testing.assert_array_equal(kd2, quantize_groups(tokens(k, 0), 4, 32, 0.6).deq.numpy())
        np.testing.assert_array_equal(vd2, vd)
    # Clipping changes the result (the test would notice a clip being ignored).
    assert not np.array_equal(store.dequantize(0, 0)[2], store.dequantize(1, 0)[2])
    assert store.plan.key_clip == pytest.approx([1.0, 0.8])


@pytest.mark.parametrize("group_heads", [1, 2, 4])
def test_mode_none_permutation_is_applied_exactly(gen, group_heads):
    hkv, d, t = 4, 64, 40
    perm = random_perm(gen, 2, hkv, d, group_heads)
    plan = RotationPlan(
        2, hkv, d, mode="none", group_heads=group_heads, rotate_values=False, key_perm=perm
    )
    np.testing.assert_array_equal(plan.key_perm, perm)
    store = KVStore(2, hkv, d, config=QuantConfig(bits=2, group_size=32), plan=plan)
    k, v = make_kv(gen, 1, hkv, t, d)
    for layer in range(2):
        store.append(layer, k, v)
        _, kd, vd = store.dequantize(layer, 0)
        stored = keys_to_stored(tokens(k, 0), plan, layer).float()
        ref = keys_from_stored(quantize_groups(stored, 2, 32).deq, plan, layer).float()
        np.testing.assert_array_equal(kd, ref.numpy())
        np.testing.assert_array_equal(vd, quantize_groups(tokens(v, 0), 2, 32).deq.numpy())
        # Without the permutation the groups differ, and so do the values.
        plain = quantize_groups(tokens(k, 0), 2, 32).deq.numpy()
        assert not np.array_equal(kd, plain)


def assert_close_in_stored_basis(got: torch.Tensor, ref, frac: float = 0.995) -> None:
    """``got``: the store's values mapped into the stored basis (float64); ``ref``: the
    reference quantization there. At least ``frac`` of the elements agree up to float
    rounding of the transforms; the others (a code flipped at a rounding boundary, or a scale
    one fp16 ulp away) within one quantization step."""
    want = ref.deq.double()
    diff = (got - want).abs()
    equal = diff <= 2e-5 * (1.0 + want.abs())
    assert equal.double().mean().item() >= frac, f"only {equal.double().mean().item():.4f} equal"
    step = ref.scale.double()
    assert bool((diff <= step * 1.001 + 2e-5 * (1.0 + want.abs())).all()), "beyond one step"


HADAMARD_CASES = [
    # mode, Hkv, D, group_heads (None: default), rotate_values, bits, group, expected heads
    ("post_rope", 2, 64, None, True, 2, None, 1),
    ("post_rope", 4, 128, 2, False, 4, 32, 2),
    ("pre_rope", 4, 64, None, True, 8, 32, 4),
    ("pre_rope", 3, 64, None, True, 3, None, 3),
    ("pre_rope", 5, 64, None, False, 2, 32, 5),
    ("pre_rope", 7, 64, None, True, 4, 64, 7),
    ("pre_rope", 2, 256, 1, True, 2, 128, 1),
    ("post_rope", 3, 128, 3, True, 8, 64, 3),
]


@pytest.mark.parametrize("case", HADAMARD_CASES, ids=lambda c: f"{c[0]}-h{c[1]}-d{c[2]}-b{c[5]}")
@pytest.mark.parametrize("permuted", [False, True])
def test_hadamard_store_matches_the_reference_in_the_stored_basis(gen, case, permuted):
    mode, hkv, d, gh, rotv, bits, group, want_gh = case
    plan = RotationPlan.hadamard(1, hkv, d, mode=mode, group_heads=gh, rotate_values=rotv)
    assert plan.group_heads == want_gh
    if permuted:
        plan = RotationPlan(
            1,
            hkv,
            d,
            mode=mode,
            group_heads=want_gh,
            rotate_values=rotv,
            key_perm=random_perm(gen, 1, hkv, d, want_gh),
        )
    store = KVStore(
        1,
        hkv,
        d,
        config=QuantConfig(bits=bits, group_size=group),
        plan=plan,
        rope_inv_freq=default_inv_freq(d),
    )
    t = 130
    k, v = make_kv(gen, 1, hkv, t, d)
    store.append(0, k, v)
    _, kd, vd = store.dequantize(0, 0)
    g = group or d
    ref_k = quantize_groups(keys_to_stored(tokens(k, 0), plan, 0).float(), bits, g)
    assert_close_in_stored_basis(keys_to_stored(torch.from_numpy(kd), plan, 0), ref_k)
    back = keys_from_stored(ref_k.deq, plan, 0)
    assert (torch.from_numpy(kd).double() - back).abs().max().item() < 0.5
    ref_v = quantize_groups(values_to_stored(tokens(v, 0), plan).float(), bits, g)
    assert_close_in_stored_basis(values_to_stored(torch.from_numpy(vd), plan), ref_v)
    if not rotv:
        np.testing.assert_array_equal(vd, quantize_groups(tokens(v, 0), bits, g).deq.numpy())
    # Power: the unrotated reference is far from the store's keys in the stored basis.
    plain = quantize_groups(tokens(k, 0), bits, g)
    assert (plain.deq.double() - torch.from_numpy(kd).double()).abs().max().item() > 1e-3
    # Rotation spreads outliers: 2-bit rotated keys are closer to the originals than plain.
    if bits == 2 and mode == "pre_rope":
        err_rot = (torch.from_numpy(kd) - tokens(k, 0)).norm()
        err_plain = (plain.deq - tokens(k, 0)).norm()
        assert err_rot < err_plain


# ============================================================================================
# Precision classes: 16-bit tokens, protected tokens, per-token bits
# ============================================================================================


@pytest.mark.parametrize("fp_format", ["float16", "bfloat16"])
@pytest.mark.parametrize("mode", ["none", "post_rope", "pre_rope"])
def test_16_bit_store_rounds_to_its_fp_format(gen, fp_format, mode):
    hkv, d, t = 2, 64, 65
    plan = (
        RotationPlan.identity(1, hkv, d)
        if mode == "none"
        else RotationPlan.hadamard(1, hkv, d, mode=mode)
    )
    store = KVStore(
        1,
        hkv,
        d,
        batch_size=2,
        config=QuantConfig(bits=16, fp_format=fp_format),
        plan=plan,
        rope_inv_freq=default_inv_freq(d),
    )
    assert store.config["fp_format"] == fp_format
    k, v = make_kv(gen, 2, hkv, t, d)
    store.append(0, k * 300, v)
    for b in range(2):
        _, kd, vd = store.dequantize(0, b)
        np.testing.assert_array_equal(kd, fp_round(tokens(k * 300, b), fp_format).numpy())
        np.testing.assert_array_equal(vd, fp_round(tokens(v, b), fp_format).numpy())
        other = "bfloat16" if fp_format == "float16" else "float16"
        assert not np.array_equal(vd, fp_round(tokens(v, b), other).numpy())


def test_protected_tokens_are_kept_in_16_bits(gen):
    hkv, d, t = 2, 64, 37
    store = KVStore(1, hkv, d, batch_size=2, config=QuantConfig(bits=2))
    k, v = make_kv(gen, 2, hkv, t, d)
    protect = torch.zeros(2, t, dtype=torch.bool)
    protect[:, :4] = True  # attention sinks
    protect[1, 20] = True
    store.append(0, k, v, protect=protect)
    for b in range(2):
        pos, kd, vd = sorted_by_position(store.dequantize(0, b))
        np.testing.assert_array_equal(pos, np.arange(t))
        kt, vt = tokens(k, b), tokens(v, b)
        pr = protect[b].numpy()
        np.testing.assert_array_equal(kd[pr], fp_round(kt[pr]).numpy())
        np.testing.assert_array_equal(vd[pr], fp_round(vt[pr]).numpy())
        np.testing.assert_array_equal(kd[~pr], quantize_groups(kt[~pr], 2, d).deq.numpy())
        np.testing.assert_array_equal(vd[~pr], quantize_groups(vt[~pr], 2, d).deq.numpy())
    # 16-bit pages cost more than 2-bit pages.
    plain = KVStore(1, hkv, d, batch_size=2, config=QuantConfig(bits=2))
    plain.append(0, k, v)
    assert store.payload_bytes > plain.payload_bytes
    assert store.bits_per_element() > plain.bits_per_element()


def test_per_token_bits_select_the_precision_class(gen):
    hkv, d, t = 2, 64, 130
    store = KVStore(1, hkv, d, batch_size=2, config=QuantConfig(bits=2, group_size=32))
    k, v = make_kv(gen, 2, hkv, t, d)
    choices = torch.tensor([2, 3, 4, 8, 16])
    bits = choices[torch.randint(0, 5, (2, t), generator=gen)]
    store.append(0, k, v, bits=bits)
    for b in range(2):
        pos, kd, vd = sorted_by_position(store.dequantize(0, b))
        np.testing.assert_array_equal(pos, np.arange(t))
        kt, vt = tokens(k, b), tokens(v, b)
        for c in choices.tolist():
            sel = (bits[b] == c).numpy()
            assert sel.any()
            if c == 16:
                want_k, want_v = fp_round(kt[sel]), fp_round(vt[sel])
            else:
                want_k = quantize_groups(kt[sel], c, 32).deq
                want_v = quantize_groups(vt[sel], c, 32).deq
            np.testing.assert_array_equal(kd[sel], want_k.numpy(), err_msg=f"bits {c}")
            np.testing.assert_array_equal(vd[sel], want_v.numpy(), err_msg=f"bits {c}")
    # Accounting: 5 classes, each with its own pages.
    assert len(store.page_buffers(0, 0)) == 5
    assert {buf.bits for buf in store.page_buffers(0, 1)} == {2, 3, 4, 8, 16}


# ============================================================================================
# The recent window and per-channel keys
# ============================================================================================


def window_reference(x: torch.Tensor, bits: int, group: int, residual: int, fmt: str):
    """Per-token layout with a residual window: tokens older than the newest ``residual``
    are quantized from their 16-bit copy; the newest stay 16-bit."""
    xr = fp_round(x, fmt)
    n = x.shape[0]
    nq = max(n - residual, 0)
    out = xr.clone()
    if nq:
        out[:nq] = quantize_groups(xr[:nq], bits, group).deq
    return out


@pytest.mark.parametrize("fp_format", ["float16", "bfloat16"])
@pytest.mark.parametrize("residual", [1, 5, 64, 200])
def test_residual_window_per_token(gen, residual, fp_format):
    hkv, d, t = 2, 64, 130
    cfg = QuantConfig(bits=3, group_size=32, residual=residual, fp_format=fp_format)
    chunked = KVStore(1, hkv, d, config=cfg)
    whole = KVStore(1, hkv, d, config=cfg)
    k, v = make_kv(gen, 1, hkv, t, d)
    start = 0
    for n in [37, 1, 1, 65, 26]:
        chunked.append(0, k[:, :, start : start + n], v[:, :, start : start + n])
        start += n
    assert start == t
    whole.append(0, k, v)
    want_k = window_reference(tokens(k, 0), 3, 32, residual, fp_format)
    want_v = window_reference(tokens(v, 0), 3, 32, residual, fp_format)
    for store in (chunked, whole):
        pos, kd, vd = sorted_by_position(store.dequantize(0, 0))
        np.testing.assert_array_equal(pos, np.arange(t))
        np.testing.assert_array_equal(kd, want_k.numpy())
        np.testing.assert_array_equal(vd, want_v.numpy())
        in_window = sum(b.length - b.start for b in store.page_buffers(0, 0) if b.window)
        assert in_window == min(residual, t)
        assert all(b.bits == 16 for b in store.page_buffers(0, 0) if b.window)


@pytest.mark.parametrize("residual", [0, 20])
@pytest.mark.parametrize("bits", [2, 4])
def test_per_channel_keys_kivi(gen, residual, bits):
    hkv, d, t, cap = 2, 64, 130, 32
    cfg = QuantConfig(bits=bits, group_size=32, key_layout="per_channel", residual=residual)
    store = KVStore(1, hkv, d, config=cfg)
    chunked = KVStore(1, hkv, d, config=cfg)
    assert store.config["page_tokens"] == cap
    assert store.config["key_layout"] == "per_channel"
    k, v = make_kv(gen, 1, hkv, t, d)
    store.append(0, k, v)
    start = 0
    for n in [1] * 10 + [3, 37, 80]:
        chunked.append(0, k[:, :, start : start + n], v[:, :, start : start + n])
        start += n
    kr, vr = fp_round(tokens(k, 0)), fp_round(tokens(v, 0))
    nq = (t - residual) // cap * cap
    want_k, want_v = kr.clone(), vr.clone()
    for s in range(0, nq, cap):
        want_k[s : s + cap] = quantize_per_channel(kr[s : s + cap], bits).deq
        want_v[s : s + cap] = quantize_groups(vr[s : s + cap], bits, 32).deq
    # Per-token keys would give different values (the layout matters).
    assert not torch.equal(want_k[:cap], quantize_groups(kr[:cap], bits, 32).deq)
    for st_ in (store, chunked):
        pos, kd, vd = sorted_by_position(st_.dequantize(0, 0))
        np.testing.assert_array_equal(pos, np.arange(t))
        np.testing.assert_array_equal(kd, want_k.numpy())
        np.testing.assert_array_equal(vd, want_v.numpy())
        window = [b for b in st_.page_buffers(0, 0) if b.window]
        assert sum(b.length - b.start for b in window) == t - nq


# ============================================================================================
# Positions
# ============================================================================================


def test_default_positions_continue_each_sequence_with_left_padding(gen):
    hkv, d, b = 2, 64, 3
    store = KVStore(2, hkv, d, batch_size=b, config=QuantConfig(bits=4))
    k, v = make_kv(gen, b, hkv, 9, d)
    valid = torch.ones(b, 9, dtype=torch.bool)
    valid[0, :4] = False  # left padding: lengths 5, 9, 7
    valid[2, :2] = False
    k[0, :, :4] = float("nan")  # padded slots are never read
    store.append(0, k, v, valid=valid)
    assert store.seq_lens(0) == [5, 9, 7]
    assert store.seq_lens(1) == [0, 0, 0]
    for _ in range(3):
        k1, v1 = make_kv(gen, b, hkv, 1, d)
        store.append(0, k1, v1)
    assert store.seq_lens(0) == [8, 12, 10]
    for i, n in enumerate([8, 12, 10]):
        np.testing.assert_array_equal(store.dequantize(0, i)[0], np.arange(n))
    # attend's default query positions are the last Tq positions of each sequence.
    tq = 3
    q = torch.randn(b, 2 * hkv, tq, d, generator=gen)
    nxt = torch.tensor([8, 12, 10])
    explicit = nxt[:, None] - tq + torch.arange(tq)[None, :]
    got = store.attend(0, q)
    assert torch.equal(got, store.attend(0, q, positions=explicit))
    torch.testing.assert_close(
        got.double(), attend_reference(store, 0, q, explicit), **tolerance(torch.float32)
    )
    # Other positions give another result (the positions matter).
    assert not torch.equal(got, store.attend(0, q, positions=explicit - 1))


def test_a_sequence_without_tokens_attends_to_nothing(gen):
    hkv, d, t = 2, 64, 9
    store = KVStore(1, hkv, d, batch_size=3, config=QuantConfig(bits=3))
    k, v = make_kv(gen, 3, hkv, t, d)
    valid = torch.ones(3, t, dtype=torch.bool)
    valid[1] = False  # sequence 1 gets nothing
    store.append(0, k, v, valid=valid)
    assert store.seq_lens(0) == [t, 0, t]
    assert store.dequantize(0, 1)[1].shape == (0, hkv, d)
    assert store.page_buffers(0, 1) == []
    q = torch.randn(3, hkv, 2, d, generator=gen)
    out = store.attend(0, q)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert out[0].abs().sum() > 0
    torch.testing.assert_close(
        out.double(),
        attend_reference(store, 0, q, [[t - 2, t - 1], [0, 0], [t - 2, t - 1]]),
        **tolerance(torch.float32),
    )
    # Its next default position is still 0.
    store.append(0, k[:, :, :1], v[:, :, :1])
    assert store.dequantize(0, 1)[0].tolist() == [0]


def test_explicit_positions_bt_and_t(gen):
    hkv, d, b, t = 1, 64, 2, 6
    store = KVStore(1, hkv, d, batch_size=b, config=QuantConfig(bits=8))
    k, v = make_kv(gen, b, hkv, t, d)
    pos_t = torch.tensor([0, 2, 4, 6, 8, 10])
    store.append(0, k, v, positions=pos_t)
    pos_bt = torch.tensor([[12, 13, 14, 15, 16, 17], [20, 30, 40, 50, 60, 70]])
    store.append(0, k, v, positions=pos_bt.numpy())
    np.testing.assert_array_equal(
        store.dequantize(0, 0)[0], np.concatenate([pos_t.numpy(), pos_bt[0].numpy()])
    )
    np.testing.assert_array_equal(
        store.dequantize(0, 1)[0], np.concatenate([pos_t.numpy(), pos_bt[1].numpy()])
    )
    # Default positions continue after the largest position.
    store.append(0, k[:, :, :1], v[:, :, :1])
    assert store.dequantize(0, 0)[0][-1] == 18
    assert store.dequantize(0, 1)[0][-1] == 71
    q = torch.randn(b, 3, 4, d, generator=gen)
    qp = [5, 13, 45, 100]
    one = store.attend(0, q, positions=qp)
    both = store.attend(0, q, positions=[qp, qp])
    assert torch.equal(one, both)
    torch.testing.assert_close(
        one.double(), attend_reference(store, 0, q, [qp, qp]), **tolerance(torch.float32)
    )
    # Query position 5 sees only keys 0, 2, 4 of each sequence.
    mask_ref = attend_reference(store, 0, q, [[5] * 4, [5] * 4])[:, :, 0]
    torch.testing.assert_close(one[:, :, 0].double(), mask_ref, atol=1e-4, rtol=1e-4)


# ============================================================================================
# Attention against scaled_dot_product_attention
# ============================================================================================


def build_and_check(
    *,
    seed: int,
    d: int,
    hkv: int,
    gqa: int,
    batch: int,
    chunks: list[int],
    mode: str = "post_rope",
    group_heads: int | None = None,
    rotate_values: bool = True,
    permuted: bool = False,
    bits: int = 2,
    key_layout: str = "per_token",
    page_tokens: int | None = None,
    group: int | None = None,
    residual: int = 0,
    left_pad: bool = True,
    explicit_positions: bool = False,
    protect: bool = False,
    mixed_bits: bool = False,
    tq: int = 1,
    q_positions: str = "default",
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    kv_dtype: torch.dtype = torch.float32,
    q_dtype: torch.dtype = torch.float32,
    partial_rope: bool = False,
    rope_scaling: float = 1.0,
    fp_format: str = "float16",
    layers: int = 2,
    lag: int = 0,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    inv_freq = default_inv_freq(d, partial=partial_rope)
    if mode == "identity":
        plan = RotationPlan.identity(layers, hkv, d)
    else:
        gh = group_heads if group_heads is not None else 1
        perm = random_perm(gen, layers, hkv, d, gh) if permuted else None
        plan = RotationPlan(
            layers,
            hkv,
            d,
            mode=mode,
            group_heads=gh,
            rotate_values=rotate_values,
            key_perm=perm,
            key_clip=[1.0, 0.9][:layers],
        )
    cfg = QuantConfig(
        bits=bits,
        group_size=group,
        residual=residual,
        key_layout=key_layout,
        page_tokens=page_tokens,
        fp_format=fp_format,
    )
    store = KVStore(
        layers,
        hkv,
        d,
        batch_size=batch,
        config=cfg,
        plan=plan,
        rope_inv_freq=inv_freq,
        rope_scaling=rope_scaling,
    )
    nxt = [0] * batch
    for ci, t in enumerate(chunks):
        k, v = make_kv(gen, batch, hkv, t, d)
        kwargs: dict[str, object] = {}
        valid = torch.ones(batch, t, dtype=torch.bool)
        if left_pad and ci == 0:
            for b in range(1, batch):
                valid[b, : int(torch.randint(0, t, (1,), generator=gen))] = False
            kwargs["valid"] = valid
        if explicit_positions:
            pos = torch.zeros(batch, t, dtype=torch.int64)
            for b in range(batch):
                stride = 1 + b % 2
                idx = torch.cumsum(valid[b].long(), 0) - 1
                pos[b] = torch.where(valid[b], nxt[b] + stride * idx, 0)
            kwargs["positions"] = pos
        if protect:
            kwargs["protect"] = torch.rand(batch, t, generator=gen) < 0.1
        if mixed_bits:
            choices = torch.tensor([2, 3, 4, 8, 16])
            kwargs["bits"] = choices[torch.randint(0, 5, (batch, t), generator=gen)]
        for layer in range(layers):
            store.append(layer, k.to(kv_dtype), v.to(kv_dtype), **kwargs)
        for b in range(batch):
            if explicit_positions and valid[b].any():
                nxt[b] = max(nxt[b], int(kwargs["positions"][b][valid[b]].max()) + 1)
            elif not explicit_positions:
                nxt[b] += int(valid[b].sum())
    assert store.seq_lens(0) == [len(store.dequantize(0, b)[0]) for b in range(batch)]
    q = torch.randn(batch, hkv * gqa, tq, d, generator=gen).to(q_dtype)
    if q_positions == "default":
        qpos = torch.tensor([[max(n - tq + j, 0) for j in range(tq)] for n in nxt])
        arg = None
    elif q_positions == "BT":
        qpos = torch.stack([torch.randint(0, n + 3, (tq,), generator=gen) for n in nxt])
        arg = qpos
    else:
        qpos = torch.randint(0, max(nxt) + 3, (tq,), generator=gen)
        arg = qpos.tolist()
        qpos = qpos[None].expand(batch, tq)
    rope = (inv_freq, rope_scaling) if mode == "pre_rope" else None
    opts = dict(positions=arg, causal=causal, scale=scale, window=window, softcap=softcap)
    for layer in range(layers):
        got, lse = store.attend(layer, q, **opts, lag=lag, return_lse=True)
        assert got.dtype == q_dtype and got.shape == q.shape
        assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
        want, want_lse = attend_reference(
            store,
            layer,
            q,
            qpos,
            causal=causal,
            scale=scale,
            window=window,
            softcap=softcap,
            rope=rope,
            lag=lag,
            return_lse=True,
        )
        torch.testing.assert_close(got.double(), want, **tolerance(q_dtype))
        assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
        seen = ~torch.isneginf(want_lse)
        # Scores come from q in its own dtype: 16-bit queries round them.
        tol = 2e-4 if q_dtype == torch.float32 else 2e-2
        torch.testing.assert_close(lse[seen].double(), want_lse[seen], rtol=tol, atol=tol)
        if lag == 0:
            assert torch.equal(got, store.attend(layer, q, **opts))


def test_the_attention_reference_detects_a_one_code_change(gen):
    """The comparison has power: a store whose values differ by one code in one token of one
    head fails the tolerance used everywhere."""
    hkv, d, t = 2, 64, 37
    k, v = make_kv(gen, 1, hkv, t, d)
    stores = []
    for bump in (0.0, 1.0):
        s = KVStore(1, hkv, d, config=QuantConfig(bits=4, group_size=32))
        v2 = v.clone()
        step = quantize_groups(tokens(v, 0), 4, 32).scale[t - 1, 1, 0].item()
        v2[0, 1, t - 1, 0] += bump * 1.5 * step  # the newest token: attended to by position t-1
        s.append(0, k * 0.1, v2)
        stores.append(s)
    assert not np.array_equal(stores[0].dequantize(0, 0)[2], stores[1].dequantize(0, 0)[2])
    q = torch.randn(1, 2 * hkv, 1, d, generator=gen)
    want = attend_reference(stores[0], 0, q, [[t - 1]])
    torch.testing.assert_close(stores[0].attend(0, q).double(), want, **tolerance(torch.float32))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(
            stores[1].attend(0, q).double(), want, **tolerance(torch.float32)
        )


@pytest.mark.parametrize("t", [1, 3, 37, 65, 130])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_attend_odd_lengths_and_head_dims(t, d):
    build_and_check(
        seed=t * 1000 + d,
        d=d,
        hkv=2,
        gqa=1 + (t + d // 64) % 8,
        batch=2,
        chunks=[t],
        mode=["post_rope", "pre_rope", "identity"][(t + d) % 3],
        bits=[2, 3, 4, 8][t % 4],
        tq=1 + t % 3,
    )


@pytest.mark.parametrize("gqa", range(1, 9))
@pytest.mark.parametrize("mode", ["post_rope", "pre_rope"])
def test_attend_gqa_ratios(gqa, mode):
    # gqa * tq above 8 rows takes the tiled path, below it the direct path.
    build_and_check(
        seed=gqa,
        d=64,
        hkv=4,
        gqa=gqa,
        batch=3,
        chunks=[37, 1],
        mode=mode,
        group_heads=4 if mode == "pre_rope" else 1,
        tq=1 + gqa % 3,
        permuted=True,
    )


@pytest.mark.parametrize(
    "options",
    [
        {"window": 1},
        {"window": 7, "tq": 4},
        {"softcap": 3.0, "tq": 2},
        {"causal": False, "q_positions": "BT"},
        {"causal": False, "window": 5, "q_positions": "T", "tq": 3},
        {"scale": 0.05, "softcap": 2.0},
        {"explicit_positions": True, "q_positions": "BT", "tq": 5},
        {"protect": True, "mixed_bits": True, "residual": 9},
        {"key_layout": "per_channel", "residual": 10, "tq": 3},
        {"key_layout": "per_channel", "bits": 3, "mode": "pre_rope", "group_heads": 2},
        {"page_tokens": 32, "group": 32, "bits": 4, "rotate_values": False},
        {"bits": 16, "mode": "pre_rope", "partial_rope": True, "rope_scaling": 1.25},
        {"fp_format": "bfloat16", "residual": 40, "bits": 8},
        {"mode": "none", "group_heads": 2, "permuted": True},
        {"mode": "post_rope", "group_heads": 2, "permuted": True, "tq": 3},
        # Each query's newest keys masked (the transformers prefill reads those from the
        # chunk): rows with only recent keys see nothing.
        {"lag": 4, "tq": 9, "chunks": [9]},
        {"lag": 32, "tq": 40, "chunks": [70, 40], "residual": 32, "protect": True},
        {"lag": 5, "tq": 5, "window": 9, "softcap": 3.0, "mode": "pre_rope"},
        {"lag": 2, "tq": 4, "key_layout": "per_channel", "residual": 10, "left_pad": True},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_attend_options(options):
    base = dict(seed=7, d=128, hkv=2, gqa=3, batch=3, chunks=[65, 3, 1], mode="post_rope")
    base.update(options)
    build_and_check(**base)


@st.composite
def attend_cases(draw: st.DrawFn) -> dict[str, object]:
    d = draw(st.sampled_from([64, 128, 256]))
    hkv = draw(st.sampled_from([1, 2, 3, 4]))
    mode = draw(st.sampled_from(["identity", "none", "post_rope", "pre_rope"]))
    key_layout = draw(st.sampled_from(["per_token", "per_token", "per_channel"]))
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        d=d,
        hkv=hkv,
        gqa=draw(st.integers(1, 8)),
        batch=draw(st.integers(1, 3)),
        chunks=draw(st.lists(st.sampled_from([1, 3, 37, 65, 130]), min_size=1, max_size=3)),
        mode=mode,
        group_heads=draw(st.sampled_from([g for g in range(1, hkv + 1) if hkv % g == 0])),
        rotate_values=draw(st.booleans()),
        permuted=draw(st.booleans()),
        bits=draw(st.sampled_from([2, 3, 4, 8, 16])),
        key_layout=key_layout,
        page_tokens=32 if key_layout == "per_channel" else draw(st.sampled_from([None, 32, 64])),
        group=draw(st.sampled_from([None, 32, 64])),
        residual=draw(st.sampled_from([0, 0, 3, 40])),
        left_pad=draw(st.booleans()),
        explicit_positions=draw(st.booleans()),
        protect=draw(st.booleans()),
        mixed_bits=draw(st.booleans()),
        tq=draw(st.integers(1, 5)),
        q_positions=draw(st.sampled_from(["default", "BT", "T"])),
        causal=draw(st.sampled_from([True, True, False])),
        window=draw(st.sampled_from([None, None, 1, 7, 50])),
        softcap=draw(st.sampled_from([None, None, 3.0])),
        scale=draw(st.sampled_from([None, None, 0.05])),
        kv_dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
        q_dtype=draw(
            st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16])
        ),
        partial_rope=draw(st.booleans()),
        rope_scaling=draw(st.sampled_from([1.0, 1.25])),
        fp_format=draw(st.sampled_from(["float16", "bfloat16"])),
        lag=draw(st.sampled_from([0, 0, 1, 3])),
    )


@given(case=attend_cases())
def test_attend_random_configurations(case):
    w = case["window"]
    if not case["causal"] or (w is not None and w <= case["lag"]):
        case["lag"] = 0  # refused combinations (test_attend_lag_is_checked)
    build_and_check(**case)


def test_attend_lag_is_checked(gen):
    s = KVStore(1, 2, 64, config=QuantConfig(bits=2))
    k, v = make_kv(gen, 1, 2, 10, 64)
    s.append(0, k, v)
    q = torch.randn(1, 2, 3, 64, generator=gen)
    before = snapshot(s, q)
    with pytest.raises(rotatekv.ArgumentError, match="lag: expected an int >= 0"):
        s.attend(0, q, lag=-1)
    with pytest.raises(rotatekv.ArgumentError, match="lag: expected 0 without causal"):
        s.attend(0, q, lag=2, causal=False)
    with pytest.raises(rotatekv.ArgumentError, match="lag: expected less than the window"):
        s.attend(0, q, lag=4, window=4)
    with pytest.raises(rotatekv.DTypeError, match="lag: expected an int"):
        s.attend(0, q, lag=1.5)
    # Refused calls change nothing; a lag beyond every query sees nothing.
    assert_same_snapshot(before, snapshot(s, q))
    out, lse = s.attend(0, q, lag=100, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


# ============================================================================================
# End to end against the original (unquantized) inputs
# ============================================================================================


def end_to_end_error(gen: torch.Generator, bits: int, mode: str, d: int = 128) -> float:
    hkv, gqa, b, t = 2, 4, 2, 130
    inv_freq = default_inv_freq(d)
    plan = (
        RotationPlan.identity(1, hkv, d)
        if mode == "none"
        else RotationPlan.hadamard(1, hkv, d, mode=mode)
    )
    store = KVStore(
        1,
        hkv,
        d,
        batch_size=b,
        config=QuantConfig(bits=bits),
        plan=plan,
        rope_inv_freq=inv_freq,
    )
    k, v = make_kv(gen, b, hkv, t, d, outliers=False)
    pos = torch.arange(t)
    if mode == "pre_rope":
        # The store gets pre-RoPE keys; the model attends with RoPE'd keys.
        store.append(0, k, v)
        k_model = torch.stack(
            [apply_rope(tokens(k, i), pos, inv_freq).permute(1, 0, 2) for i in range(b)]
        )
    else:
        store.append(0, k, v)
        k_model = k.double()
    q = torch.randn(b, hkv * gqa, 1, d, generator=gen)
    got = store.attend(0, q).double()
    want = torch.stack(
        [sdpa(q[i], k_model[i], v[i], torch.tensor([t - 1]), pos, causal=True)[0] for i in range(b)]
    )
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("mode", ["none", "post_rope", "pre_rope"])
def test_end_to_end_error_against_the_original_inputs(gen, mode):
    e16 = end_to_end_error(gen, 16, mode)
    e8 = end_to_end_error(gen, 8, mode)
    e4 = end_to_end_error(gen, 4, mode)
    e2 = end_to_end_error(gen, 2, mode)
    assert e16 <= 2e-3, e16
    assert e8 <= 1e-2, e8
    # More bits, less error: the measure can tell the widths apart.
    assert e16 < e8 < e4 < e2, (e16, e8, e4, e2)
    assert e2 > 1e-2


def test_end_to_end_16_bits_elementwise(gen):
    hkv, d, t = 2, 64, 65
    store = KVStore(1, hkv, d, config=QuantConfig(bits=16))
    k, v = make_kv(gen, 1, hkv, t, d)
    store.append(0, k, v)
    q = torch.randn(1, 2 * hkv, 3, d, generator=gen)
    got = store.attend(0, q)
    # The last 3 positions see everything but the keys after them.
    mask = torch.arange(t)[None, :] <= torch.arange(t - 3, t)[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True
    )
    torch.testing.assert_close(got.double(), want, atol=2e-3, rtol=2e-3)
    assert math.isfinite(got.abs().max().item())


# ============================================================================================
# Accounting, reorder, truncate, clear, save/load
# ============================================================================================


def test_nbytes_payload_and_bits_per_element_follow_the_layout(gen):
    from reference import page_layout

    hkv, d, cap = 8, 128, 64
    store = KVStore(1, hkv, d, batch_size=2, config=QuantConfig(bits=2, group_size=128))
    assert store.nbytes == 0 and store.payload_bytes == 0 and store.bits_per_element() == 0
    k, v = make_kv(gen, 2, hkv, 65, d)
    valid = torch.ones(2, 65, dtype=torch.bool)
    valid[1, :30] = False
    store.append(0, k, v, valid=valid)
    lay = page_layout(2, False, cap, hkv, d, 128)
    assert lay.total == 320 + 8 * 4608
    assert store.nbytes == 3 * lay.total  # 65 tokens: 2 pages; 35 tokens: 1 page
    assert store.payload_bytes == pytest.approx(100 * lay.token_payload_bytes(), abs=1e-9)
    bpe = store.bits_per_element()
    assert bpe == pytest.approx(2.25 + 40 / 2048, abs=1e-12)
    assert bpe <= 2.3
    for buf in store.page_buffers(0, 0):
        assert buf.nbytes == lay.total and buf.layout == lay.as_buffer_dict()
    # A 16-bit store costs 16 bits plus positions and tags.
    s16 = KVStore(1, hkv, d, config=QuantConfig(bits=16))
    s16.append(0, k[:1], v[:1])
    lay16 = page_layout(16, False, cap, hkv, d, d)
    assert s16.bits_per_element() == pytest.approx(
        lay16.token_payload_bytes() * 8 / (hkv * d * 2), abs=1e-12
    )
    assert 16 < s16.bits_per_element() < 16.1


@pytest.mark.parametrize("bits,group,per_channel", [(3, 32, False), (4, 64, True), (8, 8, False)])
def test_page_layouts_of_other_formats(gen, bits, group, per_channel):
    from reference import page_layout

    hkv, d = 3, 64
    cfg = QuantConfig(
        bits=bits, group_size=group, key_layout="per_channel" if per_channel else "per_token"
    )
    store = KVStore(1, hkv, d, config=cfg)
    k, v = make_kv(gen, 1, hkv, 70, d)
    store.append(0, k, v)
    cap = 32 if per_channel else 64
    lay = page_layout(bits, per_channel, cap, hkv, d, group)
    lay16 = page_layout(16, per_channel, cap, hkv, d, group)
    bufs = store.page_buffers(0, 0)
    for buf in bufs:
        want = lay if buf.bits == bits else lay16
        assert buf.capacity == cap
        assert buf.nbytes == want.total
        assert buf.layout == want.as_buffer_dict()
    assert store.nbytes == sum(buf.nbytes for buf in bufs)
    want_payload = sum(
        (buf.length - buf.start) * (lay if buf.bits == bits else lay16).token_payload_bytes()
        for buf in bufs
    )
    assert store.payload_bytes == pytest.approx(want_payload)


def test_reorder_for_beam_search(gen):
    hkv, d, b = 2, 64, 3
    store = KVStore(2, hkv, d, batch_size=b, config=QuantConfig(bits=2))
    k, v = make_kv(gen, b, hkv, 70, d)
    for layer in range(2):
        store.append(layer, k, v)
    before = [[store.dequantize(layer, i) for i in range(b)] for layer in range(2)]
    q = torch.randn(b, 2 * hkv, 1, d, generator=gen)
    out_before = store.attend(1, q)
    nbytes, payload = store.nbytes, store.payload_bytes
    store.reorder([2, 2, 0])
    for layer in range(2):
        for i, old in enumerate([2, 2, 0]):
            for x, y in zip(store.dequantize(layer, i), before[layer][old], strict=True):
                np.testing.assert_array_equal(x, y)
    out_after = store.attend(1, q[[2, 2, 0]])
    assert torch.equal(out_after, out_before[[2, 2, 0]])
    # Shared pages are counted once: old sequence 1 is gone, 2 is shared.
    assert store.nbytes == nbytes * 2 // 3
    # ... while the payload counts each sequence's tokens.
    assert store.payload_bytes == payload
    # Copy on write: appending to one beam leaves its sibling untouched.
    k1, v1 = make_kv(gen, b, hkv, 1, d)
    store.append(0, k1, v1)
    assert store.seq_lens(0) == [71, 71, 71]
    for i, old in enumerate([2, 2, 0]):
        pos, kd, vd = store.dequantize(0, i)
        np.testing.assert_array_equal(kd[:70], before[0][old][1])
        np.testing.assert_array_equal(pos, np.arange(71))
    assert not np.array_equal(store.dequantize(0, 0)[1][70], store.dequantize(0, 1)[1][70])
    assert store.nbytes > nbytes * 2 // 3
    after = [store.dequantize(0, i) for i in range(b)]
    store.reorder(np.array([1, 0, 2]))
    for i, old in enumerate([1, 0, 2]):
        for x, y in zip(store.dequantize(0, i), after[old], strict=True):
            np.testing.assert_array_equal(x, y)


def test_truncate_drops_positions_at_or_after_the_length(gen):
    hkv, d, b = 2, 64, 2
    cfg = QuantConfig(bits=4, residual=10)
    store = KVStore(2, hkv, d, batch_size=b, config=cfg)
    k, v = make_kv(gen, b, hkv, 100, d)
    prot = torch.zeros(b, 100, dtype=torch.bool)
    prot[:, 0] = True
    for layer in range(2):
        store.append(layer, k, v, protect=prot)
    before = [store.dequantize(0, i) for i in range(b)]
    store.truncate(80)
    assert store.seq_lens(0) == [80, 80] and store.seq_lens(1) == [80, 80]
    for i in range(b):
        pos, kd, vd = store.dequantize(0, i)
        keep = before[i][0] < 80
        np.testing.assert_array_equal(pos, before[i][0][keep])
        np.testing.assert_array_equal(kd, before[i][1][keep])
        np.testing.assert_array_equal(vd, before[i][2][keep])
    store.truncate([70, 5])
    assert store.seq_lens(0) == [70, 5]
    for i, n in enumerate([70, 5]):
        pos, kd, _ = sorted_by_position(store.dequantize(1, i))
        np.testing.assert_array_equal(pos, np.arange(n))
        ref = sorted_by_position(before[i])
        np.testing.assert_array_equal(kd, ref[1][:n])
    # Appending continues at the truncated length.
    k1, v1 = make_kv(gen, b, hkv, 2, d)
    store.append(0, k1, v1)
    assert store.seq_lens(0) == [72, 7]
    np.testing.assert_array_equal(sorted_by_position(store.dequantize(0, 1))[0], np.arange(7))
    q = torch.randn(b, hkv, 1, d, generator=gen)
    torch.testing.assert_close(
        store.attend(0, q).double(),
        attend_reference(store, 0, q, [[71], [6]]),
        **tolerance(torch.float32),
    )
    # Truncating beyond the end changes nothing; truncating to 0 empties.
    nb = store.nbytes
    store.truncate(10**9)
    assert store.seq_lens(0) == [72, 7] and store.nbytes == nb
    store.truncate(0)
    assert store.seq_lens(0) == [0, 0] and store.seq_lens(1) == [0, 0]
    assert store.nbytes == 0
    store.append(0, k1, v1)
    np.testing.assert_array_equal(store.dequantize(0, 0)[0], [0, 1])


def test_clear_removes_every_token_and_keeps_settings(gen):
    store = KVStore(2, 2, 64, batch_size=2, config=QuantConfig(bits=3, residual=4), plan=None)
    k, v = make_kv(gen, 2, 2, 40, 64)
    store.append(0, k, v)
    store.append(1, k, v)
    cfg = store.config
    store.clear()
    assert store.seq_lens(0) == [0, 0] and store.nbytes == 0 and store.payload_bytes == 0
    assert store.config == cfg
    assert store.dequantize(1, 1)[0].shape == (0,)
    q = torch.randn(2, 2, 1, 64, generator=gen)
    assert torch.equal(store.attend(0, q), torch.zeros_like(q))
    store.append(0, k, v)
    np.testing.assert_array_equal(store.dequantize(0, 0)[0], np.arange(40))


@pytest.mark.parametrize(
    "cfg,mode",
    [
        (QuantConfig(bits=2, residual=7), "pre_rope"),
        (QuantConfig(bits=3, key_layout="per_channel", residual=3), "post_rope"),
        (QuantConfig(bits=16, fp_format="bfloat16"), "none"),
        (QuantConfig(bits=4, group_size=32, key_clip=0.9, page_tokens=32), "post_rope"),
    ],
)
def test_save_load_round_trip_is_bit_exact(gen, tmp_path, cfg, mode):
    hkv, d, b = 2, 64, 2
    inv = default_inv_freq(d, partial=True)
    plan = (
        RotationPlan.identity(2, hkv, d)
        if mode == "none"
        else RotationPlan(
            2, hkv, d, mode=mode, group_heads=2 if mode == "pre_rope" else 1,
            key_perm=random_perm(gen, 2, hkv, d, 2 if mode == "pre_rope" else 1),
            key_clip=[0.95, 1.0],
        )
    )  # fmt: skip
    store = KVStore(
        2, hkv, d, batch_size=b, config=cfg, plan=plan, rope_inv_freq=inv, rope_scaling=1.1
    )
    k, v = make_kv(gen, b, hkv, 75, d)
    valid = torch.ones(b, 75, dtype=torch.bool)
    valid[1, :9] = False
    prot = torch.zeros(b, 75, dtype=torch.bool)
    prot[:, 10] = True
    store.append(0, k, v, valid=valid, protect=prot)
    # Every precision class in one sequence.
    mix = torch.tensor([2, 3, 4, 8, 16]).repeat(14)[: b * 33].reshape(b, 33)
    store.append(1, k[:, :, :33], v[:, :, :33], bits=mix)
    store.reorder([1, 1])
    path = tmp_path / "store.safetensors"
    store.save(path)
    loaded = KVStore.load(str(path))
    # The file lists pages per sequence, so pages shared by reorder may come back unshared.
    assert loaded.nbytes >= store.nbytes and loaded.payload_bytes == store.payload_bytes
    assert loaded.config == store.config
    assert loaded.plan == store.plan
    assert (loaded.num_layers, loaded.num_kv_heads, loaded.head_dim, loaded.batch_size) == (
        2, hkv, d, b,
    )  # fmt: skip
    q = torch.randn(b, 2 * hkv, 2, d, generator=gen)
    for layer in range(2):
        assert loaded.seq_lens(layer) == store.seq_lens(layer)
        for i in range(b):
            for x, y in zip(loaded.dequantize(layer, i), store.dequantize(layer, i), strict=True):
                np.testing.assert_array_equal(x, y)
        assert torch.equal(loaded.attend(layer, q), store.attend(layer, q))
    assert loaded.payload_bytes == store.payload_bytes
    # Both continue identically (next positions and open pages survive).
    k2, v2 = make_kv(gen, b, hkv, 40, d)
    store.append(0, k2, v2)
    loaded.append(0, k2, v2)
    for i in range(b):
        for x, y in zip(loaded.dequantize(0, i), store.dequantize(0, i), strict=True):
            np.testing.assert_array_equal(x, y)
    assert torch.equal(loaded.attend(0, q), store.attend(0, q))


def test_repr_and_getters(gen):
    store = KVStore(3, 2, 64, batch_size=4, config=QuantConfig(bits=4, group_size=32))
    assert (store.num_layers, store.num_kv_heads, store.head_dim, store.batch_size) == (3, 2, 64, 4)
    assert store.device == "cpu"
    assert store.config == {
        "bits": 4,
        "key_bits": 4,
        "value_bits": 4,
        "group_size": 32,
        "key_clip": None,
        "value_clip": None,
        "residual": 0,
        "key_layout": "per_token",
        "page_tokens": 64,
        "fp_format": "float16",
    }
    assert store.plan == RotationPlan.identity(3, 2, 64)
    assert "KVStore(" in repr(store) and "bits=4" in repr(store)
    # The resolved settings configure a store alike.
    assert KVStore(3, 2, 64, config=store.config).config == store.config
    assert rotatekv.__version__ == rotatekv.build_info()["version"]


# ============================================================================================
# Random sequences of operations against a model of the store's contents
# ============================================================================================


class Model:
    """What each (layer, sequence) holds: position -> the token's possible dequantized values
    (exactly one without a recent window; 16-bit or quantized-from-16-bit with one), and the
    next default position."""

    def __init__(self, layers: int, batch: int) -> None:
        self.seqs: list[list[dict[int, list[tuple[torch.Tensor, torch.Tensor]]]]] = [
            [{} for _ in range(batch)] for _ in range(layers)
        ]
        self.next = [[0] * batch for _ in range(layers)]


@given(data=st.data(), residual=st.sampled_from([0, 0, 6]), seed=st.integers(0, 2**31 - 1))
def test_random_operation_sequences(tmp_path_factory, data, residual, seed):
    layers, hkv, d, batch, group = 2, 2, 64, 3, 32
    gen = torch.Generator().manual_seed(seed)
    cfg = QuantConfig(bits=2, group_size=group, residual=residual)
    store = KVStore(layers, hkv, d, batch_size=batch, config=cfg)
    model = Model(layers, batch)

    def candidates(x: torch.Tensor, bits: int, protect: bool) -> list[torch.Tensor]:
        if protect or bits == 16:
            return [fp_round(x)]
        if residual:
            return [fp_round(x), quantize_groups(fp_round(x)[None], bits, group).deq[0]]
        return [quantize_groups(x[None], bits, group).deq[0]]

    for _ in range(data.draw(st.integers(1, 10))):
        op = data.draw(st.sampled_from(["append", "append", "append", "truncate", "reorder",
                                        "clear", "save"]))  # fmt: skip
        if op == "append":
            layer = data.draw(st.integers(0, layers - 1))
            t = data.draw(st.sampled_from([1, 3, 37, 65]))
            k, v = make_kv(gen, batch, hkv, t, d)
            valid = torch.rand(batch, t, generator=gen) < 0.8
            protect = torch.rand(batch, t, generator=gen) < 0.1
            bits = torch.tensor([2, 3, 4, 8, 16])[torch.randint(0, 5, (batch, t), generator=gen)]
            explicit = data.draw(st.booleans())
            positions = None
            if explicit:
                positions = torch.zeros(batch, t, dtype=torch.int64)
                for b in range(batch):
                    idx = torch.cumsum(valid[b].long(), 0) - 1
                    positions[b] = torch.where(valid[b], model.next[layer][b] + 2 * idx, 0)
            store.append(layer, k, v, positions=positions, valid=valid, protect=protect, bits=bits)
            for b in range(batch):
                for j in range(t):
                    if not valid[b, j]:
                        continue
                    pos = int(positions[b, j]) if explicit else model.next[layer][b]
                    model.next[layer][b] = max(model.next[layer][b], pos + 1)
                    kx, vx = k[b, :, j], v[b, :, j]
                    pair = list(
                        zip(
                            candidates(kx, int(bits[b, j]), bool(protect[b, j])),
                            candidates(vx, int(bits[b, j]), bool(protect[b, j])),
                            strict=True,
                        )
                    )
                    model.seqs[layer][b][pos] = pair
        elif op == "truncate":
            per_seq = data.draw(st.booleans())
            lens = [data.draw(st.integers(0, 120)) for _ in range(batch)]
            store.truncate(lens if per_seq else lens[0])
            for layer in range(layers):
                for b in range(batch):
                    n = lens[b] if per_seq else lens[0]
                    model.seqs[layer][b] = {p: x for p, x in model.seqs[layer][b].items() if p < n}
                    model.next[layer][b] = min(model.next[layer][b], n)
        elif op == "reorder":
            idx = data.draw(st.lists(st.integers(0, batch - 1), min_size=batch, max_size=batch))
            store.reorder(idx)
            for layer in range(layers):
                model.seqs[layer] = [dict(model.seqs[layer][i]) for i in idx]
                model.next[layer] = [model.next[layer][i] for i in idx]
        elif op == "clear":
            store.clear()
            model = Model(layers, batch)
        else:
            path = tmp_path_factory.mktemp("ops") / "store.safetensors"
            store.save(path)
            store = KVStore.load(path)
        # Check every sequence against the model, and attention at default positions.
        for layer in range(layers):
            assert store.seq_lens(layer) == [len(s) for s in model.seqs[layer]]
            for b in range(batch):
                pos, kd, vd = sorted_by_position(store.dequantize(layer, b))
                want_pos = sorted(model.seqs[layer][b])
                np.testing.assert_array_equal(pos, want_pos)
                for i, p in enumerate(want_pos):
                    ok = any(
                        np.array_equal(kd[i], ck.numpy()) and np.array_equal(vd[i], cv.numpy())
                        for ck, cv in model.seqs[layer][b][p]
                    )
                    assert ok, f"layer {layer} seq {b} position {p}"
            tq = 2
            q = torch.randn(batch, 2 * hkv, tq, d, generator=gen)
            qpos = [[max(n - tq + j, 0) for j in range(tq)] for n in model.next[layer]]
            torch.testing.assert_close(
                store.attend(layer, q).double(),
                attend_reference(store, layer, q, qpos),
                **tolerance(torch.float32),
            )
