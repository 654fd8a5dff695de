"""Quantized state dicts to and from safetensors files, in bitsandbytes' key layout.

A 4-bit weight ``W`` is stored as the packed tensor ``W`` plus ``W.absmax``, ``W.quant_map``
(``W.nested_absmax``, ``W.nested_quant_map`` with nested statistics) and
``W.quant_state.bitsandbytes__<nf4|fp4>``, the rest of its QuantState as JSON bytes: exactly what
``Linear4bit.state_dict()`` holds and what bitsandbytes and transformers write. So a checkpoint
saved here loads in bitsandbytes, and one saved by bitsandbytes loads here.

Files are written one tensor at a time (``SafetensorsWriter``) and read one tensor at a time from a
memory map (``iter_tensors``), so neither direction needs the checkpoint twice in memory. The
safetensors package reads; fourbit writes the (simple, documented) format itself because the
package can only write a whole in-memory dict at once.
"""

from __future__ import annotations

import ctypes
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from . import __version__
from .functional import QuantState, check_4bit_state
from .state_dict_layout import PACKED_STATE_MARKER, STATISTICS_KEYS

__all__ = [
    "FORMAT_NAME",
    "CheckpointDescription",
    "CheckpointError",
    "QuantizedTensorInfo",
    "SafetensorsWriter",
    "aligned",
    "describe",
    "fourbit_metadata",
    "iter_tensors",
    "load_state_dict",
    "open_file",
    "quantized_groups",
    "read_metadata",
    "save_state_dict",
]

#: ``__metadata__`` value of "fourbit_format" in files written by fourbit.
FORMAT_NAME = "bitsandbytes-4bit"

_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.complex64: "C64",
}
# names of the safetensors format that not every supported torch release has a dtype for
for _torch_name, _format_name in (
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
    ("float8_e8m0fnu", "F8_E8M0"),
    ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
    ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
):
    if isinstance(getattr(torch, _torch_name, None), torch.dtype):
        _SAFETENSORS_DTYPES[getattr(torch, _torch_name)] = _format_name


#: Tensor dtypes a checkpoint may hold.
SUPPORTED_DTYPES = frozenset(_SAFETENSORS_DTYPES)


class CheckpointError(ValueError):
    """A checkpoint file is missing, not safetensors, corrupt, or holds something unsupported."""


# --------------------------------------------------------------------------- writing


def _umask() -> int:
    """The process's umask (read by setting it and putting it back: Python has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class SafetensorsWriter:
    """Writes a safetensors file one tensor at a time, never holding more than one in memory.

    The header (names, dtypes, shapes, offsets) precedes the data in the format, so tensor bytes
    are spooled to a temporary file next to ``path`` and the final file is assembled on
    ``close()``, then renamed into place: a failure (or leaving the ``with`` block by an
    exception) leaves no partial file at ``path``.
    """

    def __init__(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        self.metadata = {"format": "pt", **(metadata or {})}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise TypeError("safetensors metadata must map str to str")
        if self.path.is_dir():
            raise CheckpointError(f"{self.path} is a directory: name the file to write")
        if not self.path.parent.is_dir():
            raise CheckpointError(f"{self.path.parent}: no such directory")
        self._entries: dict[str, dict[str, Any]] = {}
        # one spool per element size, written out largest first: every tensor then starts at a
        # multiple of its element size (the format allows no padding between tensors)
        self._spools: dict[int, Any] = {}
        self._sizes: dict[int, int] = {}

    def add(self, name: str, tensor: Tensor) -> None:
        """Append one tensor (copied to the CPU if needed; the caller's tensor is not modified)."""
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name!r}: expected a tensor, got {type(tensor).__name__}")
        if name in self._entries:
            raise ValueError(f"duplicate tensor name {name!r}")
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved by the safetensors format and cannot name a tensor")
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"{name!r}: safetensors cannot store {tensor.dtype}")
        data = tensor.detach().to("cpu").contiguous()
        nbytes = data.numel() * data.element_size()
        size = data.element_size()
        if size not in self._spools:
            self._spools[size] = tempfile.TemporaryFile(dir=self.path.parent)  # noqa: SIM115 (closed in close/abort)
            self._sizes[size] = 0
        if nbytes:
            self._spools[size].write((ctypes.c_ubyte * nbytes).from_address(data.data_ptr()))
        start = self._sizes[size]
        self._entries[name] = {"dtype": _SAFETENSORS_DTYPES[data.dtype], "shape": list(data.shape), "size": size,
                               "data_offsets": [start, start + nbytes]}  # fmt: skip
        self._sizes[size] = start + nbytes

    def close(self) -> None:
        """Write the header and the spooled data to ``path`` (atomically), the tensors of the
        largest element size first, so that each starts aligned to its element (as safetensors'
        own writer orders them) and loads as an aligned memory-mapped view."""
        order = sorted(self._spools, reverse=True)
        base, starts = 0, {}
        for size in order:
            starts[size], base = base, base + self._sizes[size]
        entries = {}
        for name, entry in self._entries.items():
            entry = dict(entry)
            first, last = entry["data_offsets"]
            shift = starts[entry.pop("size")]
            entries[name] = {**entry, "data_offsets": [first + shift, last + shift]}
        header = json.dumps({"__metadata__": self.metadata, **entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the format pads the header to 8 bytes
        handle, partial = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".partial")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(len(header).to_bytes(8, "little"))
                out.write(header)
                for size in order:
                    spool = self._spools[size]
                    spool.seek(0)
                    while chunk := spool.read(1 << 24):
                        out.write(chunk)
            os.chmod(partial, 0o666 & ~_umask())  # mkstemp's file is its owner's alone; open()'s is not
            os.replace(partial, self.path)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop everything written so far; ``path`` is not touched."""
        for spool in self._spools.values():
            spool.close()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def fourbit_metadata(extra: Mapping[str, str] | None) -> dict[str, str]:
    """``__metadata__`` entries naming fourbit's version and format, plus ``extra``."""
    return {"fourbit_version": __version__, "fourbit_format": FORMAT_NAME, **(extra or {})}


def save_state_dict(
    source: nn.Module | Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Save a (quantized) model or state dict as safetensors in bitsandbytes' key layout.

    ``source`` is a module (its ``state_dict()``), a mapping, or an iterable of (name, tensor)
    pairs (a generator streams: each tensor may be freed once written). ``metadata`` adds string
    entries to the file's ``__metadata__`` next to fourbit's version and format. Tied tensors are
    written once per name.
    """
    items = source.state_dict().items() if isinstance(source, nn.Module) else source
    if isinstance(items, Mapping):
        items = items.items()
    with SafetensorsWriter(path, fourbit_metadata(metadata)) as writer:
        for name, tensor in items:
            writer.add(name, tensor)


# --------------------------------------------------------------------------- reading


def open_file(path: str | os.PathLike, device: torch.device | str = "cpu") -> Any:
    """``safetensors.safe_open`` with a CheckpointError for a missing or unreadable file."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError as error:
        raise ImportError("reading checkpoints needs safetensors: pip install 'fourbit[safetensors]'") from error

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    device = torch.device(device)
    target = device.type if device.index is None else f"{device.type}:{device.index}"
    try:
        return safe_open(str(path), framework="pt", device=target)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a valid safetensors file ({error})") from error


#: The index transformers writes beside a sharded checkpoint.
SHARD_INDEX_NAME = "model.safetensors.index.json"


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint: one file, the shards an index file names, or a
    folder's (through its ``model.safetensors.index.json`` when it has one)."""
    path = Path(path)
    if path.is_dir():
        index = path / SHARD_INDEX_NAME
        if index.is_file():
            return checkpoint_files(index)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            pickled = sorted(file.name for suffix in ("*.bin", "*.pt", "*.pth") for file in path.glob(suffix))
            hint = (
                f" (it holds {', '.join(pickled[:3])}: load the model and save it with save_pretrained, "
                "which writes safetensors)"
                if pickled
                else ""
            )
            raise CheckpointError(f"{path}: a folder without safetensors files{hint}")
        return files
    if path.name.endswith(".json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{path}: not a safetensors index ({type(error).__name__}: {error})") from None
        if not all(isinstance(name, str) for name in names):
            raise CheckpointError(f"{path}: its weight_map must name files")
        return [path.parent / name for name in names]
    return [path]


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The file's ``__metadata__`` (empty when it has none)."""
    with open_file(path) as handle:
        return dict(handle.metadata() or {})


def aligned(tensor: Tensor) -> Tensor:
    """``tensor``, or a copy of it when its data does not start at a multiple of its element size:
    a file whose tensors lie unaligned (as another writer, or an older fourbit, may lay them out)
    maps them to misaligned views, which some CPU kernels read at other speeds and with other
    results than aligned data."""
    return tensor if tensor.data_ptr() % tensor.element_size() == 0 else tensor.clone()


def iter_tensors(path: str | os.PathLike, device: torch.device | str = "cpu") -> Iterator[tuple[str, Tensor]]:
    """Yield (name, tensor) one at a time, in file order, memory-mapped when on the CPU (copied when
    the file lays a tensor out unaligned: ``aligned``)."""
    with open_file(path, device) as handle:
        for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
            yield name, _read(handle, path, name)


def load_state_dict(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Load a whole safetensors checkpoint as a state dict (tensors memory-mapped on the CPU): one
    file, or a sharded checkpoint's files (its folder or index, ``checkpoint_files``).

    The result loads with ``Linear4bit.load_state_dict`` / ``fourbit.convert.load_quantized``,
    and (for a file from bitsandbytes or transformers) holds bitsandbytes' keys unchanged.
    """
    return {name: tensor for file in checkpoint_files(path) for name, tensor in iter_tensors(file, device)}


# --------------------------------------------------------------------------- structure


def quantized_groups(names: Iterable[str]) -> dict[str, list[str]]:
    """Map each packed 4-bit weight name to the names of its statistics (packed state last).

    Works from names alone, so a file can be described without reading its tensors.
    """
    names = list(names)
    present = set(names)
    groups: dict[str, list[str]] = {}
    for name in names:
        weight, marker, _ = name.partition(PACKED_STATE_MARKER)
        if marker and weight in present:
            stats = [f"{weight}.{suffix}" for suffix in STATISTICS_KEYS if f"{weight}.{suffix}" in present]
            groups[weight] = [*stats, name]
    return groups


@dataclass(frozen=True)
class QuantizedTensorInfo:
    """One 4-bit weight of a checkpoint, as ``fourbit inspect`` lists it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    quant_type: str
    blocksize: int
    nested: bool
    storage: torch.dtype
    nbytes: int


@dataclass(frozen=True)
class CheckpointDescription:
    """What a checkpoint holds: its 4-bit weights, its other tensors, and who wrote it."""

    quantized: list[QuantizedTensorInfo]
    other: list[tuple[str, tuple[int, ...], torch.dtype, int]]
    metadata: dict[str, str]

    @property
    def writer(self) -> str:
        """ "fourbit <version>", "bitsandbytes layout" (another writer), or "plain" (no 4-bit weights)."""
        if self.metadata.get("fourbit_format") == FORMAT_NAME:
            return f"fourbit {self.metadata.get('fourbit_version', '?')}"
        return "bitsandbytes layout" if self.quantized else "plain"


def _read(handle: Any, path: str | os.PathLike, name: str) -> Tensor:
    """One tensor of an open file (``aligned``); CheckpointError when the reader cannot produce it
    (a dtype torch lacks, truncated data)."""
    try:
        tensor = handle.get_tensor(name)
    except Exception as error:  # the Rust reader raises a bare SafetensorError
        raise CheckpointError(f"{path}: cannot read tensor {name!r} ({' '.join(str(error).split())})") from error
    return aligned(tensor)


def describe(path: str | os.PathLike) -> CheckpointDescription:
    """Read a checkpoint's structure: every 4-bit weight's QuantState (validated) and the rest.

    ``path`` is one file, or a sharded checkpoint (its folder or index, ``checkpoint_files``), whose
    4-bit weights may keep their statistics in another shard. Raises CheckpointError when a 4-bit
    weight's statistics are corrupt.
    """
    files = checkpoint_files(path)
    with ExitStack() as stack:
        handles = [(stack.enter_context(open_file(file)), file) for file in files]
        owners = {name: owner for owner in handles for name in owner[0].keys()}  # noqa: SIM118

        def read(name: str) -> Tensor:
            handle, file = owners[name]
            return _read(handle, file, name)

        names = list(owners)
        metadata = dict(handles[0][0].metadata() or {})
        groups = quantized_groups(names)
        grouped = {name for stats in groups.values() for name in stats} | set(groups)
        quantized = []
        for weight, stats in groups.items():
            packed = read(weight)
            entries = {name[len(weight) + 1 :]: read(name) for name in stats}
            try:
                state = QuantState.from_dict(entries, device="cpu")
                check_4bit_state(packed, state, name="quant_state")  # what loading checks
            except (ValueError, TypeError) as error:
                raise CheckpointError(
                    f"{owners[weight][1]}: corrupt 4-bit statistics for {weight!r}: {error}"
                ) from error
            nbytes = sum(t.numel() * t.element_size() for t in (packed, *entries.values()))
            quantized.append(
                QuantizedTensorInfo(
                    weight,
                    tuple(state.shape),
                    state.dtype,
                    state.quant_type,
                    state.blocksize,
                    state.nested,
                    packed.dtype,
                    nbytes,
                )
            )
        other = []
        for name in names:
            if name not in grouped:
                tensor = read(name)  # memory-mapped: nothing is read
                other.append((name, tuple(tensor.shape), tensor.dtype, tensor.numel() * tensor.element_size()))
    return CheckpointDescription(quantized, other, metadata)
