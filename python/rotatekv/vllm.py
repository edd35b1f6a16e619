"""rotatekv inside vLLM: an attention backend that keeps vLLM's KV blocks as packed rotatekv
blocks (:mod:`rotatekv.paged`), written through vLLM's slot mapping and read through its
block tables.

Installing rotatekv registers the plugin (entry point ``vllm.general_plugins``); it changes
nothing until rotatekv is asked for, with ``LLM(..., additional_config={"rotatekv": {...}})``
or the same JSON in the environment variable ``ROTATEKV_VLLM`` (for ``vllm serve``)::

    LLM(model=DIR, block_size=64, additional_config={"rotatekv": {"bits": 2}})

Settings: ``bits`` (2, 3, 4, 8 or 16), ``key_bits``/``value_bits`` (keys and values of their
own widths), ``group_size`` (channels per scale and zero). vLLM's ``block_size`` must be 32
or 64 (a rotatekv block). The cache stays ``kv_cache_dtype="auto"``: the backend resizes each
cache cell to the packed bytes of a token (``customize_spec``), so the pool holds as many
more tokens as the format is smaller.

On CPU vLLM always runs its ``CPU_ATTN`` backend; the plugin puts this class in its place,
and without rotatekv settings every layer gets vLLM's own implementation (the class below
hands construction back to it). Keys reach the backend after RoPE, so the rotation is the
post-RoPE per-head Walsh-Hadamard transform.

Not here yet (issue 19): calibration files (pre-RoPE plans), the 16-bit recent window,
attention sinks, per-layer widths and the CUDA registration.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar

import torch
from vllm.config import get_current_vllm_config_or_none
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

from . import RotationPlan, paged
from ._rotatekv import _CLASS_BITS, ArgumentError

ENV = "ROTATEKV_VLLM"
KEYS = ("bits", "key_bits", "value_bits", "group_size")
BLOCK_SIZES = (32, 64)


def register() -> None:
    """The ``vllm.general_plugins`` entry point (run in every vLLM process; idempotent)."""
    register_backend(AttentionBackendEnum.CPU_ATTN, f"{__name__}.RotateKVBackend")


def settings(additional_config: Any = None) -> dict[str, Any] | None:
    """The rotatekv settings of a vLLM run: ``additional_config["rotatekv"]``, else the JSON
    of ``$ROTATEKV_VLLM``, else ``None`` (rotatekv not asked for). Checked here: an unknown
    key or width fails at engine start, naming it."""
    raw: Any = None
    source = "additional_config['rotatekv']"
    if isinstance(additional_config, dict) and "rotatekv" in additional_config:
        raw = additional_config["rotatekv"]
    elif os.environ.get(ENV):
        source = ENV
        try:
            raw = json.loads(os.environ[ENV])
        except json.JSONDecodeError as e:
            raise ArgumentError(f"{ENV}: expected a JSON object, got {os.environ[ENV]!r}") from e
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ArgumentError(f"{source}: expected a dict of settings, got {raw!r}")
    for k in raw:
        if k not in KEYS:
            raise ArgumentError(f"{source}.{k}: unknown setting (expected one of {KEYS})")
    out = {"bits": 2, "key_bits": None, "value_bits": None, "group_size": None, **raw}
    for k in ("bits", "key_bits", "value_bits"):
        if out[k] is not None and out[k] not in _CLASS_BITS:
            classes = ", ".join(map(str, _CLASS_BITS))
            raise ArgumentError(f"{source}.{k}: expected one of {classes}, got {out[k]!r}")
    return out


class RotateKVBackend(CPUAttentionBackend):
    """vLLM's CPU backend with rotatekv's packed blocks as the KV cache (see the module)."""

    # The cell size of every layer of this process (vLLM asks for the spec without a layer:
    # the implementations set it when the model is built, before the cache is sized).
    cell_bytes: ClassVar[int | None] = None

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"

    @staticmethod
    def get_impl_cls() -> type[CPUAttentionBackendImpl]:
        return RotateKVImpl

    @classmethod
    def customize_spec(cls, spec: Any) -> Any:
        if cls.cell_bytes is None or spec.state_content_bytes is not None:
            return spec
        return dataclasses.replace(spec, dtype=torch.uint8, state_content_bytes=cls.cell_bytes)


class RotateKVImpl(CPUAttentionBackendImpl):
    """Writes and attends through :mod:`rotatekv.paged`. Without rotatekv settings the
    constructor returns vLLM's own implementation instead."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        cfg = get_current_vllm_config_or_none()
        if settings(getattr(cfg, "additional_config", None)) is None:
            return CPUAttentionBackendImpl(*args, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = "decoder",
        kv_sharing_target_layer_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_heads,
            head_size,
            scale,
            num_kv_heads,
            alibi_slopes,
            sliding_window,
            kv_cache_dtype,
            logits_soft_cap,
            attn_type,
            kv_sharing_target_layer_name,
            **kwargs,
        )
        cfg = get_current_vllm_config_or_none()
        s = settings(getattr(cfg, "additional_config", None))
        assert s is not None  # __new__ returned vLLM's own class otherwise
        if alibi_slopes is not None or kwargs.get("sinks") is not None:
            raise ArgumentError("rotatekv: models with ALiBi or learned sinks are not supported")
        if attn_type != "decoder":
            raise ArgumentError(f"rotatekv: decoder attention only, got {attn_type!r}")
        if kv_cache_dtype != "auto":
            raise ArgumentError(
                f"kv_cache_dtype: expected 'auto' with rotatekv (it sizes the cache), "
                f"got {kv_cache_dtype!r}"
            )
        block_size = cfg.cache_config.block_size if cfg is not None else None
        if block_size not in BLOCK_SIZES:
            raise ArgumentError(
                f"block_size: rotatekv blocks hold {BLOCK_SIZES[0]} or {BLOCK_SIZES[1]} tokens; "
                f"start vLLM with block_size=64 (got {block_size})"
            )
        model_dtype = cfg.model_config.dtype if cfg is not None else torch.float32
        self.fmt = paged.BlockFormat(
            num_kv_heads,
            head_size,
            bits=s["bits"],
            block_size=block_size,
            group_size=s["group_size"],
            key_bits=s["key_bits"],
            value_bits=s["value_bits"],
            # 16-bit cells keep the model's own 16-bit format.
            fp_format="bfloat16" if model_dtype == torch.bfloat16 else "float16",
        )
        cell, rest = divmod(self.fmt.block_bytes, num_kv_heads * block_size)
        if rest:
            raise ArgumentError(
                f"head_size: a rotatekv block of {num_kv_heads} x {head_size} at "
                f"{self.fmt.key_bits}/{self.fmt.value_bits} bits does not split into "
                "whole per-token cells"
            )
        RotateKVBackend.cell_bytes = cell
        quantized = self.fmt.key_bits < 16
        self.plan = (
            RotationPlan.hadamard(1, num_kv_heads, head_size, mode="post_rope")
            if quantized
            else None
        )
        self.window = sliding_window if sliding_window is not None and sliding_window > 0 else None
        self.softcap = logits_soft_cap if logits_soft_cap else None

    def _pool(self, kv_cache: torch.Tensor) -> torch.Tensor:
        # [num_blocks, H, block_size, cell] uint8 (layout LBHNC) is one rotatekv block per
        # row: H head blocks of block_size cells each.
        return kv_cache.view(kv_cache.shape[0], -1)

    def do_kv_cache_update(
        self,
        layer: Any,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        n = slot_mapping.shape[0]
        paged.write(
            self._pool(kv_cache), self.fmt, key[:n], value[:n], slot_mapping, plan=self.plan
        )

    def forward(
        self,
        layer: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: Any,
        output: torch.Tensor,
        output_scale: Any = None,
        output_block_scale: Any = None,
    ) -> torch.Tensor:
        if attn_metadata is None:  # vLLM's profiling run
            return output
        n = attn_metadata.num_actual_tokens
        out = output[:n].view(n, self.num_heads, self.head_size)
        paged.attend(
            self._pool(kv_cache),
            self.fmt,
            query[:n],
            attn_metadata.block_table,
            attn_metadata.seq_lens,
            attn_metadata.query_start_loc,
            plan=self.plan,
            scale=self.scale,
            causal=attn_metadata.causal,
            window=self.window,
            softcap=self.softcap,
            out=out,
        )
        return output
