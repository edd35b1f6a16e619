"""Calibration: a RotationPlan and an attention-sink rule fitted to a model on sample text.

Per layer, from the model run over calibration windows:

* keys before RoPE (after per-head norms: they are recovered from the keys the cache
  receives, by undoing RoPE), values, the last ``n_queries`` queries of each window, and the
  largest |hidden state| of each token at the layer input;
* the key channel permutation inside each Hadamard group: RotateKV's signed-mean ordering
  (channels sorted by their signed sum over tokens), a magnitude ordering (mean |x|) or
  none, picked per layer by the key quantization error it gives;
* clip ratios: RotateKV's fixed 0.8 at 2 bits (1.0 above), or a per-layer search that
  minimizes the attention-output error of the real store and kernel on the calibration
  queries (keys first, then values);
* sinks: a token is protected at a layer when its largest |hidden state| at that layer's
  input exceeds the layer's threshold. The threshold is ``sink_factor`` times the median of
  that statistic over calibration tokens, kept only on layers where it separates a few
  massive-activation tokens (fewer than ``max_sink_frac`` of tokens); elsewhere it is
  infinite. Decided token by token, so inference never needs the whole sequence first.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import KVStore, QuantConfig, RotationPlan, hadamard
from ._rotatekv import _CLASS_BITS, ArgumentError, FormatError
from .hf.spec import LayerRope, ModelSpec, model_spec, unrope

META_KEY = "rotatekv.calibration"
CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4)
REORDERS = ("signed_mean", "abs_mean", "none")


@dataclass
class LayerData:
    """What calibration keeps of one layer, float32 on the CPU."""

    k_pre: torch.Tensor  # [W, Hkv, T, D] keys before RoPE
    k_post: torch.Tensor  # [W, Hkv, T, D] keys after RoPE
    v: torch.Tensor  # [W, Hkv, T, D]
    q: torch.Tensor  # [W, Hq, nq, D] last queries (after RoPE)
    positions: torch.Tensor  # [W, T]
    maxabs: torch.Tensor  # [W, T] largest |hidden state| at the layer input
    scale: float  # the layer's softmax scaling
    ref_out: torch.Tensor | None = None  # float attention output of ``q`` (computed once)


@dataclass
class Calibration:
    """A fitted plan plus the sink rule and the settings that produced them."""

    plan: RotationPlan
    sink_thresholds: list[float]
    settings: dict[str, Any] = field(default_factory=dict)
    report: list[dict[str, Any]] = field(default_factory=list)
    # Per layer "per_token" or "per_channel"; None: the QuantConfig's layout everywhere.
    key_layouts: list[str] | None = None
    # Per layer code width (2, 3, 4 or 8); None: the QuantConfig's bits everywhere.
    layer_bits: list[int] | None = None

    def protect(self, layer: int, maxabs: torch.Tensor) -> torch.Tensor | None:
        """Sink mask of tokens with per-token ``maxabs`` at ``layer``'s input."""
        t = self.sink_thresholds[layer]
        return None if math.isinf(t) else maxabs > t

    def save(self, path: str | os.PathLike[str]) -> None:
        """One safetensors file: the plan's tensors, the sink rule and settings as metadata."""
        meta = {
            "sink_thresholds": [None if math.isinf(t) else t for t in self.sink_thresholds],
            "settings": self.settings,
            "report": self.report,
            "key_layouts": self.key_layouts,
            "layer_bits": self.layer_bits,
        }
        self.plan.save(path, metadata={META_KEY: json.dumps(meta)})

    @staticmethod
    def load(
        path: str | os.PathLike[str], model: torch.nn.Module | ModelSpec | None = None
    ) -> Calibration:
        """Reads a file written by :meth:`save`; with ``model``, a file made for another
        model shape is refused (:class:`rotatekv.FormatError` naming both values)."""
        spec = model_spec(model) if isinstance(model, torch.nn.Module) else model
        dims: tuple[int | None, ...] = (None, None, None)
        if spec is not None:
            dims = (spec.num_layers, spec.num_kv_heads, spec.head_dim)
        plan, meta = RotationPlan.load_with_metadata(path, *dims)
        if META_KEY not in meta:
            raise FormatError(f"path: {os.fspath(path)!r} is a plan without calibration data")
        try:
            m = json.loads(meta[META_KEY])
            th = [math.inf if t is None else float(t) for t in m["sink_thresholds"]]
        except (ValueError, KeyError, TypeError) as e:
            raise FormatError(f"path: damaged calibration metadata in {os.fspath(path)!r}") from e
        if len(th) != plan.num_layers:
            raise FormatError(
                f"path: {len(th)} sink thresholds for a plan of {plan.num_layers} layers"
            )
        layouts = m.get("key_layouts")
        if layouts is not None and (
            len(layouts) != plan.num_layers
            or any(x not in ("per_token", "per_channel") for x in layouts)
        ):
            raise FormatError(f"path: damaged key layouts in {os.fspath(path)!r}")
        lbits = m.get("layer_bits")
        if lbits is not None and (
            not isinstance(lbits, list)
            or len(lbits) != plan.num_layers
            or any(x not in _CLASS_BITS or x == 16 for x in lbits)
        ):
            raise FormatError(f"path: damaged layer bits in {os.fspath(path)!r}")
        return Calibration(plan, th, m.get("settings", {}), m.get("report", []), layouts, lbits)


# --- collection --------------------------------------------------------------------------


class _Recorder:
    def __init__(self, n_layers: int, n_queries: int) -> None:
        self.n_queries = n_queries
        self.parts: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in range(n_layers)]
        self.scales: list[float] = [0.0] * n_layers


_ACTIVE: _Recorder | None = None
_RECORD_NAME = "rotatekv_record"


def _eager_of(module: torch.nn.Module) -> Callable[..., Any]:
    return sys.modules[type(module).__module__].eager_attention_forward  # type: ignore[no-any-return]


def _record_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> Any:
    rec = _ACTIVE
    if rec is not None:
        pos = kwargs.get("position_ids")
        t = key.shape[2]
        if pos is None:
            pos = torch.arange(t)[None]
        sc = kwargs.get("scaling")
        rec.scales[module.layer_idx] = float(sc if sc is not None else query.shape[-1] ** -0.5)
        rec.parts[module.layer_idx].append(
            (
                query[:, :, -rec.n_queries :].detach().float().cpu(),
                key.detach().float().cpu(),
                value.detach().float().cpu(),
                pos.expand(key.shape[0], t).detach().cpu(),
            )
        )
    return _eager_of(module)(module, query, key, value, attention_mask, **kwargs)


def collect(
    model: torch.nn.Module,
    windows: torch.Tensor,
    n_queries: int = 128,
    progress: bool = True,
) -> list[LayerData]:
    """Runs ``model`` over token ``windows`` ``[W, T]`` (one at a time) and keeps, per layer,
    what :func:`fit` needs."""
    from transformers.modeling_utils import AttentionInterface

    global _ACTIVE
    spec = model_spec(model)
    AttentionInterface.register(_RECORD_NAME, _record_attention)
    prev = model.config._attn_implementation
    rec = _Recorder(spec.num_layers, n_queries)
    maxabs: list[list[torch.Tensor]] = [[] for _ in range(spec.num_layers)]
    it: Any = range(windows.shape[0])
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="calibration windows", unit="window")
    model.set_attn_implementation(_RECORD_NAME)
    _ACTIVE = rec
    try:
        with torch.no_grad():
            for i in it:
                out = model(
                    input_ids=windows[i : i + 1],
                    output_hidden_states=True,
                    use_cache=False,
                )
                hs = out.hidden_states
                for layer in range(spec.num_layers):
                    maxabs[layer].append(hs[layer][0].abs().amax(-1).float().cpu())
    finally:
        _ACTIVE = None
        model.set_attn_implementation(prev)
    data = []
    for layer in range(spec.num_layers):
        qs, ks, vs, ps = zip(*rec.parts[layer], strict=True)
        k_post = torch.cat(ks)
        pos = torch.cat(ps)
        data.append(
            LayerData(
                k_pre=unrope(k_post, pos, spec.ropes[layer]),
                k_post=k_post,
                v=torch.cat(vs),
                q=torch.cat(qs),
                positions=pos,
                maxabs=torch.stack(maxabs[layer]),
                scale=rec.scales[layer],
            )
        )
    return data


# --- fitting -----------------------------------------------------------------------------


def fake_quant(x: torch.Tensor, bits: int, group: int, clip: float) -> torch.Tensor:
    """Per-token asymmetric group quantization of the last axis as the store does it (min and
    max scaled by ``clip``, fp16 scale and zero, round half to even)."""
    shp = x.shape
    g = x.reshape(*shp[:-1], shp[-1] // group, group)
    lo = g.amin(-1, keepdim=True) * clip
    hi = g.amax(-1, keepdim=True) * clip
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).half().float()
    zero = lo.half().float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((g - zero) / safe).clamp(0, levels)
    return (codes * scale + zero).reshape(shp)


def _rotated(k: torch.Tensor, gh: int) -> torch.Tensor:
    """Keys ``[W, Hkv, T, D]`` as Hadamard-rotated group vectors ``[N, G, gh * D]``."""
    w, hkv, t, d = k.shape
    x = k.permute(0, 2, 1, 3).reshape(w * t, hkv // gh, gh * d)
    return torch.from_numpy(hadamard(x.numpy()))


def _perm_candidates(r: torch.Tensor) -> dict[str, torch.Tensor]:
    """Permutations per Hadamard group ``[G, gl]``: ``stored[j] = rotated[perm[j]]``."""
    g, gl = r.shape[1], r.shape[2]
    return {
        "signed_mean": torch.argsort(r.sum(0), dim=-1),
        "abs_mean": torch.argsort(r.abs().mean(0), dim=-1),
        "none": torch.arange(gl).expand(g, gl).clone(),
    }


def _key_error(r: torch.Tensor, perm: torch.Tensor, bits: int, group: int, clip: float) -> float:
    stored = torch.gather(r, 2, perm[None].expand(r.shape[0], -1, -1))
    err = fake_quant(stored, bits, group, clip) - stored
    return float(err.pow(2).mean() / stored.pow(2).mean())


def _attention_error(
    ld: LayerData,
    spec: ModelSpec,
    rope: LayerRope,
    plan: RotationPlan,
    cfg: QuantConfig,
    protect: torch.Tensor | None,
    scale: float,
) -> float:
    """Relative error of the store's attention output against float attention, over the
    calibration queries of one layer."""
    w, hkv, t, d = ld.v.shape
    store = KVStore(
        1,
        hkv,
        d,
        batch_size=w,
        config=cfg,
        plan=plan,
        rope_inv_freq=rope.inv_freq if plan.mode == "pre_rope" else None,
        rope_scaling=rope.scaling,
    )
    keys = ld.k_pre if plan.mode == "pre_rope" else ld.k_post
    store.append(0, keys, ld.v, positions=ld.positions, protect=protect)
    nq = ld.q.shape[2]
    qpos = ld.positions[:, -nq:]
    out = store.attend(0, ld.q, positions=qpos, scale=scale)
    if ld.ref_out is None:
        ld.ref_out = _float_attention(ld, scale)
    ref = ld.ref_out
    return float((out - ref).pow(2).sum() / ref.pow(2).sum())


def _float_attention(ld: LayerData, scale: float) -> torch.Tensor:
    w, hkv, t, d = ld.v.shape
    hq, nq = ld.q.shape[1], ld.q.shape[2]
    k = ld.k_post.repeat_interleave(hq // hkv, dim=1)
    v = ld.v.repeat_interleave(hq // hkv, dim=1)
    s = ld.q @ k.transpose(-1, -2) * scale
    qi = torch.arange(t - nq, t)[:, None]
    s = s.masked_fill(torch.arange(t)[None] > qi, float("-inf"))
    return torch.softmax(s, -1) @ v


def _clip_error(ctx: tuple[Any, ...], cfg: QuantConfig, kc: float, vc: float) -> float:
    ld, spec, rope, plan, protect, scale = ctx
    return _attention_error(
        ld, spec, rope, plan, cfg.replace(key_clip=kc, value_clip=vc), protect, scale
    )


def sink_threshold(maxabs: torch.Tensor, factor: float, max_frac: float) -> float:
    """``factor`` x median of the per-token statistic, or inf when that would protect more
    than ``max_frac`` of tokens or none at all."""
    th = factor * float(maxabs.median())
    frac = float((maxabs > th).float().mean())
    return th if 0.0 < frac <= max_frac else math.inf


def fit(
    data: Sequence[LayerData],
    spec: ModelSpec,
    *,
    bits: int = 2,
    group_size: int | None = None,
    mode: str = "pre_rope",
    group_heads: int | None = None,
    reorder: str = "auto",
    clip: str | float = "search",
    sinks: bool = True,
    key_layout: str = "per_token",
    layout_margin: float = 0.5,
    sink_factor: float = 20.0,
    max_sink_frac: float = 0.02,
    progress: bool = True,
) -> Calibration:
    """Fits a plan to collected data (see the module docstring)."""
    if reorder not in ("auto", *REORDERS):
        raise ArgumentError(f"reorder: expected 'auto' or one of {REORDERS}, got {reorder!r}")
    if key_layout not in ("per_token", "per_channel", "auto"):
        raise ArgumentError(
            f"key_layout: expected 'per_token', 'per_channel' or 'auto', got {key_layout!r}"
        )
    if mode not in ("pre_rope", "post_rope"):
        raise ArgumentError(f"mode: expected 'pre_rope' or 'post_rope', got {mode!r}")
    n, hkv, d = spec.num_layers, spec.num_kv_heads, spec.head_dim
    base = RotationPlan.hadamard(n, hkv, d, mode=mode, group_heads=group_heads)
    gh = base.group_heads
    group = group_size or d
    fixed_clip = 0.8 if bits == 2 else 1.0
    perms = []
    kclips: list[float] = []
    vclips: list[float] = []
    layouts: list[str] = []
    thresholds: list[float] = []
    report: list[dict[str, Any]] = []
    it: Any = range(n)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="fitting layers", unit="layer")
    for layer in it:
        ld = data[layer]
        th = sink_threshold(ld.maxabs, sink_factor, max_sink_frac) if sinks else math.inf
        thresholds.append(th)
        protect = None if math.isinf(th) else ld.maxabs > th
        keys = ld.k_pre if mode == "pre_rope" else ld.k_post
        r = _rotated(keys, gh)
        cands = _perm_candidates(r)
        errs = {name: _key_error(r, p, bits, group, fixed_clip) for name, p in cands.items()}
        pick = min(errs, key=errs.__getitem__) if reorder == "auto" else reorder
        perm = cands[pick]
        perms.append(perm.reshape(-1))
        one = RotationPlan(
            1,
            hkv,
            d,
            mode=mode,
            group_heads=gh,
            key_perm=perm.reshape(1, -1).numpy().astype(np.int64),
        )
        entry: dict[str, Any] = {
            "layer": layer,
            "reorder": pick,
            "key_error": {k: round(v, 6) for k, v in errs.items()},
            "sink_threshold": None if math.isinf(th) else th,
            "sink_fraction": 0.0 if protect is None else float(protect.float().mean()),
        }
        layout = "per_channel" if key_layout == "per_channel" else "per_token"
        if clip == "search":
            cfg0 = QuantConfig(bits=bits, group_size=group_size, key_layout=layout)

            ctx = (ld, spec, spec.ropes[layer], one, protect, ld.scale)
            kerr = {c: _clip_error(ctx, cfg0, c, 1.0) for c in CLIPS}
            kc = min(kerr, key=kerr.__getitem__)
            verr = {c: _clip_error(ctx, cfg0, kc, c) for c in CLIPS}
            vc = min(verr, key=verr.__getitem__)
            entry["attn_error"] = round(verr[vc], 6)
        else:
            kc = vc = fixed_clip if clip == "fixed" else float(clip)
        if key_layout == "auto":
            # Per-channel key scales (KIVI's layout) cost more bits (16-bit tokens until a
            # block fills); take them only where they at least halve the error of per-token
            # groups (keys with big per-channel offsets, per-head norms). On SmolLM2 the best
            # ratio is 0.62, and the bits are better spent on wider layers (docs/benchmarks.md).
            ctx = (ld, spec, spec.ropes[layer], one, protect, ld.scale)
            base_cfg = QuantConfig(bits=bits, group_size=group_size)
            e_tok = _clip_error(ctx, base_cfg, kc, vc)
            e_ch = _clip_error(ctx, base_cfg.replace(key_layout="per_channel"), kc, vc)
            layout = "per_channel" if e_ch < layout_margin * e_tok else "per_token"
            entry["layout_error"] = {"per_token": round(e_tok, 6), "per_channel": round(e_ch, 6)}
        layouts.append(layout)
        entry["key_layout"] = layout
        kclips.append(kc)
        vclips.append(vc)
        entry["key_clip"], entry["value_clip"] = kc, vc
        report.append(entry)
    plan = RotationPlan(
        n,
        hkv,
        d,
        mode=mode,
        group_heads=gh,
        key_perm=torch.stack(perms).numpy().astype(np.int64),
        key_clip=kclips,
        value_clip=vclips,
    )
    settings = {
        "bits": bits,
        "group_size": group,
        "mode": mode,
        "group_heads": gh,
        "reorder": reorder,
        "clip": clip,
        "sinks": sinks,
        "key_layout": key_layout,
        "sink_factor": sink_factor,
        "max_sink_frac": max_sink_frac,
        "windows": int(data[0].v.shape[0]),
        "window_len": int(data[0].v.shape[2]),
        "model_shape": [n, hkv, d],
    }
    return Calibration(plan, thresholds, settings, report, layouts)


def calibrate(
    model: torch.nn.Module,
    windows: torch.Tensor,
    n_queries: int = 128,
    progress: bool = True,
    wider_fraction: float = 0.0,
    config: QuantConfig | None = None,
    rank_windows: int = 4,
    **fit_args: Any,
) -> Calibration:
    """:func:`collect` then :func:`fit`; with ``wider_fraction`` > 0 also a fit at one more
    bit and :func:`promote` of that share of layers, ranked on the first ``rank_windows``
    windows with ``config`` (default: the fit's bits, 32 recent tokens, as ``rotatekv2``)."""
    if windows.ndim != 2 or windows.dtype != torch.int64:
        raise ArgumentError(
            f"windows: expected int64 token ids [W, T], got {windows.dtype} {tuple(windows.shape)}"
        )
    bits = int(fit_args.get("bits", 2))
    if not 0.0 <= wider_fraction <= 1.0:
        raise ArgumentError(f"wider_fraction: expected a value in [0, 1], got {wider_fraction}")
    if wider_fraction > 0 and bits not in (2, 3):
        raise ArgumentError(f"wider_fraction: needs bits 2 or 3 (one more bit), got bits={bits}")
    data = collect(model, windows, n_queries=n_queries, progress=progress)
    spec = model_spec(model)
    cal = fit(data, spec, progress=progress, **fit_args)
    cfg = config or QuantConfig(bits=bits, residual=32)
    if wider_fraction <= 0:
        if fit_args.get("key_layout") == "auto":
            cal = choose_layouts(model, cal, data, windows[:rank_windows], cfg, **fit_args)
        return cal
    return fit_wider(
        model, cal, data, windows[:rank_windows], cfg, wider_fraction, progress, **fit_args
    )


def fit_wider(
    model: torch.nn.Module,
    cal: Calibration,
    data: Sequence[LayerData],
    windows: torch.Tensor,
    config: QuantConfig,
    fraction: float,
    progress: bool = True,
    **fit_args: Any,
) -> Calibration:
    """``cal`` (a :func:`fit` with ``fit_args``) with a ``fraction`` of its layers at one
    more bit: a second fit at that width, then :func:`promote` ranked on ``windows``."""
    if fit_args.get("key_layout") == "auto":
        cal = choose_layouts(model, cal, data, windows, config, progress, **fit_args)
        if cal.settings["layout_nll"]["chosen"] == "per_channel":
            # The wider layers' clips are searched for the layout they will be stored in.
            fit_args = {**fit_args, "key_layout": "per_channel"}
    bits = int(cal.settings["bits"]) + 1
    wider = fit(data, model_spec(model), progress=progress, **{**fit_args, "bits": bits})
    return promote(model, cal, wider, windows, config, fraction, progress)


# Nats per token per-channel keys must gain over the fitted layouts to be taken everywhere
# (about 5% perplexity): they cost about half a bit per element more (a block's tokens stay
# 16-bit until it fills). Measured on rotatekv2's ranking windows: Gemma 3 270M gains 0.117
# (taken: +4.6% instead of +241% perplexity), SmolLM2 0.032 (not worth the bits).
LAYOUT_NLL_MARGIN = 0.05


def choose_layouts(
    model: torch.nn.Module,
    cal: Calibration,
    data: Sequence[LayerData],
    windows: torch.Tensor,
    config: QuantConfig,
    progress: bool = False,
    **fit_args: Any,
) -> Calibration:
    """``cal`` (a :func:`fit` with ``key_layout="auto"`` and ``fit_args``) or a fit with
    every layer's keys per-channel (clips searched for that layout), whichever gives
    ``windows`` the lower negative log-likelihood (two forwards); per-channel only by at
    least :data:`LAYOUT_NLL_MARGIN`. ``settings["layout_nll"]`` records both and the choice.

    The per-layer choice of :func:`fit` compares attention errors on the calibration
    queries, which misjudges keys dominated by a constant offset (Gemma 3's QK-normed keys:
    55-88% of their energy in the mean). Per-token groups spend their range on the offset
    there, and a few per-token layers among per-channel ones are enough to lose (Gemma 3
    270M: +222% perplexity with the per-layer choice, +17% with every layer per-channel);
    the model's own loss tells the two apart."""
    layers = cal.plan.num_layers
    if cal.key_layouts == ["per_channel"] * layers:
        return cal
    args = {**fit_args, "key_layout": "per_channel"}
    every = fit(data, model_spec(model), progress=progress, **args)
    fitted, channel = _nll(model, cal, windows, config), _nll(model, every, windows, config)
    pick = every if channel < fitted - LAYOUT_NLL_MARGIN else cal
    chosen = "per_channel" if pick is every else "fitted"
    out = Calibration(
        pick.plan,
        pick.sink_thresholds,
        {
            **pick.settings,
            "key_layout": "auto",
            "layout_nll": {
                "fitted": round(fitted, 6),
                "per_channel": round(channel, 6),
                "chosen": chosen,
            },
        },
        pick.report,
        pick.key_layouts,
        pick.layer_bits,
    )
    return out


def _nll(
    model: torch.nn.Module, cal: Calibration, windows: torch.Tensor, config: QuantConfig
) -> float:
    """Negative log-likelihood per token of ``windows`` with ``model``'s cache stored as
    ``cal`` and ``config`` say (one forward, every token attending to the quantized cache)."""
    from . import hf as rh

    rh.enable(model, cal, config)
    try:
        with torch.no_grad():
            logits = model(input_ids=windows, cache=rh.new_cache(model)).logits
    finally:
        rh.disable(model)
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    return -float(lp.gather(-1, windows[:, 1:, None]).mean())


def with_layer_bits(cal: Calibration, wider: Calibration, layers: Sequence[int]) -> Calibration:
    """``cal`` with ``layers`` stored at ``wider``'s width, using ``wider``'s permutations and
    clips there (fitted for that width); the sink rule and key layouts stay ``cal``'s."""
    lo, hi = int(cal.settings["bits"]), int(wider.settings["bits"])
    p, w = cal.plan, wider.plan
    if (p.num_layers, p.num_kv_heads, p.head_dim, p.mode, p.group_heads) != (
        w.num_layers,
        w.num_kv_heads,
        w.head_dim,
        w.mode,
        w.group_heads,
    ):
        raise ArgumentError("wider: expected a calibration of the same model, mode and grouping")
    chosen = set(layers)
    if any(not 0 <= i < p.num_layers for i in chosen):
        raise ArgumentError(f"layers: expected indices below {p.num_layers}, got {sorted(chosen)}")
    perm = np.array(p.key_perm).copy()
    kc, vc = list(p.key_clip), list(p.value_clip)
    wp = np.array(w.key_perm)
    for i in chosen:
        perm[i] = wp[i]
        kc[i], vc[i] = w.key_clip[i], w.value_clip[i]
    plan = RotationPlan(
        p.num_layers,
        p.num_kv_heads,
        p.head_dim,
        mode=p.mode,
        group_heads=p.group_heads,
        rotate_values=p.rotate_values,
        key_perm=perm.astype(np.int64),
        key_clip=kc,
        value_clip=vc,
    )
    bits = [hi if i in chosen else lo for i in range(p.num_layers)]
    settings = {**cal.settings, "wider_layers": sorted(chosen), "wider_bits": hi}
    return Calibration(plan, cal.sink_thresholds, settings, cal.report, cal.key_layouts, bits)


def rank_layers(
    model: torch.nn.Module,
    cal: Calibration,
    wider: Calibration,
    windows: torch.Tensor,
    config: QuantConfig,
    progress: bool = True,
) -> list[tuple[int, float]]:
    """Layers ranked by how much storing that layer alone at ``wider``'s width lowers the
    negative log-likelihood of ``windows`` (one forward each, all tokens attending to the
    quantized cache): ``[(layer, gain in nats per token)]``, largest gain first."""

    def nll(c: Calibration) -> float:
        return _nll(model, c, windows, config)

    # -1 is the baseline (no layer wider), in the same progress bar as the layers.
    it: Any = range(-1, cal.plan.num_layers)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="ranking layers", unit="forward")
    scores = {i: nll(with_layer_bits(cal, wider, [] if i < 0 else [i])) for i in it}
    base = scores.pop(-1)
    gains = [(i, base - v) for i, v in scores.items()]
    return sorted(gains, key=lambda g: -g[1])


def promote(
    model: torch.nn.Module,
    cal: Calibration,
    wider: Calibration,
    windows: torch.Tensor,
    config: QuantConfig,
    fraction: float,
    progress: bool = True,
) -> Calibration:
    """``cal`` with the ``floor(fraction * layers)`` layers that gain most from ``wider``'s
    width (:func:`rank_layers` on ``windows``, stored with ``config``) at that width."""
    if not 0.0 <= fraction <= 1.0:
        raise ArgumentError(f"fraction: expected a value in [0, 1], got {fraction}")
    k = int(fraction * cal.plan.num_layers)
    ranked = rank_layers(model, cal, wider, windows, config, progress=progress) if k else []
    out = with_layer_bits(cal, wider, [i for i, _ in ranked[:k]])
    out.settings["wider_fraction"] = fraction
    out.report = [dict(e) for e in out.report]
    for i, gain in ranked:
        if i < len(out.report):
            out.report[i]["wider_gain"] = round(gain, 6)
    return out


def describe(cal: Calibration) -> str:
    """A short per-layer summary of a calibration."""
    lines = [json.dumps(cal.settings)]
    for e in cal.report:
        e2 = {k: v for k, v in e.items() if k != "key_error"}
        lines.append(json.dumps(e2))
    return "\n".join(lines)


__all__ = [
    "Calibration",
    "LayerData",
    "calibrate",
    "choose_layouts",
    "collect",
    "fake_quant",
    "fit",
    "fit_wider",
    "promote",
    "rank_layers",
    "with_layer_bits",
]
