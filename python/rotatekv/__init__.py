"""rotatekv: packed 2-bit rotated KV caches with fused attention kernels.

The store (``KVStore``), the rotation plans (``RotationPlan``) and the kernels live in the
compiled extension ``rotatekv._rotatekv``; this package re-exports them and adds
``QuantConfig`` and the command line.
"""

from __future__ import annotations

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
    build_info,
    hadamard,
)

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
