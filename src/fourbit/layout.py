"""The tiled runtime layout of packed 4-bit weights, and its conversions to and from bitsandbytes' rows.

bitsandbytes stores a weight of shape (N, K) row after row, two 4-bit codes a byte. The tiled
layout stores the same bytes as tiles of ``TILE_ROWS`` rows by ``TILE_COLUMNS`` columns (512
bytes), a row group's tiles one after another along K. Inside a tile the 8-byte words (16
columns) run: half (rows 0-7, then 8-15), row within the half, word within the tile's row. That
is the order in which one warp of the fragment kernel reads a step's words, so each warp streams
one contiguous run of memory (an H200 read 117 MB at 3.8 TB/s in this order, against 2.4 TB/s in
rows). The tiling only moves whole words; it never changes a byte.

Checkpoints, state dicts and pickles always hold rows: a tiled weight is converted on the way
out (``untile``) and on the way in (``tile``). ``QuantState.tiled`` says which layout a packed
tensor is in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .formats import NESTED_BLOCKSIZE

__all__ = [
    "TILE_COLUMNS",
    "TILE_ROWS",
    "as_rows",
    "can_tile",
    "decoding_tiles_too",
    "multiplying_tiles_too",
    "tile",
    "untile",
]

#: Rows and columns of one tile (a warp's 16 weight rows, one 64-column step of the fragment kernel).
TILE_ROWS = 16
TILE_COLUMNS = 64
#: Bytes of one word (16 columns) and words of one tile row.
_WORD_BYTES = 8
_TILE_ROW_WORDS = TILE_COLUMNS // 16


def can_tile(shape: Sequence[int]) -> bool:
    """Whether a weight of ``shape`` has a tiled layout: 2-D, rows a multiple of 16, columns of 64."""
    return len(shape) == 2 and shape[0] % TILE_ROWS == 0 and shape[1] % TILE_COLUMNS == 0 and shape[0] * shape[1] > 0


def _words(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """The packed bytes of ``shape`` as one flat uint8 tensor (a view), checked for size."""
    if not can_tile(shape):
        raise ValueError(
            f"a weight of shape {tuple(shape)} has no tiled layout: it needs 2 dimensions, rows a multiple of "
            f"{TILE_ROWS} and columns a multiple of {TILE_COLUMNS}"
        )
    data = packed.contiguous().view(torch.uint8).reshape(-1)
    if data.numel() != shape[0] * shape[1] // 2:
        raise ValueError(f"packed data holds {data.numel()} bytes, but a {tuple(shape)} weight packs into "
                         f"{shape[0] * shape[1] // 2}")  # fmt: skip
    return data


def tile(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """A tiled copy of the packed bytes of a weight of ``shape`` (N, K) held in rows; same shape
    and dtype as ``packed``, which is not modified."""
    data = _words(packed, shape)
    n, k = shape
    data = data.reshape(n // TILE_ROWS, 2, 8, k // TILE_COLUMNS, _TILE_ROW_WORDS * _WORD_BYTES)
    tiled = data.permute(0, 3, 1, 2, 4).contiguous()
    return tiled.view(packed.dtype).reshape(packed.shape)


def untile(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """The packed bytes of a tiled weight of ``shape`` back in rows (bitsandbytes' layout); a copy
    of ``packed``'s shape and dtype."""
    data = _words(packed, shape)
    n, k = shape
    data = data.reshape(n // TILE_ROWS, k // TILE_COLUMNS, 2, 8, _TILE_ROW_WORDS * _WORD_BYTES)
    rows = data.permute(0, 2, 3, 1, 4).contiguous()
    return rows.view(packed.dtype).reshape(packed.shape)


def as_rows(packed: Tensor, shape: Sequence[int], tiled: bool) -> Tensor:
    """The packed bytes in bitsandbytes' rows: a ``tiled`` weight converted (a copy), else as given."""
    return untile(packed, shape) if tiled else packed


def decoding_tiles_too(kernel: Callable) -> Callable:
    """A ``dequantize_4bit`` kernel of rows only, made to take tiled weights too (converted first)."""

    def dequantize_4bit_rows(packed, absmax, code, blocksize, shape, dtype, nested_absmax=None, nested_code=None,
                             nested_offset=None, nested_blocksize=NESTED_BLOCKSIZE, tiled=False):  # fmt: skip
        return kernel(
            as_rows(packed, shape, tiled), absmax, code, blocksize, shape, dtype, nested_absmax, nested_code,
            nested_offset, nested_blocksize,
        )  # fmt: skip

    return dequantize_4bit_rows


def multiplying_tiles_too(kernel: Callable) -> Callable:
    """A ``linear_4bit`` kernel of rows only, made to take tiled weights too (converted per call)."""

    def linear_4bit_rows(A, packed, absmax, code, blocksize, shape, bias=None, nested_absmax=None, nested_code=None,
                         nested_offset=None, nested_blocksize=NESTED_BLOCKSIZE, tiled=False):  # fmt: skip
        return kernel(
            A, as_rows(packed, shape, tiled), absmax, code, blocksize, shape, bias, nested_absmax, nested_code,
            nested_offset, nested_blocksize,
        )  # fmt: skip

    return linear_4bit_rows
