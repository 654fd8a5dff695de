"""Time candidate tile configurations of the Triton 4-bit linear kernels on this GPU.

    python benchmarks/tune_triton.py                # NF4, bf16, blocksize 64, nested statistics
    python benchmarks/tune_triton.py --quantize     # the 4-bit quantizer's tile sizes
    python benchmarks/tune_triton.py --dequantize   # the 4-bit decode's program sizes

Prints the bandwidth of a 1 GiB device copy, then, for each weight shape (tiled as a Linear4bit
on this GPU tiles it, unless ``--layout rows``) and input row count,
every candidate's median time (CUDA graph replays, so launch overhead does not hide the kernel;
with ``--cold MIB`` replays of calls in turn over that many MiB of weight copies, as a model's
layers read their weights from memory) and the best one, next to bf16 cuBLAS.
The winners go into the GPU's ``KernelTables`` in fourbit/kernels/triton/tuning.py (its
``fragments``, ``gemv``, ``fused`` and ``wide`` entries, and the ``wgmma`` / ``wgmma_wide``
rules of a Hopper's, ``wgmma_wide`` in thread block clusters of 1, 2 and 4 of 128- and 64-row
programs for its ``cluster_fill``, ``narrow_min_rows`` and ``narrow_small_waves``;
"chunked": decode + cuBLAS; ``--kinds`` adds "wgmma" and "wgmma_wide"); the tables
this GPU uses now are printed first. With ``--quantize``: the quantizer's (elements per tile,
warps, programs per multiprocessor) next to a copy of the input, for the tables' ``quantize``.
With ``--dequantize``: the decode's (packed words per program, warps) against the copy rate, for
the tables' ``dequantize``. The measurements behind a changed rule go into docs/tuning.md.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from triton.testing import do_bench_cudagraph

import fourbit.functional as F4
from fourbit import layout
from fourbit.formats import NestedStatistics, get_4bit_type
from fourbit.kernels.triton import fragments, gemv, op_entry, tensor_core, tuning, wgmma, wgmma_wide
from fourbit.kernels.triton import quantize as triton_quantize
from fourbit.kernels.triton.dequantize import DequantizeLaunch
from fourbit.kernels.triton.tuning import DequantizeConfig, QuantizeConfig

# (ROWS, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, lookup); SPLIT_K 0 = automatic
GEMV_CANDIDATES = [
    (1, 32, 512, 0, 4, "gather"), (1, 32, 512, 0, 4, "half"), (1, 32, 1024, 0, 4, "half"),
    (1, 64, 512, 0, 8, "half"), (1, 16, 1024, 0, 4, "half"), (1, 32, 512, 0, 8, "half"),
    (2, 32, 256, 0, 4, "half"), (4, 16, 256, 0, 4, "gather"), (4, 16, 256, 0, 4, "half"),
    (4, 16, 512, 0, 4, "half"), (8, 16, 128, 0, 4, "half"),
]  # fmt: skip

# ("fused", BLOCK_N, BLOCK_M, BLOCK_K, SPLIT_K, num_warps, num_stages, SCALE_WEIGHTS): the tensor-core
# kernel, for any row count (BLOCK_M is clipped to the rows); SPLIT_K 0 = automatic
FUSED_CANDIDATES = [
    ("fused", 128, 16, 64, 0, 4, 4, False), ("fused", 128, 16, 64, 4, 4, 4, False),
    ("fused", 128, 16, 64, 8, 4, 4, False), ("fused", 128, 16, 64, 4, 4, 3, False),
    ("fused", 128, 16, 64, 4, 4, 6, False), ("fused", 64, 16, 64, 8, 4, 4, False),
    ("fused", 128, 32, 64, 0, 4, 4, False), ("fused", 128, 32, 64, 4, 4, 4, False),
    ("fused", 128, 64, 64, 0, 4, 4, False), ("fused", 128, 64, 64, 4, 4, 4, False),
    ("fused", 128, 64, 64, 0, 4, 4, True), ("fused", 128, 128, 64, 0, 4, 4, True),
    ("fused", 128, 128, 64, 0, 8, 4, True), ("fused", 128, 128, 64, 2, 4, 4, True),
    ("fused", 64, 32, 64, 0, 4, 4, False), ("fused", 64, 32, 64, 2, 4, 4, False),
    ("fused", 64, 64, 64, 0, 4, 4, False), ("fused", 64, 64, 64, 2, 4, 4, False),
    ("fused", 64, 64, 64, 4, 4, 4, False), ("fused", 64, 64, 64, 2, 4, 3, False),
    ("fused", 64, 64, 64, 2, 4, 6, False), ("fused", 128, 64, 64, 2, 4, 4, False),
    ("fused", 128, 64, 64, 2, 8, 4, False), ("fused", 64, 64, 64, 1, 4, 4, False),
    ("fused", 128, 32, 64, 0, 8, 4, False), ("fused", 128, 64, 64, 0, 8, 4, False),
    ("fused", 64, 64, 64, 0, 8, 4, False), ("fused", 64, 32, 64, 0, 8, 4, False),
]  # fmt: skip

# ("wide", BLOCK_N, BLOCK_M, BLOCK_K, num_warps, num_stages[, SPLIT_K]): the tensor-core kernel with weights
# scaled before the dot, for more than 16 rows (BLOCK_M is clipped to the rows; SPLIT_K 1 if left out)
WIDE_CANDIDATES = [
    ("wide", 128, 256, 64, 8, 3), ("wide", 128, 256, 64, 8, 4), ("wide", 128, 256, 64, 8, 2),
    ("wide", 64, 256, 64, 8, 3), ("wide", 64, 256, 64, 8, 4), ("wide", 128, 128, 64, 8, 4),
    ("wide", 128, 128, 64, 4, 4), ("wide", 256, 128, 64, 8, 3), ("wide", 128, 256, 64, 8, 3, 2),
    ("wide", 128, 256, 64, 8, 3, 4), ("wide", 128, 256, 64, 8, 3, 8), ("wide", 128, 128, 64, 4, 3, 8),
]  # fmt: skip

# ("fragments", num_warps, SPLIT_K, K_WARPS): the register-fragment kernel, up to 16 rows; SPLIT_K 0 =
# automatic (fragment_grid.fragment_parts), K_WARPS the warps sharing a row group's K (1 if left out)
FRAGMENT_CANDIDATES = [
    ("fragments", 4, 0), ("fragments", 4, 1), ("fragments", 4, 2), ("fragments", 4, 4), ("fragments", 2, 0),
    ("fragments", 8, 0), ("fragments", 4, 1, 4), ("fragments", 4, 1, 2), ("fragments", 8, 1, 8),
    ("fragments", 8, 1, 4), ("fragments", 4, 2, 4), ("fragments", 4, 4, 4), ("fragments", 2, 1, 2),
    ("fragments", 16, 1, 8), ("fragments", 16, 1, 16), ("fragments", 16, 1, 4), ("fragments", 8, 1, 2),
    ("fragments", 16, 0),
]  # fmt: skip

QUANTIZE_CANDIDATES = [
    QuantizeConfig(*candidate)
    for candidate in [
        (1024, 2, 16), (2048, 4, 8), (4096, 4, 4), (4096, 8, 2), (4096, 8, 3), (4096, 8, 4), (8192, 8, 2),
        (8192, 16, 1),
    ]
]  # fmt: skip


DEQUANTIZE_CANDIDATES = [
    DequantizeConfig(*candidate)
    for candidate in [(128, 2), (128, 4), (256, 4), (256, 8), (512, 4), (512, 8), (512, 16), (1024, 8)]
]


def tune_dequantize(shapes: list[str], rep: int, tiled: bool) -> None:
    """Time each DEQUANTIZE_CANDIDATES entry (NF4 with nested statistics, bf16 output), against the
    bytes it moves at the copy rate; every candidate's output must equal the current table's."""
    rate = copy_rate()
    for text in shapes:
        n, k = (int(part) for part in text.split("x"))
        packed, state = F4.quantize_4bit(torch.randn(n, k, device="cuda"), quant_type="nf4", compress_statistics=True)
        if tiled:
            packed = layout.tile(packed, (n, k))
        nested = (state.state2.absmax, state.state2.code, state.offset, state.state2.blocksize)
        arguments = (packed, state.absmax, state.code, 64, (n, k), torch.bfloat16, NestedStatistics(*nested), tiled)
        expected = DequantizeLaunch(*arguments)()
        floor = n * k * 2.5 / rate  # packed bytes read, bf16 written
        print(f"{text} ({'tiles' if tiled else 'rows'}): {floor * 1e6:.1f} us at the copy rate")
        for candidate in DEQUANTIZE_CANDIDATES:
            run = DequantizeLaunch(*arguments, config=candidate)
            same = torch.equal(run(), expected)
            seconds = do_bench_cudagraph(run, rep=rep, return_mode="median") / 1e3
            print(f"  {seconds * 1e6:8.1f} us  {floor / seconds:4.0%} of the copy rate  same={same}  {candidate!r}")


def tune_quantize(shapes: list[str], rep: int) -> None:
    """Time each QUANTIZE_CANDIDATES entry (NF4, bf16 input, blocksize 64), printed as the
    tables' ``quantize`` value it would be; every candidate's output must equal the current table's."""
    code = get_4bit_type("nf4", device="cuda")
    for text in shapes:
        n, k = (int(part) for part in text.split("x"))
        weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        expected_packed, expected_absmax = triton_quantize.quantize_4bit(weight, code, 64, torch.uint8)
        copy = do_bench_cudagraph(weight.clone, rep=rep, return_mode="median")
        print(f"{text}: copy of the input {copy * 1e3:.1f} us")
        for candidate in QUANTIZE_CANDIDATES:
            run = partial(triton_quantize.quantize_4bit, weight, code, 64, torch.uint8, candidate)
            packed, absmax = run()
            same = torch.equal(packed, expected_packed) and torch.equal(absmax, expected_absmax)
            milliseconds = do_bench_cudagraph(run, rep=rep, return_mode="median")
            print(f"  {milliseconds * 1e3:8.1f} us  {milliseconds / copy:5.2f}x copy  same={same}  {candidate!r}")


def copy_rate() -> float:
    """Bytes read and written a second by the eager copy of a 1 GiB buffer (median of 20): the
    memory bandwidth the kernels are held to."""
    source = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return 2 * source.numel() / (sorted(times)[len(times) // 2] / 1e3)


def device_copy() -> str:
    """The copy rate, as a line of the report."""
    return f"1 GiB device copy, eager: {copy_rate() / 1e12:.2f} TB/s read + write"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "28672x8192"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--rep", type=int, default=200, help="milliseconds of timing per candidate")
    parser.add_argument("--top", type=int, default=4, help="candidates listed per case")
    parser.add_argument(
        "--cold", type=int, default=0, metavar="MIB",
        help="time calls in turn over weight copies of this many MiB (past L2: weights read from memory)",
    )  # fmt: skip
    parser.add_argument("--quantize", action="store_true", help="tune the 4-bit quantizer instead")
    parser.add_argument("--dequantize", action="store_true", help="tune the 4-bit decode instead")
    parser.add_argument(
        "--kinds",
        nargs="+",
        default=["gemv", "chunked", "fragments", "fused", "wide"],
        choices=["gemv", "chunked", "fragments", "fused", "wide", "wgmma", "wgmma_wide"],
        help="kernel kinds to time",
    )
    parser.add_argument(
        "--layout", choices=["tiles", "rows"], default="tiles",
        help="the weight's layout: tiled where Linear4bit tiles it (the CUDA default), or rows",
    )  # fmt: skip
    args = parser.parse_args()
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)} uses the tables tuned on: {tuning.for_device(device).tuned_on}")
    if args.quantize:
        tune_quantize(args.shapes, args.rep)
        return
    if args.dequantize:
        tune_dequantize(args.shapes, args.rep, tiled=args.layout == "tiles")
        return
    print(device_copy())
    for text in args.shapes:
        n, k = (int(part) for part in text.split("x"))
        weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        copies = []  # (packed, the op's other arguments) of each copy of the quantized weight
        for _ in range(weight_copies(n * k // 2, args.cold)):
            packed, state = F4.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
            if not copies:
                expected_weight = F4.dequantize_4bit(packed, state).double()
            if args.layout == "tiles":
                packed = F4.packed_for_device(packed, state)  # tiled where a Linear4bit would be
            copies.append((packed, {**F4.op_arguments(state, weight.device), "tiled": state.tiled}))
        dense = [weight.t(), *(weight.clone().t() for _ in range(weight_copies(2 * n * k, args.cold) - 1))]
        print(f"{text}: weight {'tiled' if state.tiled else 'in rows'}, {len(copies)} copies")
        for rows in args.rows:
            x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
            cublas = time_in_turns([partial(torch.matmul, x, copy) for copy in dense], args.rep)
            expected = x.double() @ expected_weight.t()
            kinds = {
                "gemv": [c for c in GEMV_CANDIDATES if rows <= c[0] <= max(1, 2 * rows)],
                "chunked": ["chunked"],
                "fragments": FRAGMENT_CANDIDATES if rows <= 16 else [],
                "fused": [c for c in FUSED_CANDIDATES if c[2] <= max(16, 2 * rows) and c[2] >= min(rows, 128) // 2],
                "wide": WIDE_CANDIDATES if rows > 16 else [],
                "wgmma": [("wgmma", 1), ("wgmma", 2)] if 17 <= rows <= 64 else [],  # compute capability 9.0
                "wgmma_wide": [("wgmma_wide", c, p) for p in wgmma_wide.PROGRAM_ROWS for c in wgmma_wide.CLUSTERS]
                if rows >= 33
                else [],
            }
            candidates = [config for kind in args.kinds for config in kinds[kind]]
            results = []
            for config in candidates:
                runs = [
                    partial(op_entry.linear_4bit, x, packed, blocksize=64, shape=(n, k), config=config, **tensors)
                    for packed, tensors in copies
                ]
                try:
                    error = ((runs[0]().double() - expected).norm() / expected.norm()).item()
                    results.append((time_in_turns(runs, args.rep), config, error))
                except Exception as failure:  # a configuration that does not compile or fit is skipped
                    print(f"  {config}: {type(failure).__name__}: {str(failure)[:300]}")
            results.sort(key=lambda item: item[0])
            print(f"{n}x{k} rows={rows}: cuBLAS bf16 {cublas * 1e3:.1f} us")
            for milliseconds, config, error in results[: args.top]:
                ratio = milliseconds / cublas
                print(f"  {milliseconds * 1e3:8.1f} us  {ratio:5.2f}x cuBLAS  rel.err {error:.1e}  {config}")
    report_registers()


def weight_copies(nbytes: int, cold_mib: int) -> int:
    """Copies of a weight of ``nbytes`` that together pass ``cold_mib`` MiB (at least one)."""
    return max(1, -(-(cold_mib << 20) // nbytes))


def time_in_turns(calls: list, rep: int) -> float:
    """Median milliseconds of one call: CUDA graph replays of ``calls`` in turn (over weight
    copies that pass L2, each call reads its weight from memory)."""

    def every() -> None:
        for call in calls:
            call()

    return do_bench_cudagraph(every, rep=rep, return_mode="median") / len(calls)


def report_registers() -> None:
    """Registers and spills of every compiled variant (spills mean local-memory traffic)."""
    kernels = (
        gemv.gemv_words_kernel,
        gemv.gemv_any_kernel,
        tensor_core.decode_dot_kernel,
        fragments._fragment_mma_kernel,
        wgmma._wgmma_kernel,
        wgmma_wide._wide_kernel,
    )
    for kernel in kernels:
        caches = getattr(kernel, "device_caches", None) or getattr(kernel, "cache", {})
        for cache in caches.values():
            entries = cache[0] if isinstance(cache, tuple) else cache
            for compiled in entries.values():
                if not hasattr(compiled, "n_regs"):  # never loaded (did not fit the device)
                    continue
                constants = {k: v for k, v in compiled.src.constants.items() if isinstance(v, (int, bool))}
                print(
                    f"{kernel.fn.__name__} regs={compiled.n_regs} spills={compiled.n_spills} "
                    f"warps={compiled.metadata.num_warps} {constants}"
                )


if __name__ == "__main__":
    main()
