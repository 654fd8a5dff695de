"""Time a CUDA C++ form of the fragment kernel beside fourbit's Triton kernel and cuBLAS.

``cuda_fragment_probe.cu`` (same file stem) is compiled at run time by NVRTC, through torch's
``torch.cuda._compile_kernel``: no CUDA toolkit is needed beyond the NVRTC library that CUDA builds
of torch bring. It measures what hand-written CUDA would buy over the Triton kernels at 1-16 rows
(NF4, blocksize 64, bf16; the weight in ``fourbit.layout``'s tiles or bitsandbytes' rows). CUDA
graph replays taking turns over ``--cold`` MiB of weight copies, as ``bench_kernels.py
--cuda-graphs --cold`` does; every form's products are checked against a float64 product with the
dequantized weight first (a configuration off by more than 1e-2 relative is reported and not
timed). Blocks are persistent: as many as the multiprocessors hold (the driver's occupancy), each
taking the same number of row blocks. docs/performance.md (sixty-fifth session) has a run.

python benchmarks/cuda_fragment_probe.py --shapes 28672x8192 4096x4096 --rows 1 16
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import pathlib
from functools import partial

import torch
from triton.testing import do_bench_cudagraph

import fourbit.functional as F4
from fourbit.layout import tile
from fourbit.nn import Linear4bit
from fourbit.tools.bench import copy_bandwidth_gbps

SOURCE = pathlib.Path(__file__).with_suffix(".cu").read_text()
_COMPILED: dict[tuple, object] = {}
#: Extra NVRTC options (``--nvrtc-option``), such as ``-DPLAIN_LOADS`` for plain weight loads.
NVRTC_OPTIONS: list[str] = []
#: Only these configurations (``--configs``: ksplit, groups, depth, warps), if any.
ONLY: list[tuple[int, ...]] = []
#: The words a step decoded by byte permutes that each configuration is tried with (``--alu-words``).
ALU_WORDS: list[int] = [0]
#: Whether the kernels use the compact table of code pairs (``--compact-table``): 128-byte rows.
COMPACT_TABLE = False


def table_bytes() -> int:
    """Dynamic shared memory of a block: the table of code pairs, 256 rows of 256 (spread) or 128 bytes."""
    return 256 * (128 if COMPACT_TABLE else 256)


def probe_kernel(tiles: int, config: tuple, tiled: bool, nested: bool):
    """The compiled probe kernel of one configuration (compiled once a process)."""
    key = (tiles, config, tiled, nested)
    if key not in _COMPILED:
        flags = ", ".join(str(flag).lower() for flag in (not COMPACT_TABLE, tiled, nested))
        name = f"fragment_probe<{tiles}, {', '.join(map(str, config))}, {flags}>"
        kernel = torch.cuda._compile_kernel(SOURCE, name, nvcc_options=list(NVRTC_OPTIONS))
        kernel.set_shared_memory_config(table_bytes())
        _COMPILED[key] = kernel
    return _COMPILED[key]


def resident_blocks(kernel, threads: int) -> int:
    """How many blocks of ``kernel`` a multiprocessor holds at once (the driver's occupancy)."""
    libcuda = torch.cuda._utils._get_gpu_runtime_library()
    count = ctypes.c_int()
    occupancy = libcuda.cuOccupancyMaxActiveBlocksPerMultiprocessor
    status = occupancy(ctypes.byref(count), kernel.func, threads, table_bytes())
    if status != 0:
        raise RuntimeError(f"cuOccupancyMaxActiveBlocksPerMultiprocessor failed ({status})")
    return max(1, count.value)


def probe_call(config: tuple, x: torch.Tensor, packed: torch.Tensor, state, out: torch.Tensor, tiled: bool):
    """A function that runs the probe kernel of ``config`` (ksplit, groups, depth, warps, alu) once;
    ``packed`` is in bitsandbytes' rows or (``tiled``) in ``fourbit.layout``'s tiles."""
    ksplit, groups = config[:2]
    m, k = x.shape
    n = state.shape[0]
    if k % (256 * ksplit) or n % (16 * groups) or state.blocksize != 64 or not 1 <= m <= 16:
        raise ValueError(
            f"the probe takes K a multiple of 256 x ksplit, N of 16 x groups, blocksize 64 and 1-16 rows; "
            f"got {n}x{k}, blocksize {state.blocksize}, {m} rows, config {config}"
        )
    if x.dtype != torch.bfloat16 or not x.is_contiguous() or out.dtype != torch.bfloat16 or out.shape != (m, n):
        raise ValueError("the probe takes a contiguous bf16 input and a bf16 output of (rows, N)")
    tiles = 1 if m <= 8 else 2
    nested = state.state2 is not None
    kernel = probe_kernel(tiles, tuple(config), tiled, nested)
    empty = torch.empty(1, dtype=torch.float32, device=x.device)
    if nested:
        offset = torch.as_tensor(state.offset, dtype=torch.float32, device=x.device).reshape(1)
        stats = [state.absmax, empty, state.code, state.state2.code, state.state2.absmax, offset]
    else:
        stats = [empty, state.absmax, state.code, empty, empty, empty]
    args = [x, packed, *stats, out, m, n, k]
    threads = 32 * ksplit * groups
    row_blocks = n // (16 * groups)
    resident = torch.cuda.get_device_properties(x.device).multi_processor_count * resident_blocks(kernel, threads)
    rounds = -(-row_blocks // resident)
    grid = (-(-row_blocks // rounds), 1, 1)  # every block the same number of row blocks
    block = (threads, 1, 1)
    return partial(kernel, grid=grid, block=block, args=args, shared_mem=table_bytes())


def configs_for(n: int, k: int) -> list[tuple[int, int, int, int, int]]:
    """The (ksplit, groups, depth, warps, alu) the kernel takes for an n x k weight (``ALU_WORDS``:
    how many of a lane's four words a step are decoded by byte permutes, not table lookups)."""
    return [
        (ks, gr, d, wa, alu)
        for ks, gr, d, wa, alu in itertools.product((2, 4, 8), (1, 2, 4), (1, 2), (16,), ALU_WORDS)
        if k % (256 * ks) == 0 and n % (16 * gr) == 0 and 4 <= ks * gr <= 16
    ]


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.double() - reference).norm() / reference.norm())


def time_turns(fns: list, min_time: float) -> float:
    """Median us of one call, CUDA graph replays of ``fns`` in turn."""

    def every() -> None:
        for fn in fns:
            fn()

    return float(do_bench_cudagraph(every, rep=max(100, int(min_time * 1000)), return_mode="median")) * 1e3 / len(fns)


def _best(pairs: list, x: torch.Tensor, outs: list, tiled: bool, configs: list, reference: torch.Tensor,
          label: str, min_time: float) -> list:  # fmt: skip
    """(us, config, error) of each configuration whose products are right, fastest first: the probe
    taking turns over the weight copies ``pairs`` (packed, state), each with its output in ``outs``."""
    results = []
    for config in configs:
        calls = [probe_call(config, x, p, s, o, tiled) for (p, s), o in zip(pairs, outs, strict=True)]
        calls[0]()
        torch.cuda.synchronize()
        error = relative_error(outs[0], reference)
        if not error < 1e-2:
            print(f"{label} config {config}: wrong products (relative error {error:.3g})", flush=True)
            continue
        results.append((time_turns(calls, min_time), config, error))
    return sorted(results)


def run_shape(n: int, k: int, rows: list[int], layouts: list[str], cold_mib: int, min_time: float, every: bool) -> None:
    device = torch.device("cuda")
    options = {"blocksize": 64, "compress_statistics": True, "quant_type": "nf4"}
    weight = torch.randn(n, k, dtype=torch.bfloat16, device=device)
    packed, state = F4.quantize_4bit(weight, **options)
    stored = packed.numel() + state.absmax.numel() * state.absmax.element_size()
    copies = max(1, -(-(cold_mib << 20) // stored))
    quantized = [(packed, state), *(F4.quantize_4bit(weight, **options) for _ in range(copies - 1))]
    in_layout = {
        "rows": quantized,
        "tiled": [(tile(p, (n, k)), s) for p, s in quantized] if "tiled" in layouts else [],
    }
    layers = []
    for _ in range(copies):
        layer = Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
        layer.load_state_dict({"weight": weight})
        layers.append(layer.to(device).eval())
    ours_tiled = "tiled" if layers[0].weight.quant_state.tiled else "rows"
    dense_copies = max(1, -(-(cold_mib << 20) // (2 * n * k)))
    dense = [weight.clone() for _ in range(dense_copies)]
    reference_weight = F4.dequantize_4bit(packed, state).double()
    configs = [c for c in configs_for(n, k) if not ONLY or c[:4] in ONLY]
    for m in rows:
        x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
        reference = x.double() @ reference_weight.t()
        outs = [torch.empty(m, n, dtype=torch.bfloat16, device=device) for _ in quantized]
        with torch.inference_mode():
            ours = relative_error(layers[0](x), reference)
            t_ours = time_turns([partial(layer, x) for layer in layers], min_time)
            t_dense = time_turns([partial(torch.nn.functional.linear, x, w) for w in dense], min_time)
        cells = [f"{n}x{k}", str(m), f"{t_dense:.1f}", f"{t_ours:.1f} ({ours_tiled})", f"{t_ours / t_dense:.2f}"]
        errors = [f"{ours:.2e}"]
        for layout in layouts:
            label = f"{n}x{k} rows {m} {layout}"
            results = _best(in_layout[layout], x, outs, layout == "tiled", configs, reference, label, min_time)
            if not results:
                cells += ["no configuration right", "-"]
                errors.append("-")
                continue
            time, config, error = results[0]
            cells += [f"{time:.1f} {config}", f"{time / t_dense:.2f}"]
            errors.append(f"{error:.2e}")
            if every:
                print(f"   {layout}: " + "; ".join(f"{c}: {t:.1f}" for t, c, _ in results), flush=True)
        print("| " + " | ".join(cells + errors) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["28672x8192", "14336x4096", "4096x14336", "4096x4096"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 8, 16])
    parser.add_argument("--cold", type=int, default=1024, help="MiB of weight copies each form takes turns over")
    parser.add_argument("--min-time", type=float, default=0.1)
    parser.add_argument("--every-config", action="store_true", help="print each configuration's time")
    parser.add_argument("--nvrtc-option", action="append", default=[], help="extra NVRTC option, e.g. -DPLAIN_LOADS")
    parser.add_argument("--configs", nargs="+", help="only these (ksplit,groups,depth,warps), e.g. 8,1,1,16")
    parser.add_argument(
        "--layouts",
        nargs="+",
        choices=["tiled", "rows"],
        default=["tiled", "rows"],
        help="the packed weight's layouts the probe reads (fourbit's layer reads its own)",
    )
    parser.add_argument(
        "--alu-words",
        nargs="+",
        type=int,
        choices=[0, 1, 2],
        default=[0],
        help="words of a lane's four a step decoded by byte permutes (each value tried)",
    )
    parser.add_argument("--compact-table", action="store_true", help="128-byte table rows (32 KiB) for 256")
    args = parser.parse_args()
    global COMPACT_TABLE
    COMPACT_TABLE = args.compact_table
    NVRTC_OPTIONS.extend(args.nvrtc_option)
    ALU_WORDS[:] = args.alu_words
    if args.configs:
        ONLY.extend(tuple(int(v) for v in c.split(",")) for c in args.configs)
    if any(not 1 <= m <= 16 for m in args.rows):
        parser.error("--rows takes 1 to 16")
    print(f"{torch.cuda.get_device_name()}: eager 1 GiB copy {copy_bandwidth_gbps(torch.device('cuda')):.0f} GB/s")
    probes = [f"probe, {layout}: us (ksplit, groups, depth, warps, alu) | / cuBLAS" for layout in args.layouts]
    errors = [f"probe error, {layout}" for layout in args.layouts]
    print("| " + " | ".join(["shape", "rows", "cuBLAS bf16 us", "fourbit us (layout)", "/ cuBLAS", *probes,
                             "fourbit error", *errors]) + " |")  # fmt: skip
    print("|---|---:|---:|---:|---:|" + "---|---:|" * len(args.layouts) + "---:|" * (1 + len(args.layouts)))
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        run_shape(n, k, args.rows, args.layouts, args.cold, args.min_time, args.every_config)


if __name__ == "__main__":
    main()
