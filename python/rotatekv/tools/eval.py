"""Perplexity evaluation of KV-cache methods, all run on the same store and kernels.

Protocols:

* ``fake`` (the papers'): each window is one forward pass; attention inside it already reads
  the quantized store (every token but protected and recent full-precision ones);
* ``decode``: the window is fed token by token through the packed store, as generation does.

Every method's next-token distributions are compared with ``fp16`` (a 16-bit store) on the
same windows: ``delta_ppl`` and mean ``kl`` (nats per token).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import QuantConfig, RotationPlan
from .. import hf as rh
from .._rotatekv import ArgumentError
from ..calibrate import Calibration, LayerData, choose_layouts, collect, fit, fit_wider
from ..hf.spec import ModelSpec
from .methods import _REUSE, METHODS, RANK_WINDOWS, Method

# Method names and settings live in rotatekv.tools.methods (no torch); re-exported for callers.
from .methods import DEFAULT_RESIDUAL as DEFAULT_RESIDUAL
from .methods import WIDER_FRACTION as WIDER_FRACTION
from .methods import parse_methods as parse_methods


def fit_args(method: Method) -> dict[str, Any]:
    """The :func:`rotatekv.calibrate.fit` arguments of a calibrated method."""
    assert isinstance(method.plan, dict)
    return {k: v for k, v in method.plan.items() if k != "wider"}


def build(
    method: Method,
    spec: ModelSpec,
    data: list[LayerData] | None,
    progress: bool = False,
    model: torch.nn.Module | None = None,
    calib: torch.Tensor | None = None,
) -> tuple[RotationPlan | Calibration, QuantConfig]:
    """The plan (or calibration) and config of a method for a model. Methods with wider
    layers also need the model and the calibration windows (to rank the layers)."""
    n, hkv, d = spec.num_layers, spec.num_kv_heads, spec.head_dim
    cfg = method.config
    if cfg.group_size is not None and d % cfg.group_size:
        cfg = cfg.replace(group_size=None)  # heads smaller than the group: one group per head
    if method.plan == "identity":
        return RotationPlan.identity(n, hkv, d), cfg
    if method.plan == "quarot":
        return RotationPlan.hadamard(n, hkv, d, mode="post_rope", group_heads=1), cfg
    if method.plan in _REUSE:
        raise ArgumentError(f"methods: {method.name} is built from rotatekv2's calibration")
    if data is None:
        raise ArgumentError(f"methods: {method.name} needs calibration windows (--calib-windows)")
    assert isinstance(method.plan, dict)
    cal = fit(data, spec, progress=progress, **fit_args(method))
    wide = method.plan.get("wider")
    if wide is None:
        if method.plan.get("key_layout") == "auto" and model is not None and calib is not None:
            args = fit_args(method)
            cal = choose_layouts(model, cal, data, calib[:RANK_WINDOWS], cfg, progress, **args)
        return cal, cfg
    if model is None or calib is None:
        raise ArgumentError(f"methods: {method.name} needs the model and calibration windows")
    assert wide["bits"] == method.bits + 1
    args = fit_args(method)
    ranked = calib[:RANK_WINDOWS]
    return fit_wider(model, cal, data, ranked, cfg, wide["fraction"], progress, **args), cfg


def _logits(
    model: torch.nn.Module, ids: torch.Tensor, protocol: str, desc: str | None = None
) -> tuple[torch.Tensor, Any]:
    """Next-token logits ``[W, T, V]`` of a batch of windows under one protocol, and the cache.

    Windows run as one batch: a decode step costs about the same for 1 or 8 sequences on a
    CPU (the weights are read once per step). ``desc``: show the decode steps' progress
    under that name (a method takes minutes token by token)."""
    cache = rh.new_cache(model)
    with torch.no_grad():
        if protocol == "fake":
            out = model(input_ids=ids, cache=cache).logits
        else:
            steps = []
            ts: Any = range(ids.shape[1])
            if desc is not None:
                from tqdm import tqdm

                ts = tqdm(ts, desc=desc, unit="token", leave=False, mininterval=2.0)
            for t in ts:
                steps.append(model(input_ids=ids[:, t : t + 1], cache=cache).logits)
            out = torch.cat(steps, 1)
    return out, cache


@dataclass
class _Acc:
    nll: float = 0.0
    kl: float = 0.0
    tokens: int = 0
    kv_bytes: int = 0
    bits: float = 0.0
    settled: float = 0.0
    windows: int = 0
    seconds: float = 0.0


def evaluate(
    model: torch.nn.Module,
    windows: torch.Tensor,
    methods: list[str],
    protocols: list[str],
    calib: torch.Tensor | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    batch: int = 8,
    prebuilt: dict[str, tuple[Any, QuantConfig]] | None = None,
    budget: float | None = None,
) -> list[dict[str, Any]]:
    """One result row per (method, protocol) (see the module docstring). Windows run
    ``batch`` at a time; every method sees the same batches, ``fp16`` first, so only one
    batch of reference distributions is held at a time. ``prebuilt`` maps method names to
    ``(plan or calibration, config)`` already fitted. Methods with a policy get ``budget``
    or, by default, rotatekv2's settled effective bits on the same batch of windows."""
    spec = rh.model_spec(model)
    prebuilt = prebuilt or {}
    # Methods that reuse rotatekv2's calibration need it in `methods` (parse_methods adds it).
    needs_cal = any(isinstance(METHODS[m].plan, dict) and m not in prebuilt for m in methods)
    data = None
    if needs_cal:
        if calib is None or calib.shape[0] == 0:
            raise ArgumentError("calib_windows: the methods given need calibration windows")
        t0 = time.perf_counter()
        data = collect(model, calib, progress=progress)
        log(f"collected calibration data in {time.perf_counter() - t0:.1f} s")
    built: dict[str, tuple[Any, QuantConfig, float]] = {}
    for name in methods:
        t0 = time.perf_counter()
        meth = METHODS[name]
        if name in prebuilt:
            plan, cfg = prebuilt[name]
        elif meth.plan in _REUSE:
            plan, cfg = built["rotatekv2"][0], meth.config
            if meth.plan == "rotatekv2-flat":
                plan = dataclasses.replace(plan, layer_bits=None)
        else:
            plan, cfg = build(meth, spec, data, progress=progress, model=model, calib=calib)
            if progress and data is not None and isinstance(meth.plan, dict):
                how = ""
                if isinstance(plan, Calibration) and "layout_nll" in plan.settings:
                    nll = plan.settings["layout_nll"]
                    how = (f" (keys: {nll['chosen']}; loss {nll['fitted']:.3f} fitted, "
                           f"{nll['per_channel']:.3f} per-channel)")  # fmt: skip
                log(f"fitted {name} in {time.perf_counter() - t0:.1f} s{how}")
        built[name] = (plan, cfg, time.perf_counter() - t0)
    order = ["fp16"] + [m for m in methods if m != "fp16"]
    rows = []
    for proto in protocols:
        acc = {m: _Acc() for m in order}
        for b0 in range(0, windows.shape[0], batch):
            ids = windows[b0 : b0 + batch]
            ref: torch.Tensor | None = None
            settled = None  # rotatekv2's on this batch: the policies' default budget
            for name in order:
                plan, cfg, _ = built[name]
                if METHODS[name].policy != "fixed":
                    b = budget if budget is not None else settled
                    assert b is not None, "rotatekv2 runs before the policies (parse_methods)"
                    cfg = cfg.replace(policy=METHODS[name].policy, budget=b)
                rh.enable(model, plan, cfg)
                t0 = time.perf_counter()
                where = f"{proto} {name}, windows {b0 + 1}-{b0 + ids.shape[0]}"
                logits, cache = _logits(model, ids, proto, where if progress else None)
                a = acc[name]
                a.seconds += time.perf_counter() - t0
                if progress:
                    log(f"  {where}: {time.perf_counter() - t0:.1f} s")
                logp = torch.log_softmax(logits[:, :-1].float(), -1)
                del logits
                a.nll -= float(logp.gather(-1, ids[:, 1:, None]).sum())
                if ref is None:
                    ref = logp
                else:
                    a.kl += float((ref.exp() * (ref - logp)).sum())
                a.tokens += ids[:, 1:].numel()
                a.kv_bytes += cache.nbytes
                a.bits += cache.bits_per_element() * ids.shape[0]
                a.settled += cache.bits_per_element(settled=True) * ids.shape[0]
                a.windows += ids.shape[0]
                if name == "rotatekv2":
                    settled = cache.bits_per_element(settled=True, sinks=False)
                del logp, cache
            rh.disable(model)
            if progress:
                log(f"  {proto}: {min(b0 + batch, windows.shape[0])}/{windows.shape[0]} windows")
        base = math.exp(acc["fp16"].nll / acc["fp16"].tokens)
        for name in methods:
            a = acc[name]
            ppl = math.exp(a.nll / a.tokens)
            rows.append(
                {
                    "method": name,
                    "protocol": proto,
                    "bits": float(METHODS[name].bits),
                    "effective_bits": a.bits / a.windows,
                    # Recent-window tokens at the width they are stored in once they leave.
                    "settled_bits": a.settled / a.windows,
                    # Allocated bytes of one window's cache (pages included).
                    "kv_bytes": a.kv_bytes // a.windows,
                    "ppl": ppl,
                    "delta_ppl": ppl - base,
                    "kl": a.kl / a.tokens,
                    "seconds": a.seconds + built[name][2],
                }
            )
            r = rows[-1]
            log(
                f"  {proto:6s} {name:20s} ppl {ppl:8.3f} ({100 * (ppl / base - 1):+6.1f}%)  "
                f"eff bits {r['effective_bits']:.2f}  kl {r['kl']:.4f}  ({r['seconds']:.1f} s)"
            )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of result rows."""
    out = [
        "| method | protocol | bits | effective bits | KV bytes / window | PPL | dPPL | KL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = r["ppl"] - r["delta_ppl"]
        out.append(
            f"| {r['method']} | {r['protocol']} | {r['bits']:.0f} | {r['effective_bits']:.2f} | "
            f"{r['kv_bytes']} | {r['ppl']:.3f} | {r['delta_ppl']:+.3f} "
            f"({100 * r['delta_ppl'] / base:+.1f}%) | {r['kl']:.4f} |"
        )
    return "\n".join(out)


def plot_channels(
    data: list[LayerData], spec: ModelSpec, cal: Calibration, layers: list[int], out: Path
) -> list[Path]:
    """Key channel magnitudes (max |k| over tokens, per channel of the layer's KV heads)
    before and after the calibrated rotation, one PNG per layer, like the papers' figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..calibrate import _rotated

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    gh = cal.plan.group_heads
    for layer in layers:
        k = data[layer].k_pre if cal.plan.mode == "pre_rope" else data[layer].k_post
        before = k.abs().amax(dim=(0, 2)).reshape(-1)
        r = _rotated(k, gh)
        perm = torch.from_numpy(cal.plan.key_perm[layer]).long().reshape(r.shape[1], -1)
        stored = torch.gather(r, 2, perm[None].expand(r.shape[0], -1, -1))
        after = stored.abs().amax(0).reshape(-1)
        fig, ax = plt.subplots(1, 2, figsize=(10, 3), sharey=True)
        ax[0].bar(range(before.numel()), before.numpy(), width=1.0)
        ax[0].set_title(f"layer {layer}: keys before rotation")
        ax[1].bar(range(after.numel()), after.numpy(), width=1.0, color="tab:orange")
        ax[1].set_title("after grouped Hadamard + reordering")
        for a in ax:
            a.set_xlabel("channel (all KV heads)")
        ax[0].set_ylabel("max |k| over tokens")
        fig.tight_layout()
        p = out / f"key_channels_layer{layer}.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


def write_json(
    path: str | Path, model: str, text: str, windows: torch.Tensor, rows: list[dict[str, Any]]
) -> None:
    doc = {
        "model": model,
        "text": text,
        "windows": int(windows.shape[0]),
        "window_len": int(windows.shape[1]),
        "results": rows,
    }
    Path(path).write_text(json.dumps(doc, indent=1))
