"""Per-token bit widths chosen by a policy under an effective-bit budget (AKVQ-VL).

A store keeps each token in one precision class (2, 3, 4, 8 or 16 bits). A policy picks the
class of every token at append time:

* ``"fixed"``: the layer's width (``QuantConfig.bits``, or a calibration's wider layers);
  RotateKV's sinks (massive activations) in 16 bits when a calibration gives a sink rule;
* ``"saliency"``: tokens ranked by the attention they receive during prefill
  (:func:`rotatekv.saliency.attention_mass`: mean probability per query that reads them
  quantized, i.e. at distance ``>= residual``); bits go where they cut the most
  attention-weighted quantization error (:func:`water_fill`);
* ``"akvq"``: AKVQ-VL's patterns, detected per layer from the same statistics: a layer is
  *pivot-token-salient* when its few most attended tokens (``pivot_fraction`` of the chunk)
  receive at least ``pivot_mass`` of the attention, and those pivots are kept in 16 bits
  (a layer whose own share cannot pay for them borrows from the layers after it, down to
  their floor); it
  is *text-salient* when text tokens get at least ``text_ratio`` times the mean attention of
  other tokens (vision-language models: token types), and text tokens get more bits; other
  tokens share what is left evenly.

The budget is a target for the average bits per K/V element of each sequence over all
layers, in the units of ``KVStore.bits_per_element`` (codes, scales, zeros, positions, 16-bit
tokens) with every token counted at the class it is stored in once it leaves the recent
window. Sinks (the calibration's massive-activation rule, typically a sequence's first
token) stay 16-bit outside the budget: where they fall is only known layer by layer, and a
shared budget would let the first layers spend what later layers' sinks need. Each (layer,
sequence) keeps a ledger; an append spends what the tokens before it left,
``budget * tokens - spent``, less what the other layers of the sequence overspent (a budget
below a layer's floor) or plus what they left. So the average meets the budget to within
about one class step over the tokens, after a one-pass prefill, a chunked one, or
token-by-token decoding (where, without statistics, tokens share the budget evenly). Tokens
of a prefill chunk that no query read packed yet (its newest ``residual``) have no
statistics and keep the layer's own width. Layers of a calibration with wider layers keep
their difference: a layer stored ``w`` bits wider has ``w`` bits more of the budget (and its
tokens may still go down to ``QuantConfig.bits``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol

import numpy as np
import torch

from ._rotatekv import _CLASS_BITS, ArgumentError, KVStore
from .saliency import attention_mass

PolicyName = Literal["fixed", "saliency", "akvq"]
CLASSES: tuple[int, ...] = tuple(_CLASS_BITS)

# Token types (``token_types``): what a vision-language model's tokens are.
TEXT, IMAGE, OTHER = 0, 1, 2

# Score multipliers of the AKVQ patterns: pivots outrank any other token at every step up to
# 16 bits; text in a text-salient layer gets its third and fourth bit before other tokens
# get a third.
PIVOT = 1.0e9
_TEXT_SCORE = 8.0


def rel_error(bits: int) -> float:
    """Relative mean-squared error of a ``bits``-bit uniform quantizer (``2^bits`` levels);
    0 for 16-bit tokens."""
    return 0.0 if bits >= 16 else 1.0 / (2**bits - 1) ** 2


def water_fill(
    scores: np.ndarray,
    base: int,
    cost: Callable[[int], float],
    spend: float,
    classes: Sequence[int] = CLASSES,
) -> np.ndarray:
    """Widths (``>= base``) for tokens of ``scores`` that minimize
    ``sum(score * rel_error(width))`` with ``sum(cost(width)) <= spend``.

    Greedy in error removed per bit spent, which is optimal here: a token's steps up the
    ladder remove less error per bit each (``rel_error`` is convex in cost), so taking steps
    in order of that ratio never takes one before its predecessor. Ties go to tokens spread
    evenly over the sequence (a low-discrepancy order), so equal scores share bits evenly.
    What is left after the last step that fits is spent on cheaper steps still fitting, so
    the total falls short of ``spend`` by less than the cheapest step.
    """
    s = np.asarray(scores, dtype=np.float64).clip(min=0.0)
    n = s.shape[0]
    ladder = [c for c in sorted(set(classes)) if c >= base]
    out = np.full(n, ladder[0], dtype=np.int64)
    left = spend - n * cost(ladder[0])
    if n == 0 or len(ladder) == 1 or left <= 0:
        return out
    dc = np.array([cost(ladder[i + 1]) - cost(ladder[i]) for i in range(len(ladder) - 1)])
    de = np.array([rel_error(ladder[i]) - rel_error(ladder[i + 1]) for i in range(len(ladder) - 1)])
    steps = len(dc)
    ratio = s[:, None] * (de / dc)[None, :]  # [n, steps]
    spread = (np.arange(n) * 0.6180339887498949) % 1.0
    tok = np.repeat(np.arange(n), steps)
    stp = np.tile(np.arange(steps), n)
    order = np.lexsort((spread[tok], stp, -ratio.reshape(-1)))
    tok, stp = tok[order], stp[order]
    csum = np.cumsum(dc[stp])
    take = int(np.searchsorted(csum, left, side="right"))
    level = np.zeros(n, dtype=np.int64)
    np.add.at(level, tok[:take], 1)
    left -= float(csum[take - 1]) if take else 0.0
    cheapest = float(dc.min())
    for j, k in zip(tok[take:].tolist(), stp[take:].tolist(), strict=True):
        if left < cheapest:
            break
        if level[j] == k and dc[k] <= left:
            level[j] += 1
            left -= float(dc[k])
    return np.asarray(ladder)[level]


@dataclass(frozen=True)
class AkvqRule:
    """Thresholds of AKVQ-VL's attention patterns."""

    pivot_fraction: float = 0.01
    pivot_mass: float = 0.3
    text_ratio: float = 1.5

    def __post_init__(self) -> None:
        if not 0.0 < self.pivot_fraction <= 1.0:
            raise ArgumentError(
                f"pivot_fraction: expected a share in (0, 1], got {self.pivot_fraction!r}"
            )
        if not 0.0 < self.pivot_mass <= 1.0:
            raise ArgumentError(f"pivot_mass: expected a share in (0, 1], got {self.pivot_mass!r}")
        if not self.text_ratio > 0.0:
            raise ArgumentError(f"text_ratio: expected a value > 0, got {self.text_ratio!r}")


def akvq_scores(
    mean: torch.Tensor,
    counted: torch.Tensor,
    types: torch.Tensor | None,
    rule: AkvqRule,
) -> tuple[torch.Tensor, str]:
    """``"akvq"`` scores of one sequence's chunk and the layer's pattern there
    (``"pivot"``, ``"text"``, ``"pivot+text"`` or ``"even"``)."""
    n = mean.shape[0]
    s = torch.ones(n, dtype=torch.float64)
    pattern = []
    w = torch.where(counted, mean.double(), torch.zeros((), dtype=torch.float64))
    total = float(w.sum())
    if total > 0:
        k = max(1, int(rule.pivot_fraction * int(counted.sum())))
        top = torch.topk(w, min(k, n)).indices
        if float(w[top].sum()) >= rule.pivot_mass * total:
            s[top] = PIVOT
            pattern.append("pivot")
    if types is not None:
        # Pivots are their own pattern: compare text and other tokens without them.
        rest = counted & (s < PIVOT)
        text = (types == TEXT) & rest
        other = (types != TEXT) & rest
        if bool(text.any()) and bool(other.any()):
            mt, mo = float(w[text].mean()), float(w[other].mean())
            if mt >= rule.text_ratio * mo:
                s = torch.where((types == TEXT) & (s < PIVOT), _TEXT_SCORE, s)
                pattern.append("text")
    return s, "+".join(pattern) or "even"


class Scorer(Protocol):
    """What a policy is: how it ranks one sequence's chunk of tokens for the water-fill.

    ``scores(mean, counted, types)`` gets the mean attention each token receives
    (``[T]``), which tokens any query read packed, and their types (``None``: text only);
    it returns float64 scores ``[T]`` (:data:`PIVOT` or more: keep in 16 bits when the
    budget allows) and the pattern it found, recorded in ``Allocator.patterns``."""

    name: str

    def scores(
        self, mean: torch.Tensor, counted: torch.Tensor, types: torch.Tensor | None
    ) -> tuple[torch.Tensor, str]: ...


@dataclass(frozen=True)
class Saliency:
    """``"saliency"``: tokens rank by the attention they receive."""

    name: ClassVar[str] = "saliency"

    def scores(
        self, mean: torch.Tensor, counted: torch.Tensor, types: torch.Tensor | None
    ) -> tuple[torch.Tensor, str]:
        return mean.double(), "saliency"


@dataclass(frozen=True)
class Akvq:
    """``"akvq"``: AKVQ-VL's pivot-token and text-salient patterns (:func:`akvq_scores`)."""

    rule: AkvqRule = field(default_factory=AkvqRule)
    name: ClassVar[str] = "akvq"

    def scores(
        self, mean: torch.Tensor, counted: torch.Tensor, types: torch.Tensor | None
    ) -> tuple[torch.Tensor, str]:
        return akvq_scores(mean, counted, types, self.rule)


# The policies that allocate widths per token, by QuantConfig.policy name ("fixed" needs
# no allocator).
SCORERS: dict[str, type[Saliency] | type[Akvq]] = {"saliency": Saliency, "akvq": Akvq}


def scorer(policy: str | Scorer, rule: AkvqRule | None = None) -> Scorer:
    """The policy named ``policy`` (``rule``: AKVQ's thresholds), or ``policy`` itself."""
    if not isinstance(policy, str):
        if not callable(getattr(policy, "scores", None)):
            raise ArgumentError(f"policy: expected a name or a Scorer, got {policy!r}")
        return policy
    if policy not in SCORERS:
        raise ArgumentError(f"policy: expected one of {sorted(SCORERS)}, got {policy!r}")
    return Akvq(rule or AkvqRule()) if policy == "akvq" else Saliency()


class Allocator:
    """Chooses the widths of appended tokens for one cache (one budget ledger per layer and
    sequence). ``cost(layer, bits)`` gives a token's bits per element in that layer's store
    (``KVStore.class_bits``)."""

    def __init__(
        self,
        policy: str | Scorer,
        budget: float,
        layer_bits: Sequence[int],
        cost: Callable[[int, int], float],
        rule: AkvqRule | None = None,
        floor: int | None = None,
    ) -> None:
        self.scorer = scorer(policy, rule)
        self.policy = self.scorer.name
        self.budget = float(budget)
        self.layer_bits = list(layer_bits)
        # A token's cost per (layer, class), read once from the stores.
        self.costs = [{c: float(cost(i, c)) for c in CLASSES} for i in range(len(self.layer_bits))]
        # The narrowest width a token gets: a wider layer's tokens may go below its width
        # (the layer keeps its extra budget, spent where attention says).
        self.floor = min(self.layer_bits) if floor is None else int(floor)
        if self.floor not in CLASSES or self.floor > min(self.layer_bits):
            raise ArgumentError(
                f"floor: expected a width in {CLASSES} no wider than the layers' "
                f"({min(self.layer_bits)}), got {floor!r}"
            )
        base = [self.costs[i][b] for i, b in enumerate(self.layer_bits)]
        mean_base = sum(base) / len(base)
        least = sum(c[self.floor] for c in self.costs) / len(self.costs)
        if self.budget < least - 1e-9:
            raise ArgumentError(
                f"budget: expected at least {least:.4f} bits per element (every token at "
                f"{self.floor} bits), got {self.budget}"
            )
        # Each layer's budget: the global one shifted by how much wider its base width is.
        self.layer_budget = [self.budget + c - mean_base for c in base]
        self.spent: dict[int, np.ndarray] = {}
        self.tokens: dict[int, np.ndarray] = {}
        self.patterns: dict[int, list[str]] = {}

    def _ledger(self, layer: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        if layer not in self.spent or self.spent[layer].shape[0] != batch:
            self.spent[layer] = np.zeros(batch)
            self.tokens[layer] = np.zeros(batch, dtype=np.int64)
        return self.spent[layer], self.tokens[layer]

    def _excess(self, seq: int, exclude: int) -> float:
        """Bits spent beyond the budget by sequence ``seq`` in the layers but ``exclude``."""
        return sum(
            float(self.spent[m][seq] - self.layer_budget[m] * self.tokens[m][seq])
            for m in self.spent
            if m != exclude
        )

    def snapshot(self) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], dict[int, int]]:
        """The ledgers as they are, for :meth:`restore` when the append they were charged
        for fails (a failed call leaves everything as it was)."""
        return (
            {k: v.copy() for k, v in self.spent.items()},
            {k: v.copy() for k, v in self.tokens.items()},
            {k: len(v) for k, v in self.patterns.items()},
        )

    def restore(
        self, snap: tuple[dict[int, np.ndarray], dict[int, np.ndarray], dict[int, int]]
    ) -> None:
        spent, tokens, pats = snap
        self.spent, self.tokens = spent, tokens
        self.patterns = {k: v[: pats.get(k, 0)] for k, v in self.patterns.items() if pats.get(k)}

    @staticmethod
    def _keeps_own(cost: dict[int, float], own: int, n: int, spend: float) -> bool:
        """Whether ``spend`` for ``n`` tokens is within a step of the layer's width: not
        short of it by half a step down, not over by a whole step up."""
        i = CLASSES.index(own)
        up = cost[CLASSES[i + 1]] - cost[own] if i + 1 < len(CLASSES) else math.inf
        down = cost[own] - cost[CLASSES[i - 1]] if i > 0 else 0.0
        return n * cost[own] - down / 2 <= spend < n * cost[own] + up

    def _headroom(self, seq: int, layer: int, n: int) -> float:
        """What the layers after ``layer`` can still give up for ``n`` more tokens each:
        their budget above the floor, less what earlier layers already overspent."""
        later = sum(
            max(0.0, self.layer_budget[m] - self.costs[m][self.floor]) * n
            for m in range(layer + 1, len(self.layer_bits))
        )
        return later - max(0.0, self._excess(seq, exclude=layer))

    def reorder(self, index: torch.Tensor) -> None:
        """Beam search: sequence ``i`` becomes old sequence ``index[i]``."""
        idx = index.cpu().numpy()
        for layer in self.spent:
            self.spent[layer] = self.spent[layer][idx]
            self.tokens[layer] = self.tokens[layer][idx]

    def clear(self) -> None:
        self.spent.clear()
        self.tokens.clear()
        self.patterns.clear()

    def widths(
        self,
        layer: int,
        shape: tuple[int, int],
        mean: torch.Tensor | None = None,
        counted: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        sinks: torch.Tensor | None = None,
        types: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Widths (int64, ``shape`` = ``[B, T]``) of a chunk's tokens.

        ``mean``/``counted``: ``[B, T]`` mean attention received and whether any query read
        the token quantized (``None``: no statistics, e.g. one decoded token); ``valid``:
        tokens that exist (padding is not stored); ``sinks``: tokens kept in 16 bits anyway;
        ``types``: ``[B, T]`` token types (:data:`TEXT`, :data:`IMAGE`, :data:`OTHER`)."""
        b, t = shape
        if types is not None and tuple(types.shape) != (b, t):
            raise ArgumentError(
                f"token_types: expected shape [{b}, {t}] (the chunk's tokens), got "
                f"{tuple(types.shape)}"
            )
        base = self.floor
        spent, tokens = self._ledger(layer, b)
        cost = self.costs[layer]
        out = torch.full((b, t), base, dtype=torch.int64)
        pats = []
        for i in range(b):
            ok = torch.ones(t, dtype=torch.bool) if valid is None else valid[i].cpu()
            sink = torch.zeros(t, dtype=torch.bool) if sinks is None else sinks[i].cpu() & ok
            free = ok & ~sink
            n = int(free.sum())
            # What this layer's tokens so far left, less what the other layers overspent (a
            # budget below a layer's floor) or plus what they left: one budget for all.
            others = self._excess(i, exclude=layer)
            spend = self.layer_budget[layer] * (tokens[i] + n) - spent[i] - others
            if mean is None or counted is None:
                # No pattern recorded: decode steps would grow the record without bound.
                scores = torch.ones(t, dtype=torch.float64)
            else:
                # Tokens without statistics are taken out below; the rest rank by score.
                ty = None if types is None else types[i].cpu()
                scores, pat = self.scorer.scores(mean[i].cpu(), counted[i].cpu() & free, ty)
                pats.append(pat)
            fi = torch.nonzero(free).flatten()
            if mean is not None and counted is not None:
                # Tokens no query read packed yet (the chunk's newest, now in the recent
                # window) have no statistics: they keep the layer's own width, as the fixed
                # policy would store them, so the window costs what it costs there.
                blind = ~counted[i].cpu()[fi]
                own = self.layer_bits[layer]
                out[i, fi[blind]] = own
                spend -= int(blind.sum()) * cost[own]
                spent[i] += int(blind.sum()) * cost[own]
                fi = fi[~blind]
            sc = scores[fi]
            pivots = sc >= PIVOT
            npiv = int(pivots.sum())
            if npiv:
                # AKVQ-VL keeps a pivot-salient layer's pivots whole even where the layer's
                # own share cannot pay for them (2-bit layers): the layers after it pay,
                # as far as they can go down to the floor. Beyond that they compete in
                # the water-fill like any token.
                extra = npiv * (cost[16] - cost[base])
                slack = spend - len(fi) * cost[base]
                if extra <= slack + self._headroom(i, layer, n):
                    spend -= npiv * cost[16]
                    sc = sc[~pivots]
                    fi, piv_idx = fi[~pivots], fi[pivots]
                    out[i, piv_idx] = 16
                    spent[i] += npiv * cost[16]
            own = self.layer_bits[layer]
            if mean is None and self._keeps_own(cost, own, len(fi), spend):
                # No statistics (decoding) and a budget about what the layer's own width
                # costs: the fixed layout, not an even spread that would move bits across
                # layers; otherwise the budget is spread evenly, error-diffused over steps.
                w = np.full(len(fi), own, dtype=np.int64)
            else:
                w = water_fill(sc.numpy(), base, cost.__getitem__, spend)
            out[i, fi] = torch.from_numpy(w)
            out[i, sink] = 16
            spent[i] += sum(cost[c] for c in w.tolist())
            tokens[i] += n
        if pats:
            self.patterns.setdefault(layer, []).extend(pats)
        return out

    def append(
        self,
        store: KVStore,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        protect: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        token_types: torch.Tensor | None = None,
        queries: torch.Tensor | None = None,
        scored_keys: torch.Tensor | None = None,
        scale: float | None = None,
        softcap: float | None = None,
        window: int | None = None,
    ) -> torch.Tensor:
        """``store.append`` with the policy's widths, for custom models; returns them.

        A prefill chunk passes its ``queries`` ``[B, Hq, T, D]`` and the keys as they score
        against them (``scored_keys``, after RoPE; default ``k``): its tokens are then ranked
        by the attention they receive (the softmax covering what ``store`` already holds).
        Without queries (decoding) tokens share the budget evenly. ``store``'s layer
        ``layer`` is this allocator's layer ``layer``; arguments as in ``KVStore.append``."""
        b, _, t, _ = k.shape
        pos = None if positions is None else torch.as_tensor(positions).to(torch.int64)
        if pos is not None and pos.ndim == 1:
            pos = pos[None].expand(b, t)
        vmask = None if valid is None else torch.as_tensor(valid).to("cpu", torch.bool)
        sinks = None if protect is None else torch.as_tensor(protect).to("cpu", torch.bool)
        mean = counted = None
        if queries is not None:
            if pos is None:
                start = torch.tensor(store.seq_lens(layer), dtype=torch.int64)[:, None]
                pos = start + torch.arange(t)[None]
            mean, counted = chunk_statistics(
                store, layer, queries, k if scored_keys is None else scored_keys, pos, pos,
                valid=vmask, scale=scale, softcap=softcap, window=window,
                lag=int(store.config["residual"]),
            )  # fmt: skip
        types = None if token_types is None else torch.as_tensor(token_types).to("cpu")
        snap = self.snapshot()
        w = self.widths(layer, (b, t), mean, counted, vmask, sinks, types)
        try:
            store.append(layer, k, v, positions=pos, protect=protect, valid=valid, bits=w)
        except BaseException:
            self.restore(snap)
            raise
        return w

    def bits_per_element(self) -> float:
        """The average the ledgers hold: every token the policy placed (sinks are not) at
        its class; what the budget meets."""
        spent = sum(float(s.sum()) for s in self.spent.values())
        tokens = sum(int(t.sum()) for t in self.tokens.values())
        return spent / tokens if tokens else 0.0


def chunk_statistics(
    store: KVStore,
    layer: int,
    queries: torch.Tensor,
    keys: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    valid: torch.Tensor | None,
    scale: float | None,
    softcap: float | None,
    window: int | None,
    lag: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the policies read of a prefill chunk about to be appended to ``store``'s layer
    ``layer``: the mean attention each of its keys receives from its queries at distance
    ``>= lag``, and which keys any such query read; the softmax covers what the store
    already holds (its log-sum-exp from ``attend(..., return_lse=True)``)."""
    prior = None
    if max(store.seq_lens(layer), default=0) > 0:
        _, prior = store.attend(
            layer, queries.float(), positions=q_pos, causal=True, scale=scale,
            window=window, softcap=softcap, return_lse=True,
        )  # fmt: skip
    m = attention_mass(
        queries, keys, q_pos, k_pos, k_valid=valid, prior_lse=prior, scale=scale,
        softcap=softcap, window=window, lag=lag,
    )  # fmt: skip
    return m.mean(queries.shape[1]), m.count > 0
