"""The CUDA backend: availability, kernel compilation (NVRTC, works without a GPU), and
device stores (``KVStore(..., device="cuda")``).

NVRTC comes with torch's CUDA wheels (``nvidia-cuda-nvrtc``) in a folder that is not on the
library path; :func:`nvrtc_dir` finds it and the extension loads it (and its builtins
library) before first use. ``ROTATEKV_NVRTC_DIR`` overrides the search.
"""

from __future__ import annotations

import glob
import os
import sys
from typing import Any

from . import _rotatekv
from . import _rotatekv as rotatekv_errors

__all__ = [
    "compile_kernels",
    "device_count",
    "hadamard",
    "is_available",
    "nvrtc_dir",
    "nvrtc_version",
]


def nvrtc_dir() -> str | None:
    """The folder holding ``libnvrtc.so*`` from the nvidia wheels, if any."""
    env = os.environ.get("ROTATEKV_NVRTC_DIR")
    if env:
        return env
    for base in sys.path:
        for sub in ("nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib"):
            d = os.path.join(base, sub)
            if glob.glob(os.path.join(d, "libnvrtc.so*")):
                return d
    return None


def _load_nvrtc() -> None:
    d = nvrtc_dir()
    if d is not None:
        _rotatekv._cuda_load_nvrtc(d)


def nvrtc_version() -> tuple[int, int]:
    """NVRTC's (major, minor); raises DeviceError when NVRTC cannot be found."""
    _load_nvrtc()
    return _rotatekv._cuda_nvrtc_version()


def compile_kernels(arch: str = "sm_90", log: bool = False) -> dict[str, str]:
    """Compiles every kernel file for ``arch`` with NVRTC (no GPU needed).

    Returns ``{kernel_file: ptx}``, or with ``log=True`` ``{kernel_file: nvrtc_log}`` (ptxas
    statistics: registers, stack, spills).
    """
    _load_nvrtc()
    out = _rotatekv._cuda_compile(arch)
    return {name: (lg if log else ptx) for name, (ptx, lg) in out.items()}


def device_count() -> int:
    """Visible CUDA devices (0 without a driver)."""
    return _rotatekv._cuda_device_count()


def is_available() -> bool:
    """Whether device stores can run here: a CUDA driver, a device and NVRTC."""
    if device_count() == 0:
        return False
    _load_nvrtc()
    return _rotatekv._cuda_nvrtc_available()


def hadamard(x: Any, inverse: bool = False, device: str | None = None) -> Any:
    """Orthonormal Walsh-Hadamard transform of the last axis of a torch tensor, on its CUDA
    device (or ``device="emu"`` for a CPU tensor): the same transform as
    :func:`rotatekv.hadamard`, bit for bit in float32."""
    import torch

    if not isinstance(x, torch.Tensor):
        raise rotatekv_errors.DTypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if device is None:
        device = f"cuda:{x.device.index or 0}" if x.device.type == "cuda" else "emu"
    xc = x.contiguous()
    shape = xc.shape
    x4 = xc.reshape(1, 1, -1, shape[-1]) if xc.ndim else xc.reshape(1, 1, 1, 1)
    out = torch.empty_like(x4)
    _rotatekv._cuda_hadamard(x4, out, device, inverse)
    return out.reshape(shape)
