"""rotatekv.paged: blocks in caller-owned pools, written through slot mappings and read
through block tables, against torch SDPA (16-bit blocks), a float64 reference and a KVStore
fed the same tokens (quantized blocks). Inputs are fresh random draws; the seed is printed
on failure."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import rotatekv
from reference import tolerance
from rotatekv import (
    ArgumentError,
    DTypeError,
    KVStore,
    QuantConfig,
    RotationPlan,
    ShapeError,
    paged,
)

SEED = int(torch.randint(0, 2**31 - 1, ()).item())


def gen(extra: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + extra)


def rope_tables(pos: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ang = pos.to(torch.float32)[:, None] * inv_freq[None]
    return ang.cos().double(), ang.sin().double()


def apply_rope(k: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """transformers' rotate_half RoPE of ``k: [T, H, D]`` (float64 math, float32 out)."""
    cos, sin = rope_tables(pos, inv_freq)
    h = inv_freq.numel()
    kd = k.double()
    a, b = kd[..., :h], kd[..., h : 2 * h]
    c, s = cos[:, None], sin[:, None]
    out = kd.clone()
    out[..., :h] = a * c - b * s
    out[..., h : 2 * h] = b * c + a * s
    return out.float()


class Pool:
    """Requests of the given lengths written into a fresh pool in random block order;
    request 1 shares request 0's first ``shared`` blocks (prefix caching)."""

    def __init__(
        self,
        fmt: paged.BlockFormat,
        lens: list[int],
        g: torch.Generator,
        shared: int = 0,
        spare: int = 3,
    ) -> None:
        bs = fmt.block_size
        self.fmt, self.lens = fmt, lens
        need = [math.ceil(n / bs) for n in lens]
        total = sum(need) - (shared if len(lens) > 1 else 0) + spare
        ids = torch.randperm(total, generator=g).tolist()
        width = max(need) + 1
        self.table = torch.full((len(lens), width), -7, dtype=torch.int32)
        taken = 0
        for b, n in enumerate(need):
            for j in range(n):
                if b == 1 and j < shared:
                    self.table[b, j] = self.table[0, j]
                else:
                    self.table[b, j] = ids[taken]
                    taken += 1
        h, d = fmt.num_kv_heads, fmt.head_dim
        self.k = [torch.randn(n, h, d, generator=g) for n in lens]
        self.v = [torch.randn(n, h, d, generator=g) for n in lens]
        if len(lens) > 1 and shared:
            m = min(shared * bs, lens[1], lens[0])
            self.k[1][:m] = self.k[0][:m]
            self.v[1][:m] = self.v[0][:m]
        self.pool = fmt.new_pool(total)

    def slots(self, b: int) -> torch.Tensor:
        j = torch.arange(self.lens[b])
        bs = self.fmt.block_size
        return self.table[b, j // bs].long() * bs + j % bs

    def write(self, g: torch.Generator, transform=None, into=None, **kw) -> None:
        """Every request's tokens in one call, in random token order; shared slots once
        (into ``into``, a pool on any device, instead of ``self.pool`` when given)."""
        ks, vs, ss, ps = [], [], [], []
        seen: set[int] = set()
        for b in range(len(self.lens)):
            s = self.slots(b)
            keep = torch.tensor([int(x) not in seen for x in s], dtype=torch.bool)
            seen.update(int(x) for x in s)
            pos = torch.arange(self.lens[b])
            k = self.k[b] if transform is None else transform(self.k[b], pos)
            ks.append(k[keep])
            vs.append(self.v[b][keep])
            ss.append(s[keep])
            ps.append(pos[keep])
        k, v, s, p = (torch.cat(x) for x in (ks, vs, ss, ps))
        order = torch.randperm(len(s), generator=g)
        pool = self.pool if into is None else into
        k, v, s, p = (x[order].to(pool.device) for x in (k, v, s, p))
        paged.write(pool, self.fmt, k, v, s, p, **kw)


def reference(k, v, q, scale, causal=True, window=None, softcap=None, lse=False):
    """float64 attention of ``q: [nq, Hq, D]`` (the last positions) over ``k, v: [L, H, D]``;
    with ``lse`` also each row's log-sum-exp ``[nq, Hq]``."""
    n, hkv, d = k.shape
    nq, hq, _ = q.shape
    rep = hq // hkv
    kk = k.double().repeat_interleave(rep, 1)
    vv = v.double().repeat_interleave(rep, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), kk) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    qp = torch.arange(n - nq, n)[:, None]
    kp = torch.arange(n)[None]
    vis = torch.ones(nq, n, dtype=torch.bool)
    if causal:
        vis &= kp <= qp
    if window is not None:
        vis &= qp - kp < window
    s = s.masked_fill(~vis[None], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    out = torch.einsum("hqk,khd->qhd", p, vv)
    return (out, torch.logsumexp(s, -1).T) if lse else out


def ragged_queries(lens, nqs, hq, d, g):
    qs = [torch.randn(nq, hq, d, generator=g) for nq in nqs]
    qsl = torch.tensor([0] + list(torch.tensor(nqs).cumsum(0)), dtype=torch.int32)
    return qs, torch.cat(qs), qsl


CASES = [
    # (head_dim, kv heads, gqa, lens, queries per request)
    (64, 2, 4, [37, 130, 64], [1, 1, 1]),
    (128, 2, 4, [200, 5, 97], [9, 5, 1]),
    (256, 1, 4, [65, 33, 129, 1], [3, 1, 17, 1]),
]


@pytest.mark.parametrize("d,hkv,gqa,lens,nqs", CASES)
@pytest.mark.parametrize("block_size", [32, 64])
def test_16bit_blocks_match_sdpa(d, hkv, gqa, lens, nqs, block_size):
    g = gen(d + block_size)
    fmt = paged.BlockFormat(hkv, d, bits=16, block_size=block_size)
    p = Pool(fmt, lens, g, shared=1)
    # Values fp16 can hold exactly: the blocks store the same K/V as SDPA reads.
    for x in p.k + p.v:
        x.copy_(x.half().float())
    p.write(g)
    qs, q, qsl = ragged_queries(lens, nqs, hkv * gqa, d, g)
    out = paged.attend(p.pool, fmt, q, p.table, torch.tensor(lens), qsl)
    assert out.shape == q.shape and out.dtype == q.dtype
    for b, n in enumerate(lens):
        nq = nqs[b]
        qp = torch.arange(n - nq, n)[:, None]
        mask = torch.arange(n)[None] <= qp
        want = F.scaled_dot_product_attention(
            qs[b].transpose(0, 1),
            p.k[b].transpose(0, 1).repeat_interleave(gqa, 0),
            p.v[b].transpose(0, 1).repeat_interleave(gqa, 0),
            attn_mask=mask,
        ).transpose(0, 1)
        got = out[qsl[b] : qsl[b + 1]]
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4, msg=f"seed {SEED} req {b}")


@pytest.mark.parametrize("window,softcap", [(40, None), (None, 30.0), (7, 5.0)])
def test_16bit_window_softcap_match_float64(window, softcap):
    g = gen(11)
    d, hkv, gqa = 128, 2, 4
    lens, nqs = [150, 41, 77], [4, 1, 19]
    fmt = paged.BlockFormat(hkv, d, bits=16, block_size=64, fp_format="float16")
    p = Pool(fmt, lens, g)
    for x in p.k + p.v:
        x.copy_(x.half().float())
    p.write(g)
    qs, q, qsl = ragged_queries(lens, nqs, hkv * gqa, d, g)
    scale = 0.3
    out, lse = paged.attend(
        p.pool,
        fmt,
        q,
        p.table,
        torch.tensor(lens),
        qsl,
        scale=scale,
        window=window,
        softcap=softcap,
        return_lse=True,
    )
    assert lse.shape == (q.shape[0], q.shape[1]) and lse.dtype == torch.float32
    for b in range(len(lens)):
        want, want_lse = reference(p.k[b], p.v[b], qs[b], scale, True, window, softcap, lse=True)
        rows = slice(qsl[b], qsl[b + 1])
        torch.testing.assert_close(
            out[rows].double(), want, atol=3e-5, rtol=1e-4, msg=f"seed {SEED}"
        )
        torch.testing.assert_close(lse[rows].double(), want_lse, atol=1e-4, rtol=1e-5)


def test_16bit_not_causal_and_empty_request():
    g = gen(12)
    fmt = paged.BlockFormat(2, 64, bits=16, block_size=32)
    lens = [45, 0, 20]
    p = Pool(fmt, lens, g)
    for x in p.k + p.v:
        x.copy_(x.half().float())
    p.write(g)
    qs, q, qsl = ragged_queries(lens, [3, 0, 2], 4, 64, g)
    out, lse = paged.attend(
        p.pool, fmt, q, p.table, torch.tensor(lens), qsl, causal=False, return_lse=True
    )
    for b in (0, 2):
        want = reference(p.k[b], p.v[b], qs[b], 1 / 8, causal=False)
        torch.testing.assert_close(out[qsl[b] : qsl[b + 1]].double(), want, atol=3e-5, rtol=1e-4)


def hadamard_plan(d: int, hkv: int, mode: str, layers: int = 2) -> RotationPlan:
    g = gen(99)
    base = RotationPlan.hadamard(layers, hkv, d, mode=mode)
    n = base.group_heads * d
    perm = torch.stack(
        [
            torch.cat([torch.randperm(n, generator=g) for _ in range(hkv // base.group_heads)])
            for _ in range(layers)
        ]
    )
    return RotationPlan(
        layers,
        hkv,
        d,
        mode=mode,
        group_heads=base.group_heads,
        rotate_values=True,
        key_perm=perm.numpy().astype("int32"),
        key_clip=[0.95] * layers,
        value_clip=[1.0] * layers,
    )


def store_for(fmt, plan, layer, k, v, rope=None, group=None):
    """A one-sequence KVStore of the same format fed ``k, v: [L, H, D]`` at ``layer``."""
    cfg = QuantConfig(
        key_bits=fmt.key_bits,
        value_bits=fmt.value_bits,
        page_tokens=fmt.block_size,
        group_size=group,
    )
    s = KVStore(
        plan.num_layers,
        fmt.num_kv_heads,
        fmt.head_dim,
        batch_size=1,
        config=cfg,
        plan=plan,
        rope_inv_freq=rope,
    )
    s.append(layer, k.transpose(0, 1)[None], v.transpose(0, 1)[None])
    return s


QCASES = [
    # (bits, d, kv heads, gqa, group, mode)
    (2, 128, 2, 4, None, "post_rope"),
    (3, 64, 2, 4, 32, "none"),
    (4, 128, 1, 4, 64, "post_rope"),
    (8, 64, 4, 1, None, "post_rope"),
    (2, 256, 1, 4, None, "none"),
]


@pytest.mark.parametrize("bits,d,hkv,gqa,group,mode", QCASES)
def test_quantized_blocks_match_the_store(bits, d, hkv, gqa, group, mode):
    g = gen(bits * 1000 + d)
    lens, nqs = [150, 64, 77], [1, 7, 19]
    fmt = paged.BlockFormat(hkv, d, bits=bits, block_size=64, group_size=group)
    plan = hadamard_plan(d, hkv, mode) if mode != "none" else RotationPlan.identity(2, hkv, d)
    layer = 1
    p = Pool(fmt, lens, g, shared=1)
    p.write(g, plan=plan, layer=layer)
    qs, q, qsl = ragged_queries(lens, nqs, hkv * gqa, d, g)
    kw = dict(scale=0.2, window=100, softcap=20.0)
    out = paged.attend(
        p.pool, fmt, q, p.table, torch.tensor(lens), qsl, plan=plan, layer=layer, **kw
    )
    for b, n in enumerate(lens):
        s = store_for(fmt, plan, layer, p.k[b], p.v[b], group=group)
        want = s.attend(layer, qs[b].transpose(0, 1)[None], **kw)[0].transpose(0, 1)
        got = out[qsl[b] : qsl[b + 1]]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=f"seed {SEED} req {b}")
        # Same bytes where the formats coincide: a store page is a header, then a block.
        bufs = s.page_buffers(layer, 0)
        assert len(bufs) == math.ceil(n / 64)
        for j, buf in enumerate(bufs):
            page = torch.from_dlpack(buf)
            block = p.pool[int(p.table[b, j])]
            assert page.numel() - buf.layout["heads"] == fmt.block_bytes
            assert torch.equal(page[buf.layout["heads"] :], block), f"seed {SEED} req {b} blk {j}"


@pytest.mark.parametrize("bits", [2, 16])
def test_pre_rope_blocks_undo_rope_with_positions(bits):
    g = gen(7 + bits)
    d, hkv, gqa = 128, 2, 4
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 48, 2).float() / 48))  # partial rotary
    lens, nqs = [130, 45], [1, 6]
    fmt = paged.BlockFormat(hkv, d, bits=bits, block_size=64)
    plan = hadamard_plan(d, hkv, "pre_rope")
    p = Pool(fmt, lens, g)
    rope_kw = dict(rope_inv_freq=inv_freq.tolist(), rope_scaling=1.0)
    p.write(g, transform=lambda k, pos: apply_rope(k, pos, inv_freq), plan=plan, layer=0, **rope_kw)
    qs, q, qsl = ragged_queries(lens, nqs, hkv * gqa, d, g)
    out = paged.attend(p.pool, fmt, q, p.table, torch.tensor(lens), qsl, plan=plan, **rope_kw)
    for b, n in enumerate(lens):
        got = out[qsl[b] : qsl[b + 1]]
        k_post = apply_rope(p.k[b], torch.arange(n), inv_freq)
        if bits == 16:
            k16 = k_post.half().float()  # what 16-bit blocks hold, up to the RoPE round trip
            want = reference(k16, p.v[b].half().float(), qs[b], d**-0.5).float()
            torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3, msg=f"seed {SEED}")
            continue
        # The store takes pre-RoPE keys; the pool recovered them from post-RoPE keys in f32,
        # so a code may rarely land one step apart: compare whole outputs loosely.
        s = store_for(fmt, plan, 0, p.k[b], p.v[b], rope=inv_freq.tolist())
        want = s.attend(0, qs[b].transpose(0, 1)[None])[0].transpose(0, 1)
        err = (got - want).norm() / want.norm()
        assert err < 2e-2, f"seed {SEED} req {b}: relative error {err}"


def test_neighbouring_slots_in_one_call_do_not_clobber():
    """2-bit codes of slots u, u+16, u+32, u+48 share a byte (block of 64)."""
    g = gen(21)
    fmt = paged.BlockFormat(2, 64, bits=2, block_size=64)
    k, v = torch.randn(8, 2, 64, generator=g), torch.randn(8, 2, 64, generator=g)
    slots = torch.tensor([64 + 3, 64 + 19, 64 + 35, 64 + 51, 64 + 4, 64 + 20, 3, 19])
    one = fmt.new_pool(2)
    paged.write(one, fmt, k, v, slots)
    apart = fmt.new_pool(2)
    for i in torch.randperm(8, generator=g).tolist():
        paged.write(apart, fmt, k[i : i + 1], v[i : i + 1], slots[i : i + 1])
    assert torch.equal(one, apart)
    # Writing more slots later leaves the earlier ones as they were.
    before = one.clone()
    paged.write(one, fmt, torch.randn(1, 2, 64), torch.randn(1, 2, 64), torch.tensor([64 + 36]))
    dec_before = paged.attend(before, fmt, torch.randn(1, 2, 64), torch.tensor([[1]]), [64], [0, 1])
    assert not torch.equal(one, before)
    changed = (one != before).nonzero()[:, 1]
    lay = fmt.layout()
    hb = lay["head_bytes"]
    # Only bytes of slot 36's key codes (byte 4 of each channel row, shared with 4, 20, 52),
    # its scale/zero and its value row may change.
    for off in changed.tolist():
        rel = off % hb
        if rel < lay["key_scales"]:
            assert rel % lay["key_row_bytes"] == 36 % 16
    assert dec_before.isfinite().all()


def test_padding_slots_are_skipped_and_failed_writes_change_nothing():
    g = gen(31)
    fmt = paged.BlockFormat(2, 64, bits=4, block_size=32)
    pool = fmt.new_pool(3)
    k, v = torch.randn(4, 2, 64, generator=g), torch.randn(4, 2, 64, generator=g)
    paged.write(pool, fmt, k, v, torch.tensor([-1, 5, -1, 6]))
    ref = fmt.new_pool(3)
    paged.write(ref, fmt, k[[1, 3]], v[[1, 3]], torch.tensor([5, 6]))
    assert torch.equal(pool, ref)
    before = pool.clone()
    bad_k = k.clone()
    bad_k[2, 1, 7] = float("nan")
    for args, err, word in [
        ((k, v, torch.tensor([0, 1, 2, 96])), ArgumentError, "slot_mapping"),
        ((k, v, torch.tensor([0, 1, 1, 2])), ArgumentError, "slot_mapping"),
        ((bad_k, v, torch.tensor([0, 1, 2, 3])), ArgumentError, "k"),
        ((k, v, torch.tensor([0, 1, 2])), ShapeError, "slot_mapping"),
        ((k[:, :1], v[:, :1], torch.tensor([0, 1, 2, 3])), ShapeError, "k"),
    ]:
        with pytest.raises(err, match=word):
            paged.write(pool, fmt, *args)
        assert torch.equal(pool, before)


def test_bad_arguments_name_what_was_expected():
    fmt = paged.BlockFormat(2, 64, bits=2, block_size=64)
    pool = fmt.new_pool(2)
    narrow = torch.zeros(2, fmt.block_bytes - 8, dtype=torch.uint8)
    pre, inv = hadamard_plan(64, 2, "pre_rope"), [1.0, 0.5, 0.25]
    q = torch.randn(1, 4, 64)
    cases = [
        (lambda: paged.BlockFormat(2, 64, bits=5), ArgumentError, "bits"),
        (lambda: paged.BlockFormat(2, 64, block_size=16), ArgumentError, "block_size"),
        (lambda: paged.BlockFormat(2, 60), ArgumentError, "head_dim"),
        (lambda: paged.BlockFormat(2, 64, group_size=48), ArgumentError, "group_size"),
        (lambda: paged.BlockFormat(2, 64, bits=2, key_bits=5), ArgumentError, "key_bits"),
        (lambda: paged.BlockFormat(2, 64, key_bits=16, value_bits=2), ArgumentError, "value_bits"),
        (lambda: paged.BlockFormat(2, 64, bits=300), ArgumentError, "bits"),
        (lambda: paged.BlockFormat(2, 64, fp_format="fp8"), ArgumentError, "fp_format"),
        (lambda: paged.attend(pool[:, :-1], fmt, q, [[0]], [1], [0, 1]), ShapeError, "pool"),
        (lambda: paged.attend(narrow, fmt, q, [[0]], [1], [0, 1]), ShapeError, "block_bytes"),
        (lambda: paged.attend(pool.float(), fmt, q, [[0]], [1], [0, 1]), DTypeError, "pool"),
        (lambda: paged.attend(pool, fmt, q, [[5]], [1], [0, 1]), ArgumentError, "block_table"),
        (lambda: paged.attend(pool, fmt, q, [[0]], [65], [0, 1]), ShapeError, "block_table"),
        (lambda: paged.attend(pool, fmt, q, [[0]], [1], [0, 2]), ArgumentError, "query_start"),
        (lambda: paged.attend(pool, fmt, q, [[0]], [0], [0, 1]), ArgumentError, "seq_lens"),
        (lambda: paged.attend(pool, fmt, q[:, :3], [[0]], [1], [0, 1]), ShapeError, "q"),
        (
            lambda: paged.write(pool, fmt, q[:, :2], q[:, :2], [0], plan=pre),
            ArgumentError,
            "rope_inv_freq",
        ),
        (
            lambda: paged.write(pool, fmt, q[:, :2], q[:, :2], [0], plan=pre, rope_inv_freq=inv),
            ArgumentError,
            "positions",
        ),
        (
            lambda: paged.attend(
                pool, fmt, q, [[0]], [1], [0, 1], plan=RotationPlan.identity(1, 4, 64)
            ),
            ArgumentError,
            "plan",
        ),
        (lambda: paged.attend(pool, fmt, q, [[0]], [1], [0, 1], layer=3), ArgumentError, "layer"),
    ]
    for fn, err, word in cases:
        with pytest.raises(err, match=word):
            fn()


def test_block_format_reports_its_bytes():
    f = paged.BlockFormat(num_kv_heads=8, head_dim=128, bits=2, block_size=64)
    # Codes D*bs/4 per K and V, fp16 scale+zero per token for K and V, per head.
    per_head = 2 * (128 * 64 // 4) + 2 * (2 * 2 * 64)
    assert f.block_bytes == 8 * per_head
    assert f.bits_per_element() == pytest.approx(2.25)
    assert f.bits_per_element() <= 2.26
    pool = f.new_pool(3)
    assert pool.dtype == torch.uint8 and pool.shape == (3, f.block_bytes)
    assert paged.BlockFormat(8, 128, bits=16).bits_per_element() == 16
    assert f.key_bits == f.value_bits == 2


def test_numpy_pools_and_half_inputs_work_in_place():
    """A numpy uint8 pool and numpy float16 tensors go through the same kernels, in place."""
    import numpy as np

    g = gen(41)
    fmt = paged.BlockFormat(2, 64, bits=4, block_size=32)
    k = torch.randn(40, 2, 64, generator=g).half()
    v = torch.randn(40, 2, 64, generator=g).half()
    slots = torch.arange(40) + 32
    ref = fmt.new_pool(3)
    paged.write(ref, fmt, k, v, slots)
    pool = np.zeros((3, fmt.block_bytes), np.uint8)
    paged.write(pool, fmt, k.numpy(), v.numpy(), slots.numpy())
    assert np.array_equal(pool, ref.numpy())
    q = torch.randn(2, 4, 64, generator=g)
    args = ([[1, 2]], [40], [0, 2])
    want = paged.attend(ref, fmt, q, *args)
    got = paged.attend(pool, fmt, q.numpy(), *args)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want.numpy())
    out = torch.empty_like(q)
    assert paged.attend(ref, fmt, q, *args, out=out) is out
    assert torch.equal(out, want)
    ro = pool.copy()
    ro.flags.writeable = False
    np.testing.assert_array_equal(paged.attend(ro, fmt, q.numpy(), *args), got)  # reads only
    with pytest.raises(ArgumentError, match="pool: expected a writable array"):
        paged.write(ro, fmt, k, v, slots)


@pytest.mark.parametrize("kb,vb", [(4, 2), (3, 2), (8, 4), (2, 4)])
def test_separate_key_and_value_widths(kb, vb):
    """``k4v2`` blocks: the key part of a ``kb``-bit block and the value part of a ``vb``-bit
    one, byte for byte, and attention over exactly those dequantized keys and values."""
    g = gen(kb * 10 + vb)
    d, hkv, gqa, lens, nqs = 128, 2, 4, [150, 70], [1, 9]
    plan = hadamard_plan(d, hkv, "post_rope")
    fmts = {
        "kv": paged.BlockFormat(hkv, d, key_bits=kb, value_bits=vb),
        "k": paged.BlockFormat(hkv, d, bits=kb),
        "v": paged.BlockFormat(hkv, d, bits=vb),
    }
    assert (fmts["kv"].key_bits, fmts["kv"].value_bits) == (kb, vb)
    want_bits = (kb + vb) / 2 + 32 / d  # an fp16 scale and zero per token per side
    assert fmts["kv"].bits_per_element() == pytest.approx(want_bits)
    pools = {}
    for name, fmt in fmts.items():
        p = Pool(fmt, lens, gen(kb * 10 + vb))  # the same tokens and block order each time
        p.write(gen(5), plan=plan, layer=1)
        pools[name] = p
    lay = {n: f.layout() for n, f in fmts.items()}
    hb = lay["kv"]["head_bytes"]
    for blk in range(pools["kv"].pool.shape[0]):
        for h in range(hkv):
            kv = pools["kv"].pool[blk, h * hb : (h + 1) * hb]
            k = pools["k"].pool[blk, h * lay["k"]["head_bytes"] :]
            v = pools["v"].pool[blk, h * lay["v"]["head_bytes"] :]
            vc = lay["kv"]["value_codes"]
            assert vc == lay["k"]["value_codes"]
            assert torch.equal(kv[:vc], k[:vc])
            n_val = hb - vc
            vc_v = lay["v"]["value_codes"]
            tail = lay["v"]["head_bytes"] - vc_v
            assert torch.equal(kv[vc : vc + tail], v[vc_v : vc_v + tail])
            assert n_val >= tail
    p = pools["kv"]
    qs, q, qsl = ragged_queries(lens, nqs, hkv * gqa, d, g)
    out = paged.attend(p.pool, fmts["kv"], q, p.table, torch.tensor(lens), qsl, plan=plan, layer=1)
    for b, n in enumerate(lens):
        # The same tokens in kb- and vb-bit stores, read back in the model's basis.
        ks = store_for(fmts["k"], plan, 1, p.k[b], p.v[b]).dequantize(1, 0)[1]
        vs = store_for(fmts["v"], plan, 1, p.k[b], p.v[b]).dequantize(1, 0)[2]
        kk = torch.from_numpy(ks).reshape(n, hkv, d)
        vv = torch.from_numpy(vs).reshape(n, hkv, d)
        want = reference(kk, vv, qs[b], d**-0.5)
        got = out[qsl[b] : qsl[b + 1]].double()
        # AVX-512 VNNI rounds queries and value weights to 16 bits (tolerance's note).
        torch.testing.assert_close(
            got, want, **tolerance(torch.float32), msg=f"seed {SEED} req {b}"
        )


@pytest.mark.parametrize("kb,vb", [(4, 2), (3, 2), (2, 4)])
def test_stores_with_separate_widths_match_the_pool(kb, vb, tmp_path):
    """A KVStore configured ``key_bits=kb, value_bits=vb`` holds the pool's bytes (a page is
    a header, then a block) and attends alike; its device copy (emulated) as well; a saved
    store loads with its widths."""
    g = gen(kb * 7 + vb)
    d, hkv, gqa, lens, nqs = 64, 2, 4, [150, 70], [1, 9]
    plan = hadamard_plan(d, hkv, "post_rope")
    fmt = paged.BlockFormat(hkv, d, key_bits=kb, value_bits=vb)
    p = Pool(fmt, lens, g)
    p.write(g, plan=plan, layer=1)
    qs, q, qsl = ragged_queries(lens, nqs, hkv * gqa, d, g)
    out = paged.attend(p.pool, fmt, q, p.table, torch.tensor(lens), qsl, plan=plan, layer=1)
    for b in range(len(lens)):
        s = store_for(fmt, plan, 1, p.k[b], p.v[b])
        assert (s.config["key_bits"], s.config["value_bits"]) == (kb, vb)
        # The device append kernel packs the same tokens (emulated device, fresh store).
        e = s.to("emu")
        e.clear()
        e.append(1, p.k[b].transpose(0, 1)[None], p.v[b].transpose(0, 1)[None])
        # Codes of both widths, fp16 scale and zero per token and side, position and tag.
        want_bits = (kb + vb) / 2 + 32 / d + 5 * 8 / (2 * hkv * d)
        assert s.class_bits(kb) == pytest.approx(want_bits)
        s.save(tmp_path / f"s{b}")
        loaded = KVStore.load(tmp_path / f"s{b}")
        assert (loaded.config["key_bits"], loaded.config["value_bits"]) == (kb, vb)
        want = out[qsl[b] : qsl[b + 1]]
        for store in (s, e, loaded):
            got = store.attend(1, qs[b].transpose(0, 1)[None])[0].transpose(0, 1)
            # The emulated device computes in f32 where AVX-512 VNNI rounds to 16 bits.
            torch.testing.assert_close(got, want, **tolerance(torch.float32), msg=f"seed {SEED}")
        for j, buf in enumerate(s.page_buffers(1, 0)):
            page = torch.from_dlpack(buf)[buf.layout["heads"] :]
            assert torch.equal(page, p.pool[int(p.table[b, j])]), f"seed {SEED} req {b}"
    with pytest.raises(ArgumentError, match="value_bits"):
        QuantConfig(key_bits=16, value_bits=2)
    with pytest.raises(ArgumentError, match="value_bits"):
        QuantConfig(value_bits=5)


# ---------------------------------------------------------------------------------------
# The CUDA kernels over pools, with slot mappings and block tables read on the device:
# device="emu" (their host build) everywhere, device="cuda" on a GPU (pytest -m cuda).

GPU = torch.cuda.is_available()
DEVICES = [
    "emu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not GPU, reason="needs a GPU")]
    ),
]


def on(dev: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` where a ``dev`` pool's arguments live (emulated pools are CPU tensors)."""
    return x if dev == "emu" else x.to(dev)


def device_attend(dev, pool, fmt, q, table, lens, qsl, **kw):
    i32 = torch.int32
    return paged.attend(
        pool,
        fmt,
        on(dev, q),
        on(dev, table.to(i32)),
        on(dev, torch.tensor(lens, dtype=i32)),
        on(dev, qsl.to(i32)),
        device=dev,
        **kw,
    )


DCASES = [
    # (key bits, value bits, head dim, kv heads, gqa, plan mode, lens, queries, window, softcap)
    (16, 16, 64, 2, 4, "none", [37, 130, 64], [1, 1, 1], None, None),
    (2, 2, 128, 2, 4, "post_rope", [150, 5, 97], [9, 5, 1], 100, 20.0),
    (4, 2, 64, 1, 4, "post_rope", [65, 33, 129, 1], [3, 1, 17, 1], None, None),
    (3, 2, 64, 2, 1, "none", [70, 1], [2, 1], 7, 5.0),
    (8, 8, 256, 1, 4, "post_rope", [65, 30], [1, 4], None, None),
]


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("kb,vb,d,hkv,gqa,mode,lens,nqs,window,softcap", DCASES)
def test_device_pools_match_the_cpu_kernels(
    dev, kb, vb, d, hkv, gqa, mode, lens, nqs, window, softcap
):
    """The CUDA writer packs the CPU writer's bytes, bit for bit (ragged requests, a shared
    block, random block and token order, k4v2-style widths); attention over the pool gives
    the CPU kernel's outputs and log-sum-exps."""
    g = gen(kb * 100 + vb * 10 + d)
    fmt = paged.BlockFormat(hkv, d, key_bits=kb, value_bits=vb, block_size=32)
    plan = hadamard_plan(d, hkv, mode) if mode != "none" else RotationPlan.identity(2, hkv, d)
    p = Pool(fmt, lens, g, shared=1)
    p.write(gen(5), plan=plan, layer=1)
    dpool = on(dev, torch.zeros_like(p.pool))
    p.write(gen(5), into=dpool, plan=plan, layer=1, device=dev)
    assert torch.equal(dpool.cpu(), p.pool), f"seed {SEED}"
    qs, q, qsl = ragged_queries(lens, nqs, hkv * gqa, d, g)
    kw = dict(plan=plan, layer=1, scale=0.2, window=window, softcap=softcap, return_lse=True)
    want, want_lse = paged.attend(p.pool, fmt, q, p.table, torch.tensor(lens), qsl, **kw)
    got, lse = device_attend(dev, dpool, fmt, q, p.table, lens, qsl, **kw)
    assert got.shape == q.shape and lse.shape == want_lse.shape
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-4, msg=f"seed {SEED}")
    torch.testing.assert_close(lse.cpu(), want_lse, atol=1e-5, rtol=1e-5, msg=f"seed {SEED}")
    # The grid bound given (as serving engines know it) is what the default reads back; a
    # larger one only adds rows that are skipped (and may change the tiling's sum order).
    again = device_attend(dev, dpool, fmt, q, p.table, lens, qsl, max_query_len=max(nqs), **kw)
    assert torch.equal(again[0], got)
    again = device_attend(dev, dpool, fmt, q, p.table, lens, qsl, max_query_len=max(nqs) + 3, **kw)
    torch.testing.assert_close(again[0], got, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dev", DEVICES)
def test_device_pools_take_half_inputs_and_int32_slots(dev):
    g = gen(51)
    fmt = paged.BlockFormat(2, 64, bits=4, block_size=32)
    for dtype in (torch.float16, torch.bfloat16):
        k = torch.randn(40, 2, 64, generator=g).to(dtype)
        v = torch.randn(40, 2, 64, generator=g).to(dtype)
        slots = torch.arange(40) + 32
        ref = fmt.new_pool(3)
        paged.write(ref, fmt, k, v, slots)
        pool = on(dev, fmt.new_pool(3))
        paged.write(pool, fmt, on(dev, k), on(dev, v), on(dev, slots.int()), device=dev)
        assert torch.equal(pool.cpu(), ref)
        q = torch.randn(2, 4, 64, generator=g).to(dtype)
        want = paged.attend(ref, fmt, q, [[1, 2]], [40], [0, 2])
        got = device_attend(dev, pool, fmt, q, torch.tensor([[1, 2]]), [40], torch.tensor([0, 2]))
        assert got.dtype == dtype
        torch.testing.assert_close(got.cpu().float(), want.float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dev", DEVICES)
def test_device_pre_rope_writes_undo_rope_on_the_device(dev):
    g = gen(61)
    d, hkv, gqa = 128, 2, 4
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 48, 2).float() / 48))  # partial rotary
    rope_kw = dict(rope_inv_freq=inv_freq.tolist(), rope_scaling=1.0)
    lens, nqs = [130, 45], [1, 6]
    fmt = paged.BlockFormat(hkv, d, bits=2, block_size=64)
    plan = hadamard_plan(d, hkv, "pre_rope")
    p = Pool(fmt, lens, g)
    post = lambda k, pos: apply_rope(k, pos, inv_freq)  # noqa: E731
    p.write(gen(6), transform=post, plan=plan, **rope_kw)
    dpool = on(dev, torch.zeros_like(p.pool))
    p.write(gen(6), transform=post, into=dpool, plan=plan, device=dev, **rope_kw)
    # RoPE is undone in f32 with the device's sincos: a code may rarely land one step apart.
    same = (dpool.cpu() == p.pool).double().mean()
    assert same > 0.99, f"seed {SEED}: {same}"
    qs, q, qsl = ragged_queries(lens, nqs, hkv * gqa, d, g)
    kw = dict(plan=plan, **rope_kw)
    want = paged.attend(p.pool, fmt, q, p.table, torch.tensor(lens), qsl, **kw)
    # The device kernel re-applies RoPE at each key's place in its request.
    got = device_attend(dev, on(dev, p.pool), fmt, q, p.table, lens, qsl, **kw)
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-3, msg=f"seed {SEED}")
    got = device_attend(dev, dpool, fmt, q, p.table, lens, qsl, **kw).cpu()
    err = (got - want).norm() / want.norm()
    assert err < 2e-2, f"seed {SEED}: relative error {err}"


@pytest.mark.parametrize("dev", DEVICES)
def test_device_writers_of_neighbouring_slots_do_not_clobber(dev):
    """2-bit codes of slots u, u+16, u+32, u+48 share a byte: one launch writes them all
    (one thread block per token) and matches tokens written one call at a time."""
    g = gen(71)
    fmt = paged.BlockFormat(2, 64, bits=2, block_size=64)
    k, v = torch.randn(12, 2, 64, generator=g), torch.randn(12, 2, 64, generator=g)
    slots = torch.tensor([67, 83, 99, 115, 68, 84, 100, 116, 3, 19, 35, 51])
    one = on(dev, fmt.new_pool(2))
    paged.write(one, fmt, on(dev, k), on(dev, v), on(dev, slots), device=dev)
    apart = fmt.new_pool(2)
    for i in torch.randperm(12, generator=g).tolist():
        paged.write(apart, fmt, k[i : i + 1], v[i : i + 1], slots[i : i + 1])
    assert torch.equal(one.cpu(), apart)


@pytest.mark.parametrize("dev", DEVICES)
def test_device_padding_and_slots_outside_the_pool_are_skipped(dev):
    """-1 pads; a slot past the pool is skipped on the device (refusing it would mean
    reading the mapping back to the host), so a bad slot never writes out of bounds."""
    g = gen(81)
    fmt = paged.BlockFormat(2, 64, bits=4, block_size=32)
    k, v = torch.randn(5, 2, 64, generator=g), torch.randn(5, 2, 64, generator=g)
    pool = on(dev, fmt.new_pool(3))
    s = torch.tensor([-1, 5, 96, 6, -5])
    paged.write(pool, fmt, on(dev, k), on(dev, v), on(dev, s), device=dev)
    ref = fmt.new_pool(3)
    paged.write(ref, fmt, k[[1, 3]], v[[1, 3]], torch.tensor([5, 6]))
    assert torch.equal(pool.cpu(), ref)
    # A block id outside the pool reads as no tokens.
    q = torch.randn(1, 4, 64, generator=g)
    out, lse = device_attend(
        dev, pool, fmt, q, torch.tensor([[7]]), [3], torch.tensor([0, 1]), return_lse=True
    )
    assert torch.equal(out.cpu(), torch.zeros_like(q)) and torch.isinf(lse).all()


def test_device_arguments_are_checked_before_any_launch():
    fmt = paged.BlockFormat(2, 64, bits=2, block_size=64)
    pool = fmt.new_pool(2)
    before = pool.clone()
    k = torch.randn(3, 2, 64)
    s = torch.tensor([0, 1, 2])
    pre, inv = hadamard_plan(64, 2, "pre_rope"), [1.0, 0.5, 0.25]
    q = torch.randn(1, 4, 64)
    t32 = lambda *x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    bt, sl, qsl = t32([0]), t32(1), t32(0, 1)
    nan = k.clone()
    nan[1, 0, 3] = float("nan")
    cases = [
        (lambda: paged.write(pool, fmt, k, k, s, device="tpu"), rotatekv.DeviceError, "device"),
        (lambda: paged.write(pool.numpy(), fmt, k, k, s, device="emu"), DTypeError, "pool"),
        (lambda: paged.write(pool[:, 1:], fmt, k, k, s, device="emu"), ShapeError, "pool"),
        (lambda: paged.write(pool, fmt, k[0], k[0], s, device="emu"), ShapeError, "k"),
        (lambda: paged.write(pool, fmt, k, k[:, :1], s, device="emu"), ShapeError, "v"),
        (lambda: paged.write(pool, fmt, k, k.half(), s, device="emu"), DTypeError, "v"),
        (lambda: paged.write(pool, fmt, k, k, s[:2], device="emu"), ShapeError, "slot_mapping"),
        (lambda: paged.write(pool, fmt, k, k, s.float(), device="emu"), DTypeError, "slot_mapping"),
        (lambda: paged.write(pool, fmt, nan, k, s, device="emu"), ArgumentError, "k"),
        (
            lambda: paged.write(pool, fmt, k, k, s, plan=pre, rope_inv_freq=inv, device="emu"),
            ArgumentError,
            "positions",
        ),
        (lambda: device_attend("emu", pool, fmt, q[:, :3], bt, [1], qsl), ShapeError, "q"),
        (
            lambda: paged.attend(pool, fmt, q, bt.long(), sl, qsl, device="emu"),
            DTypeError,
            "block_table",
        ),
        (
            lambda: paged.attend(pool, fmt, q, bt[0], sl, qsl, device="emu"),
            ShapeError,
            "block_table",
        ),
        (
            lambda: paged.attend(pool, fmt, q, bt, t32(1, 2), qsl, device="emu"),
            ShapeError,
            "seq_lens",
        ),
        (
            lambda: paged.attend(pool, fmt, q, bt, sl, t32(0), device="emu"),
            ShapeError,
            "query_start",
        ),
        (
            lambda: paged.attend(pool, fmt, q, bt, sl, qsl, max_query_len=-1, device="emu"),
            ArgumentError,
            "max_query_len",
        ),
        (
            lambda: paged.attend(pool, fmt, q, bt, sl, qsl, out=q[:, :2], device="emu"),
            ShapeError,
            "out",
        ),
        (
            lambda: paged.attend(pool, fmt, q, bt, sl, qsl, window=0, device="emu"),
            ArgumentError,
            "window",
        ),
    ]
    for fn, err, word in cases:
        with pytest.raises(err, match=word):
            fn()
        assert torch.equal(pool, before)
