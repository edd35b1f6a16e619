"""What rotatekv reads of a transformers decoder: layer count, KV heads, head size, each
layer's RoPE and sliding flag, its decoder layers and a VLM's image token. Calibration,
evaluation and the cache all inspect models here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._rope import unrope as _unrope
from .._rotatekv import ArgumentError


@dataclass(frozen=True)
class LayerRope:
    """RoPE of one attention layer as transformers computes it."""

    inv_freq: torch.Tensor  # float32, rotary_dim / 2 entries
    scaling: float


@dataclass(frozen=True)
class ModelSpec:
    """What the cache needs to know of a model's attention layers."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    ropes: tuple[LayerRope, ...]
    sliding: tuple[bool, ...]


def text_config(model: torch.nn.Module) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _rotary_module(model: torch.nn.Module) -> torch.nn.Module:
    for name, mod in model.named_modules():
        if name.endswith("rotary_emb"):
            return mod
    raise ArgumentError(
        "model: expected a transformers decoder with a `rotary_emb` module (standard rotary "
        f"attention), found none in {type(model).__name__}"
    )


def model_spec(model: torch.nn.Module) -> ModelSpec:
    """Layer count, KV heads, head size, per-layer RoPE and sliding flags of ``model``."""
    cfg = text_config(model)
    n = int(cfg.num_hidden_layers)
    hkv = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    d = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    rot = _rotary_module(model)
    types = list(getattr(cfg, "layer_types", None) or [])
    ropes = []
    for i in range(n):
        lt = types[i] if i < len(types) else None
        if lt is not None and hasattr(rot, f"{lt}_inv_freq"):
            inv = getattr(rot, f"{lt}_inv_freq")
            scale = getattr(rot, f"{lt}_attention_scaling")
        else:
            inv, scale = rot.inv_freq, rot.attention_scaling
        ropes.append(LayerRope(inv.detach().to("cpu", torch.float32).clone(), float(scale)))
    sliding = tuple(
        (types[i] == "sliding_attention") if i < len(types) else False for i in range(n)
    )
    return ModelSpec(n, hkv, d, tuple(ropes), sliding)


def rope_types(model: torch.nn.Module) -> set[str]:
    rp = getattr(text_config(model), "rope_parameters", None) or {}
    if "rope_type" in rp:
        return {str(rp["rope_type"])}
    return {str(v.get("rope_type")) for v in rp.values() if isinstance(v, dict)}


def unrope(k: torch.Tensor, positions: torch.Tensor, rope: LayerRope) -> torch.Tensor:
    """Keys before RoPE from keys after a layer's RoPE (see :func:`rotatekv._rope.unrope`)."""
    return _unrope(k, positions, rope.inv_freq, rope.scaling)


def _text_module(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder that owns the rotary embedding (a VLM's language model; the model
    itself for a plain decoder): its layers are the ones with a KV cache."""
    for name, _ in model.named_modules():
        if name.endswith("rotary_emb"):
            parent = name.rpartition(".")[0]
            return model.get_submodule(parent) if parent else model
    return model


def decoder_layers(model: torch.nn.Module, n: int) -> list[torch.nn.Module]:
    """The ``n`` decoder layers (modules with a ``self_attn`` child), in order; a VLM's
    vision tower is left out."""
    layers = [m for m in _text_module(model).modules() if hasattr(m, "self_attn")]
    if len(layers) != n:
        raise ArgumentError(
            f"model: expected {n} decoder layers with a self_attn module, found {len(layers)}"
        )
    return layers


def image_token(model: torch.nn.Module) -> int | None:
    """A LLaVA-family model's image placeholder id (``None`` for text-only models)."""
    cfg = model.config
    for name in ("image_token_id", "image_token_index"):
        v = getattr(cfg, name, None)
        if isinstance(v, int):
            return v
    return None
