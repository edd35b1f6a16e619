"""The attention and mask functions registered with transformers as ``"rotatekv"``: they turn
transformers' arguments (handle, query, padding mask, sliding window, soft-cap) into one
:func:`rotatekv.engine.attend_chunk` step."""

from __future__ import annotations

from typing import Any

import torch
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from .._rotatekv import ArgumentError, RotateKVError
from ..engine import Allocation, Chunk, attend_chunk
from .cache import _Pending

ATTN_NAME = "rotatekv"


def _padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **_: Any,
) -> torch.Tensor | None:
    """Mask function: hands the 2D padding mask of the cache's slots to the attention."""
    if attention_mask is None:
        return None
    return attention_mask[:, kv_offset : kv_offset + kv_length]


def _attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: Any,
    value: Any,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    position_ids: torch.Tensor | None = None,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    if not isinstance(key, _Pending):
        raise RotateKVError(
            "attention: the 'rotatekv' attention needs a RotateKVCache; call the model through "
            "rotatekv.hf.enable (which supplies one) or pass cache=rotatekv.hf.new_cache(model)"
        )
    h = key
    cache = h.cache
    store, layer = cache.store_of(h.layer)
    b, _, t, _ = h.k.shape
    valid = None
    if attention_mask is not None:
        if attention_mask.ndim != 2:
            raise ArgumentError(
                f"attention_mask: expected a 2D padding mask [batch, keys], got shape "
                f"{tuple(attention_mask.shape)}"
            )
        valid = attention_mask[:, -t:].to("cpu", torch.bool)
        if bool(valid.all()):
            valid = None
    protect = None
    th = cache.sink_thresholds
    ma = cache.maxabs.pop(h.layer, None)
    if th is not None and ma is not None and th[h.layer] != float("inf"):
        protect = (ma[:, -t:] > th[h.layer]).to("cpu")
    bits = None
    lb = cache.layer_bits
    if lb is not None and lb[h.layer] != cache.config.bits:
        bits = torch.full((b, t), lb[h.layer], dtype=torch.int64)
    tq = query.shape[2]
    qpos = h.positions if position_ids is None else position_ids.to(torch.int64).expand(b, tq)
    policy = None
    if cache.allocator is not None:
        policy = Allocation(cache.allocator, h.layer, cache.token_types)
    chunk = Chunk(h.k, h.v, h.k_model, h.positions, valid=valid, protect=protect, bits=bits)
    out = attend_chunk(
        store, layer, query, chunk, query_positions=qpos, recent=cache.recent(h.layer),
        scale=scaling, window=sliding_window, softcap=softcap, fp_dtype=cache.fp_dtype,
        policy=policy,
    )  # fmt: skip
    # Counted only once stored, so a refused append leaves the cache as it was.
    cache.layers[h.layer].slots += t
    if protect is not None:
        kept = (protect if valid is None else protect & valid).sum(1)
        prev = cache.sink_tokens.get(h.layer)
        cache.sink_tokens[h.layer] = kept if prev is None else prev + kept
    return out.transpose(1, 2), None


def register() -> None:
    """Registers the attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTN_NAME, _attention)
    AttentionMaskInterface.register(ATTN_NAME, _padding_mask)
