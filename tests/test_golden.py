"""fourbit against golden files written once by bitsandbytes 0.50.2 (tests/data/make_golden.py).

These run without bitsandbytes: they pin packed bytes, absmax, nested statistics and the
dequantized output (as digests) for fp16/bf16/fp32 inputs, nf4/fp4, every blocksize, with and
without nested statistics, every quant_storage, odd element counts, partial blocks, 3-D
tensors and a tensor holding zeros, NaN and inf.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import STORAGES, assert_same_bits, canonical_digest

import fourbit.functional as F4

safetensors_torch = pytest.importorskip("safetensors.torch")

DATA = Path(__file__).parent / "data"
MANIFEST = json.loads((DATA / "golden_4bit.json").read_text())
TENSORS = safetensors_torch.load_file(DATA / "golden_4bit.safetensors")


def test_manifest_was_written_by_the_compatibility_target():
    assert MANIFEST["bitsandbytes"] == "0.50.2"
    assert len(MANIFEST["cases"]) == 240


@pytest.mark.parametrize("case", MANIFEST["cases"], ids=lambda case: case["key"])
def test_matches_bitsandbytes_output(case):
    key = case["key"]
    source = TENSORS[key.rsplit("/", 2)[0] + "/input"]
    before = source.clone()
    quant_type, blocksize = case["quant_type"], case["blocksize"]
    packed, state = F4.quantize_4bit(source, blocksize=blocksize, quant_type=quant_type)
    assert_same_bits(packed, TENSORS[f"{key}/packed"])
    assert_same_bits(state.absmax, TENSORS[f"{key}/absmax"])
    assert canonical_digest(F4.dequantize_4bit(packed, state)) == case["dequantized"]

    nested_packed, nested = F4.quantize_4bit(
        source, blocksize=blocksize, quant_type=quant_type, compress_statistics=True
    )
    assert_same_bits(nested_packed, TENSORS[f"{key}/packed"])
    assert_same_bits(nested.absmax, TENSORS[f"{key}/nested_codes"])
    assert_same_bits(nested.state2.absmax, TENSORS[f"{key}/nested_absmax"])
    assert_same_bits(nested.offset.reshape(1), TENSORS[f"{key}/nested_offset"])
    assert canonical_digest(F4.dequantize_4bit(nested_packed, nested)) == case["dequantized_nested"]

    for storage in STORAGES[1:]:
        if (source.numel() + 1) // 2 % storage.itemsize:
            continue
        viewed, viewed_state = F4.quantize_4bit(
            source, blocksize=blocksize, quant_type=quant_type, compress_statistics=True, quant_storage=storage
        )
        assert viewed.dtype == storage
        assert torch.equal(viewed.view(torch.uint8).flatten(), TENSORS[f"{key}/packed"].flatten())
        assert canonical_digest(F4.dequantize_4bit(viewed, viewed_state)) == case["dequantized_nested"]
    assert_same_bits(source, before)


@pytest.mark.parametrize("name", sorted(MANIFEST["state_dicts"]))
def test_bitsandbytes_packed_state_dict_loads(name):
    prefix = f"statedict/{name}/"
    entries = {key.removeprefix(prefix): value for key, value in TENSORS.items() if key.startswith(prefix)}
    packed = entries.pop("weight")
    state = F4.QuantState.from_dict(entries, device="cpu")
    assert state.quant_type == name.split("_")[0]
    assert state.nested == name.endswith("nested")
    assert canonical_digest(F4.dequantize_4bit(packed, state)) == MANIFEST["state_dicts"][name]
    # and fourbit writes the very same entries back
    rewritten = {f"weight.{key}": value for key, value in state.as_dict(packed=True).items()}
    assert sorted(rewritten) == sorted(entries)
    for key, value in rewritten.items():
        assert_same_bits(value, entries[key])
