"""The CUDA backend ``ROTATEKV`` (``attention_backend="ROTATEKV"``): vLLM's blocks as rotatekv
blocks read and written by the CUDA paged kernels, which take vLLM's int32 block table,
sequence lengths and query offsets on the device (no host copy of any table).

Written and tested on machines without a GPU: ``tests/vllm_plugin/test_cuda_backend.py`` runs
this backend under the emulated device (the kernels' host build) against the CPU backend.
The recent window's bookkeeping (:mod:`rotatekv.recent`) is torch on the device; its
attention is the torch composition there until the CUDA kernels read recent rows (issue 20).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from vllm.config import get_current_vllm_config_or_none
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

from .. import paged
from .._rotatekv import ArgumentError
from . import BLOCK_SIZES, CUDA_NAME, settings
from .layer import Layer

# What selecting the backend without settings means.
DEFAULTS: dict[str, Any] = {"bits": 2}


@dataclasses.dataclass
class RotateKVMetadata:
    """One step's tables (device int32, as vLLM builds them) and host-side sizes."""

    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    causal: bool = True


class RotateKVMetadataBuilder(AttentionMetadataBuilder[RotateKVMetadata]):
    """vLLM's common metadata as the kernels take it (no copies, no host reads)."""

    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: Any):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> RotateKVMetadata:
        cam = common_attn_metadata
        if not isinstance(cam.causal, bool) or not cam.causal:
            raise ArgumentError("rotatekv: causal decoder attention only")
        return RotateKVMetadata(
            num_actual_tokens=cam.num_actual_tokens,
            max_query_len=cam.max_query_len,
            max_seq_len=cam.max_seq_len,
            query_start_loc=cam.query_start_loc,
            seq_lens=cam.seq_lens,
            block_table=cam.block_table_tensor,
            slot_mapping=cam.slot_mapping,
        )


class RotateKVCudaBackend(AttentionBackend):
    """rotatekv's packed blocks as vLLM's KV cache on CUDA."""

    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[Any]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return CUDA_NAME

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec: Any = None) -> list[Any]:
        return list(BLOCK_SIZES)

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # A block's [H, N, cell] bytes in one run: one rotatekv block per pool row.
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        try:
            paged.BlockFormat(1, head_size)
        except ValueError:
            return False
        return True

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == "decoder"

    @classmethod
    def supports_compute_capability(cls, capability: Any) -> bool:
        # The kernels are compiled and checked for sm_80 and newer.
        return capability is None or tuple(capability) >= (8, 0)

    @staticmethod
    def get_impl_cls() -> type[AttentionImpl]:
        return RotateKVCudaImpl

    @staticmethod
    def get_builder_cls() -> type[RotateKVMetadataBuilder]:
        return RotateKVMetadataBuilder

    @classmethod
    def customize_spec(cls, spec: Any) -> Any:
        return Layer.customize_spec(spec)


class RotateKVCudaImpl(Layer, AttentionImpl):
    """Writes and attends through :mod:`rotatekv.paged` on the pool's device."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        cfg = get_current_vllm_config_or_none()
        s = settings(getattr(cfg, "additional_config", None), default=DEFAULTS)
        assert s is not None
        self._setup(s, *args, **kwargs)
