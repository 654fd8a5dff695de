"""Which layers of a transformers model ``FourbitConfig`` makes 4-bit, and how: ``Conv1D``
layers become Linear ones (their checkpoint weights transposed on load), an output head tied to
the input embedding stays in full precision, and batched mixture-of-experts weights, which stay
too, are named in a warning.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..convert import batched_weights
from ..file_quantization import matches

__all__ = ["as_linear_weight", "conv1d_as_linear", "tied_linear_layers", "warn_about_batched_weights"]


def conv1d_as_linear(model: nn.Module, skip: list[str]) -> list[str]:
    """Replace transformers' ``Conv1D`` layers (GPT-2 and its kin: a Linear layer whose weight is
    stored as (in, out)) outside ``skip`` by ``nn.Linear`` layers on the meta device, for
    ``quantize_model`` to make 4-bit, as bitsandbytes' integration does; their names, whose float
    checkpoint weights are transposed on load (``checkpoint_weight_transposed``)."""
    names = [
        name for name, module in model.named_modules()
        if isinstance(module, Conv1D) and not matches(name, skip)
    ]  # fmt: skip
    for name in names:
        conv = model.get_submodule(name)
        in_features, out_features = conv.weight.shape
        bias, dtype = conv.bias is not None, conv.weight.dtype
        model.set_submodule(name, nn.Linear(in_features, out_features, bias=bias, device="meta", dtype=dtype))
    return names


def as_linear_weight(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A float checkpoint weight in ``nn.Linear``'s (out, in) order: a former ``Conv1D`` stores it transposed."""
    return tensor.t() if getattr(module, "checkpoint_weight_transposed", False) else tensor


def tied_linear_layers(model: nn.Module, keep: list[str]) -> list[str]:
    """The ``nn.Linear`` layers outside ``keep`` whose weight transformers ties to another module's
    (an output head sharing the input embedding, tied after loading): a 4-bit layer cannot share a
    float weight, so they stay in full precision, as ``quantize_model`` keeps tied layers, with a
    warning that names them."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    partners: dict[str, list[str]] = {}
    for first, second in tied.items():
        partners.setdefault(first, []).append(second)
        partners.setdefault(second, []).append(first)
    modules = dict(model.named_modules())
    found = []
    for key in sorted(partners):
        name = key.removesuffix(".weight")
        covered = any(name == kept or name.startswith(f"{kept}.") for kept in keep)
        if key.endswith(".weight") and isinstance(modules.get(name), nn.Linear) and not covered:
            found.append(name)
            warnings.warn(
                f"{name}: its weight is tied to {', '.join(partners[key])} (tie_word_embeddings), and a "
                "4-bit layer cannot share a float weight: kept in full precision",
                stacklevel=3,
            )
    return found


def warn_about_batched_weights(model: nn.Module) -> None:
    """A warning when mixture-of-experts weights (3-D, not Linear layers) stay in full precision,
    with the share of the model's parameters they hold: a "4-bit" Mixtral is mostly experts."""
    batched = batched_weights(model)
    if batched:
        share = sum(batched.values()) / max(1, sum(p.numel() for p in model.parameters()))
        warnings.warn(
            f"{len(batched)} batched (mixture-of-experts) weights, {100 * share:.0f}% of the model's parameters, "
            f"stay in full precision: fourbit, like bitsandbytes, quantizes Linear layers only "
            f"(first: {next(iter(batched))})",
            stacklevel=3,
        )
