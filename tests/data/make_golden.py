"""Write the golden files that pin fourbit to bitsandbytes' 4-bit output (run once, with bitsandbytes).

    python tests/data/make_golden.py      # needs bitsandbytes==0.50.2 and safetensors

Writes ``golden_4bit.safetensors`` (inputs, packed bytes, absmax, nested statistics, and the
packed QuantState dicts bitsandbytes wrote) and ``golden_4bit.json`` (versions, the case list,
and SHA-256 digests of bitsandbytes' dequantized output). ``tests/test_golden.py`` checks
fourbit against these files without bitsandbytes installed.

Dequantized values are taken from bitsandbytes with the state's shape flattened to 1-D: its
native CPU dequantize mis-indexes absmax for some 2-D shapes (rows that are a multiple of 16
elements but not of the blocksize), while the 1-D path is correct. For the input holding NaN,
they are taken in float32 and cast by torch: bitsandbytes' own float-to-bf16 rounding turns
some NaNs into 0.0. For finite values both ways give the same bits.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import bitsandbytes
import bitsandbytes.functional as bnb_functional
import torch
from safetensors.torch import save_file

HERE = Path(__file__).parent
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def make_inputs() -> dict[str, torch.Tensor]:
    """Float32 source tensors: odd counts, partial blocks, 3-D, and one with zeros, NaN and inf."""
    generator = torch.Generator().manual_seed(20261122)
    special = torch.randn(2, 50, generator=generator) * 3
    special[0, :40] = 0.0
    special[1, 7] = float("nan")
    special[1, 30] = float("inf")
    special[1, 31] = -float("inf")
    return {
        "7": torch.randn(7, generator=generator),
        "3x37": torch.randn(3, 37, generator=generator) * 4,
        "4099": torch.randn(4099, generator=generator) * 0.02,
        "5x7x9": torch.randn(5, 7, 9, generator=generator),
        "special": special,
    }


def canonical_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of the tensor's bytes with every NaN made the same NaN and every zero +0.0."""
    flat = tensor.detach().contiguous().view(-1)
    flat = torch.where(flat.isnan(), torch.full_like(flat, float("nan")).abs(), flat)
    flat = torch.where(flat == 0, torch.zeros_like(flat), flat)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def flat_dequantize(packed: torch.Tensor, state, via_float32: bool = False) -> torch.Tensor:
    flat_state = copy.copy(state)
    flat_state.shape = torch.Size([state.shape.numel()])
    if via_float32:
        flat_state.dtype = torch.float32
    return bnb_functional.dequantize_4bit(packed, flat_state).view(state.shape).to(state.dtype)


def main() -> None:
    tensors: dict[str, torch.Tensor] = {}
    cases = []
    sources = make_inputs()
    for dtype_name, dtype in DTYPES.items():
        for shape_name, source in sources.items():
            data = source.to(dtype)
            prefix = f"{dtype_name}/{shape_name}"
            tensors[f"{prefix}/input"] = data
            has_nan = bool(data.isnan().any())
            for quant_type in QUANT_TYPES:
                for blocksize in BLOCKSIZES:
                    key = f"{prefix}/{quant_type}/{blocksize}"
                    packed, state = bnb_functional.quantize_4bit(data, blocksize=blocksize, quant_type=quant_type)
                    nested_packed, nested = bnb_functional.quantize_4bit(
                        data, blocksize=blocksize, quant_type=quant_type, compress_statistics=True
                    )
                    assert torch.equal(packed, nested_packed)
                    tensors[f"{key}/packed"] = packed
                    tensors[f"{key}/absmax"] = state.absmax
                    tensors[f"{key}/nested_codes"] = nested.absmax
                    tensors[f"{key}/nested_absmax"] = nested.state2.absmax
                    tensors[f"{key}/nested_offset"] = nested.offset.reshape(1)
                    cases.append(
                        {
                            "key": key,
                            "dtype": dtype_name,
                            "shape": list(data.shape),
                            "quant_type": quant_type,
                            "blocksize": blocksize,
                            "dequantized": canonical_digest(flat_dequantize(packed, state, has_nan)),
                            "dequantized_nested": canonical_digest(flat_dequantize(nested_packed, nested, has_nan)),
                        }
                    )
    state_dicts = {}
    for quant_type in QUANT_TYPES:
        for nested in (False, True):
            name = f"{quant_type}_{'nested' if nested else 'plain'}"
            data = sources["3x37"].to(torch.bfloat16)
            packed, state = bnb_functional.quantize_4bit(data, quant_type=quant_type, compress_statistics=nested)
            tensors[f"statedict/{name}/weight"] = packed
            for entry, value in state.as_dict(packed=True).items():
                tensors[f"statedict/{name}/weight.{entry}"] = value
            state_dicts[name] = canonical_digest(flat_dequantize(packed, state))
    save_file({key: value.contiguous() for key, value in tensors.items()}, HERE / "golden_4bit.safetensors")
    manifest = {
        "bitsandbytes": bitsandbytes.__version__,
        "torch": torch.__version__,
        "cases": cases,
        "state_dicts": state_dicts,
    }
    (HERE / "golden_4bit.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {len(cases)} cases and {len(state_dicts)} state dicts")


if __name__ == "__main__":
    main()
