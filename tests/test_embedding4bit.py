"""Embedding4bit, EmbeddingNF4, EmbeddingFP4: bitsandbytes' 4-bit embedding tables."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import available_devices, describe_dtype, needs_fullgraph

import fourbit
import fourbit.functional as F4


def _tables(num_embeddings, dim, dtype, quant_type, device="cpu", seed=0):
    """A float embedding and the same table in a fourbit Embedding4bit, quantized on ``device``."""
    torch.manual_seed(seed)
    dense = torch.nn.Embedding(num_embeddings, dim, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dims that are not whole blocks warn
        table = fourbit.nn.Embedding4bit(num_embeddings, dim, dtype=dtype, quant_type=quant_type)
    table.load_state_dict(dense.state_dict())
    return dense, table.to(device)


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("dim", [128, 96, 100], ids=["whole-blocks", "16s", "odd"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=describe_dtype)
def test_lookups_decode_the_rows_they_read(device, dim, quant_type, dtype):
    """A lookup gives the rows of the decoded table, in the table's dtype, for any index shape."""
    dense, table = _tables(50, dim, dtype, quant_type, device)
    decoded = F4.dequantize_4bit(table.weight.data, table.weight.quant_state)
    assert decoded.shape == (50, dim)
    for shape in [(7,), (3, 5), (2, 1, 4), ()]:
        index = torch.randint(0, 50, shape, device=device)
        out = table(index)
        assert out.dtype == dtype and out.shape == (*shape, dim)
        assert torch.equal(out, torch.nn.functional.embedding(index, decoded))
    # within 4-bit error of the float table (mean absolute error over the mean magnitude)
    index = torch.arange(50, device=device)
    error = (table(index).float() - dense.weight.detach().to(device).float()).abs().mean()
    assert 0 < error < 0.2 * dense.weight.detach().float().abs().mean()  # FP4 errs about 0.12, NF4 0.08


@pytest.mark.parametrize("device", available_devices())
def test_a_table_kept_in_tiles_is_looked_up_in_rows(device):
    """On CUDA a 64x256 table is stored in the tiled layout (``quant_state.tiled``); the first
    lookup turns it back into rows, which lookups read, and decodes the same values."""
    _, table = _tables(64, 256, torch.bfloat16, "nf4", device)
    state = table.weight.quant_state
    decoded = F4.dequantize_4bit(table.weight.data, state)
    index = torch.randint(0, 64, (4, 6), device=device)
    assert torch.equal(table(index), torch.nn.functional.embedding(index, decoded))
    assert not state.tiled
    assert torch.equal(F4.dequantize_4bit(table.weight.data, state), decoded)


@pytest.mark.parametrize("dim", [128, 100], ids=["whole-blocks", "odd"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=describe_dtype)
def test_lookups_match_bitsandbytes(dim, quant_type, dtype):
    """The same packed table and the same lookups, bit for bit (on the CPU; not at 96 columns,
    where bitsandbytes' CPU decode mis-indexes absmax: README, "Differences")."""
    bnb = pytest.importorskip("bitsandbytes")
    dense, ours = _tables(50, dim, dtype, quant_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = bnb.nn.Embedding4bit(50, dim, dtype=dtype, quant_type=quant_type)
    theirs.load_state_dict(dense.state_dict())
    theirs = theirs.to("cpu")
    assert torch.equal(ours.weight.data, theirs.weight.data)
    index = torch.randint(0, 50, (3, 7))
    assert torch.equal(ours(index), theirs(index))


def test_nf4_and_fp4_variants_and_the_defaults():
    assert fourbit.nn.EmbeddingNF4(10, 64).weight.quant_type == "nf4"
    assert fourbit.nn.EmbeddingFP4(10, 64).weight.quant_type == "fp4"
    table = fourbit.nn.Embedding4bit(10, 64)
    assert table.weight.quant_type == "fp4" and not table.weight.compress_statistics  # as bitsandbytes
    assert "quant_type=fp4" in repr(table)
    with pytest.warns(UserWarning, match="Embedding size 40 is not divisible by block size 64"):
        fourbit.nn.Embedding4bit(10, 40)


def test_bad_settings_and_a_table_not_yet_quantized_are_clear_errors():
    with pytest.raises(ValueError, match="quant_type='nf3' is not supported"):
        fourbit.nn.Embedding4bit(10, 64, quant_type="nf3")
    with pytest.raises(ValueError, match=r"quant_storage=torch\.int32 is not supported"):
        fourbit.nn.Embedding4bit(10, 64, quant_storage=torch.int32)
    with pytest.raises(RuntimeError, match="Embedding4bit weight is not quantized yet: move the module to a device"):
        fourbit.nn.Embedding4bit(10, 64)(torch.tensor([1]))


def test_saving_works_in_float_form_only():
    """Before quantization the float table saves as nn.Embedding's does; a quantized table refuses
    (bitsandbytes refuses always), naming what to do instead."""
    dense, _ = _tables(20, 64, torch.float32, "nf4")
    table = fourbit.nn.Embedding4bit(20, 64)
    table.load_state_dict(dense.state_dict())
    assert torch.equal(table.state_dict()["weight"], dense.weight.detach())
    table = table.to("cpu")
    with pytest.raises(NotImplementedError, match="save the float embedding table and quantize it after loading"):
        table.state_dict()


def test_a_float_table_loads_into_a_quantized_module():
    """Quantized again with the module's settings, as loading it before the move would; a table
    that does not fit is an error naming both shapes, and the module keeps its table."""
    dense, quantized_first = _tables(20, 64, torch.float32, "nf4")
    reloaded = fourbit.nn.EmbeddingNF4(20, 64).to("cpu")
    reloaded.load_state_dict(dense.state_dict())
    assert torch.equal(reloaded.weight.data, quantized_first.weight.data)
    assert reloaded.weight.module is reloaded and reloaded.quant_state is reloaded.weight.quant_state
    index = torch.arange(20)
    assert torch.equal(reloaded(index), quantized_first(index))
    packed = reloaded.weight.data.clone()
    with pytest.raises(RuntimeError, match=r"a float table of shape \(20, 64\) is needed, got a torch.float32 tensor"):
        reloaded.load_state_dict({"weight": torch.zeros(3, 64)})
    assert torch.equal(reloaded.weight.data, packed)


def test_quant_storage_views_of_the_packed_table():
    """A table stored as another dtype (``quant_storage``) decodes the same rows."""
    _, plain = _tables(40, 128, torch.bfloat16, "nf4")
    torch.manual_seed(0)
    dense = torch.nn.Embedding(40, 128, dtype=torch.bfloat16)
    stored = fourbit.nn.Embedding4bit(40, 128, dtype=torch.bfloat16, quant_type="nf4", quant_storage=torch.bfloat16)
    stored.load_state_dict(dense.state_dict())
    stored = stored.to("cpu")
    assert stored.weight.dtype == torch.bfloat16
    index = torch.randint(0, 40, (9,))
    assert torch.equal(stored(index), plain(index))


@needs_fullgraph
@pytest.mark.cpu_only  # inductor's C++ code: a minute and more on a GPU machine's shared cores, no CUDA in it
def test_compiles_without_a_graph_break_and_survives_copies():
    import copy
    import pickle

    _, table = _tables(64, 128, torch.float32, "nf4")
    index = torch.randint(0, 64, (2, 5))
    expected = table(index)
    assert torch.equal(torch.compile(table, fullgraph=True)(index), expected)
    assert torch.equal(copy.deepcopy(table)(index), expected)
    assert torch.equal(pickle.loads(pickle.dumps(table))(index), expected)
