"""Loading a 4-bit checkpoint into a model: every ``nn.Linear`` (or transformers ``Conv1D``) the
checkpoint holds in 4 bits becomes a ``Linear4bit``, tensors are assigned module by module (a meta-device model never
materialises full-precision weights), everything is checked first, and a failed load is undone.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import checkpoint
from . import functional as F4
from .formats import DEFAULT_BLOCKSIZE
from .nn import Linear4bit
from .state_dict_layout import quant_type_of_packed_key
from .validation import check_compute_dtype

__all__ = ["LoadReport", "is_conv1d", "load_quantized", "parent_of"]


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and its kin): a Linear layer whose weight is stored as
    (in, out). Recognized by its class, so that fourbit does not import transformers."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of an ``nn.Linear`` or a ``Conv1D``; None for other modules."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        return tuple(module.weight.shape)
    return None


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding ``name`` and the attribute name under it."""
    path, _, child = name.rpartition(".")
    return (model.get_submodule(path) if path else model), child


@dataclass
class LoadReport:
    """What ``load_quantized`` did: converted layers, and keys that did not fit the model."""

    converted: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    left_on_meta: list[str] = field(default_factory=list)


class _Source:
    """Random access to a checkpoint's tensors: safetensors files (memory-mapped: one file, the
    shards of an index, or a folder's) or a mapping."""

    def __init__(self, source: str | os.PathLike | Mapping[str, Tensor], device: torch.device) -> None:
        self.device = device
        self.label = str(source) if isinstance(source, (str, os.PathLike)) else "state dict"
        self._mapping: Mapping[str, Tensor] | None = None
        self._handles: list = []
        self._where: dict[str, object] = {}
        if isinstance(source, Mapping):
            self._mapping = source
            self.names = list(source)
        elif isinstance(source, (str, os.PathLike)):
            try:
                for file in checkpoint.checkpoint_files(source):
                    handle = checkpoint.open_file(file, device)
                    self._handles.append(handle)
                    for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                        if name in self._where:
                            raise checkpoint.CheckpointError(f"{self.label}: tensor {name!r} is in two shards")
                        self._where[name] = handle
            except BaseException:
                self.close()
                raise
            self.names = list(self._where)
        else:
            raise TypeError(f"checkpoint must be a path or a mapping of tensors, got {type(source).__name__}")

    def __getitem__(self, name: str) -> Tensor:
        if self._mapping is None:
            try:
                tensor = self._where[name].get_tensor(name)
            except Exception as error:  # the Rust reader raises a bare SafetensorError
                raise checkpoint.CheckpointError(f"{self.label}: cannot read tensor {name!r} ({error})") from error
            return checkpoint.aligned(tensor)
        value = self._mapping[name]
        if not isinstance(value, Tensor):
            raise checkpoint.CheckpointError(f"{self.label}: entry {name!r} is a {type(value).__name__}, not a tensor")
        return value.to(self.device)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, without reading its data."""
        if self._mapping is None:
            return tuple(self._where[name].get_slice(name).get_shape())
        value = self._mapping[name]
        return tuple(value.shape) if isinstance(value, Tensor) else ()

    def close(self) -> None:
        for handle in self._handles:
            handle.__exit__(None, None, None)
        self._handles = []


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
        "quant_type": entries.get("quant_type", quant_type_of_packed_key(packed_name)),
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
    """Load a 4-bit checkpoint into ``model``, in place: a safetensors file, a sharded checkpoint
    (its folder or its ``model.safetensors.index.json``), or a state dict.

    Every ``nn.Linear`` whose weight the checkpoint holds in 4 bits becomes a ``Linear4bit`` with
    the checkpoint's settings (a transformers ``Conv1D`` too: its 4-bit weight is stored (out, in),
    as bitsandbytes and ``fourbit quantize`` store it); all tensors are assigned (not copied)
    module by module, so a model built on the meta device never materialises full-precision
    weights: peak memory is the quantized model plus one module's tensors. A parameter the model
    shares between modules (a tied output head) and the checkpoint holds once is shared again.
    Everything that keys, shapes and settings tell is checked before the model changes, and any
    later error puts the model back as it was.
    ``strict`` raises CheckpointError when keys are missing or unexpected, or when a parameter or
    persistent buffer would be left on the meta device; otherwise the returned report lists them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_compute_dtype(compute_dtype)
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
    #: parameter the checkpoint lacks -> the loaded parameter the model ties it to
    ties: dict[str, str] = field(default_factory=dict)


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
        features = linear_features(module) if module is not None else None
        if attr != "weight" or features is None:
            raise checkpoint.CheckpointError(
                f"{src.label}: holds a 4-bit weight {weight!r} but the model has no Linear layer {path!r}"
            )
        settings, shape = _packed_settings(src, stats)
        in_features, out_features = features
        if shape is not None and shape != (out_features, in_features):
            hint = ""
            if is_conv1d(module) and shape == (in_features, out_features):
                hint = " (a Conv1D weight quantized as stored, (in, out): quantize the float checkpoint again)"
            raise checkpoint.CheckpointError(
                f"{src.label}: 4-bit weight {weight!r} has shape {shape} but layer {path!r} is "
                f"{(out_features, in_features)}{hint}"
            )
        if not isinstance(module, Linear4bit):
            replacements[path] = Linear4bit(
                in_features, out_features, bias=module.bias is not None, compute_dtype=compute_dtype,
                device="meta", **settings,
            )  # fmt: skip
            modules[path] = replacements[path]
            report.converted.append(path)
        for name in (weight, *stats):
            owner_of[name] = (path, name[len(path) + 1 :] if path else name)
    local: dict[str, dict[str, str]] = {}
    unsaved: list[str] = []  # non-persistent buffers left on the meta device
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
    ties = _ties(model, local, owner_of, src.label)
    for path, module in modules.items():
        names = {**local.get(path, {}), **{t.rpartition(".")[2]: t for t in ties if t.rpartition(".")[0] == path}}
        missing = sorted(_own_tensor_names(module) - set(names))
        report.missing_keys += [f"{path}.{n}" if path else n for n in missing]
        own = (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))
        for n, tensor in own:
            if tensor is not None and tensor.is_meta and n not in names:
                report.left_on_meta.append(f"{path}.{n}" if path else n)
                if n in module._non_persistent_buffers_set:
                    unsaved.append(report.left_on_meta[-1])
    problems = {
        "missing": report.missing_keys,
        "unexpected": report.unexpected_keys,
        "left on the meta device": report.left_on_meta,
    }
    if strict and any(problems.values()):
        detail = "; ".join(f"{kind}: {_preview(names)}" for kind, names in problems.items() if names)
        if unsaved:
            detail += (
                f". {_preview(unsaved)}: non-persistent buffers, computed in __init__ and never saved; build "
                "the model on the CPU (or assign them) before loading, or pass strict=False and fill them in"
            )
        raise checkpoint.CheckpointError(f"{src.label} does not fit the model ({detail})")
    return _LoadPlan(report, replacements, local, ties)


def _ties(
    model: nn.Module, local: dict[str, dict[str, str]], quantized: Mapping[str, object], label: str
) -> dict[str, str]:
    """Parameters shared by several modules (a tied output head) that the checkpoint holds under
    one name only, as transformers saves them: each missing name -> the loaded one, to share again."""
    shared: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(parameter), []).append(name)
    ties = {}
    for names in shared.values():
        loaded = [n for n in names if n.rpartition(".")[2] in local.get(n.rpartition(".")[0], {})]
        if len(names) < 2 or not loaded or len(loaded) == len(names):
            continue
        if loaded[0] in quantized:
            raise checkpoint.CheckpointError(
                f"{label}: {loaded[0]!r} is in 4 bits but the model ties it to "
                f"{', '.join(n for n in names if n not in loaded)}: a 4-bit weight cannot be shared"
            )
        ties.update(dict.fromkeys((n for n in names if n not in loaded), loaded[0]))
    return ties


def _apply_load(model: nn.Module, src: _Source, plan: _LoadPlan, undo: _Undo) -> None:
    """Swap in the planned Linear4bit layers and assign the checkpoint's tensors, module by module."""
    for path, layer in plan.replacements.items():
        parent, child = parent_of(model, path)
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
    for target, loaded in plan.ties.items():
        module, name = parent_of(model, target)
        undo.loading(module)
        module.register_parameter(name, model.get_parameter(loaded))


def _preview(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
