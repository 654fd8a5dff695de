"""Kernel benchmark: fourbit next to plain torch and bitsandbytes, timed side by side in one run.

Used by ``benchmarks/bench_kernels.py``. Every row times the same work three ways where
possible: fourbit; the plain-torch baseline (``x @ W.t()`` in the same dtype for products, a copy
of the dense weight for quantize/dequantize); and bitsandbytes when it is importable. Times are
medians; ratios are fourbit's time over the other's (below 1.0 means fourbit is faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from .. import functional as F4
from ..autograd import matmul_4bit


@dataclass
class Row:
    """One benchmark line: an operation on a shape, with its times in milliseconds and the fewest
    bytes fourbit's version must move through memory."""

    op: str
    shape: str
    dtype: str
    batch: str
    fourbit_ms: float | None
    torch_ms: float | None
    bnb_ms: float | None
    fourbit_bytes: int = 0


#: Time CUDA work by replaying a CUDA graph (no Python or launch overhead) instead of eager calls.
CUDA_GRAPHS = False
#: Bytes of weights each column's timed calls take turns over (CPU) or each CUDA graph replay runs
#: in turn (``CUDA_GRAPHS``), so that each call finds its weight in memory, not in the caches, as
#: a model's layer does every token (0: one weight, which stays cached when it fits: an NF4
#: 4096x14336 weight fits an H200's L2). Copies, not a buffer read between calls: that read also
#: evicts the code, the Python objects and the page tables that a model keeps warm, and it charged
#: a 1.8 MB product on a 2-core CPU 0.2 ms more than rotating through copies (docs/performance.md).
#: triton's ``do_bench`` already clears the GPU's L2 before each eager call.
COLD_BYTES = 0


def _copies(make: Callable[[], object], nbytes: int) -> list:
    """``make()`` once, or (``COLD_BYTES``) as many times as ``nbytes`` each takes to fill it."""
    count = max(1, -(-COLD_BYTES // max(1, nbytes))) if COLD_BYTES else 1
    return [make() for _ in range(count)]


def _median_ms(
    fns: Sequence[Callable[[], object]], device: torch.device, min_time: float, graphs: bool | None = None
) -> float:
    """Median time of a call in milliseconds, taking turns over ``fns`` (on CUDA: triton's
    do_bench of the first, or, with ``graphs`` (default ``CUDA_GRAPHS``), do_bench_cudagraph of
    all in turn, divided by their count; repeated timing on CPU)."""
    if device.type == "cuda":
        from triton.testing import do_bench, do_bench_cudagraph

        if CUDA_GRAPHS if graphs is None else graphs:

            def every() -> None:
                for fn in fns:
                    fn()

            rep = max(100, int(min_time * 1000))
            return float(do_bench_cudagraph(every, rep=rep, return_mode="median")) / len(fns)
        return float(do_bench(fns[0], warmup=25, rep=max(100, int(min_time * 1000)), return_mode="median"))
    for fn in fns:  # first calls: a layer may prepare itself
        fn()
    samples: list[float] = []
    deadline = time.perf_counter() + min_time
    while len(samples) < max(5, len(fns)) or (time.perf_counter() < deadline and len(samples) < max(200, len(fns))):
        fn = fns[len(samples) % len(fns)]
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _load_bitsandbytes():
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnb_functional
    except Exception:  # not installed, or no native library for this platform
        return None, None
    return bitsandbytes, bnb_functional


#: The operations the benchmark times, in the table's order.
OPS = ("quantize", "dequantize", "matmul_4bit", "Linear4bit")


def _shape_rows(
    n: int,
    k: int,
    dtype: torch.dtype,
    batches: Sequence[int],
    device: torch.device,
    options: dict,
    bnb_modules: tuple,
    min_time: float,
    ops: Sequence[str] = OPS,
) -> list[Row]:
    """The rows of one weight shape and dtype, for the operations ``ops``."""
    bnb, bnb_functional = bnb_modules
    name, shape = str(dtype).removeprefix("torch."), f"{n}x{k}"
    weight = torch.randn(n, k, dtype=dtype, device=device)
    packed, state = F4.quantize_4bit(weight, **options)
    theirs = bnb_functional.quantize_4bit(weight, **options) if bnb_functional is not None else None

    def time_it(fns: list) -> float | None:
        if not fns:
            return None
        try:
            return _median_ms(fns, device, min_time)
        except RuntimeError as error:  # e.g. a library call that cannot be captured in a CUDA graph
            message = str(error).splitlines()[0][:100]
            print(f"not timed: {getattr(fns[0], 'func', fns[0])}: {message}", file=sys.stderr, flush=True)
            return None

    dense_bytes = weight.numel() * weight.element_size()
    stored_bytes = sum(t.numel() * t.element_size() for t in (packed, *state.as_dict(packed=True).values()))
    # each column's weights, copied for COLD_BYTES; a dense copy is also what quantize reads
    weights = [weight, *_copies(weight.clone, dense_bytes)[1:]]
    ours = [(packed, state), *_copies(partial(F4.quantize_4bit, weight, **options), stored_bytes)[1:]]
    theirs_all = []
    if theirs is not None:
        theirs_all = [theirs, *_copies(partial(bnb_functional.quantize_4bit, weight, **options), stored_bytes)[1:]]
    bnb_quantize = bnb_functional.quantize_4bit if theirs else None
    rows = []
    if "quantize" in ops:
        rows.append(Row(
            "quantize", shape, name, "-", time_it([partial(F4.quantize_4bit, w, **options) for w in weights]),
            time_it([w.clone for w in weights]),
            time_it([partial(bnb_quantize, w, **options) for w in weights] if bnb_quantize else []),
            dense_bytes + stored_bytes,
        ))  # fmt: skip
    if "dequantize" in ops:
        rows.append(Row(
            "dequantize", shape, name, "-", time_it([partial(F4.dequantize_4bit, *pair) for pair in ours]),
            time_it([w.clone for w in weights]),
            time_it([partial(bnb_functional.dequantize_4bit, *pair) for pair in theirs_all]),
            dense_bytes + stored_bytes,
        ))  # fmt: skip
    layers = {}
    if "Linear4bit" in ops:
        layers["torch"] = [_dense_layer(w) for w in weights]
        for library, make in _quantized_layers(bnb).items():
            layers[library] = _copies(partial(make, weight, options), stored_bytes)
    for batch in batches if {"matmul_4bit", "Linear4bit"} & set(ops) else ():
        x = torch.randn(batch, k, dtype=dtype, device=device)
        moved = stored_bytes + batch * (n + k) * weight.element_size()
        with torch.inference_mode():
            if "matmul_4bit" in ops:
                rows.append(
                    Row(
                        "matmul_4bit", shape, name, str(batch),
                        time_it([partial(matmul_4bit, x, p.t(), s) for p, s in ours]),
                        time_it([partial(torch.matmul, x, w.t()) for w in weights]),
                        time_it([partial(bnb.matmul_4bit, x, p.t(), s) for p, s in theirs_all]), moved,
                    )
                )  # fmt: skip
            if "Linear4bit" in ops:
                rows.append(
                    Row(
                        "Linear4bit", shape, name, str(batch),
                        time_it([partial(layer, x) for layer in layers["fourbit"]]),
                        time_it([partial(layer, x) for layer in layers["torch"]]),
                        time_it([partial(layer, x) for layer in layers.get("bnb", [])]), moved,
                    )
                )  # fmt: skip
    return rows


def _dense_layer(weight: torch.Tensor) -> torch.nn.Linear:
    """An inference ``nn.Linear`` holding (a copy of) ``weight``."""
    n, k = weight.shape
    dense = torch.nn.Linear(k, n, bias=False, dtype=weight.dtype, device=weight.device)
    dense.weight.data.copy_(weight)
    return dense.eval()


def _quantized_layers(bnb) -> dict[str, Callable[[torch.Tensor, dict], torch.nn.Module]]:
    """Makers of fourbit's (and bitsandbytes') ``Linear4bit`` of a dense weight."""
    from ..nn import Linear4bit

    classes = {"fourbit": Linear4bit, **({"bnb": bnb.nn.Linear4bit} if bnb is not None else {})}
    return {name: partial(_quantized_layer, cls) for name, cls in classes.items()}


def _quantized_layer(cls: type, weight: torch.Tensor, options: dict) -> torch.nn.Module:
    """``cls(...)`` (a ``Linear4bit``) loaded with ``weight`` and moved to its device, in eval mode
    (inference, as served: bitsandbytes repacks its CPU weight only in eval mode)."""
    n, k = weight.shape
    layer = cls(k, n, bias=False, compute_dtype=weight.dtype, compress_statistics=options["compress_statistics"],
                quant_type=options["quant_type"])  # fmt: skip
    layer.load_state_dict({"weight": weight})
    return layer.to(weight.device).eval()


def run(
    shapes: Sequence[tuple[int, int]],
    dtypes: Sequence[torch.dtype],
    batches: Sequence[int],
    device: torch.device,
    quant_type: str = "nf4",
    blocksize: int = 64,
    nested: bool = True,
    min_time: float = 0.5,
    with_bnb: bool = True,
    ops: Sequence[str] = OPS,
    on_rows: Callable[[list[Row]], None] | None = None,
) -> list[Row]:
    """Time ``ops`` (quantize, dequantize, matmul_4bit, Linear4bit: ``OPS``) for each shape (N, K),
    dtype and batch; ``on_rows`` gets each shape's and dtype's rows as soon as they are timed."""
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise ValueError(f"unknown operations {unknown}: the benchmark times {', '.join(OPS)}")
    bnb_modules = _load_bitsandbytes() if with_bnb else (None, None)
    options = dict(blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    rows: list[Row] = []
    for n, k in shapes:
        for dtype in dtypes:
            timed = _shape_rows(n, k, dtype, batches, device, options, bnb_modules, min_time, ops)
            if on_rows is not None:
                on_rows(timed)
            rows += timed
    return rows


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def format_table(rows: Sequence[Row], copy_gbps: float | None = None) -> str:
    """A Markdown table of the rows, with fourbit/torch and fourbit/bitsandbytes ratios, and
    fourbit's bandwidth (its fewest bytes over its time) against the measured copy bandwidth."""
    return "\n".join([table_header(copy_gbps), *(table_line(row, copy_gbps) for row in rows)])


def table_header(copy_gbps: float | None = None) -> str:
    """The first two lines of ``format_table``'s table."""
    header = (
        "| op | shape | dtype | batch | fourbit ms | torch ms | bnb ms | fourbit/torch | fourbit/bnb | fourbit GB/s |"
    )
    header += " % of copy |" if copy_gbps else ""
    return header + "\n|" + "---|" * (header.count("|") - 1)


def _milliseconds(value: float | None) -> str:
    """A time for the table: three decimals, four below 0.1 ms (a few-microsecond product would
    otherwise show as whole microseconds)."""
    if value is None:
        return "-"
    return f"{value:.4f}" if value < 0.1 else f"{value:.3f}"


def table_line(row: Row, copy_gbps: float | None = None) -> str:
    """One row of ``format_table``'s table."""
    bnb_ms, torch_ms, fourbit_ms = (_milliseconds(value) for value in (row.bnb_ms, row.torch_ms, row.fourbit_ms))
    gbps = row.fourbit_bytes / row.fourbit_ms / 1e6 if row.fourbit_bytes and row.fourbit_ms else 0.0
    line = (
        f"| {row.op} | {row.shape} | {row.dtype} | {row.batch} | {fourbit_ms} | {torch_ms} | "
        f"{bnb_ms} | {_ratio(row.fourbit_ms, row.torch_ms)} | {_ratio(row.fourbit_ms, row.bnb_ms)} | "
    )
    line += f"{gbps:.0f} |" if gbps else "- |"
    if copy_gbps:
        line += f" {gbps / copy_gbps:.0%} |" if gbps else " - |"
    return line


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth into a preallocated buffer, bytes read plus bytes written,
    always timed eagerly: a 1 GiB clone replayed in a CUDA graph read 2.77 TB/s on an H200 against
    4.22-4.25 eagerly, which would overstate every "% of copy" of a graph-replay table."""
    source = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    target = torch.empty_like(source)
    milliseconds = _median_ms([lambda: target.copy_(source)], device, 0.5, graphs=False)
    return 2 * nbytes / milliseconds / 1e6


def peak_extra_memory(n: int, k: int, batch: int, device: torch.device, options: dict) -> tuple[int, int]:
    """Peak memory a matmul_4bit forward allocates beyond its output, and the dense weight's size."""
    weight = torch.randn(n, k, dtype=torch.bfloat16, device=device)
    packed, state = F4.quantize_4bit(weight, **options)
    dense_bytes = weight.numel() * weight.element_size()
    del weight
    x = torch.randn(batch, k, dtype=torch.bfloat16, device=device)
    with torch.inference_mode():
        matmul_4bit(x, packed.t(), state)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = matmul_4bit(x, packed.t(), state)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    return peak - before - out.numel() * out.element_size(), dense_bytes


def describe_device(device: torch.device) -> str:
    """A one-line description of the machine the numbers come from."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    import os
    import platform

    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def _positive(text: str) -> int:
    """``--threads``, ``--batches``: a whole number of at least 1 (a usage error otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _weight_shape(text: str) -> tuple[int, int]:
    """``--shapes``: ``NxK``, the weight's rows and columns, each at least 1."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"takes NxK with N and K whole numbers of at least 1, got {text!r}")
    return int(parts[0]), int(parts[1])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``benchmarks/bench_kernels.py`` and ``fourbit bench``)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--shapes", nargs="+", type=_weight_shape, default=[(4096, 4096), (11008, 4096)], help="NxK weight shapes"
    )
    parser.add_argument(
        "--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["float16", "bfloat16", "float32"]
    )
    parser.add_argument("--batches", nargs="+", type=_positive, default=[1, 8, 64])
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS, help="operations to time (default: all)")
    parser.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--no-nested", action="store_true", help="plain float32 absmax instead of nested statistics")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of timing per measurement")
    parser.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes even when installed")
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="time CUDA work as graph replays (no launch overhead)"
    )
    parser.add_argument("--memory", action="store_true", help="report the peak extra memory of a batch-64 forward")
    parser.add_argument(
        "--float32-matmul-precision",
        choices=["highest", "high", "medium"],
        help="torch.set_float32_matmul_precision for every column (fourbit's float32 CPU products take "
        "bfloat16 parts on AMX below 'highest', and on AVX512-BF16 at 'medium')",
    )
    parser.add_argument("--threads", type=_positive, help="torch.set_num_threads for every column (CPU)")
    parser.add_argument(
        "--cold",
        type=int,
        default=0,
        metavar="MIB",
        help="CPU, or CUDA with --cuda-graphs (each replay runs every copy in turn): each column takes turns "
        "over copies of its weight filling this many MiB (more than the last-level cache or L2), so that every "
        "call finds its weight in memory, as a model's layers do each token",
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run_from_args(parser.parse_args(argv))


def run_from_args(args: argparse.Namespace) -> None:
    """Run the benchmark described by parsed options and print its table."""
    global CUDA_GRAPHS, COLD_BYTES
    device = torch.device(args.device)
    if args.cold < 0 or (args.cold and device.type != "cpu" and not args.cuda_graphs):
        raise SystemExit(
            f"--cold takes a positive number of MiB, on the CPU or with --cuda-graphs (got {args.cold} on "
            f"{device.type}); triton's do_bench already clears the GPU's L2 before each eager call"
        )
    CUDA_GRAPHS = args.cuda_graphs
    COLD_BYTES = args.cold << 20
    if args.float32_matmul_precision:
        torch.set_float32_matmul_precision(args.float32_matmul_precision)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shapes = args.shapes
    settings = f"{args.quant_type}, blocksize {args.blocksize}, nested={not args.no_nested}"
    if args.float32_matmul_precision:
        settings += f", float32 matmul precision {args.float32_matmul_precision!r}"
    if args.threads is not None:
        settings += f", {args.threads} thread{'s' if args.threads > 1 else ''}"
    timing = "CUDA graph replays" if CUDA_GRAPHS else "eager calls"
    if COLD_BYTES:
        timing += f", each column taking turns over {args.cold} MiB of weight copies (weights from memory)"
    copy_gbps = copy_bandwidth_gbps(device) if device.type == "cuda" else None
    print(f"# fourbit kernel benchmark: {describe_device(device)}; {settings}; {timing}\n")
    if copy_gbps:
        print(f"measured copy bandwidth: {copy_gbps:.0f} GB/s (read + write)\n")
    # each shape's lines as soon as they are timed, so that a run cut short keeps them
    print(table_header(copy_gbps), flush=True)
    run(
        shapes,
        [getattr(torch, name) for name in args.dtypes],
        args.batches,
        device,
        quant_type=args.quant_type,
        blocksize=args.blocksize,
        nested=not args.no_nested,
        min_time=args.min_time,
        with_bnb=not args.no_bnb,
        ops=args.ops,
        on_rows=lambda rows: print("\n".join(table_line(row, copy_gbps) for row in rows), flush=True),
    )
    if args.memory and device.type == "cuda":
        n, k = shapes[-1]
        options = dict(blocksize=args.blocksize, quant_type=args.quant_type, compress_statistics=not args.no_nested)
        extra, dense = peak_extra_memory(n, k, 64, device, options)
        print(
            f"\npeak extra memory of a batch-64 forward, {n}x{k}: {extra / 2**20:.1f} MiB "
            f"(the dequantized bf16 weight would be {dense / 2**20:.0f} MiB)"
        )
