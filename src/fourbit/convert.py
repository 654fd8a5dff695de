"""Whole-model conversion: turn ``nn.Linear`` layers into ``Linear4bit``, and load 4-bit
checkpoints into a model without materialising its full-precision weights.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from torch import Tensor, nn

from . import checkpoint
from . import functional as F4
from .formats import DEFAULT_BLOCKSIZE, FLOAT_DTYPES
from .nn import Linear4bit, Params4bit

__all__ = [
    "DEFAULT_CHECKPOINT_SKIP",
    "ConversionReport",
    "LoadReport",
    "TensorReport",
    "load_quantized",
    "matches",
    "quantize_checkpoint",
    "quantize_model",
    "state_dict_nbytes",
]


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether a module or tensor name matches any pattern.

    A pattern is a shell-style glob (``*``, ``?``, ``[...]``) matched against the whole dotted name
    or against any trailing part of it, so ``"lm_head"`` matches ``"model.lm_head"`` and
    ``"*attention*"`` matches ``"encoder.layer.0.attention.self.query"``.
    """
    parts = name.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    return any(fnmatchcase(suffix, pattern) for pattern in patterns for suffix in suffixes)


def state_dict_nbytes(module: nn.Module) -> int:
    """Bytes of everything ``module.state_dict()`` holds (4-bit statistics included, shared tensors once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in module.state_dict().values():
        nbytes = tensor.numel() * tensor.element_size()
        key = (tensor.data_ptr(), nbytes) if not tensor.is_meta else (id(tensor), nbytes)
        if key not in seen:
            seen.add(key)
            total += nbytes
    return total


@dataclass
class ConversionReport:
    """What ``quantize_model`` did: converted layer names, skipped ones with the reason, bytes."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0

    def __str__(self) -> str:
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else float("nan")
        skipped = "".join(f"\n  kept {name}: {reason}" for name, reason in self.skipped.items())
        return (
            f"converted {len(self.converted)} Linear layers to 4 bits; model state "
            f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB ({ratio:.2f}x smaller)"
            f"{skipped}"
        )


@contextmanager
def _progress(total: int, description: str, enabled: bool | None, unit: str = "layer") -> Iterator[Callable[[], None]]:
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


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, child = name.rpartition(".")
    return (model.get_submodule(path) if path else model), child


def _skip_reason(
    model: nn.Module, name: str, module: nn.Linear, skip: Sequence[str], owners: Mapping[int, list[str]]
) -> str | None:
    """Why a Linear layer must stay as it is, or None to convert it."""
    if matches(name, skip):
        return "matches a skip pattern"
    parent, _ = _parent(model, name)
    if isinstance(parent, nn.MultiheadAttention):
        return "nn.MultiheadAttention reads its projection weights directly"
    sharing = [other for other in owners.get(id(module.weight), []) if other != f"{name}.weight"]
    if sharing:
        return f"weight is tied to {', '.join(sharing)}"
    if module.weight.dtype not in FLOAT_DTYPES:
        supported = ", ".join(str(dtype).removeprefix("torch.") for dtype in FLOAT_DTYPES)
        return f"weight dtype {str(module.weight.dtype).removeprefix('torch.')} is not quantized (only {supported})"
    return None


def quantize_model(
    model: nn.Module,
    quant_type: str = "nf4",
    compute_dtype: torch.dtype | None = None,
    compress_statistics: bool = True,
    blocksize: int = DEFAULT_BLOCKSIZE,
    skip: Sequence[str] = ("lm_head",),
    device: torch.device | str | None = None,
    quant_storage: torch.dtype = torch.uint8,
    progress: bool | None = None,
) -> ConversionReport:
    """Replace every ``nn.Linear`` of ``model`` by a ``Linear4bit``, in place.

    Layers matching a ``skip`` pattern (see ``matches``), projections owned by
    ``nn.MultiheadAttention`` and layers whose weight is tied to another parameter are kept (the
    report says why), and so are layers whose weight is not float32, bfloat16 or float16: every layer
    is checked before any is converted. Each weight is quantized on ``device`` (default: where it is) and its float
    copy is released; biases move with it. Weights on the meta device become not-yet-quantized
    Params4bit (load float weights, then ``.to(device)``). Forward hooks on replaced layers are not
    carried over. ``progress`` shows a tqdm bar (None: when stderr is a terminal).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(skip, str):
        skip = (skip,)
    F4.check_settings(blocksize=blocksize, quant_type=quant_type, quant_storage=quant_storage)
    report = ConversionReport(bytes_before=state_dict_nbytes(model))
    owners: dict[int, list[str]] = {}
    for pname, parameter in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(parameter), []).append(pname)
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not isinstance(module, Linear4bit) and name:
            reason = _skip_reason(model, name, module, skip, owners)
            if reason is None:
                candidates.append((name, module))
            else:
                report.skipped[name] = reason
    if isinstance(model, nn.Linear) and not isinstance(model, Linear4bit):
        raise TypeError("quantize_model converts the Linear layers inside a model; build a Linear4bit directly")
    with _progress(len(candidates), "quantizing", progress) as advance:
        for name, module in candidates:
            parent, child = _parent(model, name)
            layer = _to_linear4bit(
                module, quant_type, compute_dtype, compress_statistics, blocksize, quant_storage, device
            )
            setattr(parent, child, layer)
            report.converted.append(name)
            advance()
    report.bytes_after = state_dict_nbytes(model)
    return report


def _to_linear4bit(
    module: nn.Linear,
    quant_type: str,
    compute_dtype: torch.dtype | None,
    compress_statistics: bool,
    blocksize: int,
    quant_storage: torch.dtype,
    device: torch.device | str | None,
) -> Linear4bit:
    """A Linear4bit holding ``module``'s weight (quantized unless on meta) and bias."""
    target = torch.device(device) if device is not None else module.weight.device
    layer = Linear4bit(
        module.in_features,
        module.out_features,
        bias=module.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=compress_statistics,
        quant_type=quant_type,
        quant_storage=quant_storage,
        device="meta",
        blocksize=blocksize,
    )
    weight = Params4bit(
        module.weight.detach(),
        blocksize=blocksize,
        compress_statistics=compress_statistics,
        quant_type=quant_type,
        quant_storage=quant_storage,
        module=layer,
    )
    layer.weight = weight.to(target) if target.type != "meta" else weight
    if module.bias is not None:
        layer.bias = nn.Parameter(module.bias.detach().to(target), requires_grad=module.bias.requires_grad)
    layer.train(module.training)
    return layer


# --------------------------------------------------------------------------- loading


@dataclass
class LoadReport:
    """What ``load_quantized`` did: converted layers, and keys that did not fit the model."""

    converted: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    left_on_meta: list[str] = field(default_factory=list)


class _Source:
    """Random access to a checkpoint's tensors: a safetensors file (memory-mapped) or a mapping."""

    def __init__(self, source: str | os.PathLike | Mapping[str, Tensor], device: torch.device) -> None:
        self.device = device
        self.label = str(source) if isinstance(source, (str, os.PathLike)) else "state dict"
        if isinstance(source, Mapping):
            self._mapping, self._handle = source, None
            self.names = list(source)
        elif isinstance(source, (str, os.PathLike)):
            self._mapping, self._handle = None, checkpoint.open_file(source, device)
            self.names = list(self._handle.keys())
        else:
            raise TypeError(f"checkpoint must be a path or a mapping of tensors, got {type(source).__name__}")

    def __getitem__(self, name: str) -> Tensor:
        if self._handle is not None:
            try:
                return self._handle.get_tensor(name)
            except Exception as error:  # the Rust reader raises a bare SafetensorError
                raise checkpoint.CheckpointError(f"{self.label}: cannot read tensor {name!r} ({error})") from error
        value = self._mapping[name]
        if not isinstance(value, Tensor):
            raise checkpoint.CheckpointError(f"{self.label}: entry {name!r} is a {type(value).__name__}, not a tensor")
        return value.to(self.device)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, without reading its data."""
        if self._handle is not None:
            return tuple(self._handle.get_slice(name).get_shape())
        value = self._mapping[name]
        return tuple(value.shape) if isinstance(value, Tensor) else ()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)


def _own_tensor_names(module: nn.Module) -> set[str]:
    """Names of the parameters and persistent buffers a module stores itself (not its children's)."""
    names = {name for name, value in module.named_parameters(recurse=False) if value is not None}
    names |= {
        name
        for name, value in module.named_buffers(recurse=False)
        if value is not None and name not in module._non_persistent_buffers_set
    }
    return names


def _packed_settings(source: _Source, stats: Sequence[str]) -> tuple[dict[str, object], tuple[int, ...] | None]:
    """Linear4bit settings and the weight's shape, read from a group's packed QuantState entry
    (small: only its JSON is read)."""
    packed_name = stats[-1]
    try:
        entries = F4.unpack_tensor_to_dict(source[packed_name].cpu())
    except ValueError as error:
        raise checkpoint.CheckpointError(f"{source.label}: entry {packed_name!r}: {error}") from None
    settings = {
        "quant_type": entries.get("quant_type", packed_name.rpartition("__")[2]),
        "blocksize": entries.get("blocksize", DEFAULT_BLOCKSIZE),
        "compress_statistics": "nested_blocksize" in entries,
    }
    shape = entries.get("shape")
    return settings, tuple(shape) if isinstance(shape, list) else None


def load_quantized(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Tensor],
    device: torch.device | str = "cpu",
    compute_dtype: torch.dtype | None = None,
    strict: bool = True,
) -> LoadReport:
    """Load a 4-bit checkpoint (a safetensors path or a state dict) into ``model``, in place.

    Every ``nn.Linear`` whose weight the checkpoint holds in 4 bits becomes a ``Linear4bit`` with
    the checkpoint's settings; all tensors are assigned (not copied) module by module, so a model
    built on the meta device never materialises full-precision weights: peak memory is the
    quantized model plus one module's tensors. Everything that keys, shapes and settings tell is
    checked before the model changes, and any later error puts the model back as it was.
    ``strict`` raises CheckpointError when keys are missing or unexpected, or when a parameter or
    persistent buffer would be left on the meta device; otherwise the returned report lists them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    device = torch.device(device)
    src = _Source(source, device)
    try:
        plan = _plan_load(model, src, compute_dtype, strict)
        undo = _Undo()
        try:
            _apply_load(model, src, plan, undo)
        except BaseException:
            undo.restore()
            raise
        return plan.report
    finally:
        src.close()


@dataclass
class _LoadPlan:
    """What ``load_quantized`` will do, worked out before the model changes."""

    report: LoadReport
    #: module path -> the Linear4bit that replaces its nn.Linear
    replacements: dict[str, Linear4bit]
    #: module path -> {local tensor name: checkpoint name}
    local: dict[str, dict[str, str]]


class _Undo:
    """Records each change ``_apply_load`` makes, and reverts them all."""

    def __init__(self) -> None:
        self._steps: list[Callable[[], None]] = []

    def replaced(self, parent: nn.Module, child: str, original: nn.Module) -> None:
        self._steps.append(lambda: setattr(parent, child, original))

    def loading(self, module: nn.Module) -> None:
        parameters, buffers = dict(module._parameters), dict(module._buffers)
        attributes = {
            name: module.__dict__[name] for name in ("quant_state", "quant_storage") if name in module.__dict__
        }

        def restore() -> None:
            module._parameters.clear()
            module._parameters.update(parameters)
            module._buffers.clear()
            module._buffers.update(buffers)
            module.__dict__.update(attributes)
            module.__dict__.pop("_prepared", None)

        self._steps.append(restore)

    def restore(self) -> None:
        for step in reversed(self._steps):
            step()


def _plan_load(model: nn.Module, src: _Source, compute_dtype: torch.dtype | None, strict: bool) -> _LoadPlan:
    """Check the checkpoint against the model without changing it; raise CheckpointError on misfit."""
    report = LoadReport()
    modules: dict[str, nn.Module] = dict(model.named_modules())
    groups = checkpoint.quantized_groups(src.names)
    owner_of: dict[str, tuple[str, str]] = {}
    replacements: dict[str, Linear4bit] = {}
    for weight, stats in groups.items():
        path, _, attr = weight.rpartition(".")
        module = modules.get(path)
        if attr != "weight" or not isinstance(module, nn.Linear):
            raise checkpoint.CheckpointError(
                f"{src.label}: holds a 4-bit weight {weight!r} but the model has no Linear layer {path!r}"
            )
        settings, shape = _packed_settings(src, stats)
        expected = (module.out_features, module.in_features)
        if shape is not None and shape != expected:
            raise checkpoint.CheckpointError(
                f"{src.label}: 4-bit weight {weight!r} has shape {shape} but layer {path!r} is {expected}"
            )
        if not isinstance(module, Linear4bit):
            replacements[path] = Linear4bit(
                module.in_features, module.out_features, bias=module.bias is not None, compute_dtype=compute_dtype,
                device="meta", **settings,
            )  # fmt: skip
            modules[path] = replacements[path]
            report.converted.append(path)
        for name in (weight, *stats):
            owner_of[name] = (path, name[len(path) + 1 :] if path else name)
    local: dict[str, dict[str, str]] = {}
    for name in src.names:
        path, local_name = owner_of.get(name, (*name.rpartition(".")[::2],))
        module = modules.get(path)
        if module is None or (name not in owner_of and local_name not in _own_tensor_names(module)):
            report.unexpected_keys.append(name)
            continue
        local.setdefault(path, {})[local_name] = name
        if name not in owner_of:
            current = getattr(module, local_name)
            if tuple(current.shape) != src.shape(name):
                raise checkpoint.CheckpointError(
                    f"{src.label}: {name!r} has shape {src.shape(name)} but the model's is {tuple(current.shape)}"
                )
    for path, module in modules.items():
        names = local.get(path, {})
        missing = sorted(_own_tensor_names(module) - set(names))
        report.missing_keys += [f"{path}.{n}" if path else n for n in missing]
        own = (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))
        report.left_on_meta += [
            f"{path}.{n}" if path else n
            for n, tensor in own
            if tensor is not None and tensor.is_meta and n not in names
        ]
    problems = {
        "missing": report.missing_keys,
        "unexpected": report.unexpected_keys,
        "left on the meta device": report.left_on_meta,
    }
    if strict and any(problems.values()):
        detail = "; ".join(f"{kind}: {_preview(names)}" for kind, names in problems.items() if names)
        raise checkpoint.CheckpointError(f"{src.label} does not fit the model ({detail})")
    return _LoadPlan(report, replacements, local)


def _apply_load(model: nn.Module, src: _Source, plan: _LoadPlan, undo: _Undo) -> None:
    """Swap in the planned Linear4bit layers and assign the checkpoint's tensors, module by module."""
    for path, layer in plan.replacements.items():
        parent, child = _parent(model, path)
        undo.replaced(parent, child, getattr(parent, child))
        setattr(parent, child, layer)
    modules = dict(model.named_modules())
    for path, names in plan.local.items():
        module = modules[path]
        tensors = {local_name: src[name] for local_name, name in names.items()}
        undo.loading(module)
        try:
            module.load_state_dict(tensors, strict=False, assign=True)
        except RuntimeError as error:
            raise checkpoint.CheckpointError(f"{src.label}: cannot load module {path!r}: {error}") from error


def _preview(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# --------------------------------------------------------------------------- checkpoint files

#: Tensor-name patterns ``quantize_checkpoint`` keeps in full precision unless told otherwise.
DEFAULT_CHECKPOINT_SKIP = ("*embed*", "lm_head")


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


def _nbytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _plan(name: str, tensor: Tensor, skip: Sequence[str], grouped: set[str]) -> bool:
    """Whether ``quantize_checkpoint`` quantizes this tensor; raises for a dtype it cannot handle."""
    if tensor.dtype not in checkpoint.SUPPORTED_DTYPES:
        raise checkpoint.CheckpointError(
            f"tensor {name!r} has dtype {tensor.dtype}, which fourbit cannot write to safetensors"
        )
    module_name = name.rpartition(".")[0]
    if tensor.dim() != 2 or not tensor.is_floating_point() or name in grouped:
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
    skip: Sequence[str] = DEFAULT_CHECKPOINT_SKIP,
    quant_storage: torch.dtype = torch.uint8,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    progress: bool | None = None,
) -> list[TensorReport]:
    """Quantize every 2-D floating tensor of a safetensors checkpoint into a new one.

    Tensors that are not 2-D floating point (biases, norms), tensors or modules matching ``skip``
    (see ``matches``) and weights already in 4 bits are copied unchanged. Tensors are read and
    written one at a time; the output appears only when complete. Every tensor is checked before
    anything is written. Raises CheckpointError for a missing or corrupt input, an existing output
    (unless ``overwrite``), or a 2-D floating tensor of a dtype 4-bit quantization does not support.
    """
    F4.check_settings(blocksize=blocksize, quant_type=quant_type, quant_storage=quant_storage)
    destination = Path(destination)
    if destination.exists() and not overwrite:
        raise checkpoint.CheckpointError(f"{destination} exists (pass --force / overwrite=True to replace it)")
    if not destination.parent.is_dir():
        raise checkpoint.CheckpointError(f"{destination.parent}: no such directory")
    with checkpoint.open_file(source) as handle:
        names = list(handle.keys())
        groups = checkpoint.quantized_groups(names)
        grouped = {n for stats in groups.values() for n in stats} | set(groups)
        plan = {name: _plan(name, handle.get_tensor(name), skip, grouped) for name in names}
        metadata = {**(handle.metadata() or {}), **checkpoint.fourbit_metadata(None)}
    reports = []
    with (
        checkpoint.SafetensorsWriter(destination, metadata) as writer,
        _progress(len(names), "quantizing", progress, unit="tensor") as advance,
    ):
        for name, tensor in checkpoint.iter_tensors(source):
            if plan[name]:
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
                        tuple(tensor.shape),
                        tensor.dtype,
                        True,
                        _nbytes([tensor]),
                        _nbytes([packed, *entries.values()]),
                        error.abs().mean().item(),
                        (error.norm() / tensor.float().norm().clamp_min(1e-30)).item(),
                    )
                )
            else:
                writer.add(name, tensor)
                nbytes = _nbytes([tensor])
                reports.append(TensorReport(name, tuple(tensor.shape), tensor.dtype, False, nbytes, nbytes))
            advance()
    return reports
