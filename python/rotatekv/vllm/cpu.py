"""The CPU backend: vLLM always runs ``CPU_ATTN`` on CPU, so the plugin registers this class
in its place; without rotatekv settings each layer gets vLLM's own implementation."""

from __future__ import annotations

from typing import Any

from vllm.config import get_current_vllm_config_or_none
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from . import settings
from .layer import Layer


class RotateKVBackend(CPUAttentionBackend):
    """vLLM's CPU backend with rotatekv's packed blocks as the KV cache."""

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"

    @staticmethod
    def get_impl_cls() -> type[CPUAttentionBackendImpl]:
        return RotateKVImpl

    @classmethod
    def customize_spec(cls, spec: Any) -> Any:
        return Layer.customize_spec(spec)


class RotateKVImpl(Layer, CPUAttentionBackendImpl):
    """Writes and attends through :mod:`rotatekv.paged`. Without rotatekv settings the
    constructor returns vLLM's own implementation instead."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        cfg = get_current_vllm_config_or_none()
        if settings(getattr(cfg, "additional_config", None)) is None:
            return CPUAttentionBackendImpl(*args, **kwargs)
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        CPUAttentionBackendImpl.__init__(self, *args, **kwargs)
        cfg = get_current_vllm_config_or_none()
        s = settings(getattr(cfg, "additional_config", None))
        assert s is not None  # __new__ returned vLLM's own class otherwise
        self._setup(s, *args, **kwargs)
