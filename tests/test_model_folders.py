"""Model folders on the command line: ``fourbit quantize`` reads a transformers folder's layer
kinds from its config.json, writes a folder ``from_pretrained`` loads, and ``load_quantized``
reads it into a meta-built model; and the hook that teaches peft fourbit's layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_same_state, causal_lm_logits, import_transformers, save_tiny_llama, state_of
from torch import nn

import_transformers()
from transformers import AutoModelForCausalLM  # noqa: E402

from fourbit.checkpoint import CheckpointError  # noqa: E402
from fourbit.convert import quantize_model  # noqa: E402
from fourbit.integrations.transformers import FourbitConfig  # noqa: E402
from fourbit.nn import Linear4bit  # noqa: E402


def test_fourbit_quantize_reads_a_gpt2_folders_layers_from_its_config(tmp_path: Path, capsys):
    """``fourbit quantize`` on a GPT-2 folder quantized the embeddings (``wte``, ``wpe``: the
    default skip misses their names) and the Conv1D weights as stored, (in, out), so that nothing
    could load it. With the folder's config.json it writes what ``quantize_model`` gives (Conv1D
    weights transposed, embeddings kept), and ``load_quantized`` reads it into a meta-built model,
    the output head tied to the embedding again."""
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    from fourbit.convert import load_quantized
    from fourbit.loading import LoadReport
    from fourbit.tools.cli import main

    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    float_model = GPT2LMHeadModel(config).eval()
    float_model.save_pretrained(tmp_path / "float")
    assert main(["quantize", str(tmp_path / "float"), "-o", str(tmp_path / "nf4")]) == 0
    assert "8 Conv1D weights" in capsys.readouterr().out

    quantize_model(float_model)
    expected = {key: value for key, value in float_model.state_dict().items() if key != "lm_head.weight"}
    assert_same_state(load_file(tmp_path / "nf4" / "model.safetensors"), expected)
    with torch.device("meta"):
        fresh = GPT2LMHeadModel(config)
    assert load_quantized(fresh, tmp_path / "nf4").converted == [
        name for name, module in float_model.named_modules() if isinstance(module, Linear4bit)
    ]
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    torch.testing.assert_close(causal_lm_logits(fresh), causal_lm_logits(float_model), rtol=0, atol=0)
    settings = json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]
    assert settings["skip_modules"] == ["lm_head"]  # tied to wte, not saved: kept, without a warning on load
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map="cpu")  # config.json came along
    torch.testing.assert_close(causal_lm_logits(loaded), causal_lm_logits(float_model), rtol=0, atol=0)

    # by name alone (the old behaviour, kept behind --no-config) the Conv1D weights are (in, out)
    args = ["quantize", str(tmp_path / "float"), "-o", str(tmp_path / "by-name"), "--no-config", "--skip", "*wte*"]
    assert main([*args, "*wpe*"]) == 0
    with torch.device("meta"):
        fresh = GPT2LMHeadModel(config)
    with pytest.raises(
        CheckpointError, match=r"c_attn.weight. has shape \(64, 192\).*Conv1D weight quantized as stored"
    ):
        load_quantized(fresh, tmp_path / "by-name")
    assert isinstance(load_quantized(fresh, tmp_path / "nf4"), LoadReport)  # the failed load changed nothing


def test_the_after_import_hook_runs_its_callback_once_the_module_ran(tmp_path: Path, monkeypatch):
    """How loading a model teaches peft without importing it: a finder that wraps the module's own
    loader, runs the callback after the module executed, and leaves ``sys.meta_path``."""
    import sys

    from fourbit.integrations.peft_hook import _AfterImport

    (tmp_path / "fourbit_hook_probe.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    finder = _AfterImport("fourbit_hook_probe", lambda: seen.append(sys.modules["fourbit_hook_probe"].VALUE))
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    try:
        import fourbit_hook_probe  # noqa: F401
    finally:
        sys.modules.pop("fourbit_hook_probe", None)
    assert seen == [42] and finder not in sys.meta_path


def test_a_folder_quantized_by_the_command_loads_with_from_pretrained(tmp_path: Path, capsys):
    """``fourbit quantize`` on a sharded model folder copies config.json (with fourbit's
    quantization_config, the layers ``--skip`` kept as ``skip_modules``), the tokenizer and the
    other small files, but no weights of other formats: ``from_pretrained`` then gives the model
    ``from_pretrained`` with ``FourbitConfig`` gives, byte for byte."""
    from fourbit.tools.cli import main

    source = Path(save_tiny_llama(tmp_path / "float", max_shard_size="100KB"))
    (source / "tokenizer.json").write_text('{"version": "1.0"}')
    (source / "pytorch_model.bin").write_bytes(b"weights in another format")
    args = ["quantize", str(source), "-o", str(tmp_path / "nf4"), "--skip", "lm_head", "*.q_proj"]
    assert main([*args, "--quant-type", "fp4"]) == 0
    assert "from_pretrained" in capsys.readouterr().out
    files = {path.name for path in (tmp_path / "nf4").iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors.index.json"} <= files
    assert "pytorch_model.bin" not in files
    settings = json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]
    assert settings["quant_method"] == "fourbit" and settings["quant_type"] == "fp4"
    assert settings["skip_modules"] == ["lm_head", *(f"model.layers.{i}.self_attn.q_proj" for i in range(2))]

    # a folder of a quantized model keeps its own config: its 4-bit weights pass through unchanged
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "bnb"}}))
    assert main(["quantize", str(source), "-o", str(tmp_path / "again"), "-q"]) == 0
    assert "holds a model quantized with bnb" in capsys.readouterr().err
    assert not (tmp_path / "again" / "config.json").exists()
    (source / "config.json").write_text(json.dumps(config))

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map="cpu")
    assert type(loaded.model.layers[0].self_attn.q_proj) is nn.Linear
    config = FourbitConfig(quant_type="fp4", skip_modules=["lm_head", "q_proj"])
    expected = AutoModelForCausalLM.from_pretrained(source, quantization_config=config, device_map="cpu")
    assert_same_state(state_of(loaded), state_of(expected))
    torch.testing.assert_close(causal_lm_logits(loaded), causal_lm_logits(expected), rtol=0, atol=0)
