"""Type stubs of the compiled extension (kept in sync by tests/test_stubs.py)."""

from collections.abc import Sequence
from os import PathLike
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Tensor = Any  # a torch.Tensor or numpy.ndarray of float32, float16 or bfloat16
IntArray = Any  # array-like of integers
BoolArray = Any  # array-like of bools
Mode = Literal["pre_rope", "post_rope", "none"]

class RotateKVError(Exception): ...
class ShapeError(RotateKVError, ValueError): ...
class ArgumentError(RotateKVError, ValueError): ...
class DTypeError(RotateKVError, TypeError): ...
class FormatError(RotateKVError, ValueError): ...
class StoreIOError(RotateKVError, OSError): ...
class DeviceError(RotateKVError, RuntimeError): ...
class CapacityError(RotateKVError, MemoryError): ...

class RotationPlan:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        mode: Mode = "pre_rope",
        group_heads: int = 1,
        rotate_values: bool = True,
        key_perm: IntArray | None = None,
        key_clip: float | Sequence[float] | None = None,
        value_clip: float | Sequence[float] | None = None,
    ) -> None: ...
    @staticmethod
    def identity(num_layers: int, num_kv_heads: int, head_dim: int) -> RotationPlan: ...
    @staticmethod
    def hadamard(
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        mode: Mode = "pre_rope",
        group_heads: int | None = None,
        rotate_values: bool = True,
    ) -> RotationPlan: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def num_kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def group_heads(self) -> int: ...
    @property
    def mode(self) -> Mode: ...
    @property
    def rotate_values(self) -> bool: ...
    @property
    def key_perm(self) -> npt.NDArray[np.int32]: ...
    @property
    def key_clip(self) -> list[float]: ...
    @property
    def value_clip(self) -> list[float]: ...
    def save(self, path: str | PathLike[str], metadata: dict[str, str] | None = None) -> None: ...
    @staticmethod
    def load(
        path: str | PathLike[str],
        num_layers: int | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
    ) -> RotationPlan: ...
    @staticmethod
    def load_with_metadata(
        path: str | PathLike[str],
        num_layers: int | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
    ) -> tuple[RotationPlan, dict[str, str]]: ...

class BlockFormat:
    def __init__(
        self,
        num_kv_heads: int,
        head_dim: int,
        bits: int = 2,
        block_size: int = 64,
        group_size: int | None = None,
        key_bits: int | None = None,
        value_bits: int | None = None,
        fp_format: str = "float16",
    ) -> None: ...
    @property
    def num_kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def bits(self) -> int: ...
    @property
    def key_bits(self) -> int: ...
    @property
    def value_bits(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def group_size(self) -> int: ...
    @property
    def fp_format(self) -> str: ...
    @property
    def block_bytes(self) -> int: ...
    def bits_per_element(self) -> float: ...
    def layout(self) -> dict[str, int]: ...

def _paged_write(
    pool: Any,
    fmt: BlockFormat,
    k: Any,
    v: Any,
    slot_mapping: Any,
    positions: Any = None,
    *,
    plan: RotationPlan | None = None,
    layer: int = 0,
    rope_inv_freq: Any = None,
    rope_scaling: float = 1.0,
    device: str | None = None,
) -> None: ...
def _paged_attend(
    pool: Any,
    fmt: BlockFormat,
    q: Any,
    block_table: Any,
    seq_lens: Any,
    query_start_loc: Any,
    *,
    plan: RotationPlan | None = None,
    layer: int = 0,
    scale: float | None = None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    out: Any = None,
    return_lse: bool = False,
    rope_inv_freq: Any = None,
    rope_scaling: float = 1.0,
    max_query_len: int | None = None,
    device: str | None = None,
    recent_k: Any = None,
    recent_v: Any = None,
    recent_idx: Any = None,
    recent_lag: Any = None,
    step_k: Any = None,
    step_v: Any = None,
) -> Any: ...

class PageBuffer:
    @property
    def bits(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def start(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def window(self) -> bool: ...
    @property
    def layout(self) -> dict[str, int]: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def owners(self) -> int: ...
    def __dlpack__(
        self,
        *,
        stream: Any = None,
        max_version: Any = None,
        dl_device: Any = None,
        copy: bool | None = None,
    ) -> Any: ...
    def __dlpack_device__(self) -> tuple[int, int]: ...

class KVStore:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        batch_size: int = 1,
        config: Any = None,
        plan: RotationPlan | None = None,
        rope_inv_freq: Tensor | Sequence[float] | None = None,
        rope_scaling: float = 1.0,
        device: str = "cpu",
        max_tokens: int | None = None,
    ) -> None: ...
    @property
    def max_tokens(self) -> int | None: ...
    @max_tokens.setter
    def max_tokens(self, value: int | None) -> None: ...
    def append(
        self,
        layer: int,
        k: Tensor,
        v: Tensor,
        positions: IntArray | None = None,
        protect: BoolArray | None = None,
        valid: BoolArray | None = None,
        bits: IntArray | None = None,
    ) -> None: ...
    def attend(
        self,
        layer: int,
        q: Tensor,
        positions: IntArray | None = None,
        causal: bool = True,
        scale: float | None = None,
        window: int | None = None,
        softcap: float | None = None,
        lag: int = 0,
        return_lse: bool = False,
    ) -> Any: ...  # a Tensor; (Tensor, float32 lse [B, Hq, Tq]) with return_lse
    def seq_lens(self, layer: int) -> list[int]: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def payload_bytes(self) -> float: ...
    def bits_per_element(self, settled: bool = False) -> float: ...
    def class_bits(self, bits: int) -> float: ...
    def reorder(self, indices: IntArray) -> None: ...
    def truncate(self, length: int | IntArray) -> None: ...
    def clear(self) -> None: ...
    def dequantize(
        self, layer: int, seq: int
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32], npt.NDArray[np.float32]]: ...
    def page_buffers(self, layer: int, seq: int) -> list[PageBuffer]: ...
    def save(self, path: str | PathLike[str]) -> None: ...
    @staticmethod
    def load(path: str | PathLike[str], device: str = "cpu") -> KVStore: ...
    def to(self, device: str) -> KVStore: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def num_kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def device(self) -> str: ...
    @property
    def plan(self) -> RotationPlan: ...
    @property
    def config(self) -> dict[str, Any]: ...

_CLASS_BITS: list[int]

def _set_device_hooks(hooks: Any) -> None: ...
def build_info() -> dict[str, str]: ...
def hadamard(x: npt.NDArray[np.float32], inverse: bool = False) -> npt.NDArray[np.float32]: ...
def _attention_mass(
    q: npt.NDArray[np.float32],
    k: npt.NDArray[np.float32],
    q_pos: npt.NDArray[np.int64],
    k_pos: npt.NDArray[np.int64],
    k_valid: npt.NDArray[np.bool_] | None,
    prior_lse: npt.NDArray[np.float32] | None,
    scale: float,
    softcap: float | None,
    window: int | None,
    lag: int,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint32], npt.NDArray[np.float32]]: ...

# The CUDA backend's entry points (wrapped by rotatekv.cuda).
def _cuda_load_nvrtc(dir: str | PathLike[str]) -> None: ...
def _cuda_nvrtc_available() -> bool: ...
def _cuda_nvrtc_version() -> tuple[int, int]: ...
def _cuda_compile(arch: str) -> dict[str, tuple[str, str]]: ...
def _cuda_device_count() -> int: ...
def _cuda_hadamard(x: Tensor, out: Tensor, device: str, inverse: bool) -> None: ...
def _cuda_attention_mass(
    device: str,
    q: Tensor,
    k: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    k_valid: Tensor | None,
    prior: Tensor | None,
    lse: Tensor,
    mass: Tensor,
    count: Tensor,
    scale: float,
    softcap: float | None,
    window: int | None,
    lag: int,
) -> None: ...
