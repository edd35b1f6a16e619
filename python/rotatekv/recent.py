"""The 16-bit recent window beside a paged pool, for serving engines.

:class:`rotatekv.KVStore` keeps a sequence's newest ``residual`` tokens in 16 bits; token by
token, each query at position ``p`` then reads keys ``p - R < k <= p`` in 16 bits and older
ones quantized. :class:`RecentWindow` gives every query of a paged engine the same view,
prefill chunks included:

* the packed part is one :func:`rotatekv.paged.attend` over *shifted* sequence lengths: a
  request of ``L`` tokens is attended as ``L - w`` tokens, so its query at ``p`` sits at
  ``p - w`` and (causally) sees exactly the keys ``<= p - w``;
* the window part is a small dense attention of each query over its ``w`` newest keys:
  the step's own keys as the model computed them, older ones from side rows kept here;
* the two are merged by their log-sum-exps (:mod:`rotatekv.engine`'s rules).

``w`` is ``R`` unless a request's older window rows are missing (a block shared through
prefix caching whose tokens were never in a window, or rows evicted for lack of room): its
window then shrinks to what is held, so a missing row costs precision, never correctness.

Side rows come in chunks of ``CHUNK`` slots keyed by ``slot // CHUNK``, shared by every layer
(each layer writes the same slots in a step). A chunk is taken when a request's newest tokens
land in its slots; when none is free the least recently used one is reused (never one this
step reads). A row is valid only while it holds its slot's token (``row_slot``), so blocks
that an engine frees and hands to another request are never read stale.

Everything here is torch on the pool's device; nothing depends on a serving engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._rotatekv import ArgumentError
from .engine import dense_attention, merge

# Slots per side chunk: a window of R tokens spans at most R / CHUNK + 1 chunks.
CHUNK = 8


@dataclass
class Step:
    """One engine step's bookkeeping, shared by every layer."""

    positions: torch.Tensor  # int64 [T]: each query token's position in its request
    # The step's requests: query_start_loc and seq_lens (int64).
    qsl: torch.Tensor
    lens: torch.Tensor
    # The fused kernel's view of the window [T, R]: a side row (0..N), the step's own row
    # (N + t) or -1, for :func:`rotatekv.paged.attend`'s ``recent_idx``.
    idx: torch.Tensor
    # The packed part: query rows (into the step's T), their query_start_loc and the
    # shifted sequence lengths; ``shift`` the per-request w.
    packed_rows: torch.Tensor
    packed_qsl: torch.Tensor
    packed_lens: torch.Tensor
    shift: torch.Tensor
    # The window part [T, R]: from the step's own keys (row into T) or a side row.
    from_step: torch.Tensor
    step_idx: torch.Tensor
    side_idx: torch.Tensor
    mask: torch.Tensor
    # Writes: side rows and the step's token rows that fill them.
    write_rows: torch.Tensor
    write_tokens: torch.Tensor


def _ragged(qsl: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query token's request and position (int64 ``qsl``/``lens``): a request's
    queries are its last positions."""
    qlen = qsl[1:] - qsl[:-1]
    req = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), qlen)
    t = torch.arange(int(qsl[-1]), device=lens.device)
    return req, (lens - qlen)[req] + t - qsl[:-1][req]


def positions_of(query_start_loc: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """Each query token's position: a request's queries are its last positions."""
    return _ragged(query_start_loc.to(torch.int64), seq_lens.to(torch.int64))[1]


class RecentWindow:
    """Side rows of the newest ``residual`` tokens of every request (see the module).

    ``capacity``: side rows in all (rounded up to chunks); each layer holds that many 16-bit
    keys and values ``[capacity, num_kv_heads, head_dim]``, allocated on first write.
    """

    def __init__(
        self,
        residual: int,
        block_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        if not isinstance(residual, int) or residual < 1:
            raise ArgumentError(f"residual: expected a positive int, got {residual!r}")
        if residual > block_size:
            raise ArgumentError(
                f"residual: at most one block ({block_size} tokens), got {residual}"
            )
        if capacity < residual:
            raise ArgumentError(f"capacity: at least residual ({residual}) rows, got {capacity}")
        self.residual = residual
        self.block_size = block_size
        self.num_layers = num_layers
        self.heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.chunks = -(-capacity // CHUNK)
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self._device: torch.device | None = None
        self._meta: object = None
        self.step: Step | None = None
        self.steps = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the side rows of all layers (what the window costs beside the pool)."""
        per = self.chunks * CHUNK * self.heads * self.head_dim * self.dtype.itemsize * 2
        return per * self.num_layers

    def _init(self, device: torch.device, num_slots: int) -> None:
        self._device = device
        i64 = dict(dtype=torch.int64, device=device)
        self.chunk_of = torch.full((-(-num_slots // CHUNK),), -1, **i64)  # slot chunk -> chunk
        self.owner = torch.full((self.chunks,), -1, **i64)  # chunk -> slot chunk
        self.last_use = torch.full((self.chunks,), -1, **i64)  # -1: free
        self.row_slot = torch.full((self.chunks * CHUNK,), -1, **i64)

    def in_use(self) -> int:
        """Chunks holding rows (for reporting and tests)."""
        return int((self.owner >= 0).sum()) if self._device is not None else 0

    def _rows(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Side row of each slot (clamped to 0 where none) and whether it is valid."""
        ch = self.chunk_of[(slots.clamp(min=0) // CHUNK)]
        rows = ch.clamp(min=0) * CHUNK + slots.clamp(min=0) % CHUNK
        ok = (slots >= 0) & (ch >= 0) & (self.row_slot[rows] == slots)
        return rows, ok

    def begin(
        self,
        meta: object,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        block_table: torch.Tensor,
        slot_mapping: torch.Tensor,
        num_slots: int,
    ) -> Step:
        """The step of ``meta`` (computed once; every layer's call with the same metadata
        object gets the same step)."""
        if self._meta is meta and self.step is not None:
            return self.step
        dev = slot_mapping.device
        if self._device is None:
            self._init(dev, num_slots)
        self.steps += 1
        now = self.steps
        r, bs = self.residual, self.block_size
        qsl = query_start_loc.to(dev, torch.int64)
        lens = seq_lens.to(dev, torch.int64)
        table = block_table.to(dev, torch.int64)
        b = lens.numel()
        qlen = qsl[1:] - qsl[:-1]
        start = lens - qlen
        t = int(qsl[-1])
        req, pos = _ragged(qsl, lens)
        slots = slot_mapping[:t].to(torch.int64)

        def slot_at(rq: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            pc = p.clamp(min=0)
            blk = table[rq, (pc // bs).clamp(max=table.shape[1] - 1)]
            return torch.where(p >= 0, blk * bs + pc % bs, torch.full_like(p, -1))

        # w per request: 1 + the older window rows held, counted back from the chunk start
        # (positions before 0 count as held: there is nothing to miss).
        back = torch.arange(1, r, device=dev)
        kp = start[:, None] - back[None, :]  # [B, R-1]
        kslot = slot_at(torch.arange(b, device=dev)[:, None].expand_as(kp), kp)
        krow, kok = self._rows(kslot)
        held = (kp < 0) | kok
        shift = 1 + torch.cumprod(held.to(torch.int64), 1).sum(1)
        used = krow[kok & (torch.cumprod(held.to(torch.int64), 1) > 0)]
        self.last_use[torch.unique(used // CHUNK)] = now

        # The packed part: a request's last min(qlen, L - w) queries over L - w tokens.
        plens = (lens - shift).clamp(min=0)
        pq = torch.minimum(qlen, plens)
        keep = (torch.arange(t, device=dev) - qsl[:-1][req]) >= (qlen - pq)[req]
        packed_rows = torch.nonzero(keep).flatten()
        packed_qsl = torch.zeros(b + 1, dtype=torch.int64, device=dev)
        packed_qsl[1:] = torch.cumsum(pq, 0)

        # The window part: query at p reads p - R < k <= p, of which the newest w are 16-bit.
        j = torch.arange(r, device=dev)
        kpos = pos[:, None] - r + 1 + j[None, :]  # [T, R]
        mask = (kpos >= 0) & (j[None, :] >= (r - shift[req])[:, None])
        from_step = kpos >= start[req][:, None]
        step_idx = (qsl[:-1][req][:, None] + kpos - start[req][:, None]).clamp(0, max(t - 1, 0))
        wslot = slot_at(req[:, None].expand_as(kpos), torch.where(mask, kpos, -1))
        side_idx, _ = self._rows(wslot)

        # Writes: rows held for slots this step overwrites are dropped; the tokens that end
        # the step among their request's newest R get rows.
        written = slots >= 0
        wr, wok = self._rows(slots)
        self.row_slot[wr[wok & written]] = -1
        newest = written & (pos >= (lens - r)[req])
        held_now = self.chunk_of[slots[newest] // CHUNK]
        self.last_use[held_now[held_now >= 0]] = now  # not evicted below
        need = torch.unique(slots[newest] // CHUNK)
        need = need[self.chunk_of[need] < 0]
        if need.numel():
            # Free chunks first (last_use -1), then the least recently used; never one read
            # or written in this step.
            order = torch.argsort(self.last_use)
            order = order[self.last_use[order] < now][: need.numel()]
            need = need[: order.numel()]
            old = self.owner[order]
            self.chunk_of[old[old >= 0]] = -1
            rows = (order[:, None] * CHUNK + torch.arange(CHUNK, device=dev)).flatten()
            self.row_slot[rows] = -1
            self.owner[order] = need
            self.chunk_of[need] = order
        ch = self.chunk_of[slots.clamp(min=0) // CHUNK]
        ok = newest & (ch >= 0)
        write_rows = ch[ok] * CHUNK + slots[ok] % CHUNK
        self.row_slot[write_rows] = slots[ok]
        self.last_use[ch[ok]] = now

        n = self.chunks * CHUNK
        idx = torch.where(from_step, n + step_idx, side_idx)
        idx = torch.where(mask, idx, torch.full_like(idx, -1))

        self._meta = meta
        self.step = Step(
            pos,
            qsl,
            lens,
            idx,
            packed_rows,
            packed_qsl,
            plens,
            shift,
            from_step,
            step_idx,
            side_idx,
            mask,
            write_rows,
            torch.nonzero(ok).flatten(),
        )
        return self.step

    def store(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Keeps this step's newest tokens of ``layer`` (``key``/``value``: ``[T, H, D]``)."""
        st = self.step
        assert st is not None, "begin() runs first"
        if self.k[layer] is None:
            shape = (self.chunks * CHUNK, self.heads, self.head_dim)
            self.k[layer] = torch.zeros(shape, dtype=self.dtype, device=key.device)
            self.v[layer] = torch.zeros(shape, dtype=self.dtype, device=key.device)
        k, v = self.k[layer], self.v[layer]
        assert k is not None and v is not None
        k[st.write_rows] = key[st.write_tokens].to(self.dtype)
        v[st.write_rows] = value[st.write_tokens].to(self.dtype)

    def window(
        self, layer: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query's window keys and values ``[T, R, H, D]`` (masked ones arbitrary)."""
        st = self.step
        k, v = self.k[layer], self.v[layer]
        assert st is not None and k is not None and v is not None
        sel = st.from_step[..., None, None]
        kw = torch.where(sel, key[st.step_idx].to(self.dtype), k[st.side_idx])
        vw = torch.where(sel, value[st.step_idx].to(self.dtype), v[st.side_idx])
        return kw, vw


def attend(
    rw: RecentWindow,
    layer: int,
    pool: torch.Tensor,
    fmt: object,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_table: torch.Tensor,
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    plan: object = None,
    out: torch.Tensor | None = None,
    device: str | None = None,
    **rope_kw: object,
) -> torch.Tensor:
    """Attention ``[T, Hq, D]`` of the step's queries (query's dtype, written into ``out``
    when given): the packed blocks older than each query's window and the window in 16 bits,
    in one softmax. ``key``/``value``: the step's own tokens ``[T, H, D]`` as the model
    computed them; ``plan`` (at ``layer``) and ``rope_kw``: as :func:`rotatekv.paged.attend`
    takes them. CPU pools run one fused kernel call (the window's rows are read in place);
    device pools (and ``device``, as :func:`rotatekv.paged.attend` takes it) the
    composition :func:`attend_composed`."""
    from . import paged

    st = rw.step
    assert st is not None, "begin() runs first"
    if device is not None or pool.device.type != "cpu":
        res = attend_composed(
            rw,
            layer,
            pool,
            fmt,
            query,
            key,
            value,
            block_table,
            scale=scale,
            window=window,
            softcap=softcap,
            plan=plan,
            device=device,
            **rope_kw,
        )
        if out is None:
            return res.to(query.dtype)
        out.copy_(res)
        return out
    # The window holds 16-bit copies (as the store keeps its window): a model computing in
    # float32 gets its step's rows rounded like the side rows (16-bit models pass as is).
    key, value = key.to(rw.dtype), value.to(rw.dtype)
    return paged.attend(  # type: ignore[attr-defined,no-any-return]
        pool,
        fmt,
        query,
        block_table,
        st.lens,
        st.qsl,
        scale=scale,
        causal=True,
        window=window,
        softcap=softcap,
        plan=plan,
        layer=layer,
        out=out,
        recent_k=rw.k[layer],
        recent_v=rw.v[layer],
        step_k=key,
        step_v=value,
        recent_idx=st.idx,
        recent_lag=st.shift,
        **rope_kw,
    )


def attend_composed(
    rw: RecentWindow,
    layer: int,
    pool: torch.Tensor,
    fmt: object,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_table: torch.Tensor,
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    plan: object = None,
    device: str | None = None,
    **rope_kw: object,
) -> torch.Tensor:
    """:func:`attend` from torch operations, in float32, on any device: the packed blocks
    older than each query's window (:func:`rotatekv.paged.attend` over shifted lengths), the
    window gathered into ``[T, R, H, D]`` copies and attended densely, the two merged by
    their log-sum-exps. The reference the fused kernel is tested against."""
    from . import paged

    st = rw.step
    assert st is not None, "begin() runs first"
    t, hq, d = query.shape
    r = rw.residual
    kw_, vw_ = rw.window(layer, key, value)
    mask = st.mask
    if window is not None:
        j = torch.arange(r, device=mask.device)
        mask = mask & ((r - 1 - j) < window)[None, :]
    out_w, lse_w = dense_attention(query, kw_, vw_, mask, scale, softcap)

    out_p = torch.zeros(t, hq, d, dtype=torch.float32, device=query.device)
    lse_p = torch.full((t, hq), float("-inf"), dtype=torch.float32, device=query.device)
    # A sliding window shifts with the query (w tokens): one call per distinct w, which is
    # one call unless a request lost window rows.
    shifts = [None] if window is None else torch.unique(st.shift).tolist()
    qlen = st.packed_qsl[1:] - st.packed_qsl[:-1]
    for w in shifts:
        pick = torch.ones_like(qlen, dtype=torch.bool) if w is None else st.shift == w
        if w is not None and window is not None and window <= w:
            continue  # the whole sliding window is in 16 bits
        lens = torch.where(pick, st.packed_lens, torch.zeros_like(st.packed_lens))
        nq = torch.where(pick, qlen, torch.zeros_like(qlen))
        if int(nq.sum()) == 0:
            continue
        row_req = torch.repeat_interleave(torch.arange(qlen.numel(), device=qlen.device), qlen)
        rows = st.packed_rows[pick[row_req]]
        qsl = torch.zeros_like(st.packed_qsl)
        qsl[1:] = torch.cumsum(nq, 0)
        o, lse = paged.attend(  # type: ignore[attr-defined]
            pool,
            fmt,
            query[rows].to(torch.float32),
            block_table,
            lens.to(block_table.dtype),
            qsl.to(block_table.dtype),
            scale=scale,
            causal=True,
            window=None if w is None else window - w,  # type: ignore[operator]
            softcap=softcap,
            return_lse=True,
            plan=plan,
            layer=layer,
            max_query_len=int(nq.max()),
            device=device,
            **rope_kw,
        )
        out_p[rows] = o
        lse_p[rows] = lse
    return merge(out_p, lse_p, out_w, lse_w)[0]
