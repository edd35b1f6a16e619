"""transformers integration: a model whose KV cache is a packed :class:`rotatekv.KVStore`.

``enable(model, plan, config)`` registers an attention function and a mask function named
``"rotatekv"`` with transformers, switches the model to them and makes ``model(...)`` and
``model.generate(...)`` use a :class:`RotateKVCache` unless the caller passes a cache.

How a step runs (public transformers hooks only, so every decoder that uses transformers'
standard rotary attention works unchanged):

1. the model projects q/k/v, applies its per-head norms and RoPE, then calls
   ``cache.update(k, v, layer, kwargs={"position_ids": ...})``;
2. :class:`RotateKVLayer.update` undoes RoPE on the new keys when the plan stores keys before
   RoPE (``R(-theta p) k / attention_scaling``, the model's own ``inv_freq``), and returns a
   handle instead of tensors: nothing full precision is kept beyond the current chunk;
3. the registered attention function receives the handle, the query (after RoPE) and the 2D
   padding mask (handed over by the registered mask function); it appends the chunk to the
   store (padding dropped through ``valid``), then runs the fused attention over the packed
   store, causal by position, with the layer's sliding window, soft-cap and scaling.
4. with a recent window of ``R`` tokens (``QuantConfig.residual``), a multi-token chunk gives
   each query its ``R`` newest tokens in 16 bits, as decode does: those in the chunk from the
   chunk, those before it from the store's window (read before the chunk is appended), the
   older ones packed (``attend(..., lag=R, return_lse=True)``), merged by log-sum-exp
   (:func:`rotatekv.engine.attend_chunk` runs the step). A one-pass prefill and
   token-by-token decoding thus see the same precision (with per-channel keys, decode also
   keeps the tokens of an unfilled block in 16 bits, up to ``page_tokens - 1`` more, which a
   prefill reads packed).

The package: ``spec`` (what is read of a model), ``cache`` (the ``Cache`` over stores),
``attention`` (the registered functions), this module (``enable``/``disable``). Tested against
transformers 5.24.0 (see README).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import QuantConfig, RotationPlan
from .._rotatekv import ArgumentError, DeviceError
from .attention import ATTN_NAME, register
from .cache import RotateKVCache, RotateKVLayer, _check_plan
from .spec import (
    LayerRope,
    ModelSpec,
    decoder_layers,
    image_token,
    model_spec,
    rope_types,
    text_config,
    unrope,
)

__all__ = [
    "ATTN_NAME",
    "LayerRope",
    "ModelSpec",
    "RotateKVCache",
    "RotateKVLayer",
    "disable",
    "enable",
    "model_spec",
    "new_cache",
    "unrope",
]

_STATE_ATTR = "_rotatekv_state"


def _check_device(device: str | None) -> None:
    """Refuses a cache device this machine lacks at enable time, not in the first forward."""
    if device is None or device in ("cpu", "emu"):
        return
    if not isinstance(device, str) or not (device == "cuda" or device.startswith("cuda:")):
        raise ArgumentError(f"device: expected 'cpu', 'cuda', 'cuda:N' or 'emu', got {device!r}")
    index = device.partition(":")[2]
    if index and not index.isdigit():
        raise ArgumentError(f"device: expected 'cuda' or 'cuda:N', got {device!r}")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if int(index or 0) >= n:
        raise DeviceError(f"device: {device!r} is not available here ({n} CUDA devices visible)")


@dataclass
class _State:
    plan: RotationPlan
    config: QuantConfig
    sink_thresholds: list[float] | None
    key_layouts: list[str] | None
    layer_bits: list[int] | None
    previous_attn: str
    forward: Callable[..., Any]
    generate: Callable[..., Any]
    hooks: list[Any]
    device: str | None = None


def _sink_hook(idx: int) -> Callable[..., None]:
    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if isinstance(cache, RotateKVCache) and cache.sink_thresholds is not None:
            hs = args[0] if args else kwargs["hidden_states"]
            cache.maxabs[idx] = hs.detach().abs().amax(-1)

    return hook


def new_cache(model: torch.nn.Module) -> RotateKVCache:
    """A fresh cache for a model that :func:`enable` prepared."""
    st = getattr(model, _STATE_ATTR, None)
    if st is None:
        raise ArgumentError("model: expected a model prepared by rotatekv.hf.enable")
    return RotateKVCache(
        model,
        st.plan,
        st.config,
        st.sink_thresholds,
        st.key_layouts,
        device=st.device,
        layer_bits=st.layer_bits,
    )


def _has_cache(kwargs: dict[str, Any]) -> bool:
    return kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None


def _token_types(
    model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.Tensor | None:
    """Token types of a forward's tokens: ``token_types=`` if given, else image tokens of a
    VLM's ``input_ids`` (``IMAGE``, the rest ``TEXT``), else ``None``."""
    from ..policy import IMAGE, TEXT

    ids = kwargs.get("input_ids", args[0] if args else None)
    types = kwargs.pop("token_types", None)
    if types is not None:
        types = torch.as_tensor(types)
        if types.dtype.is_floating_point or types.ndim != 2:
            raise ArgumentError(
                f"token_types: expected integer types [batch, tokens], got {types.dtype} "
                f"{tuple(types.shape)}"
            )
        if isinstance(ids, torch.Tensor) and tuple(types.shape) != tuple(ids.shape):
            raise ArgumentError(
                f"token_types: expected shape {tuple(ids.shape)} (input_ids'), got "
                f"{tuple(types.shape)}"
            )
        return types.to("cpu", torch.int64)
    tok = image_token(model)
    if tok is None or not isinstance(ids, torch.Tensor):
        return None
    return torch.where(ids == tok, IMAGE, TEXT).to("cpu", torch.int64)


def _cache_of(kwargs: dict[str, Any]) -> Any:
    c = kwargs.get("cache")
    return c if c is not None else kwargs.get("past_key_values")


def enable(
    model: torch.nn.Module,
    plan: Any = None,
    config: QuantConfig | None = None,
    device: str | None = None,
) -> torch.nn.Module:
    """Makes ``model``'s KV cache a packed store; returns the same model.

    ``plan``: a :class:`RotationPlan`, or a :class:`rotatekv.calibrate.Calibration` (its plan,
    its per-layer key layouts, and its sink rule: tokens whose largest |hidden state| at a
    layer's input exceeds that layer's threshold stay in 16 bits there); default
    ``RotationPlan.hadamard(..., mode="pre_rope")`` (grouped heads), no sinks. ``config``
    defaults to ``QuantConfig()`` (2 bits). ``device``: where the packed stores live
    (default: the model's device, so a CUDA model keeps its cache on the GPU). Calling it
    again replaces the settings; :func:`disable` undoes it.
    """
    spec = model_spec(model)
    sinks = layouts = layer_bits = None
    if plan is not None and hasattr(plan, "sink_thresholds") and hasattr(plan, "plan"):
        sinks = list(plan.sink_thresholds)
        layouts = getattr(plan, "key_layouts", None)
        layer_bits = getattr(plan, "layer_bits", None)
        plan = plan.plan
    if plan is None:
        plan = RotationPlan.hadamard(spec.num_layers, spec.num_kv_heads, spec.head_dim)
    if config is None:
        config = QuantConfig()
    if not isinstance(plan, RotationPlan):
        raise ArgumentError(
            f"plan: expected a RotationPlan or a Calibration, got {type(plan).__name__}"
        )
    if not isinstance(config, QuantConfig):
        raise ArgumentError(f"config: expected a QuantConfig, got {type(config).__name__}")
    _check_plan(plan, spec)
    _check_device(device)
    ropes = rope_types(model)
    if plan.mode == "pre_rope" and ropes & {"dynamic", "longrope"}:
        # These recompute inv_freq as the context grows; keys stored before RoPE would be
        # rotated with frequencies other than the model's at attention time.
        raise ArgumentError(
            f"plan: a pre_rope plan needs a fixed RoPE; this model uses {sorted(ropes)} "
            "RoPE, whose frequencies change with the context: use mode='post_rope'"
        )
    if sinks is not None and len(sinks) != spec.num_layers:
        raise ArgumentError(f"plan: sink rule for {len(sinks)} layers, model has {spec.num_layers}")
    layers = decoder_layers(model, spec.num_layers)
    register()
    old = getattr(model, _STATE_ATTR, None)
    if old is not None:
        old.plan, old.config, old.sink_thresholds, old.key_layouts = plan, config, sinks, layouts
        old.layer_bits = layer_bits
        old.device = device
        return model
    text_cfg = text_config(model)
    multimodal = text_cfg is not model.config
    prev = text_cfg._attn_implementation
    hooks = [
        layer.register_forward_pre_hook(_sink_hook(i), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    st = _State(
        plan, config, sinks, layouts, layer_bits, prev, model.forward, model.generate, hooks, device
    )

    @functools.wraps(st.forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        types = _token_types(model, args, kwargs)
        if not _has_cache(kwargs) and kwargs.get("use_cache", True) is not False:
            kwargs["cache"] = new_cache(model)
        elif kwargs.get("use_cache") is False:
            # Attention runs through the store even without a kept cache.
            kwargs["cache"] = new_cache(model)
            kwargs["use_cache"] = True
        cache = _cache_of(kwargs)
        if isinstance(cache, RotateKVCache):
            cache.token_types = types
        try:
            return st.forward(*args, **kwargs)
        finally:
            if isinstance(cache, RotateKVCache):
                cache.token_types = None

    @functools.wraps(st.generate)
    def generate(*args: Any, **kwargs: Any) -> Any:
        if not _has_cache(kwargs):
            kwargs["cache"] = new_cache(model)
        return st.generate(*args, **kwargs)

    # A VLM's vision tower keeps its own attention: only the language model has a KV cache.
    model.set_attn_implementation({"text_config": ATTN_NAME} if multimodal else ATTN_NAME)
    setattr(model, _STATE_ATTR, st)
    model.forward = forward  # type: ignore[method-assign]
    model.generate = generate  # type: ignore[method-assign]
    return model


def disable(model: torch.nn.Module) -> torch.nn.Module:
    """Undoes :func:`enable`: the model's own attention and cache again."""
    st = getattr(model, _STATE_ATTR, None)
    if st is None:
        return model
    for h in st.hooks:
        h.remove()
    del model.forward
    del model.generate
    delattr(model, _STATE_ATTR)
    multimodal = text_config(model) is not model.config
    model.set_attn_implementation(
        {"text_config": st.previous_attn} if multimodal else st.previous_attn
    )
    return model
