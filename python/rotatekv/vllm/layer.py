"""One rotatekv attention layer inside vLLM, under either backend (:mod:`.cpu`,
:mod:`.cuda`): settings to a block format and plan, vLLM's slots written with
:func:`rotatekv.paged.write`, its block tables read with :func:`rotatekv.paged.attend`, the
recent window beside the pool (:mod:`rotatekv.recent`)."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, ClassVar

import torch
from vllm.config import get_current_vllm_config_or_none
from vllm.forward_context import get_forward_context

from .. import RotationPlan, paged, recent
from .._rope import from_config as rope_from_config
from .._rotatekv import ArgumentError
from ..engine import recent_tokens
from . import BLOCK_SIZES, plan_for_heads, rank_heads, settings

log = logging.getLogger("rotatekv.vllm")


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


def check_config(cfg: Any) -> None:
    """What can be checked before any worker starts: the settings, the model's head size
    against the block format, a calibration against the model (each tensor-parallel rank's
    part). Run in the front-end process (``register`` hooks it into vLLM's configuration), so
    a bad setting fails where the engine is created, naming it; the workers check again."""
    s = settings(getattr(cfg, "additional_config", None))
    if s is None or getattr(cfg, "model_config", None) is None:
        return
    _, total, d = _dims(cfg)
    tp = cfg.parallel_config.tensor_parallel_size
    h0, h1 = rank_heads(total, tp, 0)
    heads = h1 - h0
    try:
        paged.BlockFormat(
            heads,
            d,
            bits=s["bits"],
            group_size=s["group_size"],
            key_bits=s["key_bits"],
            value_bits=s["value_bits"],
        )
    except ValueError as e:
        raise ArgumentError(
            f"head_size: rotatekv blocks cannot hold this model's heads ({e})"
        ) from e
    if s["calibration"] is not None:
        # Every rank holds as many heads, and a Hadamard group fits rank 0's slice exactly
        # when it fits every rank's (slices start at multiples of their size): one check.
        _load_model(s, cfg, heads, d, 0)


def _dims(cfg: Any) -> tuple[int, int, int]:
    """The model's layers, KV heads (all ranks) and head size."""
    hf = cfg.model_config.hf_config
    text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
    q_heads = int(text.num_attention_heads)
    kv = int(getattr(text, "num_key_value_heads", None) or q_heads)
    d = int(getattr(text, "head_dim", None) or text.hidden_size // q_heads)
    return int(text.num_hidden_layers), kv, d


def install_front_end_check() -> None:
    """Runs :func:`check_config` where vLLM validates a new configuration (the platform's
    ``check_and_update_config``, called in the process that creates the engine). Idempotent."""
    from vllm.platforms import current_platform

    cls = type(current_platform)
    if getattr(cls.check_and_update_config, "_rotatekv", False):
        return
    vllm_check = cls.check_and_update_config

    def check(klass: Any, vllm_config: Any) -> None:
        check_config(vllm_config)
        vllm_check(vllm_config)

    check._rotatekv = True  # type: ignore[attr-defined]
    cls.check_and_update_config = classmethod(check)  # type: ignore[method-assign,assignment]


def _load_model(
    s: dict[str, Any], cfg: Any, heads: int, head_size: int, rank: int | None = None
) -> _Model:
    """The process's model: plan and widths (``rank``: the tensor-parallel rank whose part of
    a calibration to take; ``None``: this process's)."""
    hf = cfg.model_config.hf_config
    n, total, _ = _dims(cfg)
    bits, kb, vb = s["bits"], s["key_bits"], s["value_bits"]
    if s["calibration"] is None:
        plan = RotationPlan.hadamard(n, heads, head_size, mode="post_rope")
        return _Model(plan, bits, kb, vb, n, hf)
    from ..calibrate import Calibration

    path = s["calibration"]
    what = f"calibration: {path!r}"
    try:
        cal = Calibration.load(path)
    except Exception as e:
        raise ArgumentError(f"{what} is not a readable rotatekv calibration ({e})") from e
    p = cal.plan
    want = (n, heads, head_size)
    got = (p.num_layers, p.num_kv_heads, p.head_dim)
    tp = cfg.parallel_config.tensor_parallel_size
    if tp > 1 and got == (n, total, head_size):
        # A calibration of the whole model: this rank's heads of it.
        if rank is None:
            from vllm.distributed import get_tensor_model_parallel_rank

            rank = get_tensor_model_parallel_rank()
        p = plan_for_heads(p, *rank_heads(total, tp, rank))
        got = (p.num_layers, p.num_kv_heads, p.head_dim)
    if got != want:
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


class Layer:
    """rotatekv's side of an attention layer: both backends' implementations derive from it
    (after their vLLM base, so its ``do_kv_cache_update`` and ``forward`` win)."""

    # The plan, widths and window every layer of this process shares (one model each).
    model: ClassVar[_Model | None] = None
    # The cell size of every layer of this process (vLLM asks for the spec without a layer:
    # the implementations set it when the model is built, before the cache is sized).
    cell_bytes: ClassVar[int | None] = None
    # Where the kernels run: None follows the pool's tensor (CPU or CUDA); tests set "emu"
    # to run the CUDA kernels' host build over CPU tensors.
    kernel_device: str | None = None

    @classmethod
    def customize_spec(cls, spec: Any) -> Any:
        """vLLM's cache spec with cells of the packed bytes of a token and KV head."""
        if Layer.cell_bytes is None or spec.state_content_bytes is not None:
            return spec
        return dataclasses.replace(spec, dtype=torch.uint8, state_content_bytes=Layer.cell_bytes)

    def _setup(
        self,
        s: dict[str, Any],
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = "decoder",
        kv_sharing_target_layer_name: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Checks the layer against what rotatekv holds and sets up its format, plan and
        window (``s``: :func:`rotatekv.vllm.settings`; the rest: vLLM's arguments of an
        attention implementation)."""
        if kv_sharing_target_layer_name is not None:
            raise ArgumentError(
                "rotatekv: layers sharing another layer's KV cache are not supported"
            )
        num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        cfg = get_current_vllm_config_or_none()
        self.num_heads, self.head_size, self.scale = num_heads, head_size, scale
        self.num_kv_heads = num_kv_heads
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
        if Layer.model is None:
            Layer.model = _load_model(s, cfg, num_kv_heads, head_size)
        self.m = m = Layer.model
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
        Layer.cell_bytes = cell
        quantized = self.fmt.key_bits < 16
        self.plan = m.plan if quantized else None
        # 16-bit keys need no window (the store's rule, rotatekv.engine).
        residual = recent_tokens(self.fmt.key_bits, s["residual"])
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
            device=self.kernel_device,
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
            recent.attend(
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
                out=out,
                device=self.kernel_device,
                **rope,
            )
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
            # Known on the host: on a device the kernel then needs no read-back.
            max_query_len=int(attn_metadata.max_query_len),
            device=self.kernel_device,
            **rope,
        )
        return output
