"""The transformers ``Cache`` over packed stores: one :class:`rotatekv.KVStore` per (RoPE, key
layout), created at the first ``update``; ``update`` hands the attention function the chunk
(keys before RoPE for a ``pre_rope`` plan) instead of tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .. import KVStore, QuantConfig, RotationPlan
from .._rope import tables as _rope_tables
from .._rope import unrope as _unrope
from .._rotatekv import ArgumentError, RotateKVError
from ..engine import recent_tokens
from ..policy import CLASSES, Allocator
from .spec import LayerRope, ModelSpec, model_spec


@dataclass
class _Pending:
    """What ``update`` hands to the attention function: the chunk to append."""

    cache: RotateKVCache
    layer: int
    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor  # int64 [B, T]
    k_model: torch.Tensor  # the keys as the model computed them (after RoPE)


class RotateKVLayer(CacheLayerMixin):
    """One decoder layer's view of a :class:`RotateKVCache` (transformers' layer protocol)."""

    is_compileable = False
    is_croppable = False

    def __init__(self, cache: RotateKVCache, layer: int, sliding: bool) -> None:
        super().__init__()
        self.cache = cache
        self.layer = layer
        self.is_sliding = sliding
        # Slots as transformers counts them (padding included): masks index keys by slot.
        self.slots = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.cache._ensure_stores(key_states.shape[0], key_states.device)
        self.is_initialized = True

    def update(  # type: ignore[override]
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        *args: Any,
        kwargs: dict[str, Any] | None = None,
        **extra: Any,
    ) -> tuple[Any, Any]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, _, t, _ = key_states.shape
        pos = (kwargs or {}).get("position_ids")
        if pos is None:
            pos = torch.arange(self.slots, self.slots + t, device=key_states.device)[None]
        pos = pos.to(torch.int64).expand(b, t)
        k = key_states
        if self.cache.plan.mode == "pre_rope":
            rope = self.cache.spec.ropes[self.layer]
            cs = self.cache._cos_sin(pos, rope)
            k = _unrope(key_states, pos, rope.inv_freq, rope.scaling, cs)
        h = _Pending(self.cache, self.layer, k, value_states, pos, key_states)
        return h, h

    def get_seq_length(self) -> int:
        return self.slots

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.slots + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.slots = 0
        self.cache._clear()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        # The whole store is reordered once by RotateKVCache.reorder_cache.
        pass


class RotateKVCache(Cache):
    """A transformers ``Cache`` backed by packed :class:`KVStore` s.

    Layers that share RoPE parameters share one store (Gemma 3's sliding and full layers use
    different RoPE bases, hence two stores). Stores are created at the first ``update``, when
    the batch size is known.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        plan: RotationPlan,
        config: QuantConfig,
        sink_thresholds: list[float] | None = None,
        key_layouts: list[str] | None = None,
        device: str | None = None,
        layer_bits: list[int] | None = None,
    ) -> None:
        # Where the stores live; None: where the model's keys are (a CUDA model gets CUDA
        # stores). "emu" runs the CUDA kernels' host build, for tests without a GPU.
        self.device = device
        self.spec = model_spec(model)
        _check_plan(plan, self.spec)
        self.plan = plan
        self.config = config
        if sink_thresholds is not None and len(sink_thresholds) != self.spec.num_layers:
            raise ArgumentError(
                f"sink_thresholds: expected {self.spec.num_layers} values (one per layer), "
                f"got {len(sink_thresholds)}"
            )
        self.sink_thresholds = sink_thresholds
        if key_layouts is not None and len(key_layouts) != self.spec.num_layers:
            raise ArgumentError(
                f"key_layouts: expected {self.spec.num_layers} values (one per layer), "
                f"got {len(key_layouts)}"
            )
        layouts = key_layouts or [config.key_layout] * self.spec.num_layers
        if layer_bits is not None and (
            len(layer_bits) != self.spec.num_layers or any(b not in CLASSES for b in layer_bits)
        ):
            raise ArgumentError(
                f"layer_bits: expected {self.spec.num_layers} widths in {CLASSES}, "
                f"got {layer_bits!r}"
            )
        # Layers stored at another width than the config's (calibration's wider layers).
        self.layer_bits = layer_bits
        # Largest |hidden state| per token at each layer's input, set by the layer pre-hooks
        # that enable() installs when a sink rule is given.
        self.maxabs: dict[int, torch.Tensor] = {}
        super().__init__(
            layers=[RotateKVLayer(self, i, s) for i, s in enumerate(self.spec.sliding)]
        )
        # One store per (RoPE, key layout): a store has one RoPE and one key layout, and
        # calibration may give layers different layouts.
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, r in enumerate(self.spec.ropes):
            key = (layouts[i], r.scaling, *r.inv_freq.tolist())
            groups.setdefault(key, []).append(i)
        self._groups = list(groups.values())
        self._layouts = [layouts[g[0]] for g in self._groups]
        self._where: dict[int, tuple[int, int]] = {}
        for g, layers in enumerate(self._groups):
            for j, i in enumerate(layers):
                self._where[i] = (g, j)
        self.stores: list[KVStore] = []
        self.batch = 0
        # The bit-width policy's ledgers (QuantConfig.policy), made with the stores.
        self.allocator: Allocator | None = None
        # Token types [B, T] of the chunk being run (rotatekv.policy.TEXT/IMAGE/OTHER), set
        # by the model's forward from `token_types=` or a VLM's image-token ids.
        self.token_types: torch.Tensor | None = None
        # Sink tokens (16-bit by the calibration's rule) stored per layer and sequence.
        self.sink_tokens: dict[int, torch.Tensor] = {}
        self._tables: list[tuple[torch.Tensor, LayerRope, tuple[torch.Tensor, torch.Tensor]]] = []

    def _ensure_stores(self, batch: int, where: torch.device) -> None:
        if self.stores:
            if batch != self.batch:
                raise ArgumentError(
                    f"key_states: expected batch {self.batch} (this cache's), got {batch}"
                )
            return
        spec, plan = self.spec, self.plan
        device = self.device
        if device is None:
            device = f"cuda:{where.index or 0}" if where.type == "cuda" else "cpu"
        for layers, layout in zip(self._groups, self._layouts, strict=True):
            sub = _sub_plan(plan, layers)
            cfg = self.config
            if layout != cfg.key_layout:
                cfg = cfg.replace(key_layout=layout)
            rope = spec.ropes[layers[0]]
            self.stores.append(
                KVStore(
                    len(layers),
                    spec.num_kv_heads,
                    spec.head_dim,
                    batch_size=batch,
                    config=cfg,
                    plan=sub,
                    rope_inv_freq=rope.inv_freq if plan.mode == "pre_rope" else None,
                    rope_scaling=rope.scaling,
                    device=device,
                )
            )
        self.batch = batch
        if self.config.policy != "fixed":
            assert self.config.budget is not None
            bits = self.layer_bits or [self.config.bits] * spec.num_layers
            self.allocator = Allocator(
                self.config.policy,
                self.config.budget,
                bits,
                lambda layer, c: self.store_of(layer)[0].class_bits(c),
                floor=self.config.bits,
            )

    def _cos_sin(self, pos: torch.Tensor, rope: LayerRope) -> tuple[torch.Tensor, torch.Tensor]:
        # Every layer of a step un-rotates at the same positions: compute the tables once per
        # (positions, RoPE) instead of once per layer.
        for p, r, cs in self._tables:
            if r is rope and p.shape == pos.shape and torch.equal(p, pos):
                return cs
        cs = _rope_tables(pos, rope.inv_freq)
        self._tables = [*self._tables[-1:], (pos.clone(), rope, cs)]
        return cs

    def store_of(self, layer: int) -> tuple[KVStore, int]:
        """The store holding model layer ``layer`` and its index there."""
        g, j = self._where[layer]
        return self.stores[g], j

    def _clear(self) -> None:
        for s in self.stores:
            s.clear()
        self.sink_tokens.clear()
        if self.allocator is not None:
            self.allocator.clear()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for s in self.stores:
            s.reorder(beam_idx.to("cpu"))
        if self.allocator is not None:
            self.allocator.reorder(beam_idx)
        idx = beam_idx.to("cpu")
        self.sink_tokens = {k: v[idx] for k, v in self.sink_tokens.items()}

    def recent(self, layer: int) -> int:
        """How many of a query's newest tokens layer ``layer`` reads in 16 bits (the
        config's ``residual``; 0 where every token is 16-bit anyway)."""
        bits = self.layer_bits[layer] if self.layer_bits is not None else self.config.bits
        return recent_tokens(bits, self.config.residual)

    @property
    def fp_dtype(self) -> torch.dtype:
        """The 16-bit format the stores keep their windows and sinks in."""
        return torch.bfloat16 if self.config.fp_format == "bfloat16" else torch.float16

    def crop(self, tokens_to_remove: int) -> None:
        raise RotateKVError(
            "crop: a RotateKVCache does not roll back by slot count; use KVStore.truncate"
        )

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed stores."""
        return sum(s.nbytes for s in self.stores)

    def bits_per_element(self, settled: bool = False, sinks: bool = True) -> float:
        """Average stored bits per K/V element: codes, scales, zeros, positions and 16-bit
        tokens counted, unused page slots not (``nbytes`` has those). ``settled``: tokens of
        the recent window counted at the width they are stored in once they leave it;
        ``sinks=False``: sink tokens left out (with both, what a policy's ``budget`` is
        stated in)."""
        bits = elems = 0.0
        per_token = 2 * self.spec.num_kv_heads * self.spec.head_dim
        for s in self.stores:
            n = sum(sum(s.seq_lens(layer)) for layer in range(s.num_layers)) * per_token
            bits += s.bits_per_element(settled) * n
            elems += n
        if not sinks:
            for layer, per_seq in self.sink_tokens.items():
                store, _ = self.store_of(layer)
                count = int(per_seq.sum())
                bits -= store.class_bits(16) * count * per_token
                elems -= count * per_token
        return bits / elems if elems else 0.0


def _check_plan(plan: RotationPlan, spec: ModelSpec) -> None:
    got = (plan.num_layers, plan.num_kv_heads, plan.head_dim)
    want = (spec.num_layers, spec.num_kv_heads, spec.head_dim)
    if got != want:
        raise ArgumentError(
            f"plan: expected a plan for (num_layers, num_kv_heads, head_dim) = {want} "
            f"(this model), got {got}"
        )


def _sub_plan(plan: RotationPlan, layers: list[int]) -> RotationPlan:
    if len(layers) == plan.num_layers:
        return plan
    return RotationPlan(
        len(layers),
        plan.num_kv_heads,
        plan.head_dim,
        mode=plan.mode,
        group_heads=plan.group_heads,
        rotate_values=plan.rotate_values,
        key_perm=plan.key_perm[layers],
        key_clip=[plan.key_clip[i] for i in layers],
        value_clip=[plan.value_clip[i] for i in layers],
    )
