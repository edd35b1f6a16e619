"""The package's device hooks, handed to the extension when ``rotatekv`` is imported (the
extension never imports the package back): value checks of device tensors, run with torch
on their device before a device store changes (the CPU path checks the same rules in Rust
while reading the values), and loading torch's NVRTC."""

from __future__ import annotations

from typing import Any

from ._rotatekv import ArgumentError

_FP16_MAX = 65504.0


def check_finite(x: Any, name: str) -> None:
    """Raises ArgumentError naming `name` when `x` holds NaN or infinity."""
    import torch

    if not bool(torch.isfinite(x).all()):
        raise ArgumentError(f"{name}: expected finite values, got NaN or infinity")


def check_values(
    k: Any,
    v: Any,
    valid: Any,
    protect: Any,
    bits: Any,
    fp_format: str,
    default_bits: int,
) -> None:
    """The CPU path's rules: stored tokens finite, within ±65504 unless kept in bfloat16."""
    import torch

    b, _, t, _ = k.shape
    keep = torch.ones(b, t, dtype=torch.bool, device=k.device)
    if valid is not None:
        keep &= torch.as_tensor(valid, device=k.device).reshape(b, t).bool()
    wide = torch.zeros(b, t, dtype=torch.bool, device=k.device)
    if fp_format == "bfloat16":
        if protect is not None:
            wide |= torch.as_tensor(protect, device=k.device).reshape(b, t).bool()
        if bits is not None:
            wide |= torch.as_tensor(bits, device=k.device).reshape(b, t) == 16
        elif default_bits == 16:
            wide[:] = True
    for name, x in (("k", k), ("v", v)):
        a = x.float().abs().amax(dim=(1, 3))  # [B, T]; NaN propagates
        bad_nan = keep & ~torch.isfinite(a)
        if bool(bad_nan.any()):
            raise ArgumentError(f"{name}: expected finite values, got NaN or infinity")
        bad = keep & ~wide & (a > _FP16_MAX)
        if bool(bad.any()):
            raise ArgumentError(
                f"{name}: expected values within ±65504 (fp16 scales, zeros and tokens; use "
                "fp_format='bfloat16' with 16-bit tokens for wider ranges), got "
                f"{float(a[bad].max())}"
            )


def load_nvrtc() -> None:
    """Loads NVRTC from torch's wheels (see :mod:`rotatekv.cuda`)."""
    from .cuda import _load_nvrtc

    _load_nvrtc()
