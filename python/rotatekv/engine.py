"""One attention step over a packed cache: the rules every integration shares.

A step appends a chunk of a layer's tokens and attends the chunk's queries. The rules:

* :func:`recent_tokens`: a query reads its newest ``residual`` keys in 16 bits, as a
  store's recent window keeps them (none in a 16-bit layer, where every key is 16-bit);
* :func:`merge`: softmax parts over disjoint key sets combine exactly by log-sum-exp;
* :func:`band_attention`: a prefill chunk's queries over their own chunk's recent keys,
  ``O(T * R)``; :func:`dense_attention`: queries over gathered windows ``[T, R]``;
* :func:`attend_chunk`: the step over a :class:`rotatekv.KVStore` layer: sinks kept in 16
  bits, per-token widths from a policy (:class:`rotatekv.policy.Allocator`), the chunk
  appended, its queries' recent keys in 16 bits and older ones packed, in one softmax.

Who calls what: :mod:`rotatekv.hf` (transformers, store-owned pages) runs
:func:`attend_chunk`; :mod:`rotatekv.recent` (engine-owned pools: the vLLM backend) uses
:func:`recent_tokens`, :func:`dense_attention` and :func:`merge` for its composed path and
the fused kernel for the rest. Nothing here depends on transformers or vLLM.

A prefill chunk gets decode's precision: every query reads the keys within ``R`` positions of
it in 16 bits, those before the chunk from the store's window (``window=R``, read before the
chunk is appended), those in the chunk from the chunk itself; older keys packed
(``KVStore.attend(..., lag=R, return_lse=True)``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ._rotatekv import KVStore
from .policy import Allocator, chunk_statistics

# Position of the filler slots: never within a query's reach.
_FAR = torch.iinfo(torch.int64).max // 4


def band_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qpos: torch.Tensor,
    kpos: torch.Tensor,
    kvalid: torch.Tensor,
    recent: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [B, Hq, T, D]`` to the keys ``k, v [B, Hkv, S, D]`` (``S >= T``; the
    queries are the last ``T`` slots) that are at most ``recent - 1`` positions older:
    ``0 <= qpos - kpos < recent`` (and ``< window``), ``kvalid`` true. Positions are
    ``[B, T]`` and ``[B, S]``, rising by at least 1 per slot; key slot ``S - T + i`` holds
    query ``i``'s own token, so the keys it may see lie in the ``recent`` slots ending there.

    Returns ``(out float32 [B, Hq, T, D], lse float32 [B, Hq, T])``; a row that sees no key
    has output 0 and ``lse = -inf``."""
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g, r = hq // hkv, recent
    front = s - t  # slots before the first query
    if front > r - 1:
        k, v = k[:, :, front - (r - 1) :], v[:, :, front - (r - 1) :]
        kpos, kvalid = kpos[:, front - (r - 1) :], kvalid[:, front - (r - 1) :]
        front = r - 1
    nb = -(-t // r)
    # Slots: r filler and earlier ones, then the queries' own, padded to nb * r.
    lead, tail = r - front, nb * r - t
    dev = q.device

    def pad(x: torch.Tensor, dim: int, fill: float | int | bool) -> torch.Tensor:
        shape = list(x.shape)
        shape[dim] = lead
        a = torch.full(shape, fill, dtype=x.dtype, device=dev)
        shape[dim] = tail
        c = torch.full(shape, fill, dtype=x.dtype, device=dev)
        return torch.cat([a, x, c], dim)

    kf = pad(k.float(), 2, 0.0).unfold(2, 2 * r, r)  # [B, Hkv, nb, D, 2r]
    vf = pad(v.float(), 2, 0.0).unfold(2, 2 * r, r)
    kp = pad(kpos.to(torch.int64), 1, _FAR).unfold(1, 2 * r, r)  # [B, nb, 2r]
    kv = pad(kvalid.to(torch.bool), 1, False).unfold(1, 2 * r, r)
    qf = q.new_zeros(b, hq, nb * r, d, dtype=torch.float32)
    qf[:, :, :t] = q
    qf = qf.view(b, hkv, g, nb, r, d)
    qp = torch.cat([qpos.to(torch.int64), qpos.new_full((b, tail), -_FAR, dtype=torch.int64)], 1)
    qp = qp.view(b, nb, r)
    # In place from here on: a prefill chunk's score blocks are the size of its queries, and
    # every temporary of that size is memory that each sequence of the batch pays for.
    sc = torch.einsum("bhgjqd,bhjdk->bhgjqk", qf, kf).mul_(scale)
    del qf
    if softcap is not None:
        sc.div_(softcap).tanh_().mul_(softcap)
    diff = qp[..., :, None] - kp[..., None, :]  # [B, nb, r, 2r]
    vis = (diff >= 0) & (diff < r) & kv[:, :, None, :]
    if window is not None:
        vis &= diff < window
    sc.masked_fill_(~vis[:, None, None], float("-inf"))
    lse = torch.logsumexp(sc, -1)
    # Hidden scores are -inf, so they become exactly 0 (also in rows that see no key, whose
    # lse is clamped to a finite value).
    p = sc.sub_(lse[..., None].clamp_min(torch.finfo(torch.float32).min)).exp_()
    out = torch.einsum("bhgjqk,bhjdk->bhgjqd", p, vf)
    out = out.reshape(b, hq, nb * r, d)[:, :, :t]
    return out, lse.reshape(b, hq, nb * r)[:, :, :t]


def recent_tokens(bits: int, residual: int) -> int:
    """How many of a query's newest keys a layer stored at ``bits`` reads in 16 bits."""
    return 0 if bits >= 16 else int(residual)


def merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the union of two disjoint key sets, from each part's
    normalized output ``[..., D]`` and log-sum-exp ``[...]``: ``(out float32, lse)``; rows
    that see no key in either part get 0 and ``-inf``."""
    lse = torch.logaddexp(lse_a, lse_b)
    none = torch.isneginf(lse)
    ref = lse.masked_fill(none, 0.0)
    wa = torch.exp(lse_a - ref).masked_fill_(none, 0.0)[..., None]
    wb = torch.exp(lse_b - ref).masked_fill_(none, 0.0)[..., None]
    # One output-sized allocation: the inputs are left as they are.
    return (out_a.float() * wa).addcmul_(out_b.float(), wb), lse


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query over its own keys: ``q [T, Hq, D]``, ``k``/``v`` ``[T, R, Hkv, D]``,
    ``mask [T, R]``; float32 output ``[T, Hq, D]`` and log-sum-exp ``[T, Hq]`` (query head
    ``h`` reads KV head ``h // (Hq / Hkv)``)."""
    t, hq, d = q.shape
    hk = k.shape[2]
    qf = q.to(torch.float32).reshape(t, hk, hq // hk, d)
    s = torch.einsum("thgd,trhd->thgr", qf, k.to(torch.float32)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("thgr,trhd->thgd", p, v.to(torch.float32))
    return out.reshape(t, hq, d), lse.reshape(t, hq)


@dataclass
class Chunk:
    """A chunk of one layer's tokens, ``[B, Hkv, T, D]``: ``k``/``v`` as the store takes them
    (keys before RoPE for a ``pre_rope`` plan), ``k_model`` the keys the queries score
    (after RoPE), ``positions`` int64 ``[B, T]``; ``valid``: tokens that exist (padding is
    not stored; ``None``: all), ``protect``: sinks kept in 16 bits, ``bits``: per-token
    widths (``None``: the store's). Masks and widths are CPU ``[B, T]``."""

    k: torch.Tensor
    v: torch.Tensor
    k_model: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor | None = None
    protect: torch.Tensor | None = None
    bits: torch.Tensor | None = None


@dataclass
class Allocation:
    """Per-token widths for :func:`attend_chunk`: the cache's allocator, the model layer
    it charges, and the chunk's token types (``None``: text only)."""

    allocator: Allocator
    layer: int
    token_types: torch.Tensor | None = None


def attend_chunk(
    store: KVStore,
    layer: int,
    query: torch.Tensor,
    chunk: Chunk,
    *,
    query_positions: torch.Tensor,
    recent: int,
    scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    fp_dtype: torch.dtype = torch.float16,
    policy: Allocation | None = None,
) -> torch.Tensor:
    """Appends ``chunk`` to ``store``'s layer ``layer`` and returns the attention of
    ``query [B, Hq, Tq, D]`` (positions ``query_positions [B, Tq]``) over everything the
    layer holds, causal by position, ``[B, Hq, Tq, D]`` in the query's dtype.

    ``recent``: the newest keys each query of a multi-token chunk reads in 16 bits
    (:func:`recent_tokens`; decode steps read them from the store's own window), rounded to
    ``fp_dtype`` as the store keeps its window. A policy's ledgers are charged before the
    append and put back if it fails: a failed step leaves the store and policy unchanged."""
    b, _, t, _ = chunk.k.shape
    r = recent if query.shape[2] > 1 else 0
    att = functools.partial(
        store.attend,
        layer,
        query.float() if r else query,
        positions=query_positions,
        causal=True,
        scale=scale,
        softcap=softcap,
    )
    before = None
    if r > 0 and max(store.seq_lens(layer), default=0) > 0:
        # Keys before the chunk within the queries' reach, from the store's window before
        # the chunk drains it.
        before = att(window=min(r, window or r), return_lse=True)
    bits = chunk.bits
    alloc = None if policy is None else policy.allocator
    snap = None if alloc is None else alloc.snapshot()
    try:
        if policy is not None:
            bits = _policy_widths(store, layer, query, chunk, query_positions, policy,
                                  scale, softcap, window, recent, fp_dtype)  # fmt: skip
        store.append(
            layer,
            chunk.k,
            chunk.v,
            positions=chunk.positions,
            protect=chunk.protect,
            valid=chunk.valid,
            bits=bits,
        )
    except BaseException:
        if alloc is not None and snap is not None:
            alloc.restore(snap)
        raise
    if r == 0:
        return att(window=window)
    kval = torch.ones(b, t, dtype=torch.bool) if chunk.valid is None else chunk.valid
    sc = scale if scale is not None else query.shape[-1] ** -0.5
    out, lse = band_attention(
        query, chunk.k_model.to(fp_dtype), chunk.v.to(fp_dtype), query_positions,
        chunk.positions, kval.to(query.device), r, sc, window, softcap,
    )  # fmt: skip
    if before is not None:
        out, lse = merge(*before, out, lse)
    if window is None or window > r:
        out, lse = merge(*att(window=window, lag=r, return_lse=True), out, lse)
    return out.to(query.dtype)


def _policy_widths(
    store: KVStore,
    layer: int,
    query: torch.Tensor,
    chunk: Chunk,
    qpos: torch.Tensor,
    policy: Allocation,
    scale: float | None,
    softcap: float | None,
    window: int | None,
    recent: int,
    fp_dtype: torch.dtype,
) -> torch.Tensor:
    """The policy's widths of a chunk. A prefill chunk (several queries, the chunk's own
    tokens) is scored by the attention its tokens receive from its queries, the softmax
    covering what the store already holds; decoded tokens have no statistics."""
    b, _, t, _ = chunk.k.shape
    mean = counted = None
    if query.shape[2] == t and t > 1:
        mean, counted = chunk_statistics(
            store, layer, query, chunk.k_model.to(fp_dtype), qpos, chunk.positions,
            valid=chunk.valid, scale=scale, softcap=softcap, window=window, lag=recent,
        )  # fmt: skip
    return policy.allocator.widths(
        policy.layer, (b, t), mean, counted, chunk.valid, chunk.protect, policy.token_types
    )
