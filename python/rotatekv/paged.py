"""Paged kernels over caller-owned memory: the block layout serving engines use.

A *pool* is a ``uint8`` tensor ``[num_blocks, fmt.block_bytes]`` that the caller allocates
(``fmt.new_pool`` or any tensor of that shape). :func:`write` quantizes and packs tokens into
the slots a ``slot_mapping`` names; :func:`attend` reads each request's tokens through its row
of a ``block_table``, as vLLM, SGLang and FlashInfer pass them: token ``j`` of request ``b``
sits at slot ``block_table[b, j // block_size] * block_size + j % block_size`` and has
position ``j``. Blocks may be shared between requests (prefix caching); ``write`` touches only
the slots it is given.

The kernels are the ones :class:`rotatekv.KVStore` runs (docs/format.md documents
a block byte by byte). Tensors are read and written in place: CPU tensors and numpy arrays
by the CPU kernels, CUDA tensors by the CUDA kernels on torch's current stream, which read
the slot mapping and block tables on the device (``device="emu"`` runs those kernels' host
build over CPU tensors, for tests).
"""

from __future__ import annotations

from typing import Any

from ._rotatekv import BlockFormat as _BlockFormat
from ._rotatekv import _paged_attend as _attend
from ._rotatekv import _paged_write as _write

__all__ = ["BlockFormat", "attend", "write"]


class BlockFormat(_BlockFormat):
    """The format of a pool's blocks.

    ``BlockFormat(num_kv_heads, head_dim, bits=2, block_size=64, group_size=None,
    key_bits=None, value_bits=None, fp_format="float16")``: ``bits`` is one of 2, 3, 4, 8 or
    16 (16: unquantized), ``block_size`` 32 or 64 tokens, ``group_size`` the channels per
    scale and zero (``None``: the head dim). ``key_bits``/``value_bits`` give keys and values
    their own widths (``k4v2``: ``key_bits=4, value_bits=2``; 16 only for both). ``block_bytes``
    is the size of one block, ``bits_per_element()`` what a stored element costs (codes,
    scales, zeros, keys and values averaged).
    """

    def new_pool(self, num_blocks: int, device: Any = "cpu") -> Any:
        """A zeroed pool ``torch.uint8 [num_blocks, block_bytes]`` (any caller-allocated
        C-contiguous uint8 tensor of that shape works as well)."""
        import torch

        if not isinstance(num_blocks, int) or num_blocks < 1:
            from ._rotatekv import ArgumentError

            raise ArgumentError(f"num_blocks: expected a positive int, got {num_blocks!r}")
        return torch.zeros(num_blocks, self.block_bytes, dtype=torch.uint8, device=device)


# The kernels' entry points, as the extension defines them (docstrings and signatures there
# and in ``_rotatekv.pyi``).
write = _write
attend = _attend
