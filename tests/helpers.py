"""Small helpers shared by the test modules."""

from __future__ import annotations

import hashlib
import io
import os

import pytest
import torch

import fourbit as bnb

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DTYPE_IDS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.uint8: "u8"}
STORAGES = [torch.uint8, torch.float16, torch.bfloat16, torch.float32]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
TRUE_FALSE = [False, True]


def describe_dtype(dtype: torch.dtype) -> str:
    """A short test id for a dtype."""
    return DTYPE_IDS.get(dtype, str(dtype).removeprefix("torch."))


def available_devices() -> list[str]:
    """'cpu', plus 'cuda' when a GPU is present; FOURBIT_TEST_DEVICES (for example "cuda") keeps
    only the devices it names, so that the GPU session need not repeat the CPU cases CI runs."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    chosen = os.environ.get("FOURBIT_TEST_DEVICES")
    if not chosen:
        return devices
    names = [name.strip() for name in chosen.split(",") if name.strip()]
    unknown = sorted(set(names) - {"cpu", "cuda"})
    if unknown:
        raise ValueError(f"FOURBIT_TEST_DEVICES names unknown devices {unknown}: use cpu, cuda or both")
    return [device for device in devices if device in names]


def canonical(tensor: torch.Tensor, zero_sign: bool = False) -> torch.Tensor:
    """The tensor's bytes with every NaN made one NaN, and (unless ``zero_sign``) every zero +0.0.

    NaN payloads are the one thing bitsandbytes does not keep consistent between its code paths.
    The golden files' digests also ignore the sign of zero; bit comparisons keep it.
    """
    flat = tensor.detach().contiguous().view(-1).cpu()
    if flat.is_floating_point():
        flat = torch.where(flat.isnan(), torch.full_like(flat, float("nan")).abs(), flat)
        if not zero_sign:
            flat = torch.where(flat == 0, torch.zeros_like(flat), flat)
    return flat.view(torch.uint8)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, zero_sign: bool = True) -> None:
    """Same dtype, shape and bytes, the sign of zero included unless ``zero_sign=False`` (NaN
    payloads aside)."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    same = canonical(actual, zero_sign) == canonical(expected, zero_sign)
    assert bool(same.all()), f"{int((~same).sum())} of {same.numel()} bytes differ"


def canonical_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of ``canonical(tensor)`` (the golden files store dequantized output this way)."""
    return hashlib.sha256(canonical(tensor).numpy().tobytes()).hexdigest()


def nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The 4-bit values of a packed tensor, high nibble first (an independent unpacker for tests)."""
    data = packed.reshape(-1).view(torch.uint8).long()
    return torch.stack([data // 16, data % 16], dim=1).reshape(-1)[:numel]


def save_tiny_llama(folder, dtype: torch.dtype = torch.float32, max_shard_size: str | None = None, **sizes) -> str:
    """Save a small random transformers Llama (float) to ``folder``; return its path as a string.

    ``sizes`` override the config (hidden_size, intermediate_size, num_hidden_layers, vocab_size).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    settings.update(sizes)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**settings)).to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **kwargs)
    return str(folder)


#: Token ids the transformers tests feed tiny models (vocabulary 128).
TOKEN_IDS = torch.arange(18).reshape(2, 9) % 128


def causal_lm_logits(model: torch.nn.Module, ids: torch.Tensor = TOKEN_IDS) -> torch.Tensor:
    """A causal language model's logits for ``ids`` (eval mode, no grad), on the CPU."""
    model.eval()
    with torch.no_grad():
        return model(ids.to(model.device)).logits.cpu()


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model.state_dict()``."""
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """The same keys and, for each, the same tensor (wherever each lies)."""
    assert sorted(actual) == sorted(expected)
    different = [key for key in expected if not torch.equal(actual[key].cpu(), expected[key].cpu())]
    assert not different, f"tensors differ: {different[:5]}"


def run_without_bitsandbytes(code: str, timeout: float = 240) -> str:
    """Run ``code`` in a fresh interpreter where ``import bitsandbytes`` fails and it looks uninstalled;
    return its stdout. Raises AssertionError with the output when it fails."""
    import subprocess
    import sys

    prelude = "import sys\nsys.modules['bitsandbytes'] = None\n"
    done = subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done.stdout


def id_formatter(label: str):
    return lambda value: f"{label}={value}"


def torch_save_to_buffer(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def torch_load_from_buffer(buffer: io.BytesIO, weights_only: bool = False):
    buffer.seek(0)
    obj = torch.load(buffer, weights_only=weights_only)
    buffer.seek(0)
    return obj


def make_linear4bit(layer, quant_type, compress_statistics, bias, quant_storage=torch.uint8):
    """A Linear4bit on meta that takes ``layer``'s weights (quantized by a later .to(device)), built
    the way upstream's test builds it."""
    quantized = bnb.nn.Linear4bit(
        layer.in_features,
        layer.out_features,
        bias=bias,
        compute_dtype=None,
        compress_statistics=compress_statistics,
        quant_type=quant_type,
        quant_storage=quant_storage,
        device="meta",
    )
    # as upstream: the assigned Params4bit keeps its default compress_statistics=True
    quantized.weight = bnb.nn.Params4bit(
        data=layer.weight, quant_type=quant_type, requires_grad=False, quant_storage=quant_storage
    )
    if bias:
        quantized.bias = torch.nn.Parameter(layer.bias)
    return quantized


#: torch.compile traces through ``Params4bit`` (a tensor subclass with its own
#: ``__torch_function__``) from torch 2.8; older dynamo treats it as an opaque object and breaks the
#: graph at every 4-bit layer (bitsandbytes' own compile test skips fullgraph below 2.8 alike).
FULLGRAPH_TORCH = torch.__version__ >= (2, 8)
needs_fullgraph = pytest.mark.skipif(
    not FULLGRAPH_TORCH, reason=f"compiling 4-bit layers without graph breaks needs torch 2.8, not {torch.__version__}"
)


def import_transformers():
    """transformers, or a skip where it is missing or refuses this torch (transformers 5 needs
    torch 2.6 and leaves itself half-imported on older torch)."""
    transformers = pytest.importorskip("transformers")
    if not transformers.utils.is_torch_available():
        reason = f"transformers {transformers.__version__} does not support torch {torch.__version__}"
        pytest.skip(reason, allow_module_level=True)
    return transformers


#: transformers 5.24's Llama itself (no 4-bit layer) breaks the graph under
#: ``torch.compile(fullgraph=True)`` on torch 2.8 (in its config views and output capture);
#: its compiled models run from torch 2.11 (checked on 2.11 and 2.13).
needs_compilable_transformers = pytest.mark.skipif(
    torch.__version__ < (2, 11),
    reason=f"transformers' models compile with fullgraph=True from torch 2.11 (checked), not {torch.__version__}",
)


#: The guard-set assertions of ``test_state_buffer`` hold from torch 2.11 (checked there and on 2.13);
#: torch 2.8 guards one more traced argument, which costs time, not correctness.
needs_guard_filter = pytest.mark.skipif(
    torch.__version__ < (2, 11),
    reason=f"the exact guard sets are checked from torch 2.11, not {torch.__version__}",
)
