"""Inverse RoPE in transformers' convention, shared by the transformers integration and the
synthetic demo/bench (no transformers import here)."""

from __future__ import annotations

import torch


def tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` ``[B, 1, T, r]`` of float32 angles ``p * inv_freq``, halves repeated."""
    ang = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device, torch.float32)
    return (
        torch.cat([ang.cos(), ang.cos()], -1)[:, None],
        torch.cat([ang.sin(), ang.sin()], -1)[:, None],
    )


def unrope(
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    scaling: float = 1.0,
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Keys before RoPE from keys after it: ``R(-theta p) k / scaling`` in float32.

    ``k``: ``[B, H, T, D]``; ``positions``: ``[B, T]`` (or ``[1, T]``). Angles are computed as
    transformers does (float32 ``p * inv_freq``, rotate_half pairing ``i`` with ``i + r/2``),
    so un-rotation inverts the model's rotation to float rounding. Channels past the rotary
    width ``r = 2 * len(inv_freq)`` pass through. ``cos_sin``: :func:`tables` of the same
    positions, when the caller already has them.
    """
    cos, sin = cos_sin if cos_sin is not None else tables(positions, inv_freq)
    rd = cos.shape[-1]
    kf = k.to(torch.float32)
    kr = kf[..., :rd]
    half = rd // 2
    rot = torch.cat([-kr[..., half:], kr[..., :half]], -1)
    out = (kr * cos.to(k.device) - rot * sin.to(k.device)) / scaling
    if rd < kf.shape[-1]:
        out = torch.cat([out, kf[..., rd:]], -1)
    return out
