"""The fourbit command: quantize and inspect safetensors checkpoints, benchmark, run the demo.

Every subcommand has ``--help``. Errors print one line on stderr and exit with status 1 (2 for
usage errors); no partial output file is ever left behind.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .. import __version__, checkpoint
from ..convert import DEFAULT_CHECKPOINT_SKIP, TensorReport, quantize_checkpoint
from ..formats import BLOCKSIZES, DEFAULT_BLOCKSIZE, QUANT_TYPES

__all__ = ["build_parser", "main"]

_STORAGE_DTYPES = {"uint8": torch.uint8, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f}"


# --------------------------------------------------------------------------- quantize


def format_quantize_summary(reports: Sequence[TensorReport]) -> str:
    """The summary table ``fourbit quantize`` prints: tensors, MB before/after, mean error."""
    quantized = [r for r in reports if r.quantized]
    kept = [r for r in reports if not r.quantized]
    lines = [f"{'':<10}{'tensors':>8}{'MB before':>11}{'MB after':>10}{'mean abs err':>14}{'rel err':>9}"]
    for label, group in (("quantized", quantized), ("kept", kept)):
        before = sum(r.bytes_before for r in group)
        after = sum(r.bytes_after for r in group)
        errors = ""
        if label == "quantized" and group:
            abs_err = sum(r.mean_abs_error for r in group) / len(group)
            rel_err = sum(r.relative_error for r in group) / len(group)
            errors = f"{abs_err:>14.5f}{rel_err:>9.4f}"
        lines.append(f"{label:<10}{len(group):>8}{_mb(before):>11}{_mb(after):>10}{errors}")
    before = sum(r.bytes_before for r in reports)
    after = sum(r.bytes_after for r in reports)
    ratio = before / after if after else float("nan")
    lines.append(f"{'total':<10}{len(reports):>8}{_mb(before):>11}{_mb(after):>10}   ({ratio:.2f}x smaller)")
    transposed = sum(r.transposed for r in reports)
    if transposed:
        lines.append(f"({transposed} Conv1D weights, stored (in, out), quantized as (out, in), as bitsandbytes does)")
    batched = [r for r in kept if len(r.shape) >= 3 and r.dtype.is_floating_point]
    if batched:
        lines.append(
            f"({len(batched)} kept tensors of 3 or more dimensions, {_mb(sum(r.bytes_before for r in batched))} MB: "
            "batched weights such as mixture-of-experts layers' are not quantized)"
        )
    return "\n".join(lines)


def _layer_kinds(source: Path, enabled: bool) -> tuple[dict[str, str], Path | None]:
    """What holds each tensor, from the config.json beside the checkpoint when there is one and
    transformers can read it (otherwise a note on stderr, and tensors are chosen by name alone)."""
    from ..integrations.model_folder import checkpoint_layers, config_folder

    folder = config_folder(source) if enabled else None
    if folder is None:
        return {}, None
    try:
        return checkpoint_layers(folder), folder / "config.json"
    except (ImportError, ValueError) as error:
        print(f"fourbit: note: {error}; choosing tensors by name alone", file=sys.stderr)
        return {}, None


def _quantize(args: argparse.Namespace) -> int:
    source, destination = Path(args.input), Path(args.output)
    if source.is_file() and source.resolve() == destination.resolve() and not args.force:
        raise checkpoint.CheckpointError("the output would replace the input (pass --force to allow it)")
    if args.device is not None:
        _check_device(args.device)
    layers, config = _layer_kinds(source, not args.no_config)
    folder = source.is_dir() or source.name.endswith(".json")
    extra_files = _model_files(config.parent, args, layers) if config is not None and folder else None
    reports = quantize_checkpoint(
        source,
        destination,
        quant_type=args.quant_type,
        blocksize=args.blocksize,
        compress_statistics=not args.no_double_quant,
        skip=args.skip,
        quant_storage=_STORAGE_DTYPES[args.quant_storage],
        device=args.device,
        overwrite=args.force,
        progress=None if not args.quiet else False,
        layers=layers,
        extra_files=extra_files,
    )
    if not args.quiet:
        nested = "nested statistics" if not args.no_double_quant else "float32 absmax"
        print(f"{source} -> {destination}: {args.quant_type}, blocksize {args.blocksize}, {nested}")
        if config is not None:
            print(f"layers: as {config} describes them")
        if extra_files is not None:
            print(
                "config.json (with fourbit's quantization_config), tokenizer and the other files copied: "
                f"from_pretrained({str(destination)!r}) loads it once fourbit.integrations.transformers is imported"
            )
        print()
        print(format_quantize_summary(reports))
    return 0


def _model_files(
    folder: Path, args: argparse.Namespace, layers: dict[str, str]
) -> Callable[[list[TensorReport]], dict[str, bytes]] | None:
    """For a transformers model folder: what the quantized folder needs beside its weights to load
    with ``from_pretrained`` (None, with a note, when fourbit's transformers integration cannot
    load here)."""
    from ..integrations.model_folder import folder_files, kept_layers, quantization_method

    try:
        from ..integrations.transformers import FourbitConfig
    except ImportError as error:
        print(f"fourbit: note: {error}; config.json and the tokenizer are not copied", file=sys.stderr)
        return None
    method = quantization_method(folder)
    if method is not None:
        print(
            f"fourbit: note: {folder} holds a model quantized with {method}: its 4-bit weights are copied as "
            "they are, config.json and the tokenizer are not (fourbit loads the folder itself: "
            "fourbit.integrations.transformers.from_pretrained)",
            file=sys.stderr,
        )
        return None
    settings = FourbitConfig(
        quant_type=args.quant_type,
        compress_statistics=not args.no_double_quant,
        quant_storage=_STORAGE_DTYPES[args.quant_storage],
        blocksize=args.blocksize,
    ).fourbit_dict()

    def files(reports: list[TensorReport]) -> dict[str, bytes]:
        kept = kept_layers(layers, {report.name: report.quantized for report in reports})
        return folder_files(folder, {**settings, "skip_modules": kept})

    return files


def _check_device(name: str) -> None:
    """A ValueError naming the problem when ``--device`` is not one this torch can use."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r} is not a device ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch build has no CUDA device available")


# --------------------------------------------------------------------------- inspect


def format_description(path: Path, description: checkpoint.CheckpointDescription, list_all: bool) -> str:
    """What ``fourbit inspect`` prints."""
    lines = [f"{path}: {description.writer}"]
    if description.quantized:
        lines.append("")
        lines.append("| name | shape | dtype | type | blocksize | nested | storage | bytes |")
        lines.append("|---|---|---|---|---:|---|---|---:|")
        for info in description.quantized:
            shape = "x".join(str(size) for size in info.shape)
            dtype = str(info.dtype).removeprefix("torch.")
            storage = str(info.storage).removeprefix("torch.")
            lines.append(
                f"| {info.name} | {shape} | {dtype} | {info.quant_type} | {info.blocksize} | "
                f"{'yes' if info.nested else 'no'} | {storage} | {info.nbytes} |"
            )
    if list_all and description.other:
        lines.append("")
        lines.append("| other tensor | shape | dtype | bytes |")
        lines.append("|---|---|---|---:|")
        for name, shape, dtype, nbytes in description.other:
            lines.append(f"| {name} | {'x'.join(map(str, shape))} | {str(dtype).removeprefix('torch.')} | {nbytes} |")
    packed = sum(info.nbytes for info in description.quantized)
    dense = sum(
        torch.Size(info.shape).numel() * torch.empty((), dtype=info.dtype).element_size()
        for info in description.quantized
    )
    other = sum(entry[3] for entry in description.other)
    hint = "" if list_all or not description.other else " (--all lists them)"
    lines.append("")
    lines.append(f"4-bit tensors: {len(description.quantized)}, {_mb(packed)} MB (unquantized: {_mb(dense)} MB)")
    lines.append(f"other tensors: {len(description.other)}, {_mb(other)} MB{hint}")
    lines.append(f"total: {_mb(packed + other)} MB")
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    path = Path(args.checkpoint)
    print(format_description(path, checkpoint.describe(path), args.all))
    return 0


# --------------------------------------------------------------------------- bench, demo


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    bench.run_from_args(args)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.run_from_args(args)


# --------------------------------------------------------------------------- parser


def _add_quantize(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "quantize",
        help="quantize a safetensors checkpoint to 4 bits",
        description=(
            "Quantize every 2-D floating tensor of a safetensors checkpoint to 4 bits, in bitsandbytes' key "
            "layout. 1-D tensors (biases, norms), non-float tensors and tensors matching --skip are kept as "
            "they are. When a transformers config.json lies beside the checkpoint (and transformers is "
            "installed), only Linear and Conv1D weights are quantized (embeddings and tied weights are kept, "
            "Conv1D weights are transposed as bitsandbytes stores them). Tensors are processed one at a "
            "time; the output appears only when complete. A sharded "
            "checkpoint (a model folder, or its model.safetensors.index.json) becomes a folder of quantized "
            "shards with a new index; a transformers model folder's other files (config.json, given fourbit's "
            "quantization_config, tokenizer) are copied too, so that from_pretrained loads the result."
        ),
    )
    parser.add_argument(
        "input", help="the checkpoint to quantize: a .safetensors file, a folder of them, or their index .json"
    )
    parser.add_argument(
        "-o", "--output", required=True, help="where to write the quantized checkpoint (a folder for a sharded one)"
    )
    parser.add_argument("--quant-type", default="nf4", choices=QUANT_TYPES, help="4-bit data type (default: nf4)")
    parser.add_argument(
        "--blocksize", type=int, default=DEFAULT_BLOCKSIZE, choices=BLOCKSIZES, help="values per absmax (default: 64)"
    )
    parser.add_argument(
        "--no-double-quant", action="store_true", help="store absmax as float32 instead of nested 8-bit statistics"
    )
    parser.add_argument(
        "--skip",
        nargs="*",
        default=list(DEFAULT_CHECKPOINT_SKIP),
        metavar="PATTERN",
        help=(
            "glob patterns of tensor or module names to keep unquantized, matched against the whole name or "
            f"any trailing part of it (default: {' '.join(DEFAULT_CHECKPOINT_SKIP)}; pass --skip alone to "
            "quantize everything)"
        ),
    )
    parser.add_argument(
        "--quant-storage", default="uint8", choices=list(_STORAGE_DTYPES), help="dtype the packed bytes are stored as"
    )
    parser.add_argument("--device", default="cpu", help="device to quantize on (default: cpu)")
    parser.add_argument(
        "--no-config", action="store_true", help="ignore config.json: choose the tensors by shape and --skip alone"
    )
    parser.add_argument("-f", "--force", action="store_true", help="replace the output if it exists")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    parser.set_defaults(handler=_quantize)


def _add_inspect(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "inspect",
        help="list the 4-bit tensors of a checkpoint",
        description=(
            "List the 4-bit tensors of a safetensors checkpoint (shape, type, blocksize, nested statistics, "
            "bytes) with totals, and say whether fourbit or another bitsandbytes-format writer made it."
        ),
    )
    parser.add_argument("checkpoint", help="a .safetensors file, a folder of them, or their index .json")
    parser.add_argument("--all", action="store_true", help="also list the tensors that are not 4-bit")
    parser.set_defaults(handler=_inspect)


def _add_bench(commands: argparse._SubParsersAction) -> None:
    from . import bench

    parser = commands.add_parser(
        "bench",
        help="kernel benchmark table for this machine",
        description=bench.__doc__.splitlines()[0] + " The device is auto-detected (CUDA when available).",
    )
    bench.add_arguments(parser)
    parser.set_defaults(handler=_bench)


def _add_demo(commands: argparse._SubParsersAction) -> None:
    from . import demo

    parser = commands.add_parser(
        "demo",
        help="4-bit all-MiniLM-L6-v2 against fp32 on a retrieval set",
        description=(
            "Quantize the sentence-embedding model all-MiniLM-L6-v2 to NF4 and FP4 and compare it with fp32 on a "
            "shipped retrieval set (size, cosine similarity, retrieval agreement, speed); then save the NF4 model, "
            "reload it and check the embeddings are identical. Needs: pip install 'fourbit[demo]'."
        ),
    )
    demo.add_arguments(parser)
    parser.set_defaults(handler=_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fourbit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fourbit {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    for add in (_add_quantize, _add_inspect, _add_bench, _add_demo):
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("fourbit: interrupted", file=sys.stderr)
        return 130
    except (checkpoint.CheckpointError, ValueError, TypeError, RuntimeError, ImportError, OSError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"fourbit: error: {message}", file=sys.stderr)
        return 1
    except Exception as error:  # anything else still ends in one line, never a traceback
        message = " ".join(str(error).split())
        print(f"fourbit: error: {type(error).__name__}{': ' + message if message else ''}", file=sys.stderr)
        return 1
