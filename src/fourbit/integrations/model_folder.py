"""transformers model folders for file-to-file quantization: what holds each tensor of the
checkpoint, read from config.json (which 2-D tensors are ``nn.Linear`` weights, which are
``Conv1D`` weights stored (in, out), which are neither: embeddings, tied heads), so that
``fourbit quantize`` makes the choices ``quantize_model`` and bitsandbytes' integration make
without loading the model; and the files beside the weights that let the quantized folder load
with ``from_pretrained``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import SHARD_INDEX_NAME
from ..loading import is_conv1d

__all__ = [
    "WEIGHT_SUFFIXES",
    "checkpoint_layers",
    "config_folder",
    "folder_files",
    "kept_layers",
    "quantization_method",
]

#: Files of a model folder that hold weights (in any format): ``folder_files`` does not copy them.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz")


def config_folder(checkpoint_path: str | os.PathLike) -> Path | None:
    """The folder whose config.json describes a checkpoint (a model folder, a file in it, or its
    index), or None when there is no config.json."""
    path = Path(checkpoint_path)
    folder = path if path.is_dir() else path.parent
    return folder if (folder / "config.json").is_file() else None


def checkpoint_layers(folder: str | os.PathLike) -> dict[str, str]:
    """Tensor name -> ``"linear"``, ``"conv1d"``, ``"tied"`` or ``"other"`` (see
    ``fourbit.file_quantization.LAYER_KINDS``) for every 2-D floating parameter of the model
    that ``folder``'s config.json describes, built on the meta device (no weights are read).

    Names are given both with and without the model's ``base_model_prefix`` (checkpoints use
    either). A layer's weight tied to another parameter is ``"tied"`` and projections inside
    ``nn.MultiheadAttention`` are ``"other"``: ``quantize_model`` keeps both. Raises ImportError
    without transformers and ValueError for a folder transformers cannot build a model from.
    """
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            "reading layer kinds from config.json needs transformers: pip install transformers"
        ) from error
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder))
        architecture = next(iter(getattr(config, "architectures", None) or []), None)
        model_class = getattr(transformers, architecture, None) if architecture else None
        with torch.device("meta"):
            model = model_class(config) if model_class is not None else transformers.AutoModel.from_config(config)
    except Exception as error:  # an unknown model type, remote code, a malformed config: all say why
        raise ValueError(f"{folder}: transformers cannot build the model config.json describes ({error})") from error
    owners: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    tied = {key for pair in (getattr(model, "all_tied_weights_keys", None) or {}).items() for key in pair}
    kinds: dict[str, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for pname, parameter in module.named_parameters(recurse=False):
            if parameter.dim() != 2 or not parameter.is_floating_point():
                continue
            full = f"{name}.{pname}" if name else pname
            kinds[full] = _kind(module, pname, shared=owners[id(parameter)] > 1 or full in tied)
    kinds.update(_multihead_projections(model))
    prefix = getattr(model, "base_model_prefix", "")
    if prefix:
        variants = {}
        for name, kind in kinds.items():
            other = name.removeprefix(f"{prefix}.") if name.startswith(f"{prefix}.") else f"{prefix}.{name}"
            variants.setdefault(other, kind)
        kinds = {**variants, **kinds}
    return kinds


def _kind(module: nn.Module, parameter: str, shared: bool) -> str:
    layer = "conv1d" if is_conv1d(module) else "linear" if isinstance(module, nn.Linear) else None
    if parameter != "weight" or layer is None:
        return "other"
    return "tied" if shared else layer


def _multihead_projections(model: nn.Module) -> dict[str, str]:
    """The Linear weights inside ``nn.MultiheadAttention`` layers: its forward reads them directly."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            for child, sub in module.named_modules():
                if child and isinstance(sub, nn.Linear):
                    found[f"{name}.{child}.weight" if name else f"{child}.weight"] = "other"
    return found


def kept_layers(layers: Mapping[str, str], quantized: Mapping[str, bool]) -> list[str]:
    """The quantized folder's ``skip_modules``, so that ``from_pretrained`` keeps as they are the
    Linear and ``Conv1D`` layers whose weight the checkpoint holds in full precision
    (``quantized``: tensor name -> whether it was quantized) and the tied ones (saved or not)."""
    kept = {name for name, done in quantized.items() if not done and layers.get(name) in ("linear", "conv1d")}
    tied = {name for name, kind in layers.items() if kind == "tied"}
    prefixed = {name for name in tied if any(other != name and name.endswith(f".{other}") for other in tied)}
    return sorted({name.removesuffix(".weight") for name in kept | (tied - prefixed)})


def quantization_method(folder: str | os.PathLike) -> str | None:
    """The ``quant_method`` of the model ``folder``'s config.json, None for a float model."""
    config = json.loads((Path(folder) / "config.json").read_text())
    settings = config.get("quantization_config")
    return str(settings.get("quant_method", "an unnamed method")) if isinstance(settings, dict) else None


def folder_files(folder: str | os.PathLike, quantization_config: Mapping[str, object]) -> dict[str, bytes]:
    """What a quantized copy of the model ``folder`` needs beside its weights to load with
    ``from_pretrained``: config.json with ``quantization_config`` (replacing any), and every other
    file at the folder's top level (tokenizer, generation config, chat template) but weights
    (``WEIGHT_SUFFIXES``) and the shard index, which are written anew."""
    folder = Path(folder)
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name != SHARD_INDEX_NAME:
            files[path.name] = path.read_bytes()
    config = json.loads(files["config.json"])
    config["quantization_config"] = dict(quantization_config)
    files["config.json"] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    return files
