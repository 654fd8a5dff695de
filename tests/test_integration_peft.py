"""peft integration: QLoRA on fourbit layers (LoRA, DoRA), merging into 4-bit or full precision,
prepare_model_for_kbit_training, and no bitsandbytes import on any of these paths."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    available_devices,
    import_transformers,
    needs_compilable_transformers,
    run_without_bitsandbytes,
    save_tiny_llama,
)
from torch import nn

import_transformers()
pytest.importorskip("peft")
from peft import LoraConfig, prepare_model_for_kbit_training  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from fourbit.convert import dequantize_layer, quantize_model  # noqa: E402
from fourbit.integrations import peft as fourbit_peft  # noqa: E402
from fourbit.integrations.transformers import FourbitConfig  # noqa: E402
from fourbit.nn import Linear4bit  # noqa: E402

IDS = torch.arange(64).reshape(4, 16) % 128


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("llama") / "float")


def _trained(path: str, use_dora: bool, steps: int = 6) -> tuple[nn.Module, list[float]]:
    """A 4-bit model with a LoRA (or DoRA) adapter trained a few steps; the losses."""
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=FourbitConfig(), dtype=torch.float32)
    model = prepare_model_for_kbit_training(model)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=use_dora, lora_dropout=0.0)
    model = fourbit_peft.get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    for _ in range(steps):
        ids = IDS.to(model.device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return model, losses


def _logits(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS.to(model.device)).logits.cpu()


@needs_compilable_transformers
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("device", available_devices())
def test_a_compiled_qlora_step_is_one_graph_with_eager_gradients(float_checkpoint: str, device: str, use_dora: bool):
    """A QLoRA training step (4-bit base, LoRA or DoRA on every projection) compiles with
    fullgraph=True, and its loss and adapter gradients match the eager step's."""
    model = AutoModelForCausalLM.from_pretrained(
        float_checkpoint, quantization_config=FourbitConfig(), dtype=torch.float32, device_map=device
    )
    # adapters initialised at random (peft zeroes B by default, which leaves A without a gradient)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False, use_dora=use_dora
    )
    model = fourbit_peft.get_peft_model(model, config)
    model.train()
    ids = IDS.to(device)
    adapters = [parameter for parameter in model.parameters() if parameter.requires_grad]

    def loss() -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    def gradients(loss: torch.Tensor) -> list[torch.Tensor]:
        loss.backward()
        taken = [parameter.grad for parameter in adapters]
        model.zero_grad(set_to_none=True)
        return taken

    eager_loss = loss()
    eager_gradients = gradients(eager_loss)
    compiled_loss = torch.compile(loss, fullgraph=True, backend="aot_eager")()
    compiled_gradients = gradients(compiled_loss)
    assert len(adapters) == (42 if use_dora else 28) and eager_loss.isfinite()  # 14 layers
    assert all(gradient is not None and gradient.abs().sum() > 0 for gradient in eager_gradients)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for compiled, eager in zip(compiled_gradients, eager_gradients, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)


def test_prepare_model_for_kbit_training_turns_gradient_checkpointing_on(float_checkpoint: str):
    model = AutoModelForCausalLM.from_pretrained(float_checkpoint, quantization_config=FourbitConfig())
    assert model.is_loaded_in_4bit
    assert not model.is_gradient_checkpointing
    model = prepare_model_for_kbit_training(model)
    assert model.is_gradient_checkpointing
    # the 4-bit weights stay 4-bit (prepare casts only float16/bfloat16 parameters)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.uint8


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_adapters_train_and_merge(float_checkpoint: str, use_dora: bool):
    model, losses = _trained(float_checkpoint, use_dora)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, fourbit_peft.LoraLinear4bit)
    assert isinstance(layer.get_base_layer(), Linear4bit)
    assert bool(layer.lora_magnitude_vector) == use_dora
    assert losses[-1] < losses[0] - 0.1, losses
    adapted = _logits(model)

    # full precision: the exact merge of the adapted model
    full, report = fourbit_peft.merge_and_unload(copy.deepcopy(model), requantize=False)
    assert not any(isinstance(m, Linear4bit) for m in full.modules())
    assert len(report.dequantized) == 14 and not report.requantized
    torch.testing.assert_close(_logits(full), adapted, rtol=1e-5, atol=1e-5)

    # 4-bit: the full-precision merge quantized again, bit for bit, with the error reported
    merged, report = fourbit_peft.merge_and_unload(model)
    assert len(report.requantized) == 14
    assert all(isinstance(merged.get_submodule(name), Linear4bit) for name in report.requantized)
    requantized = copy.deepcopy(full)
    quantize_model(requantized)
    expected = requantized.state_dict()
    actual = merged.state_dict()
    assert sorted(actual) == sorted(expected)
    assert all(torch.equal(actual[key], expected[key]) for key in expected)
    # the reported error is the measured one, and NF4-sized (about 10% of the weights' rms)
    name = "model.layers.0.mlp.down_proj"
    exact = full.get_submodule(name).weight
    error = dequantize_layer(merged.get_submodule(name)).weight - exact
    assert report.requantized[name].max_abs == pytest.approx(error.abs().max().item(), rel=1e-6)
    assert 0.02 < report.max_relative_rms < 0.2
    difference = (_logits(merged) - adapted).abs().max().item()
    requantization_difference = (_logits(requantized) - _logits(full)).abs().max().item()
    assert difference == pytest.approx(requantization_difference, rel=1e-5)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merge_unmerge_cycles_leave_the_base_bit_for_bit(float_checkpoint: str, use_dora: bool):
    """trl syncs adapters to vLLM by merge_adapter / unmerge_adapter around every generation:
    re-quantizing each way would let every cycle's rounding add up in the base weight."""
    model, _ = _trained(float_checkpoint, use_dora=use_dora, steps=2)
    before, adapted = _state(model), _logits(model)
    layer = model.base_model.model.model.layers[1].mlp.gate_proj
    for _ in range(3):
        model.merge_adapter()
        assert layer.merged and layer.merge_error is not None
        merged = _logits(model)
        model.unmerge_adapter()
        assert not layer.merged
    after = _state(model)
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[key], before[key]) for key in before), "the base changed"
    assert torch.equal(_logits(model), adapted)
    assert (merged - adapted).abs().max().item() < 0.5  # merged: one re-quantization away


class _TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = Linear4bit(256, 512, quant_type="nf4", compute_dtype=torch.bfloat16)
        self.down = Linear4bit(512, 256, quant_type="nf4", compute_dtype=torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.up(x))


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merge_unmerge_cycles_keep_the_bytes_on_every_device(device: str, use_dora: bool):
    """On an accelerator the replaced weight waits on the CPU and comes back in the device's
    layout (tiled on CUDA): the same bytes, the same outputs."""
    torch.manual_seed(0)
    model = _TwoLayers().to(device)
    packed = [model.up.weight.data.clone(), model.down.weight.data.clone()]
    state = _state(model)
    config = LoraConfig(r=8, target_modules=["up", "down"], init_lora_weights=False, use_dora=use_dora)
    adapted = fourbit_peft.get_peft_model(model, fourbit_peft.register_lora(config))
    x = torch.randn(3, 256, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = adapted(x)
        for _ in range(2):
            adapted.merge_adapter()
            adapted.unmerge_adapter()
        actual = adapted(x)
    assert torch.equal(actual, expected)
    bases = [adapted.base_model.model.up.base_layer, adapted.base_model.model.down.base_layer]
    for base, before in zip(bases, packed, strict=True):
        assert base.weight.device.type == device and torch.equal(base.weight.data, before)
    unloaded = _state(adapted.unload())
    assert all(torch.equal(unloaded[key], value) for key, value in state.items())


def test_merge_and_unload_keeps_no_copy_of_the_replaced_weights(float_checkpoint: str):
    """The layers are unloaded right after their merge: keeping what they replaced, for an
    unmerge that cannot come, would hold a second 4-bit model in host memory until the end."""
    model, _ = _trained(float_checkpoint, use_dora=False, steps=1)
    adapted = [module for module in model.modules() if isinstance(module, fourbit_peft.LoraLinear4bit)]
    fourbit_peft.merge_and_unload(model)
    assert adapted and all(module.merged for module in adapted)
    assert not [module for module in adapted if "_unmerged" in module.__dict__ or "_keep_unmerged" in module.__dict__]


def test_an_unmerge_after_the_weight_was_replaced_subtracts_the_adapters(float_checkpoint: str):
    """A weight replaced while merged (loaded, moved) is not the one the merge put in: the
    adapters are subtracted from it and the difference re-quantized, as before."""
    model, _ = _trained(float_checkpoint, use_dora=False, steps=2)
    layer = model.base_model.model.model.layers[1].mlp.gate_proj
    base = layer.get_base_layer()
    before, adapted = base.weight.data.clone(), _logits(model)
    layer.merge()
    base.weight = base.weight.to(base.weight.device)  # the same bytes in another parameter
    layer.unmerge()
    assert not layer.merged
    assert not torch.equal(base.weight.data, before)  # two re-quantizations of one layer
    assert (_logits(model) - adapted).abs().max().item() < 0.5


def test_register_lora_rejects_other_configs():
    with pytest.raises(TypeError, match="LoraConfig"):
        fourbit_peft.register_lora({"r": 8})
    with pytest.raises(TypeError, match="peft model"):
        fourbit_peft.merge_and_unload(nn.Linear(2, 2))


def test_qlora_workflow_never_imports_bitsandbytes(float_checkpoint: str):
    out = run_without_bitsandbytes(
        f"""
import torch
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM
from fourbit.integrations.peft import get_peft_model, merge_and_unload
from fourbit.integrations.transformers import FourbitConfig
ids = torch.arange(32).reshape(2, 16)
for dora in (False, True):
    model = AutoModelForCausalLM.from_pretrained({float_checkpoint!r}, quantization_config=FourbitConfig())
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", use_dora=dora))
    model(input_ids=ids.to(model.device), labels=ids.to(model.device)).loss.backward()
    merged, report = merge_and_unload(model)
    merged(input_ids=ids.to(merged.device))
    print(dora, report)
assert sys.modules.get("bitsandbytes") is None
print("ok")
"""
    )
    assert out.strip().endswith("ok")


def test_plain_peft_gives_fourbit_layers_their_lora_layer(float_checkpoint: str, tmp_path: Path):
    """peft's own functions with a plain LoraConfig (as trl's SFTTrainer and
    ``PeftModel.from_pretrained`` call them) on a model loaded with FourbitConfig: fourbit's LoRA
    layer wraps the 4-bit layers. peft's generic layer trained, but merging added the adapters
    to the packed bytes and failed with a size mismatch. Loading does not import peft (seconds);
    peft imported afterwards, as in a notebook's next cell, learns fourbit's layers then."""
    adapter = tmp_path / "adapter"
    out = run_without_bitsandbytes(
        f"""
import sys, torch
from transformers import AutoModelForCausalLM
from fourbit.integrations.transformers import FourbitConfig
ids = torch.arange(32).reshape(2, 16)
def load():
    return AutoModelForCausalLM.from_pretrained({float_checkpoint!r}, quantization_config=FourbitConfig())
model = load()
ids = ids.to(model.device)
assert "peft" not in sys.modules and "fourbit.integrations.peft" not in sys.modules
from peft import LoraConfig, PeftModel, get_peft_model
assert "fourbit.integrations.peft" in sys.modules
model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
assert type(model.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "LoraLinear4bit"
with torch.no_grad():
    adapted = model(input_ids=ids).logits
model.save_pretrained({str(adapter)!r})
reloaded = PeftModel.from_pretrained(load(), {str(adapter)!r})
assert type(reloaded.base_model.model.model.layers[1].mlp.down_proj).__name__ == "LoraLinear4bit"
with torch.no_grad():
    assert torch.equal(reloaded(input_ids=ids).logits, adapted)
    merged = model.merge_and_unload()(input_ids=ids).logits
    from fourbit.integrations.peft import merge_and_unload
    expected, report = merge_and_unload(reloaded)  # fourbit's merge: the same re-quantized weights
    assert torch.equal(expected(input_ids=ids).logits, merged) and len(report.requantized) == 14
print("ok")
"""
    )
    assert out.strip().endswith("ok"), out


def test_qlora_example_runs(tmp_path: Path):
    pytest.importorskip("trl")
    example = Path(__file__).resolve().parents[1] / "examples" / "qlora_peft.py"
    done = subprocess.run(
        [sys.executable, str(example), "--steps", "8"], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "logits identical: True" in done.stdout
    assert "re-quantized 14 4-bit layers" in done.stdout
