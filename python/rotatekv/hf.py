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
   (:mod:`rotatekv._band`). A one-pass prefill and token-by-token decoding thus see the same
   precision (with per-channel keys, decode also keeps the tokens of an unfilled block in 16
   bits, up to ``page_tokens - 1`` more, which a prefill reads packed).

Tested against transformers 5.24.0 (see README).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from . import KVStore, QuantConfig, RotationPlan
from ._band import band_attention, merge
from ._rope import tables as _rope_tables
from ._rope import unrope as _unrope
from ._rotatekv import ArgumentError, DeviceError, RotateKVError
from .policy import CLASSES, Allocator, chunk_statistics

ATTN_NAME = "rotatekv"
_STATE_ATTR = "_rotatekv_state"


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


def _text_config(model: torch.nn.Module) -> Any:
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
    cfg = _text_config(model)
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


def _rope_types(model: torch.nn.Module) -> set[str]:
    rp = getattr(_text_config(model), "rope_parameters", None) or {}
    if "rope_type" in rp:
        return {str(rp["rope_type"])}
    return {str(v.get("rope_type")) for v in rp.values() if isinstance(v, dict)}


def unrope(k: torch.Tensor, positions: torch.Tensor, rope: LayerRope) -> torch.Tensor:
    """Keys before RoPE from keys after a layer's RoPE (see :func:`rotatekv._rope.unrope`)."""
    return _unrope(k, positions, rope.inv_freq, rope.scaling)


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
        return 0 if bits == 16 else int(self.config.residual)

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
    store, layer = h.cache.store_of(h.layer)
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
    th = h.cache.sink_thresholds
    ma = h.cache.maxabs.pop(h.layer, None)
    if th is not None and ma is not None and th[h.layer] != float("inf"):
        protect = (ma[:, -t:] > th[h.layer]).to("cpu")
    bits = None
    lb = h.cache.layer_bits
    if lb is not None and lb[h.layer] != h.cache.config.bits:
        bits = torch.full((b, t), lb[h.layer], dtype=torch.int64)
    tq = query.shape[2]
    qpos = h.positions if position_ids is None else position_ids.to(torch.int64).expand(b, tq)
    alloc = h.cache.allocator
    # The policy's ledgers are charged before the append: put back if anything fails.
    snap = None if alloc is None else alloc.snapshot()
    # A chunk's queries read their newest `r` tokens in 16 bits, as decode does (where the
    # store's recent window holds them): the ones before the chunk from that window, before
    # the chunk drains it, the chunk's own from the chunk; the older ones from the packed
    # store. Softmax parts merge by log-sum-exp (rotatekv._band), in float32, so the output
    # is rounded to the model's dtype once.
    r = h.cache.recent(h.layer) if tq > 1 else 0
    att = functools.partial(
        store.attend,
        layer,
        query.float() if r else query,
        positions=qpos,
        causal=True,
        scale=scaling,
        softcap=softcap,
    )
    before = None
    if r > 0 and h.cache.layers[h.layer].slots > 0:
        before = att(window=min(r, sliding_window or r), return_lse=True)
    try:
        if alloc is not None:
            bits = _policy_bits(
                h, store, layer, query, qpos, valid, protect, scaling, softcap, sliding_window
            )
        store.append(
            layer, h.k, h.v, positions=h.positions, protect=protect, valid=valid, bits=bits
        )
    except BaseException:
        if alloc is not None and snap is not None:
            alloc.restore(snap)
        raise
    # Counted only once stored, so a refused append leaves the cache as it was.
    h.cache.layers[h.layer].slots += t
    if protect is not None:
        kept = (protect if valid is None else protect & valid).sum(1)
        prev = h.cache.sink_tokens.get(h.layer)
        h.cache.sink_tokens[h.layer] = kept if prev is None else prev + kept
    if r == 0:
        return att(window=sliding_window).transpose(1, 2), None
    fmt = torch.bfloat16 if h.cache.config.fp_format == "bfloat16" else torch.float16
    kval = (torch.ones(b, t, dtype=torch.bool) if valid is None else valid).to(query.device)
    sc = scaling if scaling is not None else query.shape[-1] ** -0.5
    kb, vb = h.k_model.to(fmt), h.v.to(fmt)
    out, lse = band_attention(
        query, kb, vb, qpos, h.positions, kval, r, sc, sliding_window, softcap
    )
    if before is not None:
        out, lse = merge(*before, out, lse)
    if sliding_window is None or sliding_window > r:
        out, lse = merge(*att(window=sliding_window, lag=r, return_lse=True), out, lse)
    return out.to(query.dtype).transpose(1, 2), None


def _policy_bits(
    h: _Pending,
    store: KVStore,
    layer: int,
    query: torch.Tensor,
    qpos: torch.Tensor,
    valid: torch.Tensor | None,
    protect: torch.Tensor | None,
    scaling: float | None,
    softcap: float | None,
    sliding_window: int | None,
) -> torch.Tensor:
    """The policy's widths of a chunk. A prefill chunk (several queries, the chunk's own
    tokens) is scored by the attention its tokens receive from its queries, the softmax
    covering what the store already holds; decoded tokens have no statistics."""
    cache = h.cache
    assert cache.allocator is not None
    b, _, t, _ = h.k.shape
    mean = counted = None
    if query.shape[2] == t and t > 1:
        fmt = torch.bfloat16 if cache.config.fp_format == "bfloat16" else torch.float16
        mean, counted = chunk_statistics(
            store, layer, query, h.k_model.to(fmt), qpos, h.positions, valid=valid,
            scale=scaling, softcap=softcap, window=sliding_window, lag=cache.recent(h.layer),
        )  # fmt: skip
    return cache.allocator.widths(h.layer, (b, t), mean, counted, valid, protect, cache.token_types)


def _register() -> None:
    AttentionInterface.register(ATTN_NAME, _attention)
    AttentionMaskInterface.register(ATTN_NAME, _padding_mask)


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


def _text_module(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder that owns the rotary embedding (a VLM's language model; the model
    itself for a plain decoder): its layers are the ones with a KV cache."""
    for name, _ in model.named_modules():
        if name.endswith("rotary_emb"):
            parent = name.rpartition(".")[0]
            return model.get_submodule(parent) if parent else model
    return model


def _decoder_layers(model: torch.nn.Module, n: int) -> list[torch.nn.Module]:
    """The ``n`` decoder layers (modules with a ``self_attn`` child), in order; a VLM's
    vision tower is left out."""
    layers = [m for m in _text_module(model).modules() if hasattr(m, "self_attn")]
    if len(layers) != n:
        raise ArgumentError(
            f"model: expected {n} decoder layers with a self_attn module, found {len(layers)}"
        )
    return layers


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


def _image_token(model: torch.nn.Module) -> int | None:
    """A LLaVA-family model's image placeholder id (``None`` for text-only models)."""
    cfg = model.config
    for name in ("image_token_id", "image_token_index"):
        v = getattr(cfg, name, None)
        if isinstance(v, int):
            return v
    return None


def _token_types(
    model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> torch.Tensor | None:
    """Token types of a forward's tokens: ``token_types=`` if given, else image tokens of a
    VLM's ``input_ids`` (``IMAGE``, the rest ``TEXT``), else ``None``."""
    from .policy import IMAGE, TEXT

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
    tok = _image_token(model)
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
    rope_types = _rope_types(model)
    if plan.mode == "pre_rope" and rope_types & {"dynamic", "longrope"}:
        # These recompute inv_freq as the context grows; keys stored before RoPE would be
        # rotated with frequencies other than the model's at attention time.
        raise ArgumentError(
            f"plan: a pre_rope plan needs a fixed RoPE; this model uses {sorted(rope_types)} "
            "RoPE, whose frequencies change with the context: use mode='post_rope'"
        )
    if sinks is not None and len(sinks) != spec.num_layers:
        raise ArgumentError(f"plan: sink rule for {len(sinks)} layers, model has {spec.num_layers}")
    layers = _decoder_layers(model, spec.num_layers)
    _register()
    old = getattr(model, _STATE_ATTR, None)
    if old is not None:
        old.plan, old.config, old.sink_thresholds, old.key_layouts = plan, config, sinks, layouts
        old.layer_bits = layer_bits
        old.device = device
        return model
    text_cfg = _text_config(model)
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
    multimodal = _text_config(model) is not model.config
    model.set_attn_implementation(
        {"text_config": st.previous_attn} if multimodal else st.previous_attn
    )
    return model
