"""The KV-cache methods the evaluation compares, by name: how each builds its plan and store
settings. Importing this needs neither torch nor transformers, so the command line checks
``--methods`` before it loads anything heavy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._config import QuantConfig
from .._rotatekv import ArgumentError


@dataclass(frozen=True)
class Method:
    """How one method builds its plan and store settings."""

    name: str
    bits: int
    config: QuantConfig
    # "identity", "quarot" (post-RoPE per-head Hadamard), fit() arguments, or "rotatekv2"
    # ("rotatekv2-flat": without its wider layers): that method's calibration, reused.
    plan: str | dict[str, Any]
    description: str
    # A bit-width policy (rotatekv.policy); its budget defaults to rotatekv2's settled
    # effective bits on the same windows, sinks left out as the policies leave them out.
    policy: str = "fixed"


def _kivi(bits: int, residual: int) -> QuantConfig:
    return QuantConfig(
        bits=bits, group_size=32, key_layout="per_channel", page_tokens=32, residual=residual
    )


def _paper(**over: Any) -> dict[str, Any]:
    a: dict[str, Any] = dict(
        bits=2, mode="pre_rope", group_heads=None, reorder="signed_mean", clip="fixed", sinks=True
    )
    a.update(over)
    return a


# Our product default: the paper's rotation with reordering picked per layer, per-layer clip
# search, sinks, key layouts picked per layer, a short full-precision window of recent tokens,
# and at 2 bits the layers that gain most from a third bit stored at 3 (docs/benchmarks.md has
# the numbers that chose it).
DEFAULT_RESIDUAL = 32
# Share of layers rotatekv2 stores at 3 bits: the largest at which its effective bits stay at
# or below kivi2's on 512-token windows of the default model (13 of 30 layers).
WIDER_FRACTION = 0.45
# Calibration windows that rank the layers (one forward per layer each).
RANK_WINDOWS = 4


def _ours(bits: int) -> dict[str, Any]:
    a: dict[str, Any] = dict(
        bits=bits, mode="pre_rope", reorder="auto", clip="search", sinks=True, key_layout="auto"
    )
    if bits == 2:
        a["wider"] = dict(bits=3, fraction=WIDER_FRACTION)
    return a


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("fp16", 16, QuantConfig(bits=16), "identity", "16-bit store, no rotation"),
        Method("rtn2", 2, QuantConfig(bits=2), "identity", "per-token groups of a head"),
        Method("rtn4", 4, QuantConfig(bits=4), "identity", "per-token groups of a head"),
        Method("kivi2", 2, _kivi(2, 32), "identity", "KIVI: per-channel keys, 32 recent"),
        Method("kivi4", 4, _kivi(4, 32), "identity", "KIVI: per-channel keys, 32 recent"),
        Method("kivi2-r128", 2, _kivi(2, 128), "identity", "KIVI, 128 recent (its default)"),
        Method("quarot2", 2, QuantConfig(bits=2), "quarot", "post-RoPE per-head Hadamard"),
        Method("quarot4", 4, QuantConfig(bits=4), "quarot", "post-RoPE per-head Hadamard"),
        Method("rotatekv2-paper", 2, QuantConfig(bits=2), _paper(), "RotateKV's settings"),
        Method("rotatekv2-noreorder", 2, QuantConfig(bits=2), _paper(reorder="none"), "no reorder"),
        Method("rotatekv2-nogroup", 2, QuantConfig(bits=2), _paper(group_heads=1), "per head"),
        Method("rotatekv2-nosink", 2, QuantConfig(bits=2), _paper(sinks=False), "no sinks"),
        Method("rotatekv2-postrope", 2, QuantConfig(bits=2), _paper(mode="post_rope"), "post-RoPE"),
        Method(
            "rotatekv2",
            2,
            QuantConfig(bits=2, residual=DEFAULT_RESIDUAL),
            _ours(2),
            "ours: calibrated, sinks, 32 recent, 45% of layers at 3 bits",
        ),
        Method(
            "akvq",
            2,
            QuantConfig(bits=2, residual=DEFAULT_RESIDUAL),
            "rotatekv2",
            "AKVQ-VL's pivot/text patterns in rotatekv2's layers, rotatekv2's budget",
            "akvq",
        ),
        Method(
            "saliency",
            2,
            QuantConfig(bits=2, residual=DEFAULT_RESIDUAL),
            "rotatekv2",
            "bits by attention received, in rotatekv2's layers, rotatekv2's budget",
            "saliency",
        ),
        Method(
            "akvq-flat",
            2,
            QuantConfig(bits=2, residual=DEFAULT_RESIDUAL),
            "rotatekv2-flat",
            "akvq without rotatekv2's wider layers (all layers 2-bit based)",
            "akvq",
        ),
        Method(
            "saliency-flat",
            2,
            QuantConfig(bits=2, residual=DEFAULT_RESIDUAL),
            "rotatekv2-flat",
            "saliency without rotatekv2's wider layers",
            "saliency",
        ),
        Method(
            "rotatekv3",
            3,
            QuantConfig(bits=3, residual=DEFAULT_RESIDUAL),
            _ours(3),
            "ours at 3 bits",
        ),
        Method(
            "rotatekv4",
            4,
            QuantConfig(bits=4, residual=DEFAULT_RESIDUAL),
            _ours(4),
            "ours at 4 bits",
        ),
    ]
}


def parse_methods(s: str) -> list[str]:
    names = [x.strip() for x in s.split(",") if x.strip()]
    bad = [n for n in names if n not in METHODS]
    if bad or not names:
        raise ArgumentError(f"methods: expected names from {sorted(METHODS)}, got {bad or s!r}")
    if "fp16" not in names:
        names.insert(0, "fp16")  # the reference of delta_ppl and kl
    if any(METHODS[n].policy != "fixed" or METHODS[n].plan in _REUSE for n in names):
        # Policies reuse rotatekv2's calibration and meet its budget by default: run it too,
        # before them.
        if "rotatekv2" in names:
            names.remove("rotatekv2")
        first = min(
            i
            for i, n in enumerate(names)
            if METHODS[n].policy != "fixed" or METHODS[n].plan in _REUSE
        )
        names.insert(first, "rotatekv2")
    return names


_REUSE = ("rotatekv2", "rotatekv2-flat")
