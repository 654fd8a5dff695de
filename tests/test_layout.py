"""The tiled runtime layout (``fourbit.layout``) and the rule that everything public sees
bitsandbytes' rows: state dicts, pickles, dequantize, moves to a device that reads rows, sharding.

On the CPU no kernel reads tiles, so these tests make the CPU prefer them (``tiles_on_cpu``): the
CPU products then convert the tiles back per call, which exercises every public path of a tiled
weight without a GPU. The GPU kernels that read tiles are tested in ``test_triton_tiled.py``.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from helpers import STORAGES, available_devices, describe_dtype, needs_fullgraph

import fourbit.functional as F4
from fourbit import layout, ops
from fourbit.nn import Linear4bit, Params4bit


def _tiled_index_reference(n: int, k: int) -> torch.Tensor:
    """For each 8-byte word of a tiled (n, k) weight, the index of the same word in rows, from
    the layout's description: tiles of 16 rows by 64 columns along K, inside a tile half, row in
    half, word in row."""
    order = []
    for group in range(n // 16):
        for step in range(k // 64):
            for half in range(2):
                for row in range(8):
                    for word in range(4):
                        order.append((group * 16 + half * 8 + row) * (k // 16) + step * 4 + word)
    return torch.tensor(order)


@pytest.mark.parametrize("shape", [(16, 64), (32, 128), (48, 256), (16, 4096), (160, 192)], ids=str)
@pytest.mark.parametrize("storage", STORAGES, ids=describe_dtype)
def test_tile_moves_whole_words_to_their_documented_places_and_untile_restores_every_byte(shape, storage):
    n, k = shape
    rows = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8)
    packed = rows.view(storage).reshape(-1, 1)
    before = packed.clone()
    tiled = layout.tile(packed, shape)
    assert tiled.dtype == storage and tiled.shape == packed.shape
    assert torch.equal(packed.reshape(-1).view(torch.uint8), before.reshape(-1).view(torch.uint8)), "input modified"
    words = rows.view(torch.int64)
    assert torch.equal(tiled.reshape(-1).view(torch.uint8).view(torch.int64), words[_tiled_index_reference(n, k)])
    restored = layout.untile(tiled, shape)
    assert restored.dtype == storage and restored.shape == packed.shape
    assert torch.equal(restored.reshape(-1).view(torch.uint8), rows)


@pytest.mark.parametrize("shape", [(8, 64), (16, 32), (17, 64), (16, 96), (64,), (2, 16, 64), (0, 64)], ids=str)
def test_shapes_without_a_tiled_layout_are_refused_with_the_reason(shape):
    assert not layout.can_tile(shape)
    numel = max(1, torch.Size(shape).numel())
    with pytest.raises(ValueError, match="no tiled layout"):
        layout.tile(torch.zeros(numel // 2 + 1, dtype=torch.uint8), shape)


def test_tile_refuses_data_of_the_wrong_size():
    with pytest.raises(ValueError, match="packs into 512"):
        layout.tile(torch.zeros(500, dtype=torch.uint8), (16, 64))


@pytest.fixture
def tiles_on_cpu(monkeypatch):
    """The CPU prefers tiles for every weight that has them, as a GPU with the fragment kernel does."""
    monkeypatch.setitem(ops._tiling_rules, "cpu", lambda device, shape, blocksize: True)


def _layers(quant_type="nf4", nested=True, bias=True, storage=torch.uint8, shape=(48, 256)):
    """Two identical quantized CPU layers: one kept in rows, one tiled (quantized under tiles_on_cpu)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(shape[1], shape[0], bias=bias)

    def make():
        layer = Linear4bit(shape[1], shape[0], bias=bias, compute_dtype=torch.float32, quant_type=quant_type,
                           compress_statistics=nested, quant_storage=storage)  # fmt: skip
        layer.load_state_dict(base.state_dict())
        return layer

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(ops._tiling_rules, "cpu", lambda device, shape, blocksize: False)
        rows = make().to("cpu")
        patch.setitem(ops._tiling_rules, "cpu", lambda device, shape, blocksize: True)
        tiled = make().to("cpu")
    return rows, tiled


@pytest.mark.parametrize("storage", STORAGES, ids=describe_dtype)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("shape", [(48, 256), (48, 448)], ids=str)  # 448: K of part of a 256-column iteration
def test_a_tiled_layer_computes_what_a_layer_in_rows_does_and_saves_bitsandbytes_bytes(
    storage, quant_type, nested, shape
):
    rows, tiled = _layers(quant_type, nested, storage=storage, shape=shape)
    assert tiled.weight.quant_state.tiled and not rows.weight.quant_state.tiled
    assert not torch.equal(tiled.weight.data.view(torch.uint8), rows.weight.data.view(torch.uint8))
    x = torch.randn(5, shape[1])
    torch.testing.assert_close(tiled(x), rows(x), rtol=0, atol=0)
    state = tiled.weight.quant_state
    assert torch.equal(
        F4.dequantize_4bit(tiled.weight.data, state), F4.dequantize_4bit(rows.weight.data, rows.weight.quant_state)
    )
    saved, expected = tiled.state_dict(), rows.state_dict()
    assert saved.keys() == expected.keys()
    for key in expected:
        assert torch.equal(saved[key].view(torch.uint8), expected[key].view(torch.uint8)), key
    assert state.tiled, "saving must not change the layer"


@needs_fullgraph
def test_a_tiled_layer_trains_through_its_input_and_compiles_without_graph_breaks():
    rows, tiled = _layers()
    x = torch.randn(3, 256, requires_grad=True)
    tiled(x).square().sum().backward()
    expected = x.grad.clone()
    x.grad = None
    rows(x).square().sum().backward()
    torch.testing.assert_close(expected, x.grad)
    compiled = torch.compile(tiled, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x.detach()), rows(x.detach()))


def test_pickles_and_torch_save_hold_rows_and_load_back_working():
    rows, tiled = _layers()
    x = torch.randn(2, 256)
    for restored in (pickle.loads(pickle.dumps(tiled)), _torch_roundtrip(tiled)):
        assert not restored.weight.quant_state.tiled and not restored.quant_state.tiled
        assert restored.weight.quant_state is restored.quant_state
        assert torch.equal(restored.weight.data, rows.weight.data)
        torch.testing.assert_close(restored(x), rows(x), rtol=0, atol=0)
    assert tiled.weight.quant_state.tiled, "pickling must not change the layer"


def _torch_roundtrip(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_a_deep_copy_stays_tiled_and_independent():
    rows, tiled = _layers()
    clone = copy.deepcopy(tiled)
    assert clone.weight.quant_state.tiled and clone.weight.quant_state is clone.quant_state
    assert clone.weight.data.data_ptr() != tiled.weight.data.data_ptr()
    x = torch.randn(2, 256)
    torch.testing.assert_close(clone(x), rows(x), rtol=0, atol=0)


def test_moving_to_a_device_that_reads_rows_converts_and_moving_back_tiles_again(monkeypatch):
    rows, tiled = _layers()
    monkeypatch.setitem(ops._tiling_rules, "cpu", lambda device, shape, blocksize: False)
    tiled.to("cpu")
    assert not tiled.weight.quant_state.tiled
    assert torch.equal(tiled.weight.data, rows.weight.data)
    monkeypatch.setitem(ops._tiling_rules, "cpu", lambda device, shape, blocksize: True)
    tiled.to("cpu")
    assert tiled.weight.quant_state.tiled
    torch.testing.assert_close(tiled(torch.ones(1, 256)), rows(torch.ones(1, 256)), rtol=0, atol=0)


def test_sharding_stores_rows_as_row_ranges_are_not_tile_ranges():
    rows, tiled = _layers()
    pieces = torch.chunk(tiled.weight, 2)
    assert not tiled.weight.quant_state.tiled
    assert torch.equal(torch.cat([piece.data for piece in pieces]), rows.weight.data)
    assert all(isinstance(piece, Params4bit) for piece in pieces)


def test_a_checkpoint_in_rows_loads_tiled_where_tiles_are_preferred(tiles_on_cpu):
    rows, _ = _layers()
    target = Linear4bit(256, 48, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    checkpoint = rows.state_dict()
    before = {key: value.clone() for key, value in checkpoint.items()}
    target.load_state_dict(checkpoint)
    assert target.weight.quant_state.tiled and target.quant_state is target.weight.quant_state
    assert all(torch.equal(checkpoint[key], before[key]) for key in before), "loading modified the checkpoint"
    x = torch.randn(4, 256)
    torch.testing.assert_close(target(x), rows(x), rtol=0, atol=0)


def test_the_tiled_layout_never_applies_to_weights_without_one(tiles_on_cpu):
    layer = Linear4bit(100, 40, quant_type="nf4").to("cpu")
    assert not layer.weight.quant_state.tiled


def test_a_tiled_state_refuses_a_shape_without_a_tiled_layout():
    packed, state = F4.quantize_4bit(torch.randn(8, 64))
    state.tiled = True
    with pytest.raises(ValueError, match="has no tiled layout"):
        F4.dequantize_4bit(packed, state)


def test_the_environment_can_keep_weights_in_rows(tiles_on_cpu, monkeypatch):
    monkeypatch.setenv("FOURBIT_TILED_LAYOUT", "0")
    layer = Linear4bit(256, 48, quant_type="nf4").to("cpu")
    assert not layer.weight.quant_state.tiled


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_a_tiled_weight_saves_and_reloads_bitsandbytes_bytes(device, nested, tmp_path, monkeypatch):
    """Quantize tiled (the CUDA default; forced on the CPU), save, load into a fresh layer (tiled
    again), save again: both files hold exactly what bitsandbytes' Linear4bit saves."""
    bnb = pytest.importorskip("bitsandbytes")
    if device == "cpu":
        monkeypatch.setitem(ops._tiling_rules, "cpu", lambda device, shape, blocksize: True)
    torch.manual_seed(3)
    dense = torch.nn.Linear(512, 96, dtype=torch.bfloat16)
    theirs = bnb.nn.Linear4bit(512, 96, compress_statistics=nested, quant_type="nf4")
    theirs.load_state_dict(dense.state_dict())
    expected = theirs.to(device).state_dict()
    ours = Linear4bit(512, 96, compress_statistics=nested, quant_type="nf4")
    ours.load_state_dict(dense.state_dict())
    ours = ours.to(device)
    assert ours.weight.quant_state.tiled
    path = tmp_path / "layer.pt"
    torch.save(ours.state_dict(), path)
    fresh = Linear4bit(512, 96, compress_statistics=nested, quant_type="nf4", device="meta")
    fresh.load_state_dict(torch.load(path, weights_only=True, map_location=device), assign=True)
    fresh = fresh.to(device)
    assert fresh.weight.quant_state.tiled
    for saved in (torch.load(path, weights_only=True), fresh.state_dict()):
        assert list(saved) == list(expected)
        for key, value in expected.items():
            assert torch.equal(saved[key].cpu().view(torch.uint8), value.cpu().view(torch.uint8)), key
