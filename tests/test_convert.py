"""fourbit.convert: quantize_model, load_quantized and quantize_checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fourbit.functional as F4
from fourbit import checkpoint, convert
from fourbit.nn import Linear4bit, Params4bit


class Block(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width, bias=False)
        self.norm = nn.LayerNorm(width)
        self.register_buffer("scale", torch.tensor(0.5))
        self.register_buffer("cache", torch.zeros(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.scale * self.down(torch.relu(self.up(x))))


class TinyModel(nn.Module):
    def __init__(self, width: int = 64, vocab: int = 50) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(2))
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(x)


def test_matches_whole_names_and_trailing_parts():
    assert convert.matches("lm_head", ["lm_head"])
    assert convert.matches("model.lm_head", ["lm_head"])
    assert convert.matches("encoder.layer.0.attention.self.query", ["*attention*"])
    assert convert.matches("blocks.1.up", ["blocks.1.*"])
    assert not convert.matches("model.lm_head_extra", ["lm_head"])
    assert not convert.matches("blocks.1.up", [])
    assert convert.matches("model.lm_head", "lm_head")  # one string is one pattern, not its characters
    assert not convert.matches("l", "lm_head")


def test_quantize_model_replaces_linears_and_reports():
    model = TinyModel()
    tokens = torch.randint(0, 50, (3, 7))
    expected_layers = {"blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"}
    weights = {name: model.get_submodule(name).weight.detach().clone() for name in expected_layers}
    before = convert.state_dict_nbytes(model)
    report = convert.quantize_model(model, progress=False)
    assert set(report.converted) == expected_layers
    assert report.skipped == {"lm_head": "matches a skip pattern"}
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, Linear4bit)
    assert report.bytes_before == before
    assert report.bytes_after == convert.state_dict_nbytes(model) < before
    for name in expected_layers:
        layer = model.get_submodule(name)
        assert isinstance(layer, Linear4bit) and layer.weight.bnb_quantized
        assert layer.weight.quant_type == "nf4" and layer.weight.compress_statistics
        packed, _ = F4.quantize_4bit(weights[name], quant_type="nf4", compress_statistics=True)
        assert torch.equal(layer.weight.data, packed)
    assert "converted 4 Linear layers" in str(report)
    assert model(tokens).shape == (3, 7, 50)


def test_quantize_model_keeps_what_it_cannot_convert():
    class WithAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.MultiheadAttention(32, 4)
            self.tied = nn.Linear(32, 32)
            self.twin = nn.Linear(32, 32)
            self.twin.weight = self.tied.weight

    model = WithAttention()
    report = convert.quantize_model(model, skip=(), progress=False)
    assert report.converted == []
    assert "MultiheadAttention" in report.skipped["attention.out_proj"]
    assert "tied" in report.skipped["tied"] and "tied" in report.skipped["twin"]


def test_quantize_model_settings_and_device_choice():
    model = TinyModel()
    convert.quantize_model(
        model, quant_type="fp4", blocksize=128, compress_statistics=False, skip=("blocks.1.*",), progress=False
    )
    layer = model.blocks[0].up
    assert (layer.weight.quant_type, layer.weight.blocksize, layer.weight.compress_statistics) == ("fp4", 128, False)
    assert isinstance(model.blocks[1].up, nn.Linear) and not isinstance(model.blocks[1].up, Linear4bit)
    with pytest.raises(ValueError, match="blocksize"):
        convert.quantize_model(TinyModel(), blocksize=48)
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        convert.quantize_model("model")


def test_quantize_model_on_meta_then_load_float_weights():
    source = TinyModel()
    with torch.device("meta"):
        model = TinyModel()
    convert.quantize_model(model, progress=False)
    layer = model.blocks[0].up
    assert isinstance(layer.weight, Params4bit) and not layer.weight.bnb_quantized and layer.weight.is_meta
    model.load_state_dict(source.state_dict(), assign=True)
    for name in ("blocks.0.up", "blocks.1.down"):
        weight = model.get_submodule(name).weight
        assert isinstance(weight, Params4bit) and weight.bnb_quantized and weight.device.type == "cpu"
    for block in model.blocks:
        block.cache = torch.zeros(1)
    tokens = torch.randint(0, 50, (2, 3))
    convert.quantize_model(source, progress=False)
    assert torch.equal(model(tokens), source(tokens))


def test_progress_bar_goes_to_stderr(capsys):
    pytest.importorskip("tqdm")
    convert.quantize_model(TinyModel(), progress=True)
    assert "quantizing" in capsys.readouterr().err
    convert.quantize_model(TinyModel(), progress=False)
    assert capsys.readouterr().err == ""


def saved_quantized_model(tmp_path, **options):
    torch.manual_seed(3)
    model = TinyModel()
    convert.quantize_model(model, progress=False, **options)
    path = tmp_path / "tiny.safetensors"
    checkpoint.save_state_dict(model, path)
    return model, path


@pytest.mark.parametrize("as_mapping", [False, True], ids=["file", "mapping"])
def test_load_quantized_into_meta_model(tmp_path, as_mapping):
    model, path = saved_quantized_model(tmp_path, quant_type="fp4", blocksize=128)
    with torch.device("meta"):
        fresh = TinyModel()
    fresh.blocks[0].cache = torch.zeros(1)  # non-persistent buffers are the model's to create
    fresh.blocks[1].cache = torch.zeros(1)
    source = checkpoint.load_state_dict(path) if as_mapping else path
    report = convert.load_quantized(fresh, source)
    assert sorted(report.converted) == ["blocks.0.down", "blocks.0.up", "blocks.1.down", "blocks.1.up"]
    assert (report.missing_keys, report.unexpected_keys, report.left_on_meta) == ([], [], [])
    assert fresh.blocks[0].up.weight.quant_type == "fp4" and fresh.blocks[0].up.weight.blocksize == 128
    tokens = torch.randint(0, 50, (2, 5))
    assert torch.equal(fresh(tokens), model(tokens))


def test_load_quantized_strict_reports_what_does_not_fit(tmp_path):
    _, path = saved_quantized_model(tmp_path)
    state = checkpoint.load_state_dict(path)
    state["extra.weight"] = torch.ones(1)
    del state["blocks.1.norm.bias"]
    with torch.device("meta"):
        fresh = TinyModel()
    with pytest.raises(checkpoint.CheckpointError, match="does not fit") as error:
        convert.load_quantized(fresh, state)
    message = str(error.value)
    assert "missing: blocks.1.norm.bias" in message
    assert "unexpected: extra.weight" in message
    assert "left on the meta device" in message and "blocks.0.cache" in message
    with torch.device("meta"):
        lenient = TinyModel()
    report = convert.load_quantized(lenient, state, strict=False)
    assert report.missing_keys == ["blocks.1.norm.bias"]
    assert report.unexpected_keys == ["extra.weight"]
    assert set(report.left_on_meta) == {"blocks.1.norm.bias", "blocks.0.cache", "blocks.1.cache"}


def test_load_quantized_rejects_a_4bit_weight_without_a_linear(tmp_path):
    _, path = saved_quantized_model(tmp_path)
    state = checkpoint.load_state_dict(path)
    renamed = {key.replace("blocks.0.up", "blocks.0.norm"): value for key, value in state.items()}
    with pytest.raises(checkpoint.CheckpointError, match=r"no Linear layer 'blocks\.0\.norm'"):
        convert.load_quantized(TinyModel(), renamed)


def test_load_quantized_shape_mismatch_is_a_checkpoint_error_and_changes_nothing(tmp_path):
    _, path = saved_quantized_model(tmp_path)
    model = TinyModel(width=32)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(checkpoint.CheckpointError, match=r"has shape \(64, 128\) but layer 'blocks\.0\.down'"):
        convert.load_quantized(model, path)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[key], before[key]) for key in before)
    assert not any(isinstance(module, Linear4bit) for module in model.modules())


def test_load_quantized_puts_the_model_back_when_a_late_step_fails(tmp_path, monkeypatch):
    _, path = saved_quantized_model(tmp_path)
    model = TinyModel()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    modules_before = dict(model.named_modules())
    calls = {"count": 0}
    original = torch.nn.Module.load_state_dict

    def failing_late(self, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 3:  # two modules loaded, then a failure
            raise RuntimeError("disk vanished")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "load_state_dict", failing_late)
    with pytest.raises(checkpoint.CheckpointError, match="disk vanished"):
        convert.load_quantized(model, path)
    monkeypatch.undo()
    assert dict(model.named_modules()).keys() == modules_before.keys()
    assert all(model.get_submodule(name) is module for name, module in modules_before.items() if name)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[key], before[key]) for key in before)


# --------------------------------------------------------------------------- quantize_checkpoint


class Tied(nn.Module):
    """Two Linear layers sharing one weight, as an output head shares the input embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(64, 64), nn.Linear(64, 64)
        self.second.weight = self.first.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def test_load_quantized_ties_again_a_weight_the_checkpoint_holds_once(tmp_path):
    """A weight shared by two modules, saved once (as transformers saves a tied head), is shared
    again after loading instead of being reported missing; a tie to a 4-bit weight is refused."""
    model = Tied()
    state = {key: value for key, value in model.state_dict().items() if key != "second.weight"}
    with torch.device("meta"):
        fresh = Tied()
    assert convert.load_quantized(fresh, state).missing_keys == []
    assert fresh.second.weight is fresh.first.weight and not fresh.first.weight.is_meta
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), model(x))

    untied = Tied()
    untied.second.weight = nn.Parameter(untied.first.weight.detach().clone())
    convert.quantize_model(untied, skip=("second",), progress=False)
    state = {key: value for key, value in untied.state_dict().items() if key != "second.weight"}
    with torch.device("meta"):
        fresh = Tied()
    with pytest.raises(
        checkpoint.CheckpointError, match=r"'first\.weight' is in 4 bits but the model ties it to second"
    ):
        convert.load_quantized(fresh, state)
    assert type(fresh.first) is nn.Linear and fresh.second.weight is fresh.first.weight


def float_checkpoint(tmp_path, **extra):
    torch.manual_seed(4)
    state = {key: value.to(torch.bfloat16) for key, value in TinyModel().state_dict().items()}
    state.update(extra)
    path = tmp_path / "float.safetensors"
    save_file(state, path, metadata={"source": "test"})
    return state, path


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16], ids=str)
def test_quantize_checkpoint_matches_quantize_model(tmp_path, quant_storage):
    state, source = float_checkpoint(tmp_path)
    destination = tmp_path / "q.safetensors"
    reports = convert.quantize_checkpoint(source, destination, progress=False, quant_storage=quant_storage)
    quantized = {r.name for r in reports if r.quantized}
    assert quantized == {"blocks.0.up.weight", "blocks.0.down.weight", "blocks.1.up.weight", "blocks.1.down.weight"}
    kept = load_file(destination)
    for name in ("embed.weight", "lm_head.weight", "blocks.0.up.bias", "blocks.0.scale"):
        assert kept[name].dtype == state[name].dtype and torch.equal(kept[name], state[name]), name
    model = TinyModel().to(torch.bfloat16)
    model.load_state_dict(state)
    convert.quantize_model(model, progress=False, quant_storage=quant_storage)
    assert kept["blocks.0.up.weight"].dtype == quant_storage
    for key, value in model.state_dict().items():  # bytes: packed bytes seen as bf16 hold NaNs
        assert kept[key].dtype == value.dtype, key
        assert torch.equal(kept[key].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), key
    assert checkpoint.read_metadata(destination)["source"] == "test"
    report = next(r for r in reports if r.name == "blocks.0.up.weight")
    assert report.bytes_after < report.bytes_before / 2
    assert 0 < report.relative_error < 0.2


def test_quantize_checkpoint_refuses_bad_input_before_writing(tmp_path):
    _, source = float_checkpoint(tmp_path, **{"blocks.0.extra": torch.ones(4, 4, dtype=torch.float64)})
    destination = tmp_path / "q.safetensors"
    with pytest.raises(checkpoint.CheckpointError, match=r"'blocks.0.extra' has dtype torch.float64"):
        convert.quantize_checkpoint(source, destination, progress=False)
    assert not destination.exists()
    reports = convert.quantize_checkpoint(source, destination, skip="extra", progress=False)
    assert not next(report for report in reports if report.name == "blocks.0.extra").quantized
    with pytest.raises(checkpoint.CheckpointError, match="exists"):
        convert.quantize_checkpoint(source, destination, progress=False)
    with pytest.raises(ValueError, match="quant_type"):
        convert.quantize_checkpoint(source, tmp_path / "other.safetensors", quant_type="int3")
    with pytest.raises(ValueError, match=r"unknown layer kinds \['embedding'\]"):
        convert.quantize_checkpoint(source, tmp_path / "other.safetensors", layers={"embed.weight": "embedding"})
    with pytest.raises(ValueError, match="extra_files needs a sharded checkpoint"):
        convert.quantize_checkpoint(source, tmp_path / "other.safetensors", extra_files=lambda reports: {})
    assert not (tmp_path / "other.safetensors").exists()
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(source.read_bytes())
    for bad in ("../escape.json", "model.safetensors"):
        with pytest.raises(checkpoint.CheckpointError, match="not a plain file name, or a shard's"):
            convert.quantize_checkpoint(
                folder, tmp_path / "q-folder", skip="extra", extra_files=lambda reports, bad=bad: {bad: b"{}"}
            )
        assert not (tmp_path / "q-folder").exists() and not (tmp_path / "escape.json").exists()
        assert not list(tmp_path.glob(".q-folder-*"))  # the staging folder is gone too


def test_quantize_checkpoint_passes_4bit_weights_through(tmp_path):
    _, source = float_checkpoint(tmp_path)
    once = tmp_path / "once.safetensors"
    twice = tmp_path / "twice.safetensors"
    convert.quantize_checkpoint(source, once, progress=False)
    reports = convert.quantize_checkpoint(once, twice, progress=False)
    assert not any(r.quantized for r in reports)
    first, second = load_file(once), load_file(twice)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# --------------------------------------------------------------------------- memory

_LOAD_AND_MEASURE = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch import nn
    from fourbit.convert import load_quantized

    def status_mib(field):
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(field + ":"))
        return int(line.split()[1]) / 1024

    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(int(sys.argv[2]))])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident size
    before = status_mib("VmRSS")
    load_quantized(model, sys.argv[1])
    for layer in model:  # touch every byte: memory-mapped pages count once read
        layer.weight.data.max(), layer.weight.quant_state.absmax.max(), layer.bias.max()
    print(json.dumps({"before": before, "peak": status_mib("VmHWM")}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_loading_needs_only_the_quantized_size_plus_one_layer(tmp_path):
    """A 537 MB fp32 model (8 x 4096x4096) loads from its 4-bit checkpoint in a fresh process
    built on the meta device: peak RSS growth stays under the file size plus one fp32 layer.

    (Loading only: a CPU forward through the reference kernels adds their decode temporaries.)"""
    layers = 8
    path = tmp_path / "big.safetensors"

    def tensors():
        generator = torch.Generator().manual_seed(0)
        for index in range(layers):
            weight = torch.randn(4096, 4096, generator=generator)
            packed, state = F4.quantize_4bit(weight, quant_type="nf4")
            yield f"{index}.weight", packed
            for key, value in state.as_dict(packed=True).items():
                yield f"{index}.weight.{key}", value
            yield f"{index}.bias", torch.zeros(4096)

    checkpoint.save_state_dict(tensors(), path)
    file_mib = path.stat().st_size / 2**20
    layer_mib = 4096 * 4096 * 4 / 2**20
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_AND_MEASURE, str(path), str(layers)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    growth = measured["peak"] - measured["before"]
    fp32_mib = layers * layer_mib
    assert file_mib * 0.9 < growth < file_mib + layer_mib, (growth, file_mib, fp32_mib)


def _sharded(tmp_path, state: dict, shards: int = 2):
    """``state`` saved as transformers shards it: numbered files and a model.safetensors.index.json."""
    names = list(state)
    folder = tmp_path / "sharded"
    folder.mkdir()
    weight_map = {}
    for index in range(shards):
        file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: state[name] for name in names[index::shards]}
        checkpoint.save_state_dict(part, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    (folder / checkpoint.SHARD_INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("by", ["folder", "index"])
def test_load_quantized_reads_a_sharded_checkpoint(tmp_path, by):
    model, path = saved_quantized_model(tmp_path)
    folder = _sharded(tmp_path, checkpoint.load_state_dict(path))
    fresh = TinyModel()
    convert.load_quantized(fresh, folder if by == "folder" else folder / checkpoint.SHARD_INDEX_NAME)
    expected, loaded = model.state_dict(), fresh.state_dict()
    assert list(loaded) == list(expected)
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)


def test_a_sharded_checkpoint_with_a_tensor_in_two_shards_is_refused(tmp_path):
    _, path = saved_quantized_model(tmp_path)
    state = checkpoint.load_state_dict(path)
    folder = _sharded(tmp_path, state)
    checkpoint.save_state_dict({"embed.weight": state["embed.weight"]}, folder / "extra.safetensors")
    (folder / checkpoint.SHARD_INDEX_NAME).unlink()  # the folder's files, read without the index
    with pytest.raises(checkpoint.CheckpointError, match=r"'embed\.weight' is in two shards"):
        convert.load_quantized(TinyModel(), folder)


def test_meta_models_are_told_about_their_unsaved_buffers(tmp_path):
    _, path = saved_quantized_model(tmp_path)
    with torch.device("meta"):
        fresh = TinyModel()
    with pytest.raises(checkpoint.CheckpointError, match="non-persistent buffers, computed in __init__"):
        convert.load_quantized(fresh, path)


def test_dequantize_model_inverts_quantize_model_up_to_quantization_error():
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32, bias=False))
    x = torch.randn(3, 64)
    convert.quantize_model(model, skip=())
    quantized = model(x)
    before = {
        name: module.weight.data.clone() for name, module in model.named_modules() if isinstance(module, Linear4bit)
    }
    assert convert.dequantize_model(model, torch.float32) == ["0", "2"]
    assert all(type(module) is torch.nn.Linear for module in (model[0], model[2]))
    assert model[2].bias is None and model[0].weight.dtype == torch.float32
    torch.testing.assert_close(model(x), quantized, rtol=1e-5, atol=1e-5)
    assert all(before[name].dtype == torch.uint8 for name in before)  # nothing was changed in place
    with pytest.raises(TypeError, match="dequantize_layer"):
        convert.dequantize_model(Linear4bit(4, 4))
    with pytest.raises(TypeError, match="Linear4bit"):
        convert.dequantize_layer(torch.nn.Linear(4, 4))
