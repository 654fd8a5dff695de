"""transformers integration: ``FourbitConfig`` and the quantizer behind ``from_pretrained``.

Importing this module registers the quantization method ``"fourbit"`` with transformers, so that::

    from fourbit.integrations.transformers import FourbitConfig
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=FourbitConfig())

quantizes every ``nn.Linear`` (except the output head and ``skip_modules``) while the checkpoint
streams in, shard by shard, and a saved 4-bit model loads back with ``from_pretrained(path)``.
Checkpoints written by transformers + bitsandbytes load through ``from_pretrained`` below.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ..convert import dequantize_model, quantize_model
from ..formats import DEFAULT_BLOCKSIZE, FLOAT_DTYPES, QUANT_STORAGE_DTYPES, QUANT_TYPES, packed_nbytes
from ..nn import Linear4bit, Params4bit
from ..state_dict_layout import STATISTICS_KEYS, packed_state_key
from ..validation import check_settings

try:
    from transformers import AutoConfig
    from transformers.core_model_loading import ConversionOps, WeightConverter
    from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
    from transformers.quantizers.quantizers_utils import get_module_from_name
    from transformers.utils.quantization_config import QuantizationConfigMixin
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "fourbit.integrations.transformers needs transformers 5 (its quantizer and weight-conversion API); "
        "install it with: pip install 'transformers>=5'"
    ) from error

# after the check that transformers 5 is there (layer_rules imports from it)
from .layer_rules import (
    as_linear_weight,
    conv1d_as_linear,
    tied_linear_layers,
    warn_about_batched_weights,
)
from .peft_hook import teach_peft

__all__ = ["METHOD", "FourbitConfig", "FourbitHfQuantizer", "from_pretrained"]

#: The ``quant_method`` fourbit registers with transformers and writes to config.json.
METHOD = "fourbit"

#: The checkpoint names of one quantized weight, as bitsandbytes and fourbit write them. The packed
#: weight comes first: saving maps the loaded weight back to the first name.
SERIALIZED_WEIGHT_NAMES = [
    "weight",
    *(f"weight.{key}" for key in STATISTICS_KEYS),
    *(f"weight.{packed_state_key(quant_type)}" for quant_type in QUANT_TYPES),
]

_SERIALIZE_AS = ("fourbit", "bitsandbytes")

#: transformers 5.24 and newer (quantizers declare ``get_load_operations``) match source patterns
#: as whole name endings; before, a pattern matched anywhere in a key, in list order.
_ANCHORED_PATTERNS = hasattr(HfQuantizer, "get_load_operations")


def _dtype(value: Any, name: str, allowed: tuple[torch.dtype, ...]) -> torch.dtype | None:
    """A torch dtype from a dtype or its name ("bfloat16", "torch.bfloat16"), checked against ``allowed``."""
    if value is None or isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
    else:
        dtype = None
    if (value is not None and not isinstance(dtype, torch.dtype)) or (dtype is not None and dtype not in allowed):
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(f"{name}={value!r} is not supported; allowed: {names}")
    return dtype


def _module_names(value: Any) -> list[str] | None:
    """``skip_modules`` as a list of names: None stays None, and one string is one name (not its
    characters, which name no module and would leave the named one quantized)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Iterable) or not all(isinstance(name, str) for name in value):
        raise TypeError(f"skip_modules must be a module name or a list of them, got {value!r}")
    return list(value)


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


class FourbitConfig(QuantizationConfigMixin):
    """How ``from_pretrained`` quantizes a model with fourbit (the counterpart of ``BitsAndBytesConfig``).

    Args:
        quant_type: "nf4" (default) or "fp4".
        compress_statistics: quantize the absmax statistics again ("double quantization").
        compute_dtype: dtype of the products; None takes it from each layer's first input.
        quant_storage: dtype the packed bytes are viewed as (uint8, or a float dtype for FSDP).
        blocksize: 4-bit block size; bitsandbytes reads only 64.
        skip_modules: module names kept in full precision (a name covers the modules under it; one
            string is one name).
            None keeps the output head and tied weights; a list replaces that default, as
            bitsandbytes' ``llm_int8_skip_modules`` does (name the head too to keep it), except
            that a layer tied to another module's weight always stays (with a warning).
        serialize_as: "fourbit" writes ``quant_method: fourbit`` to config.json (reloads with
            fourbit); "bitsandbytes" writes bitsandbytes' 4-bit config, so transformers +
            bitsandbytes reload the saved model too (fourbit does, through ``from_pretrained``).
    """

    def __init__(
        self,
        quant_type: str = "nf4",
        compress_statistics: bool = True,
        compute_dtype: torch.dtype | str | None = None,
        quant_storage: torch.dtype | str = torch.uint8,
        blocksize: int = DEFAULT_BLOCKSIZE,
        skip_modules: list[str] | str | None = None,
        serialize_as: str = "fourbit",
        **kwargs: Any,
    ) -> None:
        method = kwargs.pop("quant_method", METHOD)
        if method != METHOD or kwargs:
            raise ValueError(f"FourbitConfig got unknown settings {sorted(kwargs) or {'quant_method': method}}")
        self.quant_method = METHOD
        self.quant_type = quant_type
        self.compress_statistics = bool(compress_statistics)
        self.compute_dtype = _dtype(compute_dtype, "compute_dtype", FLOAT_DTYPES)
        self.quant_storage = _dtype(quant_storage, "quant_storage", QUANT_STORAGE_DTYPES)
        self.blocksize = blocksize
        self.skip_modules = _module_names(skip_modules)
        self.serialize_as = serialize_as
        check_settings(blocksize=blocksize, quant_type=quant_type, quant_storage=self.quant_storage)
        if serialize_as not in _SERIALIZE_AS:
            raise ValueError(f"serialize_as={serialize_as!r} is not supported; allowed: {_SERIALIZE_AS}")
        if serialize_as == "bitsandbytes" and blocksize != 64:
            raise ValueError(
                f"serialize_as='bitsandbytes' needs blocksize=64 (bitsandbytes reads no other), got {blocksize}"
            )

    @classmethod
    def from_bitsandbytes(cls, config: Mapping[str, Any] | QuantizationConfigMixin) -> FourbitConfig:
        """The FourbitConfig equivalent of a bitsandbytes 4-bit config (a ``BitsAndBytesConfig`` or its dict).

        Saving keeps bitsandbytes' format (``serialize_as="bitsandbytes"``).
        """
        settings = dict(config) if isinstance(config, Mapping) else config.to_dict()
        if settings.get("quant_method") != "bitsandbytes" or not settings.get("load_in_4bit", False):
            raise ValueError(
                "only bitsandbytes 4-bit configs (quant_method 'bitsandbytes', load_in_4bit true) have a fourbit "
                f"equivalent; got quant_method={settings.get('quant_method')!r}, "
                f"load_in_4bit={settings.get('load_in_4bit')!r}, load_in_8bit={settings.get('load_in_8bit')!r}"
            )
        return cls(
            quant_type=settings.get("bnb_4bit_quant_type", "fp4"),
            compress_statistics=settings.get("bnb_4bit_use_double_quant", False),
            compute_dtype=settings.get("bnb_4bit_compute_dtype") or torch.float32,
            quant_storage=settings.get("bnb_4bit_quant_storage") or torch.uint8,
            skip_modules=settings.get("llm_int8_skip_modules"),
            serialize_as="bitsandbytes",
        )

    def fourbit_dict(self) -> dict[str, Any]:
        """This config as fourbit's config.json entry (``quant_method: fourbit``), whatever ``serialize_as`` says."""
        return {
            "quant_method": METHOD,
            "quant_type": self.quant_type,
            "compress_statistics": self.compress_statistics,
            "compute_dtype": _dtype_name(self.compute_dtype),
            "quant_storage": _dtype_name(self.quant_storage),
            "blocksize": self.blocksize,
            "skip_modules": self.skip_modules,
            "serialize_as": self.serialize_as,
        }

    def bitsandbytes_dict(self) -> dict[str, Any]:
        """This config as transformers + bitsandbytes write it (``BitsAndBytesConfig.to_dict()``'s keys)."""
        if self.blocksize != 64:
            raise ValueError(f"bitsandbytes reads blocksize 64 only; this config has {self.blocksize}")
        return {
            "quant_method": "bitsandbytes",
            "_load_in_4bit": True,
            "_load_in_8bit": False,
            "load_in_4bit": True,
            "load_in_8bit": False,
            "bnb_4bit_quant_type": self.quant_type,
            "bnb_4bit_use_double_quant": self.compress_statistics,
            "bnb_4bit_compute_dtype": _dtype_name(self.compute_dtype or torch.float32),
            "bnb_4bit_quant_storage": _dtype_name(self.quant_storage),
            "llm_int8_skip_modules": self.skip_modules,
            "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False,
        }

    def to_dict(self) -> dict[str, Any]:
        """The config.json entry ``save_pretrained`` writes: fourbit's or bitsandbytes' (``serialize_as``)."""
        return self.bitsandbytes_dict() if self.serialize_as == "bitsandbytes" else self.fourbit_dict()

    def __iter__(self):
        yield from self.to_dict().items()


class _QuantizeOnLoad(ConversionOps):
    """Quantizes one float weight of a ``Linear4bit`` where transformers materialized it."""

    def __init__(self, hf_quantizer: FourbitHfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], model: nn.Module | None = None, **kwargs: Any) -> dict[str, Any]:
        result = {}
        for name, value in input_dict.items():
            tensor = value[0] if isinstance(value, list) else value
            module, _ = get_module_from_name(model, name)
            tensor = as_linear_weight(module, tensor)
            result[name] = module.weight.unquantized_like(tensor, module=module).to(tensor.device)
            module._is_hf_initialized = True
        return result


class _LoadPrequantized(ConversionOps):
    """Builds a ``Params4bit`` from a checkpoint's packed weight and its statistics."""

    def __init__(self, hf_quantizer: FourbitHfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(
        self,
        input_dict: dict[str, Any],
        model: nn.Module | None = None,
        full_layer_name: str | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        tensors = {key: value[0] if isinstance(value, list) else value for key, value in input_dict.items()}
        module, _ = get_module_from_name(model, full_layer_name)
        if len(tensors) == 1:  # a weight without statistics: kept as it is, or quantized for a 4-bit layer
            tensor = tensors.get("weight")
            if not isinstance(module, Linear4bit) or tensor is None:
                return input_dict
            if not tensor.is_floating_point():  # transformers before 5.24 cast it to the packed dtype
                raise ValueError(
                    f"the checkpoint holds {full_layer_name} in full precision but its quantization config "
                    "makes it 4-bit; add the layer to skip_modules, or load with transformers 5.24 or newer, "
                    "which hands the float weight over uncast so that it is quantized on load"
                )
            module._is_hf_initialized = True
            tensor = as_linear_weight(module, tensor)
            return {"weight": module.weight.unquantized_like(tensor, module=module).to(tensor.device)}
        packed = tensors.pop("weight")
        weight = Params4bit.from_prequantized(packed, tensors, requires_grad=False, device=packed.device, module=module)
        module._is_hf_initialized = True
        return {"weight": weight}


def _packed_placeholder(weight: Params4bit, module: nn.Module) -> Params4bit:
    """A meta weight shaped and typed as the checkpoint's packed one, so that transformers (before
    5.24) does not cast the packed bytes to the model's dtype on the way in."""
    storage = weight.quant_storage
    rows = packed_nbytes(weight.numel()) // storage.itemsize
    return weight.unquantized_like(torch.empty((rows, 1), dtype=storage, device="meta"), module=module)


class FourbitHfQuantizer(HfQuantizer):
    """transformers' side of fourbit: swaps ``nn.Linear`` for ``Linear4bit`` before weights load,
    then quantizes float weights as they arrive or rebuilds packed ones."""

    requires_calibration = False
    quantization_config: FourbitConfig
    serialized_names: ClassVar[dict[str, list[str]]] = {"weight": SERIALIZED_WEIGHT_NAMES}

    @property
    def quantized_element_size(self) -> float:
        return 0.5

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, Mapping) and "disk" in device_map.values():
            raise ValueError("fourbit cannot offload 4-bit layers to disk; give device_map devices only")

    def update_device_map(self, device_map: Any) -> Any:
        if device_map is None:
            device_map = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
        return device_map

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        module, name = get_module_from_name(model, param_name)
        return isinstance(module, Linear4bit) and name == "weight"

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        config = self.quantization_config
        keep = self.get_modules_to_not_convert(
            model, config.skip_modules, getattr(model, "_keep_in_fp32_modules", None)
        )
        keep = keep + tied_linear_layers(model, keep)
        warn_about_batched_weights(model)
        self.modules_to_not_convert = keep
        skip = [pattern for name in keep for pattern in (name, f"{name}.*")]
        transposed = conv1d_as_linear(model, skip)
        quantize_model(
            model,
            quant_type=config.quant_type,
            compute_dtype=config.compute_dtype,
            compress_statistics=config.compress_statistics,
            blocksize=config.blocksize,
            quant_storage=config.quant_storage,
            skip=skip,
            device="meta",
            progress=False,
        )
        for name in transposed:
            model.get_submodule(name).checkpoint_weight_transposed = True
        if self.pre_quantized:
            for module in model.modules():
                if isinstance(module, Linear4bit):
                    module.weight = _packed_placeholder(module.weight, module)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        model.is_loaded_in_4bit = True
        teach_peft()  # peft's LoRA dispatch learns fourbit's layers, now or when peft is imported
        # Saving needs no conversion back: ``Linear4bit``'s state dict already holds the checkpoint's
        # entries. transformers before 5.24 would replay this loader's key patterns in reverse on
        # every key holding "weight", and so write ``weight.absmax.absmax`` and the like.
        conversions = getattr(model, "_weight_conversions", None)
        if conversions:
            model._weight_conversions = [
                conversion
                for conversion in conversions
                if not any(isinstance(op, _LoadPrequantized) for op in getattr(conversion, "operations", ()))
            ]
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        dequantize_model(model, dtype)
        model.is_loaded_in_4bit = False  # peft and trl read it to prepare 4-bit training
        return model

    def get_quantize_ops(self) -> ConversionOps:
        return _QuantizeOnLoad(self)

    def get_load_operations(self) -> dict[str, type[ConversionOps]]:
        return {"deserialize": _LoadPrequantized}

    def get_weight_conversions(self) -> list[WeightConverter]:
        """Collect each packed weight with its statistics (transformers before 5.24 asks only this)."""
        if not self.pre_quantized:
            return []
        names = list(SERIALIZED_WEIGHT_NAMES)
        if not _ANCHORED_PATTERNS:  # the first matching source pattern wins: "weight" must come last
            names = [*names[1:], names[0]]
        return [WeightConverter(source_patterns=names, target_patterns="weight", operations=[_LoadPrequantized(self)])]


def from_pretrained(model_class: Any, path: str, **kwargs: Any) -> Any:
    """``model_class.from_pretrained(path, **kwargs)``, loading a bitsandbytes 4-bit checkpoint through fourbit.

    transformers sends a config.json with ``quant_method: bitsandbytes`` to bitsandbytes; this reads
    the config first and hands such a checkpoint to fourbit instead (bitsandbytes need not be
    installed). The loaded model saves in bitsandbytes' format again. Other checkpoints load as
    ``model_class.from_pretrained`` would load them.
    """
    config = kwargs.pop("config", None)
    if config is None:
        hub = ("revision", "token", "cache_dir", "local_files_only", "trust_remote_code", "subfolder")
        config = AutoConfig.from_pretrained(path, **{key: kwargs[key] for key in hub if key in kwargs})
    settings = getattr(config, "quantization_config", None)
    if settings is not None:
        settings = settings if isinstance(settings, Mapping) else settings.to_dict()
        if settings.get("quant_method") == "bitsandbytes":
            config.quantization_config = FourbitConfig.from_bitsandbytes(settings).fourbit_dict()
    return model_class.from_pretrained(path, config=config, **kwargs)


def _register() -> None:
    """Register the method with transformers once (importing this module twice is harmless)."""
    if METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(METHOD)(FourbitConfig)
    if METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(METHOD)(FourbitHfQuantizer)


_register()
