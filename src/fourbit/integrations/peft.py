"""peft integration: LoRA and DoRA on fourbit's ``Linear4bit``, and merging adapters.

peft recognises bitsandbytes' layers by name and imports bitsandbytes to decode them. Registering
``LoraLinear4bit`` through peft's custom-module hook gives fourbit layers their own LoRA layer:
DoRA decodes with fourbit, and merging dequantizes, adds the adapters and quantizes again::

    config = register_lora(LoraConfig(r=8, target_modules="all-linear", use_dora=True))
    model = get_peft_model(model, config)         # or trl's SFTTrainer(peft_config=config)
    merged, report = merge_and_unload(model)      # 4-bit again; report holds the re-quantization error

peft has no registry of layer types, only that per-config hook, so importing this module also
wraps peft's LoRA dispatch: a config that meets a fourbit layer is registered on the way
(``peft.get_peft_model`` and ``PeftModel.from_pretrained`` with a plain ``LoraConfig`` then give
fourbit layers their own LoRA layer too). Loading a model with ``FourbitConfig`` imports it when
peft is loaded, or once it is (``fourbit.integrations.peft_hook``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .. import functional as F4
from ..convert import dequantize_layer, dequantize_model
from ..nn import Linear4bit

try:
    import peft
    from peft import LoraConfig
    from peft.tuners.lora.dora import DoraLinearLayer
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.model import LoraModel
    from peft.tuners.lora.variants import DoraLinearVariant
    from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fourbit.integrations.peft needs peft (its LoRA variants API, 0.17 or newer): pip install peft"
    ) from error

__all__ = ["LoraLinear4bit", "MergeReport", "get_peft_model", "merge_and_unload", "register_lora"]

logger = logging.getLogger("fourbit")


def _dequantized_weight(layer: nn.Module) -> Tensor:
    """The layer's weight as a float tensor (decoded when it is 4-bit), without autograd history."""
    weight = layer.weight
    if isinstance(layer, Linear4bit):
        with torch.no_grad():
            return F4.dequantize_4bit(weight.data, layer._forward_quant_state())
    return weight.detach()


class _DecodedBase:
    """What peft's DoRA code reads of a base layer (``weight``, ``bias``, ``parameters()``), with a
    4-bit weight decoded by fourbit instead of bitsandbytes."""

    def __init__(self, layer: nn.Module) -> None:
        self._layer = layer

    @property
    def weight(self) -> Tensor:
        return _dequantized_weight(self._layer)

    @property
    def bias(self) -> Tensor | None:
        return self._layer.bias

    def parameters(self) -> Iterator[nn.Parameter]:
        return self._layer.parameters()


class _FourbitDoraVariant(DoraLinearVariant):
    """peft's DoRA for ``Linear``, reading the base weight through ``_DecodedBase``."""

    @staticmethod
    def init(module: LoraLinear, adapter_name: str, **kwargs: Any) -> None:
        if not module.lora_magnitude_vector:
            module.adapter_layer_names = (*module.adapter_layer_names, "lora_magnitude_vector")
        dora_layer = DoraLinearLayer(fan_in_fan_out=getattr(module, "fan_in_fan_out", False))
        dora_layer.update_layer(
            base_layer=_DecodedBase(module.get_base_layer()),
            lora_A=module.lora_A[adapter_name].weight,
            lora_B=module.lora_B[adapter_name].weight,
            scaling=module.scaling[adapter_name],
        )
        module.lora_magnitude_vector[adapter_name] = dora_layer

    @staticmethod
    def forward(module: LoraLinear, active_adapter: str, x: Tensor, result: Tensor, **kwargs: Any) -> Tensor:
        dropout = module.lora_dropout[active_adapter]
        if isinstance(dropout, nn.Identity) or not module.training:
            base_result = result
        else:
            x = dropout(x)
            base_result = None
        return result + module.lora_magnitude_vector[active_adapter](
            x,
            lora_A=module.lora_A[active_adapter],
            lora_B=module.lora_B[active_adapter],
            scaling=module.scaling[active_adapter],
            base_layer=_DecodedBase(module.get_base_layer()),
            base_result=base_result,
            adapter_name=active_adapter,
        )


@dataclass
class MergeError:
    """How far the re-quantized weight of one layer is from the exact merged weight."""

    max_abs: float
    rms: float
    weight_rms: float

    @property
    def relative_rms(self) -> float:
        return self.rms / self.weight_rms if self.weight_rms else 0.0


class _Unmerged(NamedTuple):
    """What a first merge replaced in a 4-bit base layer, for an exact unmerge: the packed weight
    (kept on the CPU, so that merging costs no accelerator memory), the bias, and the merged weight
    that was put in (an unmerge restores only while that one is still in place)."""

    weight: Tensor
    bias: Tensor | None
    merged: Tensor


class LoraLinear4bit(LoraLinear):
    """peft's LoRA ``Linear`` around a fourbit ``Linear4bit``.

    Forward is peft's. DoRA decodes the base weight with fourbit. ``merge`` dequantizes the base
    weight, adds the adapters (DoRA's scaling included) and quantizes the sum again with the same
    settings, recording the error in ``merge_error``. ``unmerge`` puts back the very weight the
    first merge replaced (kept on the CPU meanwhile), so that cycles of ``merge_adapter`` and
    ``unmerge_adapter`` (trl's syncs to vLLM) leave the base weight bit for bit as it was, where
    subtracting and re-quantizing again would let each cycle's rounding add up; when the weight
    was replaced since, it subtracts the adapters and re-quantizes. A base layer that is no longer
    4-bit (see ``merge_and_unload(requantize=False)``) merges as peft's ``Linear``.
    """

    merge_error: MergeError | None = None

    @property
    def lora_variants(self) -> dict:
        return {**super().lora_variants, ("use_dora",): _FourbitDoraVariant}

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        base = self.get_base_layer()
        if not isinstance(base, Linear4bit):
            return super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.lora_A]
        if not names:
            return None
        if self.merged_adapters and any(name in self.lora_variant for name in names):
            raise ValueError(
                f"cannot merge DoRA adapters {names} into a 4-bit weight that already holds merged adapters "
                f"{self.merged_adapters}: its norm needs the unmerged weight; unmerge first"
            )
        original = _dequantized_weight(base).float()
        weight = original
        bias = base.bias.detach().float() if base.bias is not None else None
        for name in names:
            delta = self.get_delta_weight(name).float()
            if name in self.lora_variant:
                magnitude = self.lora_magnitude_vector[name]
                norm = magnitude.get_weight_norm(original, delta, scaling=1).detach()
                self._cache_store(f"{name}-weight_norm", norm)
                weight = (magnitude.weight.float() / norm).view(-1, 1) * (weight + delta)
            else:
                weight = weight + delta
            if self.lora_bias[name]:
                bias = bias + self.lora_B[name].bias.detach().float()
        if safe_merge and not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
            raise ValueError(f"NaNs or infinities in the merged weights: adapters {names} seem to be broken")
        replaced = base.weight
        kept_bias = None if base.bias is None else base.bias.detach().clone()
        self._replace_base(base, weight, bias)
        if not self.merged_adapters and self.__dict__.get("_keep_unmerged", True):  # the weight before any merge
            kept = replaced if replaced.device.type == "cpu" else replaced.to("cpu")  # moved only now
            self.__dict__["_unmerged"] = _Unmerged(kept, kept_bias, base.weight)
        elif self.__dict__.get("_unmerged") is not None:
            self.__dict__["_unmerged"] = self._unmerged._replace(merged=base.weight)
        self.merged_adapters.extend(names)
        return None

    def unmerge(self) -> None:
        base = self.get_base_layer()
        if not isinstance(base, Linear4bit):
            return super().unmerge()
        if not self.merged:
            logger.warning("unmerge: no adapter is merged")
            return None
        unmerged = self.__dict__.pop("_unmerged", None)
        if unmerged is not None and base.weight is unmerged.merged:
            for name in self.merged_adapters:
                if name in self.lora_variant:
                    self._cache_pop(f"{name}-weight_norm")
            self.merged_adapters.clear()
            base.weight = unmerged.weight.to(unmerged.merged.device)
            base.weight.share_state_with_module()
            if unmerged.bias is not None:
                base.bias.data = unmerged.bias
            return None
        weight = _dequantized_weight(base).float()
        bias = base.bias.detach().float() if base.bias is not None else None
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.lora_A:
                continue
            delta = self.get_delta_weight(name).float()
            if name in self.lora_variant:
                norm = self._cache_pop(f"{name}-weight_norm")
                weight = weight / (self.lora_magnitude_vector[name].weight.float() / norm).view(-1, 1) - delta
            else:
                weight = weight - delta
            if self.lora_bias[name]:
                bias = bias - self.lora_B[name].bias.detach().float()
        self._replace_base(base, weight, bias)
        return None

    def _replace_base(self, base: Linear4bit, weight: Tensor, bias: Tensor | None) -> None:
        """Quantize ``weight`` into ``base`` with its settings; record the re-quantization error."""
        old = base.weight
        target = weight.to(base._forward_quant_state().dtype)
        base.weight = old.unquantized_like(target, module=base).to(old.device)
        if bias is not None:
            base.bias.data = bias.to(base.bias.dtype)
        decoded = _dequantized_weight(base).float()
        error = decoded - weight
        self.merge_error = MergeError(
            max_abs=error.abs().max().item(),
            rms=error.pow(2).mean().sqrt().item(),
            weight_rms=weight.pow(2).mean().sqrt().item(),
        )
        logger.info(
            "re-quantized a merged 4-bit weight: max |error| %.3g, rms %.3g (%.2f%% of the weight's rms)",
            self.merge_error.max_abs,
            self.merge_error.rms,
            100 * self.merge_error.relative_rms,
        )

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register_lora(config: LoraConfig) -> LoraConfig:
    """Make ``config`` wrap fourbit ``Linear4bit`` layers in ``LoraLinear4bit`` (peft's custom-module hook).

    Returns the same config. A config read back from disk must be registered again.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"register_lora takes a peft LoraConfig, got {type(config).__name__}")
    config._register_custom_module({Linear4bit: LoraLinear4bit})
    return config


def get_peft_model(model: nn.Module, config: LoraConfig, **kwargs: Any) -> Any:
    """``peft.get_peft_model`` with ``config`` registered for fourbit layers first (``register_lora``)."""
    return peft.get_peft_model(model, register_lora(config), **kwargs)


def _dispatch_fourbit_layers() -> None:
    """Wrap peft's choice of LoRA layer so that a config meeting a fourbit ``Linear4bit`` it has no
    custom layer for is registered first (``register_lora``); peft's generic layer would train
    but fail to merge (it adds to the packed bytes). Idempotent; a peft without the hook is left alone."""
    original = getattr(LoraModel, "_create_new_module", None)
    if original is None or getattr(original, "registers_fourbit_layers", False):
        return

    def create_new_module(lora_config: Any, adapter_name: str, target: nn.Module, **kwargs: Any) -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        custom = getattr(lora_config, "_custom_modules", None) or {}
        fourbit_layer = isinstance(base, Linear4bit) and isinstance(lora_config, LoraConfig)
        if fourbit_layer and not any(isinstance(base, key) for key in custom):
            register_lora(lora_config)
        return original(lora_config, adapter_name, target, **kwargs)

    create_new_module.registers_fourbit_layers = True
    LoraModel._create_new_module = staticmethod(create_new_module)


_dispatch_fourbit_layers()


@dataclass
class MergeReport:
    """What ``merge_and_unload`` did: per merged layer, the re-quantization error (empty when the
    result is full precision), and the 4-bit layers it dequantized."""

    requantized: dict[str, MergeError] = field(default_factory=dict)
    dequantized: list[str] = field(default_factory=list)

    @property
    def max_abs(self) -> float:
        return max((error.max_abs for error in self.requantized.values()), default=0.0)

    @property
    def max_relative_rms(self) -> float:
        return max((error.relative_rms for error in self.requantized.values()), default=0.0)

    def __str__(self) -> str:
        if not self.requantized:
            return f"merged in full precision; dequantized {len(self.dequantized)} 4-bit layers"
        return (
            f"merged and re-quantized {len(self.requantized)} 4-bit layers: max |error| {self.max_abs:.3g}, "
            f"worst rms {100 * self.max_relative_rms:.2f}% of the weight's"
        )


def merge_and_unload(
    model: Any, requantize: bool = True, dtype: torch.dtype | None = None, safe_merge: bool = False
) -> tuple[nn.Module, MergeReport]:
    """Merge the active adapters of a peft model over fourbit layers and return the base model.

    ``requantize=True`` keeps the model 4-bit: each adapted layer is dequantized, merged and
    quantized again (the report holds each layer's error). ``requantize=False`` merges in full
    precision: every 4-bit layer becomes an ``nn.Linear`` in ``dtype`` (default: its compute dtype).
    """
    if not hasattr(model, "merge_and_unload"):
        raise TypeError(f"merge_and_unload takes a peft model, got {type(model).__name__}")
    report = MergeReport()
    adapted = {name: module for name, module in model.named_modules() if isinstance(module, LoraLinear4bit)}
    if not requantize:
        for module in adapted.values():
            base = module.get_base_layer()
            if isinstance(base, Linear4bit):
                module.base_layer = dequantize_layer(base, dtype)
    for module in adapted.values():  # unloaded right after: nothing to unmerge, nothing to keep
        module.__dict__["_keep_unmerged"] = False
    try:
        merged = model.merge_and_unload(safe_merge=safe_merge)
    finally:
        for module in adapted.values():
            module.__dict__.pop("_keep_unmerged", None)
    if requantize:
        report.requantized = {
            name.removeprefix("base_model.model."): module.merge_error
            for name, module in adapted.items()
            if module.merge_error is not None
        }
    else:
        report.dequantized = sorted(name.removeprefix("base_model.model.") for name in adapted)
        report.dequantized += dequantize_model(merged, dtype)
    return merged, report
