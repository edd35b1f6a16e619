"""Inverse RoPE in transformers' convention, shared by the transformers integration and the
synthetic demo/bench (no transformers import here)."""

from __future__ import annotations

from typing import Any

import torch

from ._rotatekv import ArgumentError


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


def from_config(config: Any, layer: int) -> tuple[torch.Tensor, float]:
    """``(inv_freq, attention_scaling)`` of one layer's RoPE from a transformers config, as the
    model's rotary module computes them (for engines that hold the config, not the module).

    ``rope_parameters`` may be one dict or one per layer type (Gemma 3). The ``default`` type
    is computed here; others come from transformers' ``ROPE_INIT_FUNCTIONS``. RoPE that
    changes with the sequence length (``dynamic``) cannot be undone at a fixed position."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    rp = dict(getattr(cfg, "rope_parameters", None) or {})
    types = list(getattr(cfg, "layer_types", None) or [])
    layer_type = types[layer] if layer < len(types) else None
    if "rope_type" not in rp and layer_type in rp:
        rp = dict(rp[layer_type])
    else:
        layer_type = None
    kind = rp.get("rope_type", "default")
    if kind == "dynamic":
        raise ArgumentError("rope_type: 'dynamic' RoPE depends on the length; not supported")
    if kind == "default":
        base = float(rp.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dim = int(int(head_dim) * float(rp.get("partial_rotary_factor", 1.0)))
        exps = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
        return 1.0 / (base**exps), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if kind not in ROPE_INIT_FUNCTIONS:
        raise ArgumentError(f"rope_type: {kind!r} is not one transformers knows")
    inv, scaling = ROPE_INIT_FUNCTIONS[kind](cfg, torch.device("cpu"), layer_type=layer_type)
    return inv.to(torch.float32), float(scaling)
