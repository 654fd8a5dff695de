"""Tile configurations of the Triton kernels: one ``KernelTables`` per GPU they were tuned on.

Measured with ``benchmarks/tune_triton.py`` on an H100 and kept on the H200, where the same
entries measured best or within noise (history: docs/performance.md). ``for_device`` picks a
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
    another of the wide kernel's configurations, or (``quarter_alone``) of any."""

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
    #: Products of 33-256 rows on the wide ``wgmma`` kernel (``wgmma_wide``), its programs
    #: counted in 128 weight rows.
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

#: The H200 measured the Hopper entries best or within noise (docs/performance.md). Eager calls
#: read their inputs in place: the copy into fragment order is a second launch, 22 us more host
#: time a call on the H200's host (28672x8192 at 16 rows: 51.7 us against 29.9, where
#: ``F.linear`` took 21.7), more than the 8 us of GPU time it saves there.
#: The decode with one packed word a thread (256 words, 8 warps) measured 1.1-1.4x faster there
#: than the Hopper entry, outputs identical: 28672x8192 in bf16 174 us against 239.
#: ``wgmma`` at 17-64 rows, CUDA graph replays, NF4 bf16 nested, against the tensor-core kernel:
#: 28672x8192 at 32 / 64 rows 81 / 109 us against 109 / 161, 14336x4096 25 / 31 against 37 /
#: 46; with 64 programs (4096 weight rows) it lost, 20 against 17 us at 4096x4096. Eager calls
#: pay the staging kernel's launch: 14336x4096 took 42 / 52 us a call against 40 / 48, so the
#: rule asks for two waves of programs (28672x8192 eager: 90 / 113 us against 112 / 162).
#: The wide ``wgmma`` kernel at 65-256 rows, graph replays against the batch-wide tiles and
#: decode + cuBLAS: 28672x8192 at 65 / 96 / 128 / 192 / 256 rows 120 / 121 / 151 / 194 / 217 us
#: against 224 / 225 / 248 / 328 / 311 (cuBLAS bf16 119 / 121 / 130 / 149 / 182); 14336x4096
#: (0.85 waves of programs) 35 / 35 / 40 / 49 / 63 against 60 / 58 / 57 / 72 / 71; with 32
#: programs (4096-row weights) it lost, 131 against 63 us at 4096x14336 and 128 rows. Its 64-row
#: tile, the weights scaled by two bf16 parts, beat ``wgmma`` at 64 rows: 28672x8192 98.4 us
#: against 106.0, 14336x4096 30.1 against 36.6 (cuBLAS bf16 118.3 / 34.2); at 32 rows it lost
#: (86.0 against 82.3): ``wgmma`` keeps 17-32 rows, and 33-64 of weights too few rows for it.
#: From 0.6 of a wave it beat the batch-wide tiles too: 10240x4096 (80 programs) at 128 / 256
#: rows 35.7 / 50.1 us against 56.3 / 69.2 (33-64 rows: even with ``wgmma``, 29-30 us).
#: In clusters of two (K split, partial sums added in distributed shared memory), graph replays
#: against the tables' choice before: 8192x8192 at 64 / 128 / 256 rows 36.6 / 41.7 / 62.6 us
#: against 46.8 / 72.3 / 107.6 (cuBLAS 37.1 / 38.5 / 56.0), 6144x4096 20.2 / 22.8 / 33.7
#: against 26.4 / 35.9 / 41.9, 5120x5120 (80 programs in clusters) 23.9 / 26.5 / 38.3 against
#: 30.0 / 39.9 / 44.9, 8448x4096 at 33 / 64 rows 19.9 / 20.3 against ``wgmma``'s 25.0 / 25.5;
#: with 32 programs (half a wave in clusters) it was even or lost (4096x14336 66.7 / 92.6
#: against 63.0 / 91.1 at 128 / 256 rows, 4096x4096 32.2 against 28.4 at 256); clusters of four
#: lost wherever a program holds a multiprocessor (4096x14336 at 256 rows 104.4 us): 30 such
#: clusters fit an H200 at once (its four multiprocessors in one GPC), not 32.
#: Programs of 64 weight rows (one warpgroup) in clusters of two fill a wave with 4096-row
#: weights: 4096x14336 at 128 / 256 rows 50.0 / 76.1 us against 62.2 / 90.5 on the batch-wide
#: tiles (cuBLAS 38.0 / 54.6), 4096x4096 16.6 / 22.1 against 25.7 / 28.3 (decode + cuBLAS;
#: cuBLAS 13.0 / 15.4); at 64 rows 4096x14336 lost (48.6 against the tensor-core kernel's 40.0).
#: Where 128-row programs fill a wave in clusters they stayed faster (8192x8192 at 256 rows 62.9
#: against 86.8 us), and 2048-row weights (half a wave even so) lost (2048x8192: 37.3 against 34.8).
#: At 33-64 input rows the 64-row tile's one-warpgroup programs take 67 KB of shared memory, so
#: three share a multiprocessor: in clusters of two, where they fill 0.68-1.0 of three waves,
#: they beat the unsplit 128-row programs and ``wgmma``: 10240x4096 / 11008x4096 / 12288x4096 at
#: 33-64 rows 24.0-24.4 us against 28.8-29.8 (cuBLAS 23.0-24.2 / 24.4-26.0 / 28.5-29.0), 8704x4096
#: / 9216x4096 / 9728x4096 at 64 rows 24.1-24.2 against 29.5-29.8 (``wgmma``); past three waves
#: they lost (14336x4096 38.6 against 29.7, 28672x8192 118.7 against 100.8); 8192x8192 (0.65 of
#: them) keeps 128-row programs in clusters of two (35.3 against 35.8 us).
#: Clusters of three (graph replays, us at 128 / 256 rows, against clusters of two of 64-row
#: programs): 4096x14336 in 128-row programs 48.5 / 67.4 against 49.3 / 72.7 (cuBLAS 38.6 /
#: 56.7); 2048x8192 in 64-row programs 22.8 / 29.5 against 27.0 / 36.6 and the batch-wide tiles'
#: 30.6 / 35.0 (cuBLAS 17.2 / 22.2); with five iterations a part they lost (4096x4096 in 128-row
#: programs 20.8 / 28.0 against 16.1 / 21.8), and at 64 rows 2048x8192 (20.4 against 17.4).
#: Clusters of four of 64-row programs at 33-64 rows (three a multiprocessor), graph replays over
#: copies of each weight that pass L2 (as ``bench --cold`` runs them), us at 33 / 64 rows:
#: 4096x4096 15.6 / 15.9 against the tensor-core kernel's 15.9 / 18.3, 3072x4096 13.9 / 14.1
#: against 15.8 / 16.8, 5120x5120 18.5 / 18.9 and 5120x4096 16.2 / 16.5 against 128-row programs
#: in clusters of two, 25.0 / 25.4 and 21.1 / 21.4. With 11-14 iterations a part they lost
#: (4096x14336 39.7 / 40.1 against 36.3 / 39.4, 4096x11008 32.0 / 32.7 against 30.0 / 32.1), though
#: they won on replays that keep the weight in L2; 6144x4096 (384 programs) and 2048x8192 (128)
#: lost. Eager ``Linear4bit`` (L2 cleared): 5120x5120 24-25 us against 31-32, 5120x4096 21-22
#: against 27-28, but 4096x4096 at 33 rows 21 against 18 (the input staging's launch): eager calls
#: take them only in place of the wide kernel's other configurations. Weights of 1024-5120 rows and
#: K 1024-5120 (0.48-2.42 of a wave of such programs), read from memory, us at 33 / 64 rows against
#: the kernel chosen before (5120 rows: 128-row programs in clusters of two, 5120x1024 9.4 / 9.6
#: against 9.8 / 10.0, 5120x2048 11.7 / 11.8 against 13.8 / 13.9, 5120x3072 13.9 / 14.2 against 17.6
#: / 17.8; the others the fused kernel): 1024x2048 8.6 / 8.7 against 12.9 / 13.6, 2048x2048 9.5 /
#: 9.7 against 12.7 / 13.6, 3072x2048 10.0 / 10.3 against 12.8 / 13.9, 4096x2048 11.2 / 11.4 against
#: 13.2 / 14.7, 2048x1024 7.6 / 7.7 against 12.7 / 13.5, 4096x1024 8.9 / 9.1 against 12.6 / 13.6,
#: 3072x3072 12.0 / 12.2 against 15.7 / 17.3, 2048x3072 11.5 / 11.7 against 12.7 / 13.7, 1024x4096
#: 12.0 / 12.2 against 12.7 / 13.6, 2048x4096 13.4 / 13.6 against 13.2 / 14.4, 2048x5120 15.6 / 15.8
#: against 15.5 / 16.7; 512x2048 (0.24 of a wave, left out) 8.4 / 8.6 against 13.2 / 14.0; past 2.5
#: waves they lost (6144x2048 16.4 / 16.7 against clusters of two of 128-row programs' 13.7 / 13.9,
#: 8192x1024 14.4 / 14.5 against 9.8 / 10.0). Below 0.45 of a wave they won too (256x2048 8.4 / 8.5
#: against the fused kernel's 12.5 / 13.2, 64x2048 8.1 / 8.2 against 12.5, 512x1024 6.6 / 6.8 against
#: 12.3 / 12.8), but from three iterations a part the fused kernel's 64-row programs
#: (``fused_narrow_fill``) beat them below one wave: 1024x4096 9.5 / 10.0 against 12.0 / 12.2,
#: 2048x4096 11.2 / 11.8 against 13.3 / 13.5, 2048x5120 12.5 / 13.1 against 15.4 / 15.7, 1024x3072
#: 9.4 / 9.7 against 10.3 / 10.5 (2048x3072 even, 11.1 / 11.6 against 11.4 / 11.6).
#: The fused kernel's programs of 64 weight rows in place of 128 (graph replays, weights from
#: memory, us at 17 / 33 / 64 rows) where those of 128, K split as far as allowed, fill under 1.25
#: waves: 512x4096 9.1 / 9.5 / 9.6 against 10.9 / 13.3 / 13.9, 2048x2048 9.1 / - / 10.0 against 10.9 /
#: - / 13.7, 2048x1024 - / 9.4 / 9.8 against 12.7 / 13.6, 2048x5120 11.2 / 12.5 / 13.1 against 12.9
#: / 15.5 / 16.7, 4096x2048 10.0 at 17 against 11.1; eager ``Linear4bit`` 512x2048 11 against 15-16
#: us, 1024x4096 12-13 against 15-16. Above that they lost or drew: 4096x4096 at 17 / 32 rows 14.8 /
#: 15.0 against 13.5 / 14.0, 2048x8192 14.8 / 15.1 against 13.8 / 14.2 (64 rows 17.3 against 17.8),
#: 1024x14336 even (64 rows 15.6 against 17.3), 4096x14336 38.5 / 39.0 / 43.4 against 31.5 / 31.9 /
#: 39.5 (eager 45-46 against 40-42).
H200 = HOPPER._replace(
    tuned_on="NVIDIA H200",
    dequantize=DequantizeConfig(words_per_program=256, num_warps=8),
    fused_narrow_fill=1.25,
    wgmma=WgmmaRule(17, 64, 2.0),
    wgmma_wide=WgmmaRule(
        33,
        256,
        0.6,
        cluster_fill=0.6,
        narrow_min_rows=65,
        narrow_small_waves=3,
        narrow_small_fill=0.68,
        third_min_iterations=8,
        quarter_fill=((0.0, 2.5), (0.0, 2.5), (1.0, 2.5), (1.0, 2.5), (1.0, 2.5)),
    ),
)
#: Under capture, on graph replays (NF4 bf16 nested, us, against the eager tables' choice):
#: ``wgmma`` from one wave of programs: 14336x4096 at 17 / 32 / 64 rows 24.6 / 25.0 / 33.0
#: against 36.1 / 37.1 / 46.1; 6144x4096 (0.7 waves) even, 4096-row weights 1.4-2.2x slower.
#: Inputs in fragment order: 28672x8192 at 16 rows 62.4 us against 70.3, 28672x4096 33.3
#: against 37.1, 128256x4096 at 8 rows 110.8 against 122.0; from 13 rows of 2^25 weights too,
#: 14336x4096 and 4096x14336 at 16 rows 19.1 / 18.2 against 21.4 / 20.0 (at 12 rows even,
#: 0.97-0.99x; 6144x4096 even at 16); 4096x4096 at 16 rows 8.9 against 8.3, slower below 5 rows.
H200 = H200._replace(
    captured=H200._replace(
        fragment_permute=(PermuteRule(9, 1 << 26), PermuteRule(5, 1 << 27), PermuteRule(13, 1 << 25)),
        wgmma=WgmmaRule(17, 64, 1.0),
        wgmma_wide=H200.wgmma_wide._replace(quarter_alone=True),
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
