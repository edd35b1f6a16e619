"""Attention of a prefill chunk's queries to their most recent keys, in full precision.

A store with a recent window keeps each decode step's newest ``R`` tokens in 16 bits. A
multi-token chunk (prefill) gets the same treatment in ``rotatekv.hf``: every query reads the
keys within ``R`` positions of it from the chunk itself (those before the chunk from the
store's window, ``window=R``, before the chunk is appended), and only the older keys from the
packed store (``KVStore.attend(..., lag=R, return_lse=True)``); the softmax parts are merged
exactly by their log-sum-exps.

The chunk is cut into blocks of ``R`` queries; block ``j`` scores against the ``2R`` key slots
that end with it, so the cost is ``O(T * R)``, not ``O(T^2)``.
"""

from __future__ import annotations

import torch

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
