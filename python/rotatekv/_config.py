"""Quantization settings of a store."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from ._rotatekv import _CLASS_BITS, ArgumentError

KeyLayout = Literal["per_token", "per_channel"]

# Bit-allocation policies (rotatekv.policy implements them; the names live here so that
# configuring a store needs neither the policies nor torch).
POLICIES: tuple[str, ...] = ("fixed", "saliency", "akvq")


def check_budget(budget: float | None, policy: str) -> None:
    """Validates a policy and its budget (``QuantConfig``)."""
    if policy not in POLICIES:
        raise ArgumentError(f"policy: expected one of {POLICIES}, got {policy!r}")
    if policy == "fixed":
        if budget is not None:
            raise ArgumentError(
                "budget: expected None with policy 'fixed' (a budget needs a policy)"
            )
        return
    if budget is None or isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ArgumentError(
            f"budget: expected bits per element (a float) with policy {policy!r}, got {budget!r}"
        )
    if not math.isfinite(budget) or not 2.0 <= budget <= 17.0:
        raise ArgumentError(f"budget: expected bits per element in [2, 17], got {budget!r}")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How a :class:`rotatekv.KVStore` quantizes tokens.

    Args:
        bits: default bit width of a token: one of the precision classes, 2, 3, 4, 8, or 16
            (unquantized).
        key_bits: the default class's key width (overrides ``bits``, which then reads the
            same).
        value_bits: the default class's value width, when values should differ from keys
            (``key_bits=4, value_bits=2`` is the ``k4v2`` serving users ask for: keys usually
            need more); ``None``: the key width. Tokens a policy puts in other classes keep
            one width for both; 16 goes only with 16.
        group_size: channels per quantization group (a multiple of 8 dividing ``head_dim``);
            ``None`` uses the whole head.
        key_clip: clip ratio of key groups (min and max scaled by it); ``None`` uses the
            plan's per-layer value.
        value_clip: the same for values.
        residual: most recent tokens per sequence kept in 16 bits, quantized as they age.
        key_layout: ``"per_token"`` (groups of channels of one token) or ``"per_channel"``
            (KIVI: one group per channel over a page of tokens).
        page_tokens: tokens per page, 32 or 64; ``None``: 64 per token, 32 per channel.
        fp_format: 16-bit format of unquantized tokens, ``"float16"`` or ``"bfloat16"``.
        policy: how tokens get their widths (:mod:`rotatekv.policy`): ``"fixed"`` (``bits``,
            sinks in 16), ``"saliency"`` (attention received during prefill) or ``"akvq"``
            (AKVQ-VL's text- and pivot-token-salient patterns); the last two need
            ``budget``, and ``bits`` is then the narrowest width they use.
        budget: target average bits per K/V element of a sequence (codes, scales, zeros,
            positions and 16-bit tokens counted, each token at the width it is stored in once
            it leaves the recent window).
    """

    bits: int = 2
    group_size: int | None = None
    key_clip: float | None = None
    value_clip: float | None = None
    residual: int = 0
    key_layout: KeyLayout = "per_token"
    page_tokens: int | None = None
    fp_format: Literal["float16", "bfloat16"] = "float16"
    policy: Literal["fixed", "saliency", "akvq"] = "fixed"
    budget: float | None = None
    key_bits: int | None = None
    value_bits: int | None = None

    def __post_init__(self) -> None:
        classes = ", ".join(map(str, _CLASS_BITS))
        for name in ("bits", "key_bits", "value_bits"):
            b = getattr(self, name)
            if (b is not None or name == "bits") and b not in _CLASS_BITS:
                raise ArgumentError(f"{name}: expected one of {classes}, got {b!r}")
        if self.key_bits is not None:
            object.__setattr__(self, "bits", self.key_bits)
        if self.value_bits is not None and (self.value_bits == 16) != (self.bits == 16):
            raise ArgumentError(
                f"value_bits: expected 16 with 16-bit keys, a quantized width with "
                f"{self.bits}-bit keys, got {self.value_bits}"
            )
        if self.key_layout not in ("per_token", "per_channel"):
            raise ArgumentError(
                f"key_layout: expected 'per_token' or 'per_channel', got {self.key_layout!r}"
            )
        if self.residual < 0:
            raise ArgumentError(f"residual: expected an int >= 0, got {self.residual!r}")
        check_budget(self.budget, self.policy)
        for name in ("key_clip", "value_clip"):
            c = getattr(self, name)
            if c is not None and not 0.0 < c <= 1.0:
                raise ArgumentError(f"{name}: expected a ratio in (0, 1], got {c!r}")

    def replace(self, **changes: object) -> QuantConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
