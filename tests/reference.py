"""Plain PyTorch/NumPy references of rotatekv's documented formats.

Everything here is written from the format descriptions (quant.rs, page.rs, rotation.rs,
rope.rs, attend.rs docs), not from the implementation: a quantizer, the Hadamard matrices, the
key basis of a rotation plan, RoPE, the page byte layout, and attention over a store's own
dequantized tokens through ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import rotatekv

F16_MAX = 65504.0
QUANT_BITS = (2, 3, 4, 8)


# --------------------------------------------------------------------------------------------
# Conversions
# --------------------------------------------------------------------------------------------


def as_torch(x: object) -> torch.Tensor:
    """A torch view (or copy for numpy) of a tensor-like."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    return torch.from_numpy(np.ascontiguousarray(x))


def fp_round(x: torch.Tensor, fmt: str = "float16") -> torch.Tensor:
    """Rounds float32 values through a 16-bit format (round to nearest even)."""
    dt = torch.float16 if fmt == "float16" else torch.bfloat16
    return x.float().to(dt).float()


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Quantizer (quant.rs: "Quantizing a group")
# --------------------------------------------------------------------------------------------


@dataclass
class Quantized:
    codes: torch.Tensor  # int64, same shape as the input
    scale: torch.Tensor  # float32, broadcastable to the input (fp16-representable values)
    zero: torch.Tensor
    deq: torch.Tensor  # float32


def quantize(x: torch.Tensor, bits: int, clip: float = 1.0, dim: int = -1) -> Quantized:
    """Asymmetric uniform quantization of the groups spanning ``dim`` of float32 ``x``.

    lo = clip*min, hi = clip*max (f32, saturated to +-65504), scale = f16((hi-lo)/L) with the
    quotient saturated to 65504, zero = f16(lo), code = clamp(round_half_even((x - zero) /
    scale), 0, L) in f32 with the rounded scale and zero, code 0 when scale == 0, and
    dequantized = code * scale + zero (f32, unfused).
    """
    x = x.float()
    levels = _f32(float(2**bits - 1))
    c = _f32(clip)
    lo = (x.amin(dim=dim, keepdim=True) * c).clamp(-F16_MAX, F16_MAX)
    hi = (x.amax(dim=dim, keepdim=True) * c).clamp(-F16_MAX, F16_MAX)
    scale = ((hi - lo) / levels).clamp(max=F16_MAX).half().float()
    zero = lo.half().float()
    raw = torch.round((x - zero) / scale).clamp(0, 2**bits - 1)
    codes = torch.where(scale == 0, torch.zeros_like(raw), raw)
    codes = torch.nan_to_num(codes, nan=0.0).to(torch.int64)
    deq = codes.float() * scale + zero
    return Quantized(codes, scale, zero, deq)


def quantize_groups(x: torch.Tensor, bits: int, group: int, clip: float = 1.0) -> Quantized:
    """Groups of ``group`` consecutive channels of the last axis."""
    shape = x.shape
    d = shape[-1]
    assert d % group == 0
    q = quantize(x.reshape(*shape[:-1], d // group, group), bits, clip, dim=-1)
    return Quantized(
        q.codes.reshape(shape),
        q.scale.expand(*shape[:-1], d // group, group).reshape(shape),
        q.zero.expand(*shape[:-1], d // group, group).reshape(shape),
        q.deq.reshape(shape),
    )


def quantize_per_channel(x: torch.Tensor, bits: int, clip: float = 1.0) -> Quantized:
    """KIVI keys: ``x`` is ``[tokens, heads, D]``; one group per (head, channel) over tokens."""
    return quantize(x, bits, clip, dim=0)


# --------------------------------------------------------------------------------------------
# Hadamard matrices (hadamard.rs: H_n = (S_m kron W_{2^k}) / sqrt(n))
# --------------------------------------------------------------------------------------------


def sylvester(n: int) -> torch.Tensor:
    """Sylvester's +-1 matrix of order n = 2^k (float64, unnormalized)."""
    assert n >= 1 and n & (n - 1) == 0
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _chi(a: int, q: int) -> float:
    a %= q
    if a == 0:
        return 0.0
    return 1.0 if any((x * x) % q == a for x in range(1, q)) else -1.0


def paley(m: int) -> torch.Tensor:
    """The +-1 Paley matrices of order 1, 12, 20 (Paley I) and 28 (Paley II)."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m in (12, 20):
        q = m - 1
        h = torch.zeros(m, m, dtype=torch.float64)
        for i in range(m):
            for j in range(m):
                if i == 0 and j == 0:
                    s = 0.0
                elif i == 0:
                    s = 1.0
                elif j == 0:
                    s = -1.0
                else:
                    s = _chi(j - i, q)
                h[i, j] = s + (1.0 if i == j else 0.0)
        return h
    assert m == 28
    q = 13

    def c(i: int, j: int) -> float:
        if i == 0 and j == 0:
            return 0.0
        if i == 0 or j == 0:
            return 1.0
        return _chi(j - i, q)

    a = [[1.0, -1.0], [-1.0, -1.0]]
    b = [[1.0, 1.0], [1.0, -1.0]]
    h = torch.zeros(28, 28, dtype=torch.float64)
    for i in range(14):
        for j in range(14):
            for r in range(2):
                for s in range(2):
                    h[2 * i + r, 2 * j + s] = c(i, j) * a[r][s] + (b[r][s] if i == j else 0.0)
    return h


def hadamard_matrix(n: int) -> torch.Tensor:
    """The orthonormal H_n (float64) of the documented convention."""
    for m in (1, 12, 20, 28):
        if n % m == 0 and (n // m) & (n // m - 1) == 0:
            return torch.kron(paley(m), sylvester(n // m)) / math.sqrt(n)
    raise ValueError(f"unsupported Hadamard size {n}")


# --------------------------------------------------------------------------------------------
# Rotation plans: the stored key basis (rotation.rs)
# --------------------------------------------------------------------------------------------


def keys_to_stored(k: torch.Tensor, plan: rotatekv.RotationPlan, layer: int) -> torch.Tensor:
    """``k`` ``[n, Hkv, D]`` -> the stored basis ``[n, Hkv, D]`` (float64):
    stored[j] = (H k_group)[perm[j]] for each group of ``group_heads`` consecutive heads."""
    n, hkv, d = k.shape
    gh = plan.group_heads
    gl = gh * d
    perm = torch.from_numpy(np.asarray(plan.key_perm)[layer].astype(np.int64))
    x = k.double().reshape(n, hkv // gh, gl)
    if plan.mode != "none":
        x = x @ hadamard_matrix(gl).T
    out = torch.empty_like(x)
    for g in range(hkv // gh):
        out[:, g, :] = x[:, g, perm[g * gl : (g + 1) * gl]]
    return out.reshape(n, hkv, d)


def keys_from_stored(s: torch.Tensor, plan: rotatekv.RotationPlan, layer: int) -> torch.Tensor:
    """Inverse of :func:`keys_to_stored` (float64)."""
    n, hkv, d = s.shape
    gh = plan.group_heads
    gl = gh * d
    perm = torch.from_numpy(np.asarray(plan.key_perm)[layer].astype(np.int64))
    x = s.double().reshape(n, hkv // gh, gl)
    y = torch.empty_like(x)
    for g in range(hkv // gh):
        y[:, g, perm[g * gl : (g + 1) * gl]] = x[:, g, :]
    if plan.mode != "none":
        y = y @ hadamard_matrix(gl)
    return y.reshape(n, hkv, d)


def values_to_stored(v: torch.Tensor, plan: rotatekv.RotationPlan) -> torch.Tensor:
    d = v.shape[-1]
    if plan.rotate_values:
        return v.double() @ hadamard_matrix(d).T
    return v.double()


def values_from_stored(v: torch.Tensor, plan: rotatekv.RotationPlan) -> torch.Tensor:
    d = v.shape[-1]
    if plan.rotate_values:
        return v.double() @ hadamard_matrix(d)
    return v.double()


# --------------------------------------------------------------------------------------------
# RoPE (rope.rs: Hugging Face rotate_half)
# --------------------------------------------------------------------------------------------


def default_inv_freq(d: int, partial: bool = False, base: float = 10000.0) -> torch.Tensor:
    r = d // 2 if partial else d
    return 1.0 / (base ** (torch.arange(0, r, 2, dtype=torch.float32) / r))


def apply_rope(
    x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0
) -> torch.Tensor:
    """RoPE of ``x`` ``[n, H, D]`` at positions ``pos`` ``[n]`` (float64 result).

    angle = float32(pos) * inv_freq in float32; channel i pairs with i + r/2; channels past
    r = 2 * len(inv_freq) pass through; cos and sin are multiplied by ``scaling``."""
    inv = torch.as_tensor(inv_freq, dtype=torch.float32)
    half = inv.shape[0]
    ang = (pos.to(torch.float32)[:, None] * inv[None, :]).double()
    cos = (torch.cos(ang) * scaling)[:, None, :]
    sin = (torch.sin(ang) * scaling)[:, None, :]
    x = x.double()
    out = x.clone()
    a, b = x[..., :half], x[..., half : 2 * half]
    out[..., :half] = a * cos - b * sin
    out[..., half : 2 * half] = b * cos + a * sin
    return out


def unrope(
    x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0
) -> torch.Tensor:
    """Inverse of :func:`apply_rope` for ``scaling == 1`` (float64)."""
    inv = torch.as_tensor(inv_freq, dtype=torch.float32)
    half = inv.shape[0]
    ang = (pos.to(torch.float32)[:, None] * inv[None, :]).double()
    cos = (torch.cos(ang) / scaling)[:, None, :]
    sin = (torch.sin(ang) / scaling)[:, None, :]
    x = x.double()
    out = x.clone()
    a, b = x[..., :half], x[..., half : 2 * half]
    out[..., :half] = a * cos + b * sin
    out[..., half : 2 * half] = b * cos - a * sin
    return out


# --------------------------------------------------------------------------------------------
# Attention reference
# --------------------------------------------------------------------------------------------


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qpos: torch.Tensor,
    kpos: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    lag: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 attention of one sequence: ``q`` ``[Hq, Tq, D]``, ``k, v`` ``[Hkv, n, D]``;
    returns the output and each row's log-sum-exp of its scores ``[Hq, Tq]``.

    Key j is visible to query t iff (not causal or kpos[j] <= qpos[t] - lag) and (no window
    or qpos[t] - kpos[j] < window). Rows without a visible key are 0 (as the store returns),
    their log-sum-exp -inf."""
    q, k, v = q.double(), k.double(), v.double()
    hq, tq, d = q.shape
    out = torch.zeros(hq, tq, d, dtype=torch.float64)
    lse = torch.full((hq, tq), float("-inf"), dtype=torch.float64)
    if k.shape[1] == 0:
        return out, lse
    qp = qpos.to(torch.int64)[:, None]
    kp = kpos.to(torch.int64)[None, :]
    vis = torch.ones(tq, k.shape[1], dtype=torch.bool)
    if causal:
        vis &= kp <= qp - lag
    if window is not None:
        vis &= (qp - kp) < window
    sc = 1.0 / math.sqrt(d) if scale is None else scale
    g = hq // k.shape[0]
    kk = k.repeat_interleave(g, 0)
    s = (q @ kk.transpose(-1, -2)) * sc
    if softcap is None:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=vis, scale=sc, enable_gqa=True)
    else:
        vv = v.repeat_interleave(g, 0)
        s = softcap * torch.tanh(s / softcap)
        o = torch.softmax(s.masked_fill(~vis, float("-inf")), -1) @ vv
    rows = vis.any(-1)
    out[:, rows] = o[:, rows]
    lse[:, rows] = torch.logsumexp(s.masked_fill(~vis, float("-inf")), -1)[:, rows]
    return out, lse


def attend_reference(
    store: rotatekv.KVStore,
    layer: int,
    q: object,
    qpos: object,
    *,
    causal: bool = True,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    rope: tuple[torch.Tensor, float] | None = None,
    lag: int = 0,
    return_lse: bool = False,
) -> Any:
    """Attention over the store's own dequantized tokens (``store.dequantize``), float64;
    with ``return_lse`` also the rows' log-sum-exps ``[B, Hq, Tq]``.

    ``qpos``: ``[B, Tq]`` query positions. ``rope``: ``(inv_freq, scaling)`` for a pre-RoPE
    store, whose dequantized keys are pre-RoPE."""
    qt = as_torch(q).double()
    b, _, tq, _ = qt.shape
    qpos = torch.as_tensor(np.asarray(qpos), dtype=torch.int64).reshape(-1, tq).expand(b, tq)
    out = torch.zeros_like(qt)
    lse = torch.zeros(qt.shape[:3], dtype=torch.float64)
    for i in range(b):
        pos, k, v = store.dequantize(layer, i)
        kpos = torch.from_numpy(pos.astype(np.int64))
        kt = torch.from_numpy(k).double()
        if rope is not None:
            kt = apply_rope(kt, kpos, rope[0], rope[1])
        out[i], lse[i] = sdpa(
            qt[i],
            kt.permute(1, 0, 2),
            torch.from_numpy(v).double().permute(1, 0, 2),
            qpos[i],
            kpos,
            causal=causal,
            scale=scale,
            window=window,
            softcap=softcap,
            lag=lag,
        )
    return (out, lse) if return_lse else out


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """assert_close tolerances of an attention output of ``dtype`` against float64."""
    if dtype == torch.float16:
        return {"atol": 2e-4, "rtol": 2e-3}
    if dtype == torch.bfloat16:
        return {"atol": 2e-3, "rtol": 1e-2}
    # On AVX-512 VNNI the 2/4-bit kernels round queries and value weights to 16-bit integers
    # (2^-16 of each row's largest entry): up to a few 1e-4 here.
    return {"atol": 5e-4, "rtol": 5e-4}


# --------------------------------------------------------------------------------------------
# Page byte layout (page.rs)
# --------------------------------------------------------------------------------------------


def _align(x: int, a: int) -> int:
    return -(-x // a) * a


def packed_row_bytes(n: int, bits: int) -> int:
    if bits == 3:
        return n // 4 + n // 8
    if bits == 16:
        return 2 * n
    return n * bits // 8


@dataclass
class Layout:
    bits: int
    per_channel: bool
    cap: int
    heads: int
    d: int
    group: int
    tag_off: int
    head_off: int
    head_bytes: int
    k_row: int
    k_scale: int
    k_zero: int
    v_codes: int
    v_row: int
    v_scale: int
    v_zero: int
    total: int

    def token_payload_bytes(self) -> float:
        return (self.total - self.head_off) / self.cap + 5.0

    def as_buffer_dict(self) -> dict[str, int]:
        return {
            "positions": 0,
            "tags": self.tag_off,
            "heads": self.head_off,
            "head_bytes": self.head_bytes,
            "key_codes": 0,
            "key_row_bytes": self.k_row,
            "key_scales": self.k_scale,
            "key_zeros": self.k_zero,
            "value_codes": self.v_codes,
            "value_row_bytes": self.v_row,
            "value_scales": self.v_scale,
            "value_zeros": self.v_zero,
        }


def page_layout(bits: int, per_channel: bool, cap: int, heads: int, d: int, group: int) -> Layout:
    tag_off = 4 * cap
    head_off = _align(tag_off + cap, 8)
    ng = d // group
    if bits == 16:
        k_row = 2 * cap
        k_scale = k_zero = d * k_row
        v_codes = _align(d * k_row, 4)
        v_row = 2 * d
        v_scale = v_zero = end = v_codes + cap * v_row
    else:
        k_row = packed_row_bytes(cap, bits)
        k_scale = _align(d * k_row, 4)
        ks_len = d if per_channel else ng * cap
        k_zero = k_scale + 2 * ks_len
        v_codes = _align(k_zero + 2 * ks_len, 4)
        v_row = packed_row_bytes(d, bits)
        v_scale = _align(v_codes + cap * v_row, 4)
        v_zero = v_scale + 2 * cap * ng
        end = v_zero + 2 * cap * ng
    head_bytes = _align(end, 8)
    return Layout(
        bits, per_channel, cap, heads, d, group, tag_off, head_off, head_bytes, k_row,
        k_scale, k_zero, v_codes, v_row, v_scale, v_zero, head_off + heads * head_bytes,
    )  # fmt: skip


def unpack_row(b: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Codes of a packed row of ``n`` codes (quant.rs "Packing a row")."""
    b = b.astype(np.uint8)
    if bits == 8:
        return b[:n].copy()
    if bits == 4:
        q = n // 2
        return np.concatenate([b[:q] & 15, b[:q] >> 4])
    if bits == 2:
        q = n // 4
        return np.concatenate([(b[:q] >> (2 * s)) & 3 for s in range(4)])
    assert bits == 3
    low = unpack_row(b[: n // 4], 2, n)
    q = n // 8
    high = b[n // 4 : n // 4 + q]
    hi = np.concatenate([(high >> s) & 1 for s in range(8)])
    return low | (hi << 2)


def _f16(raw: np.ndarray, fmt: str = "float16") -> np.ndarray:
    u = raw.view(np.uint16)
    if fmt == "float16":
        return u.view(np.float16).astype(np.float32)
    return (u.astype(np.uint32) << 16).view(np.float32)


@dataclass
class DecodedPage:
    positions: np.ndarray  # int32 [cap]
    tags: np.ndarray  # uint8 [cap]
    keys: np.ndarray  # float32 [cap, H, D], stored basis
    values: np.ndarray  # float32 [cap, H, D], stored basis
    key_codes: np.ndarray | None  # [cap, H, D]
    value_codes: np.ndarray | None


def decode_page(raw: np.ndarray, lay: Layout, fp_format: str = "float16") -> DecodedPage:
    """Decodes a page's bytes following the documented layout table."""
    cap, heads, d, g = lay.cap, lay.heads, lay.d, lay.group
    ng = d // g
    raw = np.asarray(raw, dtype=np.uint8)
    assert raw.shape == (lay.total,)
    positions = raw[: 4 * cap].view(np.int32).copy()
    tags = raw[lay.tag_off : lay.tag_off + cap].copy()
    keys = np.zeros((cap, heads, d), np.float32)
    values = np.zeros((cap, heads, d), np.float32)
    kcodes = np.zeros((cap, heads, d), np.int64) if lay.bits < 16 else None
    vcodes = np.zeros((cap, heads, d), np.int64) if lay.bits < 16 else None
    for h in range(heads):
        base = lay.head_off + h * lay.head_bytes
        if lay.bits == 16:
            kk = _f16(raw[base : base + 2 * d * cap], fp_format).reshape(d, cap)
            vv = _f16(raw[base + lay.v_codes : base + lay.v_codes + 2 * cap * d], fp_format)
            keys[:, h, :] = kk.T
            values[:, h, :] = vv.reshape(cap, d)
            continue
        kc = np.stack(
            [
                unpack_row(raw[base + c * lay.k_row : base + (c + 1) * lay.k_row], lay.bits, cap)
                for c in range(d)
            ]
        )  # [d, cap]
        kcodes[:, h, :] = kc.T
        if lay.per_channel:
            ks = _f16(raw[base + lay.k_scale : base + lay.k_scale + 2 * d])
            kz = _f16(raw[base + lay.k_zero : base + lay.k_zero + 2 * d])
            keys[:, h, :] = kc.T.astype(np.float32) * ks[None, :] + kz[None, :]
        else:
            ks = _f16(raw[base + lay.k_scale : base + lay.k_scale + 2 * ng * cap]).reshape(ng, cap)
            kz = _f16(raw[base + lay.k_zero : base + lay.k_zero + 2 * ng * cap]).reshape(ng, cap)
            ks = np.repeat(ks, g, axis=0)  # [d, cap]
            kz = np.repeat(kz, g, axis=0)
            keys[:, h, :] = (kc.astype(np.float32) * ks + kz).T
        vc = np.stack(
            [
                unpack_row(
                    raw[
                        base + lay.v_codes + u * lay.v_row : base
                        + lay.v_codes
                        + (u + 1) * lay.v_row
                    ],
                    lay.bits,
                    d,
                )
                for u in range(cap)
            ]
        )  # [cap, d]
        vcodes[:, h, :] = vc
        vs = _f16(raw[base + lay.v_scale : base + lay.v_scale + 2 * cap * ng]).reshape(cap, ng)
        vz = _f16(raw[base + lay.v_zero : base + lay.v_zero + 2 * cap * ng]).reshape(cap, ng)
        values[:, h, :] = vc.astype(np.float32) * np.repeat(vs, g, axis=1) + np.repeat(vz, g, 1)
    return DecodedPage(positions, tags, keys, values, kcodes, vcodes)


# --------------------------------------------------------------------------------------------
# Inputs and store snapshots
# --------------------------------------------------------------------------------------------


def make_kv(
    gen: torch.Generator, b: int, h: int, t: int, d: int, outliers: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys with a few outlier channels (as real keys have) and plain values, float32."""
    k = torch.randn(b, h, t, d, generator=gen)
    if outliers:
        k[..., 3] *= 8.0
        k[..., d - 2] += 4.0
    v = torch.randn(b, h, t, d, generator=gen)
    return k, v


def tokens(x: torch.Tensor, b: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens ``[n, H, D]`` of sequence ``b`` of a ``[B, H, T, D]`` tensor (valid ones)."""
    y = x[b].permute(1, 0, 2).float()
    if valid is not None:
        y = y[valid[b]]
    return y


def sorted_by_position(
    deq: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pos, k, v = deq
    order = np.argsort(pos, kind="stable")
    return pos[order], k[order], v[order]


def snapshot(store: rotatekv.KVStore, probe: torch.Tensor | None = None) -> dict[str, object]:
    """Everything observable about a store's contents: lengths, byte counts, every sequence's
    dequantized tokens and (with ``probe`` queries) the attention output at default
    positions, which depends on each sequence's next position."""
    snap: dict[str, object] = {
        "lens": [store.seq_lens(layer) for layer in range(store.num_layers)],
        "nbytes": store.nbytes,
        "payload": store.payload_bytes,
        "deq": [
            [store.dequantize(layer, b) for b in range(store.batch_size)]
            for layer in range(store.num_layers)
        ],
    }
    if probe is not None:
        snap["attend"] = [store.attend(layer, probe) for layer in range(store.num_layers)]
    return snap


def assert_same_snapshot(a: dict[str, object], b: dict[str, object]) -> None:
    assert a["lens"] == b["lens"]
    assert a["nbytes"] == b["nbytes"]
    assert a["payload"] == b["payload"]
    for la, lb in zip(a["deq"], b["deq"], strict=True):
        for sa, sb in zip(la, lb, strict=True):
            for xa, xb in zip(sa, sb, strict=True):
                np.testing.assert_array_equal(xa, xb)
    if "attend" in a:
        for xa, xb in zip(a["attend"], b["attend"], strict=True):
            assert torch.equal(xa, xb)


# --------------------------------------------------------------------------------------------
# Attention mass (saliency.rs docs)
# --------------------------------------------------------------------------------------------


def attention_mass_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    k_valid: torch.Tensor | None = None,
    prior_lse: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
    lag: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense float64 attention probabilities (the full map), summed per key: the mass each
    key gets from queries at distance >= lag, those queries' count, and each query's
    log-sum-exp over visible keys and the prior."""
    qd, kd = q.double().numpy(), k.double().numpy()
    hq, d = qd.shape[1], qd.shape[3]
    hkv = kd.shape[1]
    sc = d**-0.5 if scale is None else scale
    kx = np.repeat(kd, hq // hkv, axis=1)  # [B, Hq, Tk, D]
    s = np.einsum("bhqd,bhkd->bhqk", qd, kx) * sc
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    dist = q_pos.numpy()[:, :, None] - k_pos.numpy()[:, None, :]  # [B, Tq, Tk]
    vis = dist >= 0
    if window is not None:
        vis &= dist < window
    if k_valid is not None:
        vis &= k_valid.numpy()[:, None, :]
    s = np.where(vis[:, None], s, -np.inf)
    parts = [s]
    if prior_lse is not None:
        parts.append(prior_lse.double().numpy()[..., None])
    full = np.concatenate(parts, -1)
    with np.errstate(divide="ignore"):
        lse = np.log(np.exp(full).sum(-1))  # [B, Hq, Tq]
        p = np.exp(s - lse[..., None])
    p = np.nan_to_num(p)
    counted = vis & (dist >= lag)
    mass = (p * counted[:, None]).sum(axis=(1, 2))
    return mass, counted.sum(1), lse
