"""rotatekv inside vLLM: an attention backend that keeps vLLM's KV blocks as packed rotatekv
blocks (:mod:`rotatekv.paged`), written through vLLM's slot mapping and read through its
block tables.

Installing rotatekv registers the plugin (entry point ``vllm.general_plugins``); it changes
nothing until rotatekv is asked for, with ``LLM(..., additional_config={"rotatekv": {...}})``
or the same JSON in the environment variable ``ROTATEKV_VLLM`` (for ``vllm serve``)::

    LLM(model=DIR, block_size=64, additional_config={"rotatekv": {"bits": 2}})

Settings: ``bits`` (2, 3, 4, 8 or 16), ``key_bits``/``value_bits`` (keys and values of their
own widths), ``group_size`` (channels per scale and zero), ``residual`` (each query's newest
tokens kept in 16 bits, default 32; 0: none) and ``calibration`` (a ``rotatekv calibrate``
file: per-layer orderings and clips, pre- or post-RoPE). vLLM's ``block_size`` must be 32 or
64 (a rotatekv block). The cache stays ``kv_cache_dtype="auto"``: the backend resizes each
cache cell to the packed bytes of a token (``customize_spec``), so the pool holds as many
more tokens as the format is smaller.

On CPU vLLM always runs its ``CPU_ATTN`` backend; the plugin puts this class in its place,
and without rotatekv settings every layer gets vLLM's own implementation (the class below
hands construction back to it). Keys reach the backend after RoPE: without a calibration the
rotation is the post-RoPE per-head Walsh-Hadamard transform; a pre-RoPE calibration undoes
the model's RoPE (computed from its config) at each token's position before packing.

The recent window (:mod:`rotatekv.recent`) keeps 16-bit copies of every request's newest
tokens in side rows beside the pool, sized for ``max_num_seqs`` requests; its size is logged
at start. vLLM gives every layer cells of one size, so a calibration's per-layer widths run
at the widest of them (narrower layers would leave their cells' extra bytes unused).

Not here yet (issue 19): attention sinks (the calibration's rule needs each layer's input,
which an attention backend does not see), per-channel key layouts, calibrations under tensor
parallelism, and the CUDA registration.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, ClassVar

import torch
from vllm.config import get_current_vllm_config_or_none
from vllm.forward_context import get_forward_context
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

from . import RotationPlan, paged, recent
from ._rope import from_config as rope_from_config
from ._rotatekv import _CLASS_BITS, ArgumentError

ENV = "ROTATEKV_VLLM"
KEYS = ("bits", "key_bits", "value_bits", "group_size", "residual", "calibration")
BLOCK_SIZES = (32, 64)
DEFAULT_RESIDUAL = 32
log = logging.getLogger(__name__)


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
    out = {
        "bits": 2,
        "key_bits": None,
        "value_bits": None,
        "group_size": None,
        "residual": DEFAULT_RESIDUAL,
        "calibration": None,
        **raw,
    }
    for k in ("bits", "key_bits", "value_bits"):
        if out[k] is not None and out[k] not in _CLASS_BITS:
            classes = ", ".join(map(str, _CLASS_BITS))
            raise ArgumentError(f"{source}.{k}: expected one of {classes}, got {out[k]!r}")
    r = out["residual"]
    if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r <= max(BLOCK_SIZES):
        raise ArgumentError(
            f"{source}.residual: expected an int from 0 to the block size, got {r!r}"
        )
    cal = out["calibration"]
    if cal is not None and (not isinstance(cal, str) or not os.path.isfile(cal)):
        raise ArgumentError(
            f"{source}.calibration: expected the path of a `rotatekv calibrate` file, got {cal!r}"
        )
    return out


@dataclasses.dataclass
class _Model:
    """What every layer of the process shares: the plan, widths, RoPE and the windows."""

    plan: RotationPlan | None
    bits: int
    key_bits: int | None
    value_bits: int | None
    num_layers: int
    hf_config: Any
    # RecentWindow arguments (None: no window) and one window per KV-cache group: a group's
    # layers share a block table, so slots (which key the side rows) are per group.
    window_args: dict[str, Any] | None = None
    windows: dict[str, recent.RecentWindow] = dataclasses.field(default_factory=dict)
    ropes: dict[int, tuple[torch.Tensor, float]] = dataclasses.field(default_factory=dict)

    def rope(self, layer: int) -> dict[str, Any]:
        """``paged`` RoPE arguments of a pre-RoPE plan's layer (none for post-RoPE)."""
        if self.plan is None or self.plan.mode != "pre_rope":
            return {}
        if layer not in self.ropes:
            self.ropes[layer] = rope_from_config(self.hf_config, layer)
        inv, scaling = self.ropes[layer]
        return {"rope_inv_freq": inv, "rope_scaling": scaling}

    def window(self, group: str) -> recent.RecentWindow | None:
        if self.window_args is None:
            return None
        if group not in self.windows:
            w = recent.RecentWindow(**self.window_args)
            self.windows[group] = w
            log.info(
                "rotatekv: recent window of %d tokens for %d requests (KV-cache group of %s): "
                "%.1f MiB beside the KV pool",
                w.residual,
                self.window_args["capacity"] // (w.residual + recent.CHUNK),
                group,
                w.nbytes / 2**20,
            )
        return self.windows[group]


def _load_model(s: dict[str, Any], cfg: Any, heads: int, head_size: int) -> _Model:
    hf = cfg.model_config.hf_config
    text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    n = int(text.num_hidden_layers)
    bits, kb, vb = s["bits"], s["key_bits"], s["value_bits"]
    if s["calibration"] is None:
        plan = RotationPlan.hadamard(n, heads, head_size, mode="post_rope")
        return _Model(plan, bits, kb, vb, n, hf)
    from .calibrate import Calibration

    path = s["calibration"]
    what = f"calibration: {path!r}"
    try:
        cal = Calibration.load(path)
    except Exception as e:
        raise ArgumentError(f"{what} is not a readable rotatekv calibration ({e})") from e
    p = cal.plan
    want = (n, heads, head_size)
    got = (p.num_layers, p.num_kv_heads, p.head_dim)
    if got != want:
        tp = cfg.parallel_config.tensor_parallel_size
        raise ArgumentError(
            f"{what} was made for another model: (layers, KV heads, head size) {got}, this "
            f"model (per tensor-parallel rank, of {tp}) has {want}"
        )
    if cal.key_layouts and "per_channel" in cal.key_layouts:
        raise ArgumentError(
            f"{what} has per-channel key layouts, which paged blocks do not hold; "
            "calibrate with --key-layout per_token"
        )
    if any(math.isfinite(t) for t in cal.sink_thresholds):
        log.warning("rotatekv: %s has a sink rule; sinks are not applied inside vLLM yet", what)
    if cal.layer_bits:
        # One cell size for every layer: the widest width costs nothing more.
        bits = max(cal.layer_bits)
        kb = vb = None
        log.warning(
            "rotatekv: %s has per-layer widths %s; vLLM sizes every layer alike, so all "
            "layers run at %d bits",
            what,
            sorted(set(cal.layer_bits)),
            bits,
        )
    return _Model(p, bits, kb, vb, n, hf)


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

    # The plan, widths and window every layer of this process shares (one model each).
    model: ClassVar[_Model | None] = None

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
        if RotateKVImpl.model is None:
            RotateKVImpl.model = _load_model(s, cfg, num_kv_heads, head_size)
        self.m = m = RotateKVImpl.model
        model_dtype = cfg.model_config.dtype
        self.fmt = paged.BlockFormat(
            num_kv_heads,
            head_size,
            bits=m.bits,
            block_size=block_size,
            group_size=s["group_size"],
            key_bits=m.key_bits,
            value_bits=m.value_bits,
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
        self.plan = m.plan if quantized else None
        residual = s["residual"] if quantized else 0
        if residual > block_size:
            raise ArgumentError(
                f"residual: at most one block ({block_size} tokens), got {residual}"
            )
        if residual and m.window_args is None:
            seqs = cfg.scheduler_config.max_num_seqs
            m.window_args = dict(
                residual=residual,
                block_size=block_size,
                num_layers=m.num_layers,
                num_kv_heads=num_kv_heads,
                head_dim=head_size,
                capacity=seqs * (residual + recent.CHUNK),
                # 16-bit copies, as the store keeps its window (bf16 models: bf16).
                dtype=torch.bfloat16 if model_dtype == torch.bfloat16 else torch.float16,
            )
        log.info(
            "rotatekv: %d/%d-bit cells of %d bytes per token and KV head",
            self.fmt.key_bits,
            self.fmt.value_bits,
            cell,
        )
        self.window = sliding_window if sliding_window is not None and sliding_window > 0 else None
        self.softcap = logits_soft_cap if logits_soft_cap else None
        self.layer: int | None = None
        self.group: str | None = None
        self.recent: recent.RecentWindow | None = None

    def _layer(self, layer: Any) -> int:
        if self.layer is None:
            from vllm.model_executor.models.utils import extract_layer_index

            self.layer = extract_layer_index(layer.layer_name)
        return self.layer

    def _pool(self, kv_cache: torch.Tensor) -> torch.Tensor:
        # [num_blocks, H, block_size, cell] uint8 (layout LBHNC) is one rotatekv block per
        # row: H head blocks of block_size cells each.
        return kv_cache.view(kv_cache.shape[0], -1)

    def _step(self, layer: Any, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> Any:
        """This step's metadata (``None`` in vLLM's profiling run), after the window's
        bookkeeping for it."""
        metas = get_forward_context().attn_metadata
        if isinstance(metas, list):
            metas = metas[0]
        meta = metas.get(layer.layer_name) if isinstance(metas, dict) else metas
        if meta is None:
            return None
        if self.group is None:
            # The layers given the same metadata object form one KV-cache group.
            names = [n for n, x in metas.items() if x is meta] if isinstance(metas, dict) else []
            self.group = min(names, default="all")
        self.recent = self.m.window(self.group)
        if self.recent is not None:
            self.recent.begin(
                meta,
                meta.query_start_loc,
                meta.seq_lens,
                meta.block_table,
                slot_mapping,
                kv_cache.shape[0] * self.fmt.block_size,
            )
        return meta

    def do_kv_cache_update(
        self,
        layer: Any,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        meta = self._step(layer, kv_cache, slot_mapping) if self.plan is not None else None
        li = self._layer(layer)
        n = slot_mapping.shape[0]
        kw: dict[str, Any] = {}
        if self.plan is not None and self.plan.mode == "pre_rope":
            if meta is None:
                return  # vLLM's profiling run: nothing is read back
            n = int(meta.num_actual_tokens)
            kw = self.m.rope(li)
            pos = (
                self.recent.step.positions
                if self.recent is not None and self.recent.step is not None
                else recent.positions_of(meta.query_start_loc, meta.seq_lens)
            )
            kw["positions"] = pos[:n]
        paged.write(
            self._pool(kv_cache),
            self.fmt,
            key[:n],
            value[:n],
            slot_mapping[:n],
            plan=self.plan,
            layer=li if self.plan is not None else 0,
            **kw,
        )
        if meta is not None and self.recent is not None:
            t = int(meta.num_actual_tokens)
            self.recent.store(li, key[:t], value[:t])

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
        li = self._layer(layer)
        rope = self.m.rope(li) if self.plan is not None else {}
        if self.plan is not None and self.recent is not None:
            res = recent.attend(
                self.recent,
                li,
                self._pool(kv_cache),
                self.fmt,
                query[:n],
                key[:n],
                value[:n],
                attn_metadata.block_table,
                scale=self.scale,
                window=self.window,
                softcap=self.softcap,
                plan=self.plan,
                **rope,
            )
            out.copy_(res)
            return output
        paged.attend(
            self._pool(kv_cache),
            self.fmt,
            query[:n],
            attn_metadata.block_table,
            attn_metadata.seq_lens,
            attn_metadata.query_start_loc,
            plan=self.plan,
            layer=li if self.plan is not None else 0,
            scale=self.scale,
            causal=attn_metadata.causal,
            window=self.window,
            softcap=self.softcap,
            out=out,
            **rope,
        )
        return output
