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

Backends (one layer implementation, :mod:`rotatekv.vllm.layer`, under both):

* CPU (:mod:`rotatekv.vllm.cpu`): vLLM always runs its ``CPU_ATTN`` backend there; the plugin
  puts its class in that place, and without rotatekv settings every layer gets vLLM's own
  implementation.
* CUDA (:mod:`rotatekv.vllm.cuda`): the backend ``ROTATEKV``, chosen with
  ``attention_backend="ROTATEKV"`` (``--attention-backend ROTATEKV``); settings as above,
  ``{"bits": 2}`` without them. Tested here under the emulated device.

Keys reach the backend after RoPE: without a calibration the rotation is the post-RoPE
per-head Walsh-Hadamard transform; a pre-RoPE calibration undoes the model's RoPE (computed
from its config) at each token's position before packing. The recent window
(:mod:`rotatekv.recent`) keeps 16-bit copies of every request's newest tokens in side rows
beside the pool, sized for ``max_num_seqs`` requests; its size is logged at start. vLLM gives
every layer cells of one size, so a calibration's per-layer widths run at the widest of them.

Under tensor parallelism each rank serves its slice of the KV heads (or a replica of one);
a calibration of the whole model is cut to the rank's heads (:func:`plan_for_heads`).

Not here yet (issue 19): attention sinks (the calibration's rule needs each layer's input,
which an attention backend does not see) and per-channel key layouts.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from .. import RotationPlan
from .._rotatekv import _CLASS_BITS, ArgumentError

ENV = "ROTATEKV_VLLM"
KEYS = ("bits", "key_bits", "value_bits", "group_size", "residual", "calibration")
BLOCK_SIZES = (32, 64)
DEFAULT_RESIDUAL = 32
# The name of the CUDA backend in vLLM's registry.
CUDA_NAME = "ROTATEKV"


def rank_heads(total: int, tp: int, rank: int) -> tuple[int, int]:
    """The KV heads ``h0 .. h1`` a tensor-parallel rank holds, as vLLM splits them: an equal
    slice each when there are at least ``tp`` heads, else one head per rank, replicated
    (rank ``r`` holds head ``r * total // tp``)."""
    if not (0 <= rank < tp and total >= 1) or (total >= tp and total % tp):
        raise ArgumentError(
            f"tensor_parallel_size: {total} KV heads do not split over {tp} ranks (rank {rank})"
        )
    if total >= tp:
        per = total // tp
        return rank * per, (rank + 1) * per
    h = rank * total // tp
    return h, h + 1


def plan_for_heads(plan: RotationPlan, h0: int, h1: int) -> RotationPlan:
    """The part of a whole-model plan (a calibration) that serves KV heads ``h0 .. h1``: a
    rank's keys are rotated and ordered exactly as in the whole model, so its cache holds
    the same codes. Hadamard groups must not span two ranks."""
    gh, d = plan.group_heads, plan.head_dim
    if h0 % gh or h1 % gh:
        raise ArgumentError(
            f"calibration: its keys are rotated in groups of {gh} KV heads, and a "
            f"tensor-parallel rank holds heads {h0}..{h1 - 1}; calibrate with group heads "
            "that divide each rank's heads"
        )
    if (h0, h1) == (0, plan.num_kv_heads):
        return plan
    return RotationPlan(
        plan.num_layers,
        h1 - h0,
        d,
        mode=plan.mode,
        group_heads=gh,
        rotate_values=plan.rotate_values,
        key_perm=np.ascontiguousarray(plan.key_perm[:, h0 * d : h1 * d]),
        key_clip=plan.key_clip,
        value_clip=plan.value_clip,
    )


def register() -> None:
    """The ``vllm.general_plugins`` entry point (run in every vLLM process; idempotent).

    Classes are registered by path, so neither backend module is imported before vLLM asks
    for it (the CPU one imports vLLM's CPU backend, which a GPU build need not load)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, f"{__name__}.cpu.RotateKVBackend")
    if CUDA_NAME not in AttentionBackendEnum.__members__:
        register_backend(CUDA_NAME, f"{__name__}.cuda.RotateKVCudaBackend")
    # Settings fail where the engine is created (vLLM runs this hook there first): the
    # environment's now, a configuration's when vLLM checks it.
    settings(None)
    from .layer import install_front_end_check

    install_front_end_check()


def settings(
    additional_config: Any = None, default: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The rotatekv settings of a vLLM run: ``additional_config["rotatekv"]``, else the JSON
    of ``$ROTATEKV_VLLM``, else ``default`` (``None``: rotatekv not asked for). Checked here:
    an unknown key or width fails at engine start, naming it."""
    raw: Any = default
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
