"""Tile configurations of the Triton kernels, one named-tuple table per kernel family.

Measured with ``benchmarks/tune_triton.py`` on an H100 and kept on the H200, where the same
entries measured best or within noise (history: docs/performance.md); a GPU whose best values
differ gets its own tables here, chosen by device name. ``tune_triton.py`` prints rows in these
types, ready to paste.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = [
    "CHUNK_BYTES",
    "FRAGMENT_TABLE",
    "FUSED_TABLE",
    "GEMV_TABLE",
    "QUANTIZE",
    "WIDE_CONFIG",
    "WIDE_MIN_COVERAGE",
    "WIDE_ROWS",
    "FragmentConfig",
    "FusedConfig",
    "GemvConfig",
    "QuantizeConfig",
    "WideConfig",
]


class GemvConfig(NamedTuple):
    """The CUDA-core kernel, for inputs the tensor-core kernels do not take (float32, K not a
    multiple of the blocksize, the interpreter). ``split_k`` 0: enough K splits to give every
    multiprocessor work. ``lookup``: "half" (float16 table, one memory sector; float32 inputs keep
    float32) or "gather" (float32 table)."""

    max_rows: int
    rows: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    lookup: str


class FusedConfig(NamedTuple):
    """The tensor-core kernel decoding in registers, for 16-bit inputs. ``split_k`` is the fewest
    K splits: more are added until the programs cover the multiprocessors twice."""

    max_rows: int
    block_n: int
    block_m: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    scale_weights: bool


class WideConfig(NamedTuple):
    """The tensor-core kernel with batch-wide tiles: one program per ``block_n`` weight rows and
    ``block_m`` input rows, no K split, weights scaled before the dot."""

    kind: str
    block_n: int
    block_m: int
    block_k: int
    num_warps: int
    num_stages: int


class FragmentConfig(NamedTuple):
    """The register-fragment kernel (``fragments``), for 16-bit inputs and blocksizes of 64 and
    more. ``split_k`` 0: ``fragments.fragment_splits``."""

    max_rows: int
    num_warps: int
    split_k: int


class QuantizeConfig(NamedTuple):
    """The persistent 4-bit quantizer: elements per tile, warps per program, programs per multiprocessor."""

    tile_elements: int
    warps: int
    programs_per_sm: int


#: The first entry whose ``max_rows`` covers the input's rows is used; more rows than the last
#: entry's decode in chunks and use cuBLAS.
GEMV_TABLE: tuple[GemvConfig, ...] = (
    GemvConfig(1, 1, 16, 1024, 0, 4, "half"),
    GemvConfig(2, 2, 16, 512, 0, 4, "half"),
    GemvConfig(4, 4, 16, 512, 0, 4, "half"),
)

#: As GEMV_TABLE; rows beyond the last entry run WIDE_CONFIG or decode in chunks.
FUSED_TABLE: tuple[FusedConfig, ...] = (
    FusedConfig(16, 128, 16, 64, 4, 4, 4, False),
    FusedConfig(32, 128, 32, 64, 4, 4, 4, False),
    FusedConfig(64, 128, 64, 64, 1, 4, 4, False),
)

#: Rows beyond FUSED_TABLE up to WIDE_ROWS run WIDE_CONFIG when its programs number at least
#: WIDE_MIN_COVERAGE of the multiprocessors (one program fills a multiprocessor, so the path pays
#: only for weights with enough rows: on an H100 it beat decode + cuBLAS 1.2-2x from 8192 weight
#: rows up and lost at 4096); otherwise decode + cuBLAS.
WIDE_CONFIG = WideConfig("wide", 128, 256, 64, 8, 3)
WIDE_ROWS = 256
WIDE_MIN_COVERAGE = 0.4

FRAGMENT_TABLE: tuple[FragmentConfig, ...] = (FragmentConfig(16, 4, 0),)

QUANTIZE = QuantizeConfig(tile_elements=4096, warps=8, programs_per_sm=4)

#: Bytes of decoded weight per chunk on the many-rows path (decode + cuBLAS).
CHUNK_BYTES = 64 << 20
