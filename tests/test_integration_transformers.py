"""transformers integration: FourbitConfig, from_pretrained with quantization on load, save and reload,
bitsandbytes-written checkpoints without bitsandbytes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import (
    TOKEN_IDS,
    assert_same_state,
    available_devices,
    causal_lm_logits,
    import_transformers,
    needs_compilable_transformers,
    needs_fullgraph,
    run_without_bitsandbytes,
    save_tiny_llama,
    state_of,
)
from torch import nn

transformers = import_transformers()
from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: E402

from fourbit.convert import quantize_model  # noqa: E402
from fourbit.integrations.transformers import FourbitConfig  # noqa: E402
from fourbit.nn import Linear4bit  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _bitsandbytes_nf4(compute_dtype: torch.dtype):
    """bitsandbytes' 4-bit config with FourbitConfig's defaults (NF4, nested statistics)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def _assert_bitsandbytes_bytes(key: str, ours: torch.Tensor, theirs: torch.Tensor, device: str) -> None:
    """fourbit writes bitsandbytes' CPU bytes on every device. bitsandbytes' CUDA kernel codes
    nested statistics by an exact nearest search, its CPU path on a 65536-point grid, so the two
    pick nearby codes for a value near a midpoint (0.03-0.2% of codes, up to 3 steps apart;
    README, "Differences from bitsandbytes"): on CUDA those may differ, everything else is equal."""
    if device == "cpu" or not key.endswith(".absmax") or ours.dtype != torch.uint8:
        assert torch.equal(ours, theirs), key
        return
    apart = (ours.int() - theirs.int()).abs()
    assert apart.max() <= 3 and (apart > 0).float().mean() < 0.01, key


def test_from_pretrained_quantizes_three_shards_like_quantize_model(tmp_path: Path):
    path = save_tiny_llama(tmp_path / "float", max_shard_size="100KB", num_hidden_layers=1)
    shards = sorted(p.name for p in Path(path).glob("*.safetensors"))
    assert len(shards) == 3, shards

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=FourbitConfig(), dtype=torch.float32)
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    targets = [name for name in linears if name.endswith(TARGETS)]
    assert len(targets) == 7
    assert all(isinstance(linears[name], Linear4bit) for name in targets)
    assert type(model.lm_head) is nn.Linear  # the output head stays in full precision
    assert model.is_loaded_in_4bit and model.is_quantized

    # quantized where from_pretrained put the model (a GPU when there is one): nested statistics
    # hold absmax.mean(), whose last bit depends on the device's reduction order, as in bitsandbytes
    reference = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).to(model.device)
    quantize_model(reference)
    assert_same_state(state_of(model), state_of(reference))
    assert torch.equal(causal_lm_logits(model), causal_lm_logits(reference))


def test_from_pretrained_peak_memory_stays_under_float_model_plus_one_shard(tmp_path: Path):
    path = save_tiny_llama(
        tmp_path / "float",
        max_shard_size="24MB",
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=256,
    )
    files = list(Path(path).glob("*.safetensors"))
    float_bytes = sum(f.stat().st_size for f in files)
    shard_bytes = max(f.stat().st_size for f in files)
    assert len(files) >= 3
    # Anonymous resident memory, sampled while loading: the safetensors files are memory-mapped, and
    # their page-cache pages would count in the process's total RSS. Loaded to the CPU: a CUDA
    # context alone takes hundreds of MB of host memory.
    out = run_without_bitsandbytes(
        f"""
import threading, time, torch
from transformers import AutoModelForCausalLM
from transformers.models.llama import modeling_llama
from fourbit.integrations.transformers import FourbitConfig
from fourbit.nn import Linear4bit

def anonymous():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

peak, done = [anonymous()], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anonymous())
        time.sleep(0.001)

before = anonymous()
peak[0] = before
sampler = threading.Thread(target=sample)
sampler.start()
model = AutoModelForCausalLM.from_pretrained(
    {path!r}, quantization_config=FourbitConfig(), dtype=torch.float32, device_map="cpu"
)
done.set()
sampler.join()
assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 28
print(max(peak[0], anonymous()) - before)
"""
    )
    growth = int(out.strip().splitlines()[-1])
    assert growth < float_bytes + shard_bytes, (growth, float_bytes, shard_bytes)


def test_save_pretrained_round_trip_is_byte_identical(tmp_path: Path):
    path = save_tiny_llama(tmp_path / "float", dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=FourbitConfig(quant_type="fp4", compute_dtype=torch.bfloat16), dtype=torch.bfloat16
    )
    model.save_pretrained(tmp_path / "4bit")
    saved = json.loads((tmp_path / "4bit" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "fourbit" and saved["quant_type"] == "fp4"
    assert saved["compute_dtype"] == "bfloat16"

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "4bit")
    assert isinstance(reloaded.model.layers[0].mlp.down_proj, Linear4bit)
    assert reloaded.model.layers[0].mlp.down_proj.weight.quant_type == "fp4"
    assert_same_state(state_of(reloaded), state_of(model))
    assert torch.equal(causal_lm_logits(reloaded), causal_lm_logits(model))


def test_bitsandbytes_serialization_reloads_with_transformers_and_bitsandbytes(tmp_path: Path):
    pytest.importorskip("bitsandbytes")
    path = save_tiny_llama(tmp_path / "float", dtype=torch.bfloat16)
    config = FourbitConfig(serialize_as="bitsandbytes", compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "4bit")
    saved = json.loads((tmp_path / "4bit" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "bitsandbytes" and saved["load_in_4bit"] is True

    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "4bit", device_map="cpu")
    assert type(theirs.model.layers[0].self_attn.q_proj).__module__.startswith("bitsandbytes")
    assert_same_state(state_of(theirs), state_of(model))


def test_bitsandbytes_checkpoint_loads_without_bitsandbytes(tmp_path: Path):
    pytest.importorskip("bitsandbytes")
    path = save_tiny_llama(tmp_path / "float", dtype=torch.bfloat16)
    bnb_config = _bitsandbytes_nf4(torch.bfloat16)
    theirs = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=bnb_config, dtype=torch.bfloat16, device_map="cpu"
    )
    theirs.save_pretrained(tmp_path / "bnb")  # before any forward: bitsandbytes' CPU path repacks on the first
    torch.save({"ids": TOKEN_IDS, "logits": causal_lm_logits(theirs)}, tmp_path / "expected.pt")

    out = run_without_bitsandbytes(
        f"""
import json, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from fourbit.integrations.transformers import from_pretrained
from fourbit.nn import Linear4bit
folder = {str(tmp_path / "bnb")!r}
model = from_pretrained(AutoModelForCausalLM, folder)
assert isinstance(model.model.layers[1].mlp.up_proj, Linear4bit)
expected = torch.load({str(tmp_path / "expected.pt")!r})
model.eval()
with torch.no_grad():
    logits = model(expected["ids"].to(model.device)).logits.cpu()
file = load_file(folder + "/model.safetensors")
state = {{k: v.cpu() for k, v in model.state_dict().items()}}
assert sorted(file) == sorted(state)
assert all(torch.equal(file[k], state[k]) for k in file), "bytes differ"
model.save_pretrained({str(tmp_path / "again")!r})
again = load_file({str(tmp_path / "again")!r} + "/model.safetensors")
assert sorted(again) == sorted(file), sorted(set(again) ^ set(file))
resaved = [k for k in file if not (file[k].dtype == again[k].dtype and torch.equal(file[k], again[k]))]
assert not resaved, [(k, file[k].dtype, again[k].dtype, file[k].shape, again[k].shape) for k in resaved[:4]]
config = json.load(open({str(tmp_path / "again")!r} + "/config.json"))["quantization_config"]
assert config["quant_method"] == "bitsandbytes", config
assert sys.modules.get("bitsandbytes") is None
print((logits.float() - expected["logits"].float()).abs().max().item(), expected["logits"].abs().max().item())
"""
    )
    difference, scale = map(float, out.split()[-2:])
    # bf16 logits: within a couple of units in the last place of the largest logit
    assert difference <= 2 * 2.0 ** (math.floor(math.log2(scale)) - 7), (difference, scale)


def test_skip_modules_and_dequantize(tmp_path: Path):
    path = save_tiny_llama(tmp_path / "float")
    config = FourbitConfig(skip_modules=["model.layers.1.mlp"])  # replaces the default: the head is quantized
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)
    assert isinstance(model.lm_head, Linear4bit)
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[1].self_attn.q_proj, Linear4bit)
    assert isinstance(model.model.layers[0].mlp.down_proj, Linear4bit)

    quantized_logits = causal_lm_logits(model)
    assert model.is_loaded_in_4bit
    model = model.dequantize()
    assert not any(isinstance(module, Linear4bit) for module in model.modules())
    assert not model.is_loaded_in_4bit
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    torch.testing.assert_close(causal_lm_logits(model), quantized_logits, rtol=1e-4, atol=1e-4)


def test_a_head_tied_to_the_embedding_stays_float_when_every_layer_is_asked_for(tmp_path: Path):
    """skip_modules=[] asks for every Linear layer, but a head tied to the input embedding cannot
    be 4-bit (transformers ties it to the float embedding after loading, which left a Linear4bit
    holding a float weight that failed at its first forward): it is kept, with a warning naming
    it, and the model computes, saves and reloads as the default configuration's does."""
    path = save_tiny_llama(tmp_path / "float", tie_word_embeddings=True)
    default = AutoModelForCausalLM.from_pretrained(path, quantization_config=FourbitConfig(), dtype=torch.float32)
    with pytest.warns(UserWarning, match=r"lm_head: its weight is tied to model\.embed_tokens\.weight"):
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=FourbitConfig(skip_modules=[]), dtype=torch.float32
        )
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(model.model.layers[0].mlp.down_proj, Linear4bit)
    logits = causal_lm_logits(model)
    torch.testing.assert_close(logits, causal_lm_logits(default), rtol=0, atol=0)
    model.save_pretrained(tmp_path / "nf4")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4")
    torch.testing.assert_close(causal_lm_logits(reloaded), logits, rtol=0, atol=0)


@pytest.mark.parametrize("device", available_devices())
def test_gpt2_conv1d_layers_are_quantized_as_bitsandbytes_quantizes_them(tmp_path: Path, device: str):
    """GPT-2's projections are transformers' Conv1D (weights stored as (in, out)); they were left
    in full precision without a word, by from_pretrained and by quantize_model. They become
    Linear4bit layers whose state dict is bitsandbytes' byte for byte (it transposes the weight
    before quantizing, as fourbit does now), quantize_model gives the same bytes, and a saved
    model reloads to the same logits."""
    pytest.importorskip("bitsandbytes")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "float")
    float_path = tmp_path / "float"
    model = AutoModelForCausalLM.from_pretrained(
        float_path, quantization_config=FourbitConfig(), dtype=torch.float32, device_map=device
    )
    projections = [name for name, module in model.named_modules() if name.endswith(("c_attn", "c_proj", "c_fc"))]
    assert len(projections) == 8
    assert all(isinstance(model.get_submodule(name), Linear4bit) for name in projections)
    assert model.get_submodule("transformer.h.0.mlp.c_fc").weight.quant_state.shape == (256, 64)

    theirs = AutoModelForCausalLM.from_pretrained(
        float_path, quantization_config=_bitsandbytes_nf4(torch.float32), dtype=torch.float32, device_map=device
    ).state_dict()
    ours = model.state_dict()
    keys = [key for key in ours if key.split(".weight")[0].endswith(("c_attn", "c_proj", "c_fc"))]
    assert keys
    for key in keys:
        _assert_bitsandbytes_bytes(key, ours[key].cpu(), theirs[key].cpu(), device)

    logits = causal_lm_logits(model)
    float_model = AutoModelForCausalLM.from_pretrained(float_path, dtype=torch.float32, device_map=device)
    float_logits = causal_lm_logits(float_model)
    assert (logits - float_logits).norm() / float_logits.norm() < 0.2
    report = quantize_model(float_model)  # the same layers, from the float model in memory
    assert sorted(report.converted) == sorted(projections)
    converted = float_model.state_dict()
    assert all(torch.equal(converted[key].cpu(), ours[key].cpu()) for key in keys)
    torch.testing.assert_close(causal_lm_logits(float_model), logits, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "nf4")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map=device)
    torch.testing.assert_close(causal_lm_logits(reloaded), logits, rtol=0, atol=0)


def test_mixture_of_experts_weights_left_in_full_precision_are_named(tmp_path: Path):
    """transformers 5 keeps a mixture-of-experts layer's experts as 3-D parameters, not Linear
    layers: neither fourbit nor bitsandbytes quantizes them, so a "4-bit" Mixtral holds most of
    its weights in full precision. Loading says so, with their share of the parameters."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    MixtralForCausalLM(config).save_pretrained(tmp_path / "float")
    with pytest.warns(UserWarning, match=r"4 batched \(mixture-of-experts\) weights, 8\d% of the model's param"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=FourbitConfig())
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)
    assert model.model.layers[0].mlp.experts.gate_up_proj.dim() == 3
    report = quantize_model(MixtralForCausalLM(config))
    assert report.skipped["model.layers.1.mlp.experts.down_proj"].startswith("a batched (mixture-of-experts)")


def test_config_dicts_round_trip_and_validate():
    config = FourbitConfig(quant_type="fp4", compress_statistics=False, compute_dtype="bfloat16", blocksize=128)
    again = FourbitConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert again.compute_dtype is torch.bfloat16 and again.blocksize == 128

    bnb_form = FourbitConfig(serialize_as="bitsandbytes").to_dict()
    assert bnb_form["quant_method"] == "bitsandbytes" and bnb_form["bnb_4bit_quant_type"] == "nf4"
    from_bnb = FourbitConfig.from_bitsandbytes(bnb_form)
    assert from_bnb.fourbit_dict() == {
        **FourbitConfig(serialize_as="bitsandbytes").fourbit_dict(),
        "compute_dtype": "float32",
    }

    with pytest.raises(ValueError, match="quant_type"):
        FourbitConfig(quant_type="int4")
    with pytest.raises(ValueError, match="serialize_as"):
        FourbitConfig(serialize_as="gguf")
    with pytest.raises(ValueError, match="blocksize=64"):
        FourbitConfig(blocksize=128, serialize_as="bitsandbytes")
    with pytest.raises(ValueError, match="compute_dtype"):
        FourbitConfig(compute_dtype="int8")
    with pytest.raises(ValueError, match="unknown settings"):
        FourbitConfig(load_in_4bit=True)
    with pytest.raises(ValueError, match="4-bit"):
        FourbitConfig.from_bitsandbytes({"quant_method": "bitsandbytes", "load_in_8bit": True})


def test_skip_modules_takes_one_name_or_a_list_of_names():
    """A single string is one module name, not its characters (which name no module, so the one
    meant was quantized); anything but names is refused."""
    assert FourbitConfig(skip_modules="lm_head").skip_modules == ["lm_head"]
    assert FourbitConfig(skip_modules=("lm_head", "model.layers.1")).skip_modules == ["lm_head", "model.layers.1"]
    assert FourbitConfig(skip_modules=[]).skip_modules == [] and FourbitConfig().skip_modules is None
    for wrong in (3, ["lm_head", 3]):
        with pytest.raises(TypeError, match="skip_modules"):
            FourbitConfig(skip_modules=wrong)


def test_import_fourbit_imports_no_integration():
    out = run_without_bitsandbytes(
        """
import fourbit, fourbit.nn, fourbit.convert, fourbit.functional
heavy = sorted(name for name in ("transformers", "peft", "trl", "accelerate", "safetensors") if name in sys.modules)
print(heavy)
"""
    )
    assert out.strip().splitlines()[-1] == "[]"


def test_a_float_layer_in_a_prequantized_checkpoint_is_quantized_on_load(tmp_path: Path):
    """A layer the checkpoint holds in float (it skipped it) but this load converts gets quantized
    with the layer's settings, instead of arriving as a float tensor in a 4-bit layer."""
    path = save_tiny_llama(tmp_path / "float")
    skipped = FourbitConfig(skip_modules=["lm_head", "model.layers.1.mlp"])
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=skipped, dtype=torch.float32)
    model.save_pretrained(tmp_path / "4bit")
    config_file = tmp_path / "4bit" / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"]["skip_modules"] = ["lm_head"]
    config_file.write_text(json.dumps(config))

    if not hasattr(transformers.quantizers.HfQuantizer, "get_load_operations"):  # before 5.24: cast on the way in
        # the load fails (never a float tensor in a 4-bit layer); 5.17 reports fourbit's message in its
        # conversion report, 5.0 goes on to initialize the layer and fails there
        with pytest.raises(RuntimeError):
            AutoModelForCausalLM.from_pretrained(tmp_path / "4bit")
        return
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "4bit")
    layer = reloaded.model.layers[1].mlp.down_proj
    assert isinstance(layer, Linear4bit) and layer.weight.dtype == torch.uint8
    reference = AutoModelForCausalLM.from_pretrained(path, quantization_config=FourbitConfig(), dtype=torch.float32)
    assert torch.equal(layer.weight, reference.model.layers[1].mlp.down_proj.weight)
    assert torch.equal(causal_lm_logits(reloaded), causal_lm_logits(reference))


@needs_compilable_transformers
@needs_fullgraph
def test_compiled_generate_with_module_guards_skipped_gives_eager_tokens(tmp_path: Path):
    """transformers' compiled decoding with torch's ``skip_guard_on_all_nn_modules_unsafe``
    (docs/transformers.md, "Compiled generation"): the tokens of eager decoding, and no guard
    left on a 4-bit layer's weight or state."""
    from transformers import CompileConfig

    path = save_tiny_llama(tmp_path / "float")
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=FourbitConfig(), dtype=torch.float32)
    model.eval()
    kept: list[str] = []

    def skip_module_guards(entries):
        keep = torch.compiler.skip_guard_on_all_nn_modules_unsafe(entries)
        kept.extend(entry.name for entry, kept_one in zip(entries, keep, strict=True) if kept_one)
        return keep

    guards = {"guard_filter_fn": skip_module_guards}
    config = CompileConfig(fullgraph=True, backend="aot_eager", mode=None, options=guards)
    config._compile_all_devices = True  # transformers compiles decoding on CUDA only, unless told
    options = dict(max_new_tokens=6, do_sample=False, cache_implementation="static")
    torch.compiler.reset()
    with torch.no_grad():
        eager = model.generate(TOKEN_IDS, **options)
        compiled = model.generate(TOKEN_IDS, compile_config=config, **options)
    assert hasattr(model, "_compiled_call"), "decoding ran compiled"
    assert torch.equal(compiled, eager)
    on_layers = [name for name in kept if not name.startswith("G[") and ("quant_state" in name or "_proj" in name)]
    assert kept and not on_layers, on_layers[:5]


@needs_compilable_transformers
@needs_fullgraph
@pytest.mark.parametrize("device", available_devices())
def test_a_compiled_llama_with_grouped_products_gives_the_eager_logits(tmp_path: Path, device: str):
    """``fourbit.compile_options`` on a model loaded with ``FourbitConfig``: each layer's q/k/v
    and gate/up become one grouped product (on CUDA, one launch each), and the logits stay the
    eager model's within bfloat16 rounding."""
    from fourbit.compiled_groups import GroupedProducts, compile_options, group_products

    made: list[int] = []

    class Counting(GroupedProducts):
        def __call__(self, graph: torch.fx.Graph) -> None:
            made.append(group_products(graph, self.devices, self.max_rows))

    path = save_tiny_llama(tmp_path / "float", hidden_size=256, intermediate_size=512)
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=FourbitConfig(compute_dtype=torch.bfloat16), dtype=torch.bfloat16, device_map=device
    )
    options = compile_options(devices=(device,))
    options.update(post_grad_custom_post_pass=Counting((device,)), fx_graph_cache=False)
    ids = TOKEN_IDS[:1].to(device)  # 9 rows: decode-sized products, which the pass groups
    torch.compiler.reset()
    with torch.no_grad():
        eager = model(ids).logits.float()
        compiled = torch.compile(model, options=options, fullgraph=True)(ids).logits.float()
    assert made == [4]  # two layers, two groups each
    assert ((compiled - eager).norm() / eager.norm()).item() < 2e-2
