"""rotatekv: packed 2-bit rotated KV caches with fused attention kernels.

The store (``KVStore``), the rotation plans (``RotationPlan``) and the kernels live in the
compiled extension ``rotatekv._rotatekv``; this package re-exports them and adds
``QuantConfig`` and the command line.
"""

from __future__ import annotations

from . import _device
from ._config import QuantConfig
from ._rotatekv import (
    ArgumentError,
    CapacityError,
    DeviceError,
    DTypeError,
    FormatError,
    KVStore,
    PageBuffer,
    RotateKVError,
    RotationPlan,
    ShapeError,
    StoreIOError,
    _set_device_hooks,
    build_info,
    hadamard,
)

# The extension calls back into these for device stores (it never imports the package).
_set_device_hooks(_device)

__version__ = build_info()["version"]

__all__ = [
    "ArgumentError",
    "CapacityError",
    "DTypeError",
    "DeviceError",
    "FormatError",
    "KVStore",
    "PageBuffer",
    "QuantConfig",
    "RotateKVError",
    "RotationPlan",
    "ShapeError",
    "StoreIOError",
    "build_info",
    "hadamard",
]
