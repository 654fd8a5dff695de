"""File-to-file quantization: a safetensors checkpoint in, its 4-bit version out, one tensor at a
time (nothing from ``fourbit.nn`` is needed), and the name patterns that choose what stays in
full precision.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import checkpoint
from . import functional as F4
from .formats import DEFAULT_BLOCKSIZE, FLOAT_DTYPES
from .validation import check_settings

__all__ = ["DEFAULT_CHECKPOINT_SKIP", "LAYER_KINDS", "TensorReport", "matches", "progress_bar", "quantize_checkpoint"]


def matches(name: str, patterns: Iterable[str] | str) -> bool:
    """Whether a module or tensor name matches any pattern (one string is one pattern).

    A pattern is a shell-style glob (``*``, ``?``, ``[...]``) matched against the whole dotted name
    or against any trailing part of it, so ``"lm_head"`` matches ``"model.lm_head"`` and
    ``"*attention*"`` matches ``"encoder.layer.0.attention.self.query"``.
    """
    if isinstance(patterns, str):
        patterns = (patterns,)
    parts = name.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    return any(fnmatchcase(suffix, pattern) for pattern in patterns for suffix in suffixes)


@contextmanager
def progress_bar(
    total: int, description: str, enabled: bool | None, unit: str = "layer"
) -> Iterator[Callable[[], None]]:
    """A tqdm bar when tqdm is installed and ``enabled`` (None: only when stderr is a terminal)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    bar = None
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            bar = tqdm(total=total, desc=description, unit=unit)
    try:
        yield (bar.update if bar is not None else lambda: None)
    finally:
        if bar is not None:
            bar.close()


#: Tensor-name patterns ``quantize_checkpoint`` keeps in full precision unless told otherwise.
DEFAULT_CHECKPOINT_SKIP = ("*embed*", "lm_head")

#: What ``quantize_checkpoint``'s ``layers`` may say of a tensor: a ``nn.Linear`` weight (out, in),
#: a transformers ``Conv1D`` weight (in, out), a layer's weight tied to another parameter (an
#: output head sharing the embedding: kept), or anything else (an embedding table: kept).
LAYER_KINDS = ("linear", "conv1d", "tied", "other")


@dataclass(frozen=True)
class TensorReport:
    """One tensor of a quantized checkpoint: what happened to it and what it cost."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    quantized: bool
    bytes_before: int
    bytes_after: int
    mean_abs_error: float = 0.0
    relative_error: float = 0.0
    #: a ``Conv1D`` weight, quantized as its transpose (``shape`` is the stored one)
    transposed: bool = False


def _nbytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _plan(name: str, tensor: Tensor, skip: Sequence[str], grouped: set[str], kind: str | None) -> bool:
    """Whether ``quantize_checkpoint`` quantizes this tensor (``kind``: its entry in ``layers``);
    raises for a dtype it cannot handle."""
    if tensor.dtype not in checkpoint.SUPPORTED_DTYPES:
        raise checkpoint.CheckpointError(
            f"tensor {name!r} has dtype {tensor.dtype}, which fourbit cannot write to safetensors"
        )
    module_name = name.rpartition(".")[0]
    if tensor.dim() != 2 or not tensor.is_floating_point() or name in grouped or kind in ("tied", "other"):
        return False
    if matches(name, skip) or (module_name and matches(module_name, skip)):
        return False
    if tensor.dtype not in FLOAT_DTYPES:
        raise checkpoint.CheckpointError(
            f"tensor {name!r} has dtype {tensor.dtype}; 4-bit quantization supports float16, bfloat16 and "
            "float32 (keep it with --skip)"
        )
    return True


def quantize_checkpoint(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    quant_type: str = "nf4",
    blocksize: int = DEFAULT_BLOCKSIZE,
    compress_statistics: bool = True,
    skip: Sequence[str] | str = DEFAULT_CHECKPOINT_SKIP,
    quant_storage: torch.dtype = torch.uint8,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    progress: bool | None = None,
    layers: Mapping[str, str] | None = None,
    extra_files: Callable[[list[TensorReport]], Mapping[str, bytes]] | None = None,
) -> list[TensorReport]:
    """Quantize every 2-D floating tensor of a safetensors checkpoint into a new one.

    Tensors that are not 2-D floating point (biases, norms), tensors or modules matching ``skip``
    (see ``matches``) and weights already in 4 bits are copied unchanged. ``layers`` maps tensor
    names to what holds them (``LAYER_KINDS``; ``fourbit.integrations.transformers.checkpoint_layers``
    reads it from a model folder's config.json): ``"tied"`` and ``"other"`` tensors are kept, and ``"conv1d"``
    weights are quantized as their (out, in) transpose, as bitsandbytes stores them; names it
    lacks follow the rule above. Tensors are read and
    written one at a time; the output appears only when complete. Every tensor is checked before
    anything is written. Raises CheckpointError for a missing or corrupt input, an existing output
    (unless ``overwrite``), or a 2-D floating tensor of a dtype 4-bit quantization does not support.

    A sharded checkpoint (a folder of safetensors files, or its ``model.safetensors.index.json``)
    becomes a folder at ``destination`` holding each shard quantized under its own name, and a new
    index when the source had one; the checkpoint's other files (config, tokenizer) are not copied,
    but ``extra_files``, called with the reports once every shard is written, returns files (name
    -> bytes) to write beside them before the folder appears
    (``fourbit.integrations.model_folder.folder_files``). A single file takes no ``extra_files``.
    """
    check_settings(blocksize=blocksize, quant_type=quant_type, quant_storage=quant_storage)
    layers = dict(layers or {})
    unknown = sorted({kind for kind in layers.values() if kind not in LAYER_KINDS})
    if unknown:
        raise ValueError(f"layers: unknown layer kinds {unknown} (expected one of {LAYER_KINDS})")
    source, destination = Path(source), Path(destination)
    sharded = source.is_dir() or source.name.endswith(".json")
    if sharded and (source if source.is_dir() else source.parent).resolve().is_relative_to(destination.resolve()):
        raise checkpoint.CheckpointError(
            f"{destination} holds the checkpoint being quantized: replacing it would delete the input and the "
            "folder's other files (config, tokenizer); write the output elsewhere"
        )
    if destination.exists() and not overwrite:
        raise checkpoint.CheckpointError(f"{destination} exists (pass --force / overwrite=True to replace it)")
    if not destination.parent.is_dir():
        raise checkpoint.CheckpointError(f"{destination.parent}: no such directory")
    if sharded:
        settings = dict(quant_type=quant_type, blocksize=blocksize, compress_statistics=compress_statistics,
                        skip=skip, quant_storage=quant_storage, device=device, progress=progress,
                        layers=layers)  # fmt: skip
        return _quantize_shards(source, destination, settings, extra_files)
    if extra_files is not None:
        raise ValueError("extra_files needs a sharded checkpoint (a folder): a single file has nowhere to put them")
    if destination.is_dir():
        raise checkpoint.CheckpointError(f"{destination} is a folder: name the file to write")
    with checkpoint.open_file(source) as handle:
        names = list(handle.keys())
        groups = checkpoint.quantized_groups(names)
        grouped = {n for stats in groups.values() for n in stats} | set(groups)
        plan = {name: _plan(name, handle.get_tensor(name), skip, grouped, layers.get(name)) for name in names}
        metadata = {**(handle.metadata() or {}), **checkpoint.fourbit_metadata(None)}
    reports = []
    with (
        checkpoint.SafetensorsWriter(destination, metadata) as writer,
        progress_bar(len(names), "quantizing", progress, unit="tensor") as advance,
    ):
        for name, stored in checkpoint.iter_tensors(source):
            if plan[name]:
                transposed = layers.get(name) == "conv1d"
                tensor = stored.t().contiguous() if transposed else stored
                packed, state = F4.quantize_4bit(
                    tensor.to(device),
                    blocksize=blocksize,
                    compress_statistics=compress_statistics,
                    quant_type=quant_type,
                    quant_storage=quant_storage,
                )
                entries = state.as_dict(packed=True)
                writer.add(name, packed)
                for key, value in entries.items():
                    writer.add(f"{name}.{key}", value)
                error = (F4.dequantize_4bit(packed, state).float() - tensor.to(device).float()).cpu()
                reports.append(
                    TensorReport(
                        name,
                        tuple(stored.shape),
                        tensor.dtype,
                        True,
                        _nbytes([tensor]),
                        _nbytes([packed, *entries.values()]),
                        error.abs().mean().item(),
                        (error.norm() / tensor.float().norm().clamp_min(1e-30)).item(),
                        transposed,
                    )
                )
            else:
                writer.add(name, stored)
                nbytes = _nbytes([stored])
                reports.append(TensorReport(name, tuple(stored.shape), stored.dtype, False, nbytes, nbytes))
            advance()
    return reports


def _quantize_shards(
    source: Path,
    destination: Path,
    settings: dict[str, Any],
    extra_files: Callable[[list[TensorReport]], Mapping[str, bytes]] | None,
) -> list[TensorReport]:
    """``quantize_checkpoint`` for a sharded checkpoint: every shard into a staging folder beside
    ``destination``, the index, then the folder renamed into place, so that a failure leaves
    nothing at ``destination`` (and an output being replaced stays whole until the new one is)."""
    files = checkpoint.checkpoint_files(source)
    indexed = source.name.endswith(".json") or (source / checkpoint.SHARD_INDEX_NAME).is_file()
    if len({file.name for file in files}) < len(files):
        raise checkpoint.CheckpointError(f"{source}: two shards share a file name")
    staging = destination.parent / f".{destination.name}-{uuid.uuid4().hex[:12]}.partial"
    staging.mkdir()  # the mode a plain folder gets (mkdtemp's is its owner's alone)
    try:
        reports, weight_map = [], {}
        for file in files:
            reports += quantize_checkpoint(file, staging / file.name, **settings)
            with checkpoint.open_file(staging / file.name) as handle:
                weight_map.update(dict.fromkeys(handle.keys(), file.name))
        if indexed:
            total = sum(report.bytes_after for report in reports)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (staging / checkpoint.SHARD_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        for name, data in (extra_files(reports) if extra_files is not None else {}).items():
            if Path(name).name != name or (staging / name).exists():
                raise checkpoint.CheckpointError(f"extra file {name!r}: not a plain file name, or a shard's")
            (staging / name).write_bytes(data)
        _move_into_place(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return reports


def _move_into_place(staging: Path, destination: Path) -> None:
    """Rename ``staging`` to ``destination``; an existing output is set aside first and removed
    only once the new one is in place."""
    if not destination.exists():
        staging.rename(destination)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{destination.name}-old-", dir=destination.parent)) / destination.name
    destination.rename(aside)
    try:
        staging.rename(destination)
    except BaseException:
        aside.rename(destination)
        raise
    if aside.is_dir():
        shutil.rmtree(aside.parent, ignore_errors=True)
    else:
        aside.unlink()
        aside.parent.rmdir()
