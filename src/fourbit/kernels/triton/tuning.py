"""Tile configurations of the Triton kernels: one ``KernelTables`` per GPU they were tuned on.

Measured with ``benchmarks/tune_triton.py`` on an H100 and kept on the H200, where the same
entries measured best or within noise and the rules that choose among kernels changed (the
measurements behind them: docs/tuning.md; history: docs/performance.md). ``for_device`` picks a
device's tables by its name; a GPU without tables of its own gets the Hopper tables when it is a
Hopper, else ``GENERIC``, whose tiles fit the shared memory of every supported GPU.
``tune_triton.py`` prints rows in these types, ready to paste into a new GPU's tables.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

import torch

__all__ = [
    "CHUNK_BYTES",
    "GENERIC",
    "H200",
    "HOPPER",
    "TABLES",
    "DequantizeConfig",
    "FragmentConfig",
    "FusedConfig",
    "GemvConfig",
    "KernelTables",
    "QuantizeConfig",
    "WgmmaRule",
    "WideConfig",
    "for_device",
    "tables_for",
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
    ``block_m`` input rows (and K split), weights scaled before the dot. The tables keep
    ``split_k`` 1; ``dispatch.choose_config`` splits K for weights with too few rows."""

    kind: str
    block_n: int
    block_m: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1


class FragmentConfig(NamedTuple):
    """The register-fragment kernel (``fragments``), for 16-bit inputs and blocksizes of 64 and
    more. ``split_k`` 0: ``fragment_grid.fragment_parts`` chooses the split and, unless given
    (non-zero), the warps sharing each row group's K."""

    max_rows: int
    num_warps: int
    split_k: int
    k_warps: int = 0


class PermuteRule(NamedTuple):
    """The fragment kernel reads its inputs from a copy in fragment order
    (``fragment_inputs.InputPermute``, one kernel more) from ``min_rows`` input rows on, for
    weights of at least ``min_elements`` elements (out_features x in_features)."""

    min_rows: int
    min_elements: int


class WgmmaRule(NamedTuple):
    """Products of ``min_rows`` to ``max_rows`` input rows run on Hopper's ``wgmma`` (``wgmma``
    or ``wgmma_wide``, one kernel more to stage the inputs) when the weight's programs (64 or 128
    weight rows) number at least ``min_waves`` times the multiprocessors; other weights keep the
    tensor-core kernel or decode + cuBLAS. Rows both rules take go to the wide kernel where its
    rule holds. ``cluster_fill`` (the wide kernel's; 0: never) lets weights of fewer programs run
    in clusters of two that split K, when twice their programs fill at least that share of one
    wave and no more than the wave; from ``narrow_min_rows`` input rows (0: never) programs of 64
    weight rows (one warpgroup) may fill it where those of 128 are too few. Up to 64 input rows
    (the smallest row tile, whose one-warpgroup programs are small enough for several a
    multiprocessor) 64-row programs in clusters of two go first where they fill
    ``narrow_small_fill`` to all of ``narrow_small_waves`` waves (0: never). From
    ``narrow_min_rows``, where clusters of two of a program size fill too little, clusters of
    three may, when each program's part of K keeps at least ``third_min_iterations`` 256-column
    iterations (0: never). Up to the smallest row tile, 64-row programs in clusters of four go
    before all but those of ``narrow_small_waves`` where they fill ``quarter_fill[i - 1]`` (a
    range, in multiprocessors) for parts of ``i`` iterations (none beyond the table): in place of
    another of the wide kernel's configurations, or (``quarter_alone``) of any. Those of parts of
    one iteration (K of 1024-2047) start from ``quarter_min_rows`` input rows (0: ``min_rows``),
    where nothing else of the wide kernel does. Weights of at least ``large_min_elements``
    elements (out_features x in_features) take up to ``large_max_rows`` input rows (0: never).
    Up to the smallest row tile, weights whose K lies in ``one_launch_k`` (from, below) run in no
    clusters that split K: there the tensor-core kernel's one launch costs an eager call less than
    the wide kernel's two ((0, 0): none). K of part of an iteration (not a multiple of 256, whose
    steps each take their own nested absmax) start from ``short_min_rows`` input rows (0:
    ``min_rows``). Up to the smallest row tile, weights of enough 128-row
    programs to run unsplit run them in clusters of two where they number at most
    ``small_pairs_waves`` waves (and K splits), or else in 64-row programs, unsplit, up to
    ``small_narrow_waves`` waves of 128-row ones (0: never; three 64-row programs fit a
    multiprocessor). From there up to ``pairs_past_a_wave[0]`` input rows, weights of more than
    one wave of 128-row programs and at most ``pairs_past_a_wave[1]`` waves run them in clusters
    of two ((0, 0.0): never)."""

    min_rows: int
    max_rows: int
    min_waves: float
    cluster_fill: float = 0.0
    narrow_min_rows: int = 0
    narrow_small_waves: int = 0
    narrow_small_fill: float = 1.0
    third_min_iterations: int = 0
    quarter_fill: tuple[tuple[float, float], ...] = ()
    quarter_alone: bool = False
    quarter_min_rows: int = 0
    large_max_rows: int = 0
    large_min_elements: int = 0
    one_launch_k: tuple[int, int] = (0, 0)
    small_pairs_waves: float = 0.0
    small_narrow_waves: float = 0.0
    pairs_past_a_wave: tuple[int, float] = (0, 0.0)
    short_min_rows: int = 0


class QuantizeConfig(NamedTuple):
    """The persistent 4-bit quantizer: elements per tile, warps per program, programs per multiprocessor."""

    tile_elements: int
    warps: int
    programs_per_sm: int


class DequantizeConfig(NamedTuple):
    """The word kernel of the 4-bit decode: packed int32 words (8 weights each) per program, and
    warps per program. The decode feeds the many-rows products (decode + cuBLAS) and
    ``dequantize_4bit``."""

    words_per_program: int
    num_warps: int


class KernelTables(NamedTuple):
    """Every tuned choice of the product kernels and the quantizer for one GPU (``tuned_on``).

    In each row table the first entry whose ``max_rows`` covers the input's rows is used. Rows
    beyond ``gemv`` decode in chunks and use cuBLAS; rows beyond ``fused`` up to ``wide_rows``
    run ``wide`` when its programs number at least ``wide_min_coverage`` of the
    multiprocessors (one program fills a multiprocessor, so the path pays only for weights with
    enough rows: on an H100 it beat decode + cuBLAS 1.2-2x from 8192 weight rows up and lost at
    4096). Programs too few for one wave split K as many times as the wave holds, when that
    fills ``wide_split_fill`` of it and each split keeps at least ``wide_split_columns`` columns
    (on an H200, 96-256 rows of 4096x14336, 5120x13824 and 8192x28672 ran 1.2-1.6x faster so
    than unsplit or by decode + cuBLAS; splits of 1024-2048 columns, or filling 73% of the wave,
    lost at 256 rows); otherwise decode + cuBLAS."""

    tuned_on: str
    gemv: tuple[GemvConfig, ...]
    fused: tuple[FusedConfig, ...]
    wide: WideConfig
    wide_rows: int
    wide_min_coverage: float
    wide_split_columns: int
    wide_split_fill: float
    fragments: tuple[FragmentConfig, ...]
    quantize: QuantizeConfig
    fragment_permute: tuple[PermuteRule, ...] = ()
    wgmma: WgmmaRule | None = None
    #: Products of ``min_rows`` to ``max_rows`` rows on the wide ``wgmma`` kernel (``wgmma_wide``;
    #: past 256 rows in equal blocks), its programs counted in 128 weight rows (those of every block).
    wgmma_wide: WgmmaRule | None = None
    #: The ``fused`` entries run programs of 64 weight rows (``dispatch.NARROW_FUSED_ROWS``) where
    #: their own, K split as far as allowed, fill less than this many waves (0: never).
    fused_narrow_fill: float = 0.0
    #: (an H100 sweep of 256-2048 words with 4 warps: 512 reached 96% of the copy bandwidth)
    dequantize: DequantizeConfig = DequantizeConfig(words_per_program=512, num_warps=4)
    #: The tables for products recorded into a CUDA graph, whose launches cost host time once:
    #: there a second kernel a call (an input copy, the staging of ``wgmma``) pays wherever it
    #: saves GPU time. None: the same tables.
    captured: KernelTables | None = None


HOPPER = KernelTables(
    tuned_on="NVIDIA H100 80GB HBM3",
    gemv=(
        GemvConfig(1, 1, 16, 1024, 0, 4, "half"),
        GemvConfig(2, 2, 16, 512, 0, 4, "half"),
        GemvConfig(4, 4, 16, 512, 0, 4, "half"),
    ),
    fused=(
        FusedConfig(16, 128, 16, 64, 4, 4, 4, False),
        FusedConfig(32, 128, 32, 64, 4, 4, 4, False),
        FusedConfig(64, 128, 64, 64, 1, 4, 4, False),
    ),
    wide=WideConfig("wide", 128, 256, 64, 8, 3),
    wide_rows=256,
    wide_min_coverage=0.4,
    wide_split_columns=2560,
    wide_split_fill=0.85,
    fragments=(FragmentConfig(16, 4, 0),),
    quantize=QuantizeConfig(tile_elements=4096, warps=8, programs_per_sm=4),
)

#: The H200 keeps the Hopper entries (measured best or within noise there) and changes these
#: rules, each measured on one (the numbers: docs/tuning.md): eager calls read their inputs in
#: place (the copy into fragment order costs more host time than the GPU time it saves); the
#: dequantizer takes one packed word a thread; ``wgmma`` runs 17-64 rows from two waves of its
#: programs; the wide ``wgmma`` kernel runs 33-512 rows (1024 for weights of 2**27 elements and
#: more) from 0.6 of a wave of 128-row programs,
#: with fewer in clusters of two or three that split K, from 65 rows also in 64-row programs, and
#: up to 64 rows in 64-row programs in clusters of two (0.68-1.0 of three waves) or four (a fill
#: range by their parts' iterations), except K of 4096-6143 up to 64 rows (one launch there), and
#: up to 64 rows 0.6-1.0 waves of 128-row programs in clusters of two, 1.0-1.5 waves of them as
#: 64-row programs (at 65-128 rows in clusters of two); K of part of an iteration runs neither
#: ``wgmma`` kernel below 65 rows (the tensor-core kernel was 5-7% faster than the wide one
#: there; the few-row one was not measured on it); the tensor-core kernel runs 64-row
#: programs where its 128-row ones fill under 1.25 waves.
H200 = HOPPER._replace(
    tuned_on="NVIDIA H200",
    dequantize=DequantizeConfig(words_per_program=256, num_warps=8),
    fused_narrow_fill=1.25,
    wgmma=WgmmaRule(17, 64, 2.0, short_min_rows=65),
    wgmma_wide=WgmmaRule(
        33,
        512,
        0.6,
        cluster_fill=0.6,
        narrow_min_rows=65,
        narrow_small_waves=3,
        narrow_small_fill=0.68,
        third_min_iterations=8,
        quarter_fill=((0.0, 2.5), (0.0, 2.5), (1.0, 2.5), (1.0, 2.5), (1.0, 2.5)),
        large_max_rows=1024,
        large_min_elements=1 << 27,
        one_launch_k=(4096, 6144),
        small_pairs_waves=1.0,
        small_narrow_waves=1.5,
        pairs_past_a_wave=(128, 1.5),
        short_min_rows=65,
    ),
)
#: Under capture (docs/tuning.md): ``wgmma`` from one wave of programs, inputs copied into
#: fragment order for the rows and weight sizes of ``fragment_permute``, and clusters of four in
#: place of any kernel, from 17 rows where K is 1024-2047.
H200 = H200._replace(
    captured=H200._replace(
        fragment_permute=(PermuteRule(9, 1 << 26), PermuteRule(5, 1 << 27), PermuteRule(13, 1 << 25)),
        wgmma=H200.wgmma._replace(min_waves=1.0),
        wgmma_wide=H200.wgmma_wide._replace(quarter_alone=True, quarter_min_rows=17, one_launch_k=(0, 0)),
    )
)

#: GPUs without tables of their own, and not Hoppers: the Hopper entries with batch-wide tiles of
#: 128 input rows in two stages. Triton 3.9 builds the Hopper batch-wide tiles with 90 KiB of
#: shared memory for compute capability 8.x and 110 KiB for 9.0, these with 37-41 KiB; GPUs of
#: capability 8.6, 8.9 and 12.0 give a program at most 99 KiB.
GENERIC = HOPPER._replace(tuned_on="no GPU: the nearest safe tables", wide=WideConfig("wide", 128, 128, 64, 8, 2))

#: Tables by a word of the device name (``torch.cuda.get_device_name``), checked in order.
TABLES: dict[str, KernelTables] = {"H200": H200, "H100": HOPPER}


def tables_for(name: str, capability: tuple[int, int]) -> KernelTables:
    """The tables of a GPU called ``name`` (a whole word of it names a tuned GPU), else the
    Hopper tables for compute capability 9.x, else ``GENERIC``."""
    for word, tables in TABLES.items():
        if re.search(rf"\b{word}\b", name):
            return tables
    return HOPPER if capability[0] == 9 else GENERIC


@functools.cache
def for_device(device: torch.device) -> KernelTables:
    """The tables of ``device``'s GPU, read once per device; the Hopper tables off the GPU (the
    Triton interpreter runs the kernels on CPU tensors)."""
    if device.type != "cuda":
        return HOPPER
    return tables_for(torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))


#: Bytes of decoded weight per chunk on the many-rows path (decode + cuBLAS).
CHUNK_BYTES = 64 << 20
