"""Token saliency: how much attention each token of a prefill chunk receives.

:func:`attention_mass` sums, for every key of a chunk, the softmax probability each query
(every head) gives it, without building attention maps: on CPU tensors a Rust kernel builds
one query's score row at a time and adds its probabilities into per-key sums; on CUDA
tensors two kernels (``cuda/saliency.cu``) take each query row's log-sum-exp, then give each
key a thread that sums its probabilities over the query rows, staged through shared memory.
The softmax of a query may cover keys outside the chunk (the packed store): pass their
log-sum-exp as ``prior_lse`` (``KVStore.attend(..., return_lse=True)`` gives it).

Bit-allocation policies (:mod:`rotatekv.policy`) read the mean attention a token receives
from the queries that read it quantized (``lag`` = the recent window's length).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._rotatekv import ArgumentError, ShapeError
from ._rotatekv import _attention_mass as _kernel


@dataclass(frozen=True)
class Mass:
    """What :func:`attention_mass` returns."""

    mass: torch.Tensor  # float32 [B, Tk]: probability received, summed over heads and queries
    count: torch.Tensor  # int64 [B, Tk]: queries (not heads) that added to it
    lse: torch.Tensor  # float32 [B, Hq, Tq]: each query's log-sum-exp, prior included

    def mean(self, heads: int) -> torch.Tensor:
        """Mean attention a key gets from one (query, head) pair; 0 where none counted."""
        return self.mass / (heads * self.count.clamp(min=1))


def _positions(p: torch.Tensor | None, b: int, t: int, name: str) -> torch.Tensor:
    if p is None:
        return torch.arange(t, dtype=torch.int64).expand(b, t)
    p = torch.as_tensor(p)
    if p.dtype.is_floating_point or p.dtype == torch.bool:
        raise ArgumentError(f"{name}: expected integer positions, got {p.dtype}")
    if p.ndim == 1:
        p = p[None].expand(b, -1)
    if tuple(p.shape) != (b, t):
        raise ShapeError(f"{name}: expected shape [{b}, {t}] or [{t}], got {tuple(p.shape)}")
    return p.to(torch.int64)


def attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    *,
    k_valid: torch.Tensor | None = None,
    prior_lse: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
    lag: int = 0,
) -> Mass:
    """Attention each key receives from the queries, causal by position.

    Args:
        q: queries ``[B, Hq, Tq, D]`` (after RoPE).
        k: keys ``[B, Hkv, Tk, D]`` in the same basis; ``Hq`` a multiple of ``Hkv``.
        q_pos, k_pos: positions ``[B, T]`` or ``[T]``; default ``0..T-1``.
        k_valid: ``[B, Tk]`` bools, ``False`` for padding.
        prior_lse: ``[B, Hq, Tq]`` log-sum-exp of each query over keys not in ``k``.
        scale: score scale (default ``D ** -0.5``); ``softcap``: Gemma 2's logit cap.
        window: a key is visible when ``q_pos - k_pos < window``.
        lag: queries closer than ``lag`` positions to a key are not added to its mass.
    """
    if not isinstance(q, torch.Tensor) or q.ndim != 4:
        raise ShapeError(f"q: expected a tensor [B, Hq, Tq, D], got {getattr(q, 'shape', q)!r}")
    if not isinstance(k, torch.Tensor) or k.ndim != 4:
        raise ShapeError(f"k: expected a tensor [B, Hkv, Tk, D], got {getattr(k, 'shape', k)!r}")
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != d or hkv == 0 or hq % hkv:
        raise ShapeError(
            f"k: expected [{b}, Hkv, Tk, {d}] with {hq} a multiple of Hkv, got {tuple(k.shape)}"
        )
    if k.device != q.device:
        raise ArgumentError(f"k: expected a tensor on {q.device} (q's device), got {k.device}")
    for name, x in (("q", q), ("k", k)):
        if not x.dtype.is_floating_point:
            raise ArgumentError(f"{name}: expected a floating tensor, got {x.dtype}")
    if isinstance(lag, bool) or not isinstance(lag, int) or lag < 0:
        raise ArgumentError(f"lag: expected an int >= 0, got {lag!r}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)):
        raise ArgumentError(f"window: expected an int >= 1 or None, got {window!r}")
    if window is not None and window < 1:
        raise ArgumentError(f"window: expected an int >= 1 or None, got {window!r}")
    qp = _positions(q_pos, b, tq, "q_pos")
    kp = _positions(k_pos, b, tk, "k_pos")
    kv = None
    if k_valid is not None:
        kv = torch.as_tensor(k_valid)
        if kv.dtype != torch.bool or tuple(kv.shape) != (b, tk):
            raise ShapeError(
                f"k_valid: expected bools [{b}, {tk}], got {kv.dtype} {tuple(kv.shape)}"
            )
    pl = None
    if prior_lse is not None:
        pl = torch.as_tensor(prior_lse)
        if tuple(pl.shape) != (b, hq, tq):
            raise ShapeError(f"prior_lse: expected [{b}, {hq}, {tq}], got {tuple(pl.shape)}")
    sc = float(d**-0.5 if scale is None else scale)
    if not sc > 0.0 or sc == float("inf"):
        raise ArgumentError(f"scale: expected a finite value > 0, got {scale!r}")
    if softcap is not None and not 0.0 < float(softcap) < float("inf"):
        raise ArgumentError(f"softcap: expected a finite value > 0, got {softcap!r}")
    if q.device.type == "cuda":
        dev = f"cuda:{q.device.index or 0}"
        return _device_mass(q, k, qp, kp, kv, pl, sc, softcap, window, lag, dev)
    if q.device.type != "cpu":
        raise ArgumentError(f"q: expected a CPU or CUDA tensor, got one on {q.device}")

    def host(x: torch.Tensor, dtype: torch.dtype) -> object:
        return x.detach().to("cpu", dtype).contiguous().numpy()

    mass, count, lse = _kernel(
        host(q, torch.float32),
        host(k, torch.float32),
        host(qp, torch.int64),
        host(kp, torch.int64),
        None if kv is None else host(kv, torch.bool),
        None if pl is None else host(pl, torch.float32),
        sc,
        None if softcap is None else float(softcap),
        window,
        lag,
    )
    return Mass(
        torch.from_numpy(mass), torch.from_numpy(count).to(torch.int64), torch.from_numpy(lse)
    )


def _device_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    qp: torch.Tensor,
    kp: torch.Tensor,
    kv: torch.Tensor | None,
    prior: torch.Tensor | None,
    scale: float,
    softcap: float | None,
    window: int | None,
    lag: int,
    device: str,
) -> Mass:
    """The CUDA kernels (``cuda/saliency.cu``) on ``device``: ``"cuda:N"``, or ``"emu"``
    (their host build, on CPU tensors, for tests)."""
    from . import _rotatekv

    dev = q.device
    b, hq, tq, _ = q.shape
    tk = k.shape[2]

    def on(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x.detach().to(dev, dtype).contiguous()

    lse = torch.empty(b, hq, tq, dtype=torch.float32, device=dev)
    mass = torch.empty(b, tk, dtype=torch.float32, device=dev)
    count = torch.empty(b, tk, dtype=torch.int32, device=dev)
    _rotatekv._cuda_attention_mass(
        device,
        on(q, torch.float32),
        on(k, torch.float32),
        on(qp, torch.int64),
        on(kp, torch.int64),
        None if kv is None else on(kv, torch.uint8),
        None if prior is None else on(prior, torch.float32),
        lse,
        mass,
        count,
        scale,
        None if softcap is None else float(softcap),
        window,
        lag,
    )
    return Mass(mass.cpu(), count.cpu().to(torch.int64), lse.cpu())
