"""The engine's rules (rotatekv.engine): band attention of a prefill chunk and the log-sum-exp merge
against a dense float64 reference."""

from __future__ import annotations

import pytest
import torch

from rotatekv.engine import band_attention, merge


def dense(q, k, v, qpos, kpos, kvalid, recent, scale, window, softcap, lag=0):
    """Float64 attention with explicit masks: key j is visible to query i iff valid and
    ``lag <= qpos - kpos < recent`` (and ``< window``)."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    sc = torch.einsum("bhtd,bhsd->bhts", q.double(), kk) * scale
    if softcap is not None:
        sc = softcap * torch.tanh(sc / softcap)
    diff = qpos[:, :, None] - kpos[:, None, :]
    vis = (diff >= lag) & (diff < recent) & kvalid[:, None, :]
    if window is not None:
        vis &= diff < window
    sc = sc.masked_fill(~vis[:, None], float("-inf"))
    lse = torch.logsumexp(sc, -1)
    return torch.softmax(sc, -1).nan_to_num(0.0) @ vv, lse


@pytest.mark.parametrize(
    "b,hkv,g,t,front,d,recent,window,softcap",
    [
        (2, 2, 3, 37, 0, 16, 8, None, None),
        (1, 1, 1, 5, 3, 8, 4, None, 2.0),
        (3, 2, 2, 50, 31, 32, 32, 40, None),
        (2, 1, 2, 1, 7, 8, 8, None, None),
        (1, 2, 1, 64, 70, 16, 16, 9, 3.0),
        (2, 3, 1, 17, 2, 24, 1, None, None),
    ],
)
def test_band_attention_matches_dense_reference(
    gen, b, hkv, g, t, front, d, recent, window, softcap
):
    s = front + t
    q = torch.randn(b, hkv * g, t, d, generator=gen)
    k = torch.randn(b, hkv, s, d, generator=gen)
    v = torch.randn(b, hkv, s, d, generator=gen)
    # Positions rise by 1 or 2 per slot (gaps, as explicit positions may have).
    steps = torch.randint(1, 3, (b, s), generator=gen)
    kpos = steps.cumsum(1) + torch.randint(0, 3, (b, 1), generator=gen)
    kvalid = torch.rand(b, s, generator=gen) > 0.2
    kvalid[0, -t:] = False  # a row of queries whose own keys are all padding
    qpos = kpos[:, front:]
    out, lse = band_attention(q, k, v, qpos, kpos, kvalid, recent, 0.3, window, softcap)
    want, want_lse = dense(q, k, v, qpos, kpos, kvalid, recent, 0.3, window, softcap)
    assert out.dtype == torch.float32 and out.shape == q.shape and lse.shape == q.shape[:3]
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    seen = ~torch.isneginf(want_lse)
    torch.testing.assert_close(lse[seen].double(), want_lse[seen], rtol=1e-5, atol=1e-5)


def test_merge_of_disjoint_parts_is_the_whole_attention(gen):
    """Recent keys (band) merged with older keys (``lag``) and a part that sees nothing give
    the attention over all keys."""
    b, h, t, d, r = 2, 2, 23, 16, 5
    q = torch.randn(b, h, t, d, generator=gen)
    k = torch.randn(b, h, t, d, generator=gen)
    v = torch.randn(b, h, t, d, generator=gen)
    pos = torch.arange(t).expand(b, t)
    valid = torch.ones(b, t, dtype=torch.bool)
    big = 10**6
    whole, _ = dense(q, k, v, pos, pos, valid, big, 0.25, None, None)
    near = dense(q, k, v, pos, pos, valid, r, 0.25, None, None)
    far = dense(q, k, v, pos, pos, valid, big, 0.25, None, None, lag=r)
    nothing = dense(q, k, v, pos, pos, valid & False, big, 0.25, None, None)
    out, lse = merge(*near, *far)
    out, lse = merge(*nothing, out, lse)
    torch.testing.assert_close(out.double(), whole, rtol=1e-6, atol=1e-6)
    none, lse0 = merge(*nothing, *nothing)
    assert torch.equal(none, torch.zeros_like(none)) and torch.isneginf(lse0).all()


def test_inputs_are_left_as_they_are(gen):
    """The band and the merge work in place on their own buffers only: float32 inputs (which
    ``.float()`` does not copy) come back unchanged."""
    b, h, t, d = 2, 2, 19, 8
    q, k, v = (torch.randn(b, h, t, d, generator=gen) for _ in range(3))
    pos = torch.arange(t).expand(b, t)
    valid = torch.ones(b, t, dtype=torch.bool)
    before = [x.clone() for x in (q, k, v)]
    out, lse = band_attention(q, k, v, pos, pos, valid, 4, 0.3, None, 2.0)
    assert all(torch.equal(x, y) for x, y in zip((q, k, v), before, strict=True))
    o2, l2 = out.clone(), lse.clone()
    far = dense(q, k, v, pos, pos, valid, 10**6, 0.3, None, 2.0, lag=4)
    far = (far[0].float(), far[1].float())
    f2 = [x.clone() for x in far]
    merge(out, lse, *far)
    assert torch.equal(out, o2) and torch.equal(lse, l2)
    assert all(torch.equal(x, y) for x, y in zip(far, f2, strict=True))


def _store(bits: int, residual: int, hkv: int = 2, d: int = 16):
    from rotatekv import KVStore, QuantConfig, RotationPlan

    cfg = QuantConfig(bits=bits, residual=residual, group_size=None)
    plan = RotationPlan.hadamard(1, hkv, d, mode="post_rope", group_heads=None)
    return KVStore(1, hkv, d, batch_size=2, config=cfg, plan=plan)


@pytest.mark.parametrize("t,recent,window", [(9, 16, None), (23, 8, None), (30, 8, 12)])
def test_attend_chunk_reads_each_query_recent_keys_in_16_bits(gen, t, recent, window):
    """A prefill chunk's queries see their newest ``recent`` keys at 16 bits, older ones packed:
    with the window covering the chunk, a 2-bit store gives fp16 attention; else it lies
    between, and it equals the composition of the store's own attention and the band."""
    from rotatekv.engine import Chunk, attend_chunk

    b, hkv, g, d = 2, 2, 2, 16
    q = torch.randn(b, hkv * g, t, d, generator=gen)
    k = torch.randn(b, hkv, t, d, generator=gen)
    v = torch.randn(b, hkv, t, d, generator=gen)
    pos = torch.arange(t).expand(b, t)
    valid = torch.ones(b, t, dtype=torch.bool)
    ch = Chunk(k, v, k, pos)
    store = _store(2, recent)
    out = attend_chunk(store, 0, q, ch, query_positions=pos, recent=recent, scale=0.25,
                       window=window)  # fmt: skip
    assert store.seq_lens(0) == [t, t] and out.shape == q.shape and out.dtype == q.dtype
    kh, vh = k.half().float(), v.half().float()
    fp16, _ = dense(q, kh, vh, pos, pos, valid, window or 10**6, 0.25, None, None)
    if recent >= t and window is None:
        torch.testing.assert_close(out.double(), fp16, rtol=1e-4, atol=1e-4)
        return
    near = dense(q, kh, vh, pos, pos, valid, recent, 0.25, window, None)
    # The packed part: the same store's attention at lag `recent`.
    far = store.attend(0, q, positions=pos, causal=True, scale=0.25, window=window,
                       lag=recent, return_lse=True)  # fmt: skip
    want, _ = merge(near[0].float(), near[1].float(), *far)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    # Queries whose whole reach lies in the window read only 16-bit keys.
    early = slice(0, min(recent, window or recent))
    torch.testing.assert_close(out[:, :, early].double(), fp16[:, :, early], rtol=1e-4, atol=1e-4)


def test_attend_chunk_failure_leaves_store_and_policy_unchanged(gen):
    """A refused append (a width the store cannot hold) puts the policy's ledgers back and
    stores nothing."""
    from rotatekv import RotateKVError
    from rotatekv.engine import Allocation, Chunk, attend_chunk
    from rotatekv.policy import Allocator

    store = _store(2, 4)
    alloc = Allocator("saliency", 6.0, [2], lambda layer, c: store.class_bits(c))
    b, t, d = 2, 6, 16
    q = torch.randn(b, 4, t, d, generator=gen)
    k = torch.randn(b, 2, t, d, generator=gen)
    pos = torch.arange(t).expand(b, t)
    ok = Chunk(k, k, k, pos)
    attend_chunk(store, 0, q, ok, query_positions=pos, recent=4, policy=Allocation(alloc, 0))
    spent = {i: x.copy() for i, x in alloc.spent.items()}
    bad = Chunk(k, k[:, :, :-1], k, pos + t)  # values one token short
    with pytest.raises(RotateKVError, match="v: expected shape"):
        attend_chunk(store, 0, q, bad, query_positions=pos + t, recent=4,
                     policy=Allocation(alloc, 0))  # fmt: skip
    assert store.seq_lens(0) == [t, t]
    assert all((alloc.spent[i] == spent[i]).all() for i in spent) and set(alloc.spent) == set(spent)
