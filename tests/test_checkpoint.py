"""fourbit.checkpoint: the streaming safetensors writer, readers, and bitsandbytes' key layout."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fourbit.functional as F4
from fourbit import checkpoint
from fourbit.nn import Linear4bit


def quantized_model(quant_type: str = "nf4", nested: bool = True, storage: torch.dtype = torch.uint8) -> nn.Module:
    dense = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32, bias=False), nn.LayerNorm(32))
    model = nn.Sequential(
        Linear4bit(64, 48, quant_type=quant_type, compress_statistics=nested, quant_storage=storage),
        nn.ReLU(),
        Linear4bit(48, 32, bias=False, quant_type=quant_type, compress_statistics=nested, quant_storage=storage),
        nn.LayerNorm(32),
    )
    model.load_state_dict(dense.state_dict())
    return model.to("cpu")


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.uint8, torch.bool],
)
def test_writer_output_reads_back_with_safetensors(tmp_path, dtype):
    tensors = {
        "a": (torch.randn(3, 5) * 10).to(dtype),
        "b.empty": torch.zeros(0, 4, dtype=dtype),
        "c.scalar": torch.tensor(3).to(dtype),
        "d.strided": (torch.randn(6, 4) * 10).to(dtype).t(),
    }
    path = tmp_path / "out.safetensors"
    with checkpoint.SafetensorsWriter(path, {"note": "x"}) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == dtype
        assert torch.equal(loaded[name], tensor), name
    assert checkpoint.read_metadata(path) == {"format": "pt", "note": "x"}


def test_writer_leaves_nothing_behind_on_error(tmp_path):
    path = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError, match="boom"), checkpoint.SafetensorsWriter(path) as writer:
        writer.add("a", torch.ones(3))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_names_a_path_it_cannot_write_before_reading_any_tensor(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="is a directory"):
        checkpoint.save_state_dict({"a": torch.ones(2)}, tmp_path / "folder")
    with pytest.raises(checkpoint.CheckpointError, match="no such directory"):
        checkpoint.save_state_dict({"a": torch.ones(2)}, tmp_path / "missing" / "out.safetensors")
    assert [path.name for path in tmp_path.iterdir()] == ["folder"] and not any((tmp_path / "folder").iterdir())


def test_writer_rejects_bad_tensors(tmp_path):
    writer = checkpoint.SafetensorsWriter(tmp_path / "out.safetensors")
    writer.add("a", torch.ones(2))
    with pytest.raises(ValueError, match="duplicate tensor name 'a'"):
        writer.add("a", torch.ones(2))
    with pytest.raises(TypeError, match=r"cannot store torch\.complex128"):
        writer.add("c", torch.ones(2, dtype=torch.complex128))
    with pytest.raises(TypeError, match="expected a tensor"):
        writer.add("d", [1, 2])
    writer.abort()
    with pytest.raises(TypeError, match="metadata"):
        checkpoint.SafetensorsWriter(tmp_path / "x.safetensors", {"n": 1})
    assert list(tmp_path.iterdir()) == []


def test_writer_does_not_modify_its_input(tmp_path):
    tensor = torch.randn(4, 4)
    before = tensor.clone()
    checkpoint.save_state_dict({"t": tensor}, tmp_path / "a.safetensors")
    assert torch.equal(tensor, before)


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("quant_type", "nested"), [("nf4", True), ("fp4", False)])
def test_saved_model_reloads_identically(tmp_path, quant_type, nested, storage):
    model = quantized_model(quant_type, nested, storage)
    path = tmp_path / "model.safetensors"
    checkpoint.save_state_dict(model, path, metadata={"origin": "test"})
    metadata = checkpoint.read_metadata(path)
    assert metadata["fourbit_format"] == checkpoint.FORMAT_NAME
    assert metadata["origin"] == "test"
    state = checkpoint.load_state_dict(path)
    assert state.keys() == model.state_dict().keys()
    fresh = nn.Sequential(
        Linear4bit(64, 48, quant_type=quant_type, device="meta"),
        nn.ReLU(),
        Linear4bit(48, 32, bias=False, quant_type=quant_type, device="meta"),
        nn.LayerNorm(32, device="meta"),
    )
    fresh.load_state_dict(state, assign=True)
    x = torch.randn(5, 64)
    assert torch.equal(fresh(x), model(x))
    assert fresh[0].weight.quant_storage == storage


def test_generator_source_streams(tmp_path):
    path = tmp_path / "g.safetensors"
    checkpoint.save_state_dict(((f"t{i}", torch.full((2,), float(i))) for i in range(3)), path)
    assert [name for name, _ in checkpoint.iter_tensors(path)] == ["t0", "t1", "t2"]


def test_quantized_groups_from_names():
    names = [
        "a.weight",
        "a.weight.absmax",
        "a.weight.quant_map",
        "a.weight.nested_absmax",
        "a.weight.nested_quant_map",
        "a.weight.quant_state.bitsandbytes__nf4",
        "a.bias",
        "b.weight",
        "orphan.weight.quant_state.bitsandbytes__fp4",
    ]
    groups = checkpoint.quantized_groups(names)
    assert groups == {"a.weight": [*names[1:5], names[5]]}


def test_describe_reports_each_writer(tmp_path):
    model = quantized_model()
    ours = tmp_path / "ours.safetensors"
    checkpoint.save_state_dict(model, ours)
    theirs = tmp_path / "theirs.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, theirs)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2, 2)}, plain)

    described = checkpoint.describe(ours)
    assert described.writer == "fourbit 0.1.0"
    assert [info.name for info in described.quantized] == ["0.weight", "2.weight"]
    first = described.quantized[0]
    assert (first.shape, first.quant_type, first.blocksize, first.nested, first.dtype) == (
        (48, 64),
        "nf4",
        64,
        True,
        torch.float32,
    )
    expected = sum(v.numel() * v.element_size() for k, v in model.state_dict().items() if k.startswith("0.weight"))
    assert first.nbytes == expected
    assert sorted(name for name, *_ in described.other) == ["0.bias", "3.bias", "3.weight"]
    assert checkpoint.describe(theirs).writer == "bitsandbytes layout"
    assert checkpoint.describe(plain).writer == "plain"


def test_describe_rejects_corrupt_statistics(tmp_path):
    state = {k: v.contiguous() for k, v in quantized_model().state_dict().items()}
    packed = F4.unpack_tensor_to_dict(state["0.weight.quant_state.bitsandbytes__nf4"])
    packed["blocksize"] = 48
    state["0.weight.quant_state.bitsandbytes__nf4"] = F4.pack_dict_to_tensor(packed)
    path = tmp_path / "bad.safetensors"
    save_file(state, path)
    with pytest.raises(checkpoint.CheckpointError, match=r"corrupt 4-bit statistics for '0\.weight'.*blocksize"):
        checkpoint.describe(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no such file"), (b"not a checkpoint at all", "not a valid safetensors file")],
)
def test_bad_files_raise_checkpoint_error(tmp_path, content, message):
    path = tmp_path / "x.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.load_state_dict(path)


def test_truncated_file_raises_checkpoint_error(tmp_path):
    path = tmp_path / "x.safetensors"
    checkpoint.save_state_dict({"a": torch.randn(100, 100)}, path)
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(checkpoint.CheckpointError, match="not a valid safetensors file"):
        checkpoint.load_state_dict(path)


def test_header_is_json_with_metadata_first(tmp_path):
    path = tmp_path / "x.safetensors"
    checkpoint.save_state_dict({"a": torch.ones(3)}, path)
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    assert size % 8 == 0
    header = json.loads(raw[8 : 8 + size])
    assert header["a"] == {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}
    assert len(raw) == 8 + size + 12


def test_tensors_lie_aligned_to_their_element_size(tmp_path):
    """The format allows no padding between tensors, so a float after an odd number of bytes
    would start misaligned, and load as a misaligned memory-mapped view (whose products may
    differ in their last bits from an aligned copy's). The writer lays tensors out by element
    size, largest first, as safetensors' own writer does; header order and values are kept."""
    state = {
        "odd": torch.arange(7, dtype=torch.uint8),
        "f32": torch.randn(5),
        "half": torch.randn(3, dtype=torch.bfloat16),
        "f64": torch.randn(3, dtype=torch.float64),
        **{key: value.contiguous() for key, value in quantized_model().state_dict().items()},
    }
    path = tmp_path / "x.safetensors"
    checkpoint.save_state_dict(state, path)
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    header.pop("__metadata__")
    assert list(header) == list(state)
    spans = sorted(entry["data_offsets"] for entry in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - size
    assert all(left[1] == right[0] for left, right in itertools.pairwise(spans))  # no holes, no overlaps
    loaded = checkpoint.load_state_dict(path)
    for name, tensor in state.items():
        assert header[name]["data_offsets"][0] % tensor.element_size() == 0, name
        assert loaded[name].data_ptr() % tensor.element_size() == 0, name
        assert torch.equal(loaded[name], tensor), name
    theirs = load_file(path)  # safetensors' own reader agrees
    assert all(torch.equal(theirs[name], tensor) for name, tensor in state.items())


def _write_in_arrival_order(path, state):
    """A safetensors file with the tensors back to back in ``state``'s order, whatever their
    alignment (as other writers, and fourbit's before, may lay them out)."""
    names = {torch.float32: "F32", torch.uint8: "U8", torch.bfloat16: "BF16", torch.float64: "F64"}
    entries, blobs, offset = {}, [], 0
    for name, tensor in state.items():
        data = tensor.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
        entries[name] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape),
                         "data_offsets": [offset, offset + len(data)]}  # fmt: skip
        blobs.append(data)
        offset += len(data)
    header = json.dumps(entries).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"".join(blobs))


def test_tensors_a_file_lays_out_unaligned_load_as_aligned_copies(tmp_path):
    """A file from a writer that packs tensors back to back: ``load_state_dict`` and
    ``load_quantized`` give aligned tensors with the file's values, and the loaded model's
    outputs are the saved model's, bit for bit."""
    from fourbit.loading import load_quantized

    torch.manual_seed(0)
    model = quantized_model()
    state = {"odd": torch.arange(5, dtype=torch.uint8), **{k: v.contiguous() for k, v in model.state_dict().items()}}
    path = tmp_path / "packed.safetensors"
    _write_in_arrival_order(path, state)
    with checkpoint.open_file(path) as handle:  # the reader's own views are misaligned
        assert any(handle.get_tensor(name).data_ptr() % value.element_size() for name, value in state.items())
    loaded = checkpoint.load_state_dict(path)
    for name, tensor in state.items():
        assert loaded[name].data_ptr() % tensor.element_size() == 0, name
        assert torch.equal(loaded[name], tensor), name

    state.pop("odd")
    _write_in_arrival_order(path, state)
    with torch.device("meta"):
        fresh = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32, bias=False), nn.LayerNorm(32))
    load_quantized(fresh, path)
    for name, tensor in fresh.state_dict().items():
        assert tensor.data_ptr() % tensor.element_size() == 0, name
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
