"""Sharded checkpoints (a folder of safetensors files, with or without its index): quantized shard
by shard into a folder, described as one checkpoint, and files written with the usual mode."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import fourbit.functional as F4
from fourbit import checkpoint
from fourbit.convert import quantize_checkpoint

INDEX = checkpoint.SHARD_INDEX_NAME
SHARDS = {
    "model-00001-of-00002.safetensors": {
        "embed_tokens.weight": torch.randn(100, 64),
        "layers.0.proj.weight": torch.randn(128, 64, dtype=torch.bfloat16),
        "layers.0.proj.bias": torch.randn(128),
    },
    "model-00002-of-00002.safetensors": {
        "layers.0.out.weight": torch.randn(64, 128, dtype=torch.float16),
        "layers.0.norm.weight": torch.ones(64),
    },
}


def _sharded(folder, indexed=True, shards=SHARDS):
    folder.mkdir()
    for name, tensors in shards.items():
        save_file(tensors, folder / name)
    if indexed:
        weight_map = {key: name for name, tensors in shards.items() for key in tensors}
        (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return folder


def _files(folder):
    return sorted(path.name for path in folder.iterdir())


@pytest.mark.parametrize("given", ["folder", "index"])
def test_each_shard_is_quantized_under_its_name_with_a_new_index(tmp_path, given):
    source = _sharded(tmp_path / "float")
    out = tmp_path / "nf4"
    reports = quantize_checkpoint(source if given == "folder" else source / INDEX, out, progress=False)
    assert _files(out) == sorted([*SHARDS, INDEX])
    for name in SHARDS:  # each shard as quantizing it alone gives it
        alone = tmp_path / f"alone-{name}"
        quantize_checkpoint(source / name, alone, progress=False)
        assert (out / name).read_bytes() == alone.read_bytes()
    index = json.loads((out / INDEX).read_text())
    written = {key: name for name in SHARDS for key in load_file(out / name)}
    assert index["weight_map"] == written
    assert "layers.0.out.weight.quant_state.bitsandbytes__nf4" in written
    assert index["metadata"]["total_size"] == sum(report.bytes_after for report in reports)
    assert sum(report.quantized for report in reports) == 2  # the embedding is skipped by default
    assert _files(tmp_path) == sorted(["float", "nf4", *(f"alone-{name}" for name in SHARDS)])


def test_a_folder_without_an_index_gets_none(tmp_path):
    source = _sharded(tmp_path / "float", indexed=False)
    quantize_checkpoint(source, tmp_path / "nf4", progress=False)
    assert _files(tmp_path / "nf4") == sorted(SHARDS)


def test_a_failing_shard_leaves_no_output_and_no_staging_folder(tmp_path):
    shards = {**SHARDS, "model-00003-of-00003.safetensors": {"layers.1.w": torch.randn(8, 8, dtype=torch.float64)}}
    source = _sharded(tmp_path / "float", shards=shards)
    with pytest.raises(checkpoint.CheckpointError, match=r"'layers\.1\.w' has dtype torch\.float64"):
        quantize_checkpoint(source, tmp_path / "nf4", progress=False)
    assert _files(tmp_path) == ["float"]


def test_an_existing_output_folder_is_replaced_only_when_asked(tmp_path):
    source = _sharded(tmp_path / "float")
    out = tmp_path / "nf4"
    out.mkdir()
    (out / "keep").write_text("mine")
    with pytest.raises(checkpoint.CheckpointError, match="exists"):
        quantize_checkpoint(source, out, progress=False)
    assert _files(out) == ["keep"]
    quantize_checkpoint(source, out, overwrite=True, progress=False)
    assert _files(out) == sorted([*SHARDS, INDEX])
    assert _files(tmp_path) == ["float", "nf4"]


@pytest.mark.parametrize("target", ["the folder", "its parent"])
def test_an_output_that_would_delete_the_input_is_refused(tmp_path, target):
    """Shards are written, not the folder's other files: replacing the input would lose them."""
    (tmp_path / "models").mkdir()
    source = _sharded(tmp_path / "models" / "float")
    (source / "config.json").write_text("{}")
    out = source if target == "the folder" else source.parent
    before = _files(source)
    with pytest.raises(checkpoint.CheckpointError, match="holds the checkpoint being quantized"):
        quantize_checkpoint(source / INDEX, out, overwrite=True, progress=False)
    assert _files(source) == before and _files(tmp_path / "models") == ["float"]


def test_a_file_cannot_be_written_over_a_folder(tmp_path):
    (tmp_path / "out").mkdir()
    source = tmp_path / "one.safetensors"
    save_file({"w": torch.randn(8, 64)}, source)
    with pytest.raises(checkpoint.CheckpointError, match="is a folder"):
        quantize_checkpoint(source, tmp_path / "out", overwrite=True, progress=False)


def test_a_folder_of_pickled_weights_is_refused_with_a_way_out(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match=r"a folder without safetensors files$"):
        quantize_checkpoint(tmp_path / "empty", tmp_path / "out", progress=False)
    (tmp_path / "pickled").mkdir()
    torch.save({"w": torch.randn(8, 64)}, tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(checkpoint.CheckpointError, match=r"holds pytorch_model\.bin: load the model and save it"):
        quantize_checkpoint(tmp_path / "pickled", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_sharded_checkpoint_is_described_whole(tmp_path):
    """transformers shards by tensor, so a 4-bit weight's statistics may sit in another shard."""
    packed, state = F4.quantize_4bit(torch.randn(32, 64), quant_type="nf4", compress_statistics=True)
    entries = {f"w.{key}": value for key, value in state.as_dict(packed=True).items()}
    shards = {"a.safetensors": {"w": packed, "bias": torch.zeros(32)}, "b.safetensors": entries}
    folder = _sharded(tmp_path / "q", shards=shards)
    for given in (folder, folder / INDEX):
        description = checkpoint.describe(given)
        assert [(info.name, info.shape, info.nested) for info in description.quantized] == [("w", (32, 64), True)]
        assert [entry[0] for entry in description.other] == ["bias"]


def test_a_sharded_checkpoint_loads_as_one_state_dict(tmp_path):
    folder = _sharded(tmp_path / "float")
    expected = {key: value for tensors in SHARDS.values() for key, value in tensors.items()}
    for given in (folder, folder / INDEX):
        loaded = checkpoint.load_state_dict(given)
        assert sorted(loaded) == sorted(expected)
        assert all(torch.equal(loaded[key], expected[key]) for key in expected)


def test_written_files_get_the_mode_a_plain_open_gives(tmp_path):
    """Checkpoints are shared: not readable by their owner alone, as a temporary file would be."""
    out = tmp_path / "q.safetensors"
    with checkpoint.SafetensorsWriter(out) as writer:
        writer.add("w", torch.zeros(4))
    mask = os.umask(0o022)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask
    quantize_checkpoint(_sharded(tmp_path / "float"), tmp_path / "nf4", progress=False)
    assert (tmp_path / "nf4").stat().st_mode & 0o777 == 0o777 & ~mask
