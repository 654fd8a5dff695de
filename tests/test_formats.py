"""The code tables and small builders of fourbit.formats."""

from __future__ import annotations

import pytest
import torch

from fourbit import formats
from fourbit.formats import create_dynamic_map, get_4bit_type

SPEC_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def test_nf4_table_is_the_spec_table_sorted_float32():
    table = get_4bit_type("nf4")
    assert table.dtype == torch.float32 and table.shape == (16,)
    assert torch.equal(table, torch.tensor(SPEC_NF4, dtype=torch.float32))
    assert torch.all(table[1:] > table[:-1])


def test_fp4_table_is_bit_pattern_ordered_and_normalised_by_twelve():
    table = get_4bit_type("fp4")
    raw = [0, 0.0625, 8, 12, 4, 6, 2, 3]
    expected = torch.tensor(raw + [-v for v in raw], dtype=torch.float32) / 12
    assert torch.equal(table, expected)
    assert table.abs().max() == 1.0
    # the sign bit is bit 3 of the index: entries 8..15 are the negatives of 0..7
    assert torch.equal(table[8:], -table[:8])
    # the "-0" pattern holds +0.0, byte for byte what bitsandbytes stores as quant_map
    assert not torch.signbit(table[8]) and table.view(torch.int32)[8] == 0


@pytest.mark.parametrize("name", ["int4", "af4"])
def test_optional_tables_span_minus_one_to_one(name):
    table = get_4bit_type(name)
    assert table.shape == (16,) and table.abs().max() == 1.0
    assert table.min() == -1.0


def test_get_4bit_type_places_the_table_on_the_device_asked():
    assert get_4bit_type("nf4").device.type == "cpu"
    assert get_4bit_type("nf4", device="meta").device.type == "meta"


def test_get_4bit_type_rejects_unknown_names_and_af4_blocksizes():
    with pytest.raises(ValueError, match="unknown 4-bit type 'nf5'"):
        get_4bit_type("nf5")
    with pytest.raises(ValueError, match="blocksize 64"):
        get_4bit_type("af4", blocksize=128)


def test_dynamic_map_follows_the_construction_rule():
    code = create_dynamic_map()
    assert code.dtype == torch.float32 and code.shape == (256,)
    assert torch.all(code[1:] >= code[:-1])
    assert code[-1] == 1.0 and (code == 0).sum() == 1
    # level 6 (the largest) holds 64 midpoints of linspace(0.1, 1, 65) on each side
    edges = torch.linspace(0.1, 1.0, 65)
    largest = ((edges[:-1] + edges[1:]) / 2)[-1]
    assert code[0] == -largest and code[-2] == largest
    # level 0 holds one value 1e-6 * mean(0.1, 1) on each side: the smallest magnitudes
    smallest = torch.tensor(1e-6, dtype=torch.float32) * ((torch.tensor(0.1) + 1.0) / 2)
    assert code[code > 0].min() == smallest


def test_dynamic_map_unsigned_and_too_many_exponent_bits():
    unsigned = create_dynamic_map(signed=False)
    assert unsigned.shape == (256,) and unsigned.min() == 0
    assert create_dynamic_map(max_exponent_bits=4, total_bits=6).shape == (64,)
    with pytest.raises(ValueError, match="max_exponent_bits must be between 1 and total_bits - 1 = 3"):
        create_dynamic_map(max_exponent_bits=8, total_bits=4)


def test_size_helpers():
    assert [formats.packed_nbytes(n) for n in (0, 1, 2, 3, 4)] == [0, 1, 1, 2, 2]
    assert [formats.num_blocks(n, 64) for n in (0, 1, 64, 65, 128)] == [0, 1, 1, 2, 2]
