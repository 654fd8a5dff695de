"""The fourbit command, run as a user runs it: ``python -m fourbit`` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from fourbit import checkpoint

pytestmark = pytest.mark.cpu_only  # the commands run with FOURBIT_DISABLE_TRITON=1 on the CPU

SUBCOMMANDS = ["quantize", "inspect", "bench", "demo"]


def fourbit(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "FOURBIT_DISABLE_TRITON": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fourbit", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fourbit: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_file(
        {
            "embed_tokens.weight": torch.randn(100, 64),
            "layers.0.proj.weight": torch.randn(128, 64, dtype=torch.bfloat16),
            "layers.0.proj.bias": torch.randn(128),
            "layers.0.out.weight": torch.randn(64, 128, dtype=torch.float16),
            "layers.0.norm.weight": torch.ones(64),
            "step": torch.tensor([3], dtype=torch.int64),
        },
        path,
    )
    return path


@pytest.mark.parametrize("command", [None, *SUBCOMMANDS])
def test_help(command):
    result = fourbit(*([command] if command else []), "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: fourbit")
    if command is None:
        assert all(name in result.stdout for name in SUBCOMMANDS)


def test_no_command_is_a_usage_error():
    result = fourbit()
    assert result.returncode == 2 and "usage: fourbit" in result.stderr


def test_quantize_and_inspect(float_checkpoint, tmp_path):
    out = tmp_path / "q.safetensors"
    result = fourbit("quantize", float_checkpoint, "-o", out, "--quant-type", "fp4", "--blocksize", "128")
    assert result.returncode == 0, result.stderr
    summary = result.stdout
    assert "fp4, blocksize 128, nested statistics" in summary
    assert summary.splitlines()[-3].split()[:2] == ["quantized", "2"]
    assert summary.splitlines()[-2].split()[:2] == ["kept", "4"]
    state = load_file(out)
    assert state["layers.0.proj.weight"].dtype == torch.uint8
    assert "layers.0.proj.weight.quant_state.bitsandbytes__fp4" in state
    assert torch.equal(state["embed_tokens.weight"], load_file(float_checkpoint)["embed_tokens.weight"])

    inspected = fourbit("inspect", out)
    assert inspected.returncode == 0, inspected.stderr
    assert f"{out}: fourbit" in inspected.stdout
    assert "| layers.0.proj.weight | 128x64 | bfloat16 | fp4 | 128 | yes | uint8 |" in inspected.stdout
    assert "| layers.0.out.weight | 64x128 | float16 | fp4 | 128 | yes | uint8 |" in inspected.stdout
    assert "4-bit tensors: 2" in inspected.stdout and "other tensors: 4" in inspected.stdout
    listed = fourbit("inspect", out, "--all")
    assert "| embed_tokens.weight | 100x64 | float32 |" in listed.stdout


def test_the_summary_names_what_it_leaves_and_why():
    """Kept tensors of three or more dimensions (mixture-of-experts weights) and transposed
    Conv1D weights get a line each, so that a model that stays mostly float says why."""
    from fourbit.file_quantization import TensorReport
    from fourbit.tools.cli import format_quantize_summary

    reports = [
        TensorReport("h.0.attn.c_attn.weight", (64, 192), torch.float32, True, 49152, 7000, 0.01, 0.09, True),
        TensorReport("experts.gate_up_proj", (8, 256, 64), torch.bfloat16, False, 262144, 262144),
        TensorReport("norm.weight", (64,), torch.float32, False, 256, 256),
    ]
    lines = format_quantize_summary(reports).splitlines()
    assert lines[1].split()[:2] == ["quantized", "1"] and lines[2].split()[:2] == ["kept", "2"]
    assert lines[-2] == "(1 Conv1D weights, stored (in, out), quantized as (out, in), as bitsandbytes does)"
    assert lines[-1].startswith("(1 kept tensors of 3 or more dimensions, 0.26 MB: batched weights")
    assert len(format_quantize_summary(reports[2:]).splitlines()) == 4


def test_quantize_options(float_checkpoint, tmp_path):
    out = tmp_path / "q.safetensors"
    result = fourbit("quantize", float_checkpoint, "-o", out, "--no-double-quant", "--skip", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    description = checkpoint.describe(out)
    assert {info.name for info in description.quantized} == {
        "embed_tokens.weight",
        "layers.0.proj.weight",
        "layers.0.out.weight",
    }
    assert not any(info.nested for info in description.quantized)


def test_inspect_plain_and_bitsandbytes_layout(float_checkpoint, tmp_path):
    assert "model.safetensors: plain" in fourbit("inspect", float_checkpoint).stdout
    ours = tmp_path / "q.safetensors"
    fourbit("quantize", float_checkpoint, "-o", ours, "-q")
    theirs = tmp_path / "theirs.safetensors"
    save_file(load_file(ours), theirs)  # same tensors, written without fourbit's metadata
    assert f"{theirs}: bitsandbytes layout" in fourbit("inspect", theirs).stdout


# --------------------------------------------------------------------------- bad input


def test_quantize_and_inspect_a_sharded_folder(float_checkpoint, tmp_path):
    tensors = load_file(float_checkpoint)
    folder = tmp_path / "model"
    folder.mkdir()
    names = sorted(tensors)
    save_file({name: tensors[name] for name in names[:3]}, folder / "model-00001-of-00002.safetensors")
    save_file({name: tensors[name] for name in names[3:]}, folder / "model-00002-of-00002.safetensors")
    (folder / "config.json").write_text("{}")
    out = tmp_path / "nf4"
    result = fourbit("quantize", folder, "-o", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-3].split()[:2] == ["quantized", "2"]
    assert sorted(path.name for path in out.iterdir()) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    inspected = fourbit("inspect", out)
    assert inspected.returncode == 0, inspected.stderr
    assert "4-bit tensors: 2" in inspected.stdout and "other tensors: 4" in inspected.stdout


def test_missing_file(tmp_path):
    out = tmp_path / "q.safetensors"
    assert_one_line_error(fourbit("quantize", tmp_path / "absent.safetensors", "-o", out), "no such file")
    assert not out.exists()
    assert_one_line_error(fourbit("inspect", tmp_path / "absent.safetensors"), "no such file")


def test_not_a_safetensors_file(tmp_path):
    bogus = tmp_path / "model.safetensors"
    bogus.write_text("this is not a checkpoint")
    out = tmp_path / "q.safetensors"
    assert_one_line_error(fourbit("quantize", bogus, "-o", out), "not a valid safetensors file")
    assert_one_line_error(fourbit("inspect", bogus), "not a valid safetensors file")
    assert list(tmp_path.iterdir()) == [bogus]


def test_unsupported_dtype(tmp_path):
    source = tmp_path / "f64.safetensors"
    save_file({"layer.weight": torch.randn(8, 8, dtype=torch.float64)}, source)
    out = tmp_path / "q.safetensors"
    assert_one_line_error(fourbit("quantize", source, "-o", out), "'layer.weight' has dtype torch.float64", "--skip")
    assert sorted(tmp_path.iterdir()) == [source]


def test_existing_output_needs_force(float_checkpoint, tmp_path):
    out = tmp_path / "q.safetensors"
    out.write_bytes(b"keep me")
    assert_one_line_error(fourbit("quantize", float_checkpoint, "-o", out), "exists", "--force")
    assert out.read_bytes() == b"keep me"
    assert fourbit("quantize", float_checkpoint, "-o", out, "--force", "-q").returncode == 0
    assert "layers.0.proj.weight.absmax" in load_file(out)
    assert_one_line_error(fourbit("quantize", out, "-o", out), "replace the input")


def test_corrupt_checkpoint(float_checkpoint, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(float_checkpoint.read_bytes()[:-100])
    out = tmp_path / "q.safetensors"
    assert_one_line_error(fourbit("quantize", truncated, "-o", out), "not a valid safetensors file")
    assert_one_line_error(fourbit("inspect", truncated), "not a valid safetensors file")
    assert sorted(tmp_path.iterdir()) == [truncated]

    quantized = tmp_path / "quantized.safetensors"
    fourbit("quantize", float_checkpoint, "-o", quantized, "-q")
    state = load_file(quantized)
    state["layers.0.proj.weight.quant_state.bitsandbytes__nf4"] = torch.tensor([123, 34, 0], dtype=torch.uint8)
    broken = tmp_path / "broken.safetensors"
    save_file(state, broken)
    assert_one_line_error(fourbit("inspect", broken), "corrupt 4-bit statistics for 'layers.0.proj.weight'")


def test_bad_option_is_a_usage_error(float_checkpoint, tmp_path):
    result = fourbit("quantize", float_checkpoint, "-o", tmp_path / "q.safetensors", "--blocksize", "48")
    assert result.returncode == 2 and "invalid choice" in result.stderr
    assert not (tmp_path / "q.safetensors").exists()


def test_output_directory_missing(float_checkpoint, tmp_path):
    assert_one_line_error(
        fourbit("quantize", float_checkpoint, "-o", tmp_path / "absent" / "q.safetensors"), "no such directory"
    )


def _unreadable_dtype_file(path) -> None:
    """A safetensors file holding an F6_E2M3 tensor, a dtype torch cannot load."""
    import json
    import struct

    header = json.dumps({"t": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0")


def test_a_dtype_torch_cannot_load_is_a_one_line_error(tmp_path):
    source = tmp_path / "f6.safetensors"
    _unreadable_dtype_file(source)
    assert_one_line_error(fourbit("inspect", source), "F6_E2M3")
    assert_one_line_error(fourbit("quantize", source, "-o", tmp_path / "out.safetensors"), "F6_E2M3")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_quantize_on_cuda_without_cuda_is_a_one_line_error(float_checkpoint, tmp_path):
    result = fourbit("quantize", float_checkpoint, "-o", tmp_path / "out.safetensors", "--device", "cuda")
    assert_one_line_error(result, "no CUDA device")


def _corrupt(path, float_checkpoint, tmp_path, change) -> None:
    state = checkpoint.load_state_dict(_quantized(float_checkpoint, tmp_path))
    change(state)
    save_file(state, path)


def _quantized(float_checkpoint, tmp_path):
    path = tmp_path / "q.safetensors"
    if not path.exists():
        assert fourbit("quantize", float_checkpoint, "-o", path, "-q").returncode == 0
    return path


def _json_dtype_int8(state) -> None:
    import fourbit.functional as F4

    key = next(key for key in state if ".quant_state.bitsandbytes__" in key)
    entries = F4.unpack_tensor_to_dict(state[key])
    entries["dtype"] = "int8"
    state[key] = F4.pack_dict_to_tensor(entries)


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda state: state.update({"layers.0.proj.weight": state["layers.0.proj.weight"][:-1]}), "bytes"),
        (
            lambda state: state.update(
                {"layers.0.proj.weight": state["layers.0.proj.weight"].reshape(-1).view(torch.int32)}
            ),
            "int32",
        ),
        (_json_dtype_int8, "int8"),
    ],
    ids=["short-packed-bytes", "int32-storage", "json-dtype-int8"],
)
def test_inspect_refuses_corrupt_4bit_entries_as_loading_does(float_checkpoint, tmp_path, change, fragment):
    path = tmp_path / "corrupt.safetensors"
    _corrupt(path, float_checkpoint, tmp_path, change)
    assert_one_line_error(fourbit("inspect", path), "corrupt 4-bit statistics", fragment)


def test_quantize_writes_the_requested_quant_storage(float_checkpoint, tmp_path):
    path = tmp_path / "bf16.safetensors"
    assert fourbit("quantize", float_checkpoint, "-o", path, "--quant-storage", "bfloat16", "-q").returncode == 0
    state = load_file(path)
    assert state["layers.0.proj.weight"].dtype == torch.bfloat16
    assert state["layers.0.norm.weight"].dtype == torch.float32  # kept tensors keep their dtype
