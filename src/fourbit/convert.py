"""Whole-model conversion: turn a model's ``nn.Linear`` layers into ``Linear4bit``.

Loading 4-bit checkpoints (``load_quantized``) and file-to-file quantization
(``quantize_checkpoint``) live in ``fourbit.loading`` and ``fourbit.file_quantization``; their
names are re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import functional as F4
from .file_quantization import DEFAULT_CHECKPOINT_SKIP, TensorReport, matches, progress_bar, quantize_checkpoint
from .formats import DEFAULT_BLOCKSIZE, FLOAT_DTYPES
from .loading import LoadReport, is_conv1d, load_quantized, parent_of
from .nn import Linear4bit, Params4bit
from .validation import check_compute_dtype, check_settings

__all__ = [
    "BATCHED_WEIGHT_REASON",
    "DEFAULT_CHECKPOINT_SKIP",
    "ConversionReport",
    "LoadReport",
    "TensorReport",
    "batched_weights",
    "dequantize_layer",
    "dequantize_model",
    "load_quantized",
    "matches",
    "quantize_checkpoint",
    "quantize_model",
    "state_dict_nbytes",
]


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


#: Why ``quantize_model`` keeps a batched (3-D or more) weight such as a mixture-of-experts layer's.
BATCHED_WEIGHT_REASON = "a batched (mixture-of-experts) weight: only Linear layers are quantized"


def batched_weights(model: nn.Module) -> dict[str, int]:
    """Floating parameters of three or more dimensions outside convolutions (transformers 5 keeps a
    mixture-of-experts layer's experts as one 3-D ``gate_up_proj`` and one ``down_proj``), which
    4-bit quantization of Linear layers leaves as they are: name -> number of elements."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            continue
        for pname, parameter in module.named_parameters(recurse=False):
            if parameter.dim() >= 3 and parameter.is_floating_point():
                found[f"{name}.{pname}" if name else pname] = parameter.numel()
    return found


def _skip_reason(
    model: nn.Module, name: str, module: nn.Linear, skip: Sequence[str], owners: Mapping[int, list[str]]
) -> str | None:
    """Why a Linear layer must stay as it is, or None to convert it."""
    if matches(name, skip):
        return "matches a skip pattern"
    parent, _ = parent_of(model, name)
    if isinstance(parent, nn.MultiheadAttention):
        return "nn.MultiheadAttention reads its projection weights directly"
    sharing = [other for other in owners.get(id(module.weight), []) if other != f"{name}.weight"]
    if sharing:
        return f"weight is tied to {', '.join(sharing)}"
    if isinstance(module.weight, Params4bit) or getattr(module.weight, "quant_state", None) is not None:
        return "already holds a 4-bit weight"
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
    """Replace every ``nn.Linear`` of ``model`` by a ``Linear4bit``, in place (transformers'
    ``Conv1D`` layers too, their (in, out) weights transposed, as bitsandbytes' integration does).

    Layers matching a ``skip`` pattern (see ``matches``), projections owned by
    ``nn.MultiheadAttention`` and layers whose weight is tied to another parameter are kept (the
    report says why), and so are layers whose weight is not float32, bfloat16 or float16: every
    layer is checked before any is converted. Batched weights (``batched_weights``: a
    mixture-of-experts layer's 3-D experts) stay in full precision; the report names them. Each
    weight is quantized on ``device`` (default: where it is) and its float copy is released;
    biases move with it. Weights on the meta device become not-yet-quantized Params4bit (load
    float weights, then ``.to(device)``). Forward hooks on replaced layers are not carried over.
    ``progress`` shows a tqdm bar (None: when stderr is a terminal).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(skip, str):
        skip = (skip,)
    check_settings(blocksize=blocksize, quant_type=quant_type, quant_storage=quant_storage)
    check_compute_dtype(compute_dtype)
    report = ConversionReport(bytes_before=state_dict_nbytes(model))
    owners: dict[int, list[str]] = {}
    for pname, parameter in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(parameter), []).append(pname)
    candidates = []
    for name, module in model.named_modules():
        linear = isinstance(module, nn.Linear) and not isinstance(module, Linear4bit)
        if (linear or is_conv1d(module)) and name:
            reason = _skip_reason(model, name, module, skip, owners)
            if reason is None:
                candidates.append((name, module))
            else:
                report.skipped[name] = reason
    report.skipped.update(dict.fromkeys(batched_weights(model), BATCHED_WEIGHT_REASON))
    if isinstance(model, nn.Linear) and not isinstance(model, Linear4bit):
        raise TypeError("quantize_model converts the Linear layers inside a model; build a Linear4bit directly")
    with progress_bar(len(candidates), "quantizing", progress) as advance:
        for name, module in candidates:
            parent, child = parent_of(model, name)
            layer = _to_linear4bit(
                module, quant_type, compute_dtype, compress_statistics, blocksize, quant_storage, device
            )
            setattr(parent, child, layer)
            report.converted.append(name)
            advance()
    report.bytes_after = state_dict_nbytes(model)
    return report


def _to_linear4bit(
    module: nn.Module,
    quant_type: str,
    compute_dtype: torch.dtype | None,
    compress_statistics: bool,
    blocksize: int,
    quant_storage: torch.dtype,
    device: torch.device | str | None,
) -> Linear4bit:
    """A Linear4bit holding ``module``'s weight (quantized unless on meta) and bias; a ``Conv1D``'s
    weight is transposed to Linear's (out, in) order."""
    target = torch.device(device) if device is not None else module.weight.device
    weight = module.weight.detach()
    if is_conv1d(module):
        weight = weight.t()
    out_features, in_features = weight.shape
    layer = Linear4bit(
        in_features,
        out_features,
        bias=module.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=compress_statistics,
        quant_type=quant_type,
        quant_storage=quant_storage,
        device="meta",
        blocksize=blocksize,
    )
    weight = Params4bit(
        weight,
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


def dequantize_layer(layer: Linear4bit, dtype: torch.dtype | None = None) -> nn.Linear:
    """An ``nn.Linear`` holding ``layer``'s dequantized weight (in ``dtype``; default: the layer's
    compute dtype, else the dtype the weight was quantized from) and a copy of its bias."""
    if not isinstance(layer, Linear4bit):
        raise TypeError(f"dequantize_layer takes a Linear4bit, got {type(layer).__name__}")
    weight = layer.weight
    state = layer._forward_quant_state()
    target = dtype or layer.compute_dtype or state.dtype
    if target not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {target}")
    with torch.no_grad():
        dense = F4.dequantize_4bit(weight.data, state).to(target)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = nn.Parameter(dense, requires_grad=False)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.detach().to(target).clone(), requires_grad=layer.bias.requires_grad)
    linear.train(layer.training)
    return linear


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Replace every ``Linear4bit`` of ``model`` by an ``nn.Linear`` with its dequantized weight, in place.

    The inverse of ``quantize_model`` up to quantization error. Every layer is dequantized before
    any is replaced, so a failure leaves the model as it was. Returns the replaced layer names.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, Linear4bit):
        raise TypeError("dequantize_model converts the Linear4bit layers inside a model; use dequantize_layer")
    replacements = [
        (name, dequantize_layer(module, dtype))
        for name, module in model.named_modules()
        if isinstance(module, Linear4bit)
    ]
    for name, linear in replacements:
        parent, child = parent_of(model, name)
        setattr(parent, child, linear)
    return [name for name, _ in replacements]
