"""What the Triton kernel tests share: the device, the skip rule, inputs and comparisons.

On a machine with a GPU the tests run the compiled kernels on CUDA over the large awkward shapes.
Without one (CI) they run the same kernels through Triton's interpreter (TRITON_INTERPRET=1) on
CPU tensors over small shapes, which checks the kernels' indexing and arithmetic. The
interpreter rounds float32 -> bfloat16 by truncation and has a broken half-precision dot, so
there bf16 outputs are compared within one bf16 step and products are computed in float32.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import assert_same_bits, describe_dtype

from fourbit import layout, ops
from fourbit.formats import create_dynamic_map, get_4bit_type
from fourbit.kernels import reference

ON_GPU = torch.cuda.is_available()  # without a GPU, conftest.py turns on TRITON_INTERPRET
DEVICE = "cuda" if ON_GPU else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
#: The mark of every Triton test module.
NEEDS_TRITON = [
    pytest.mark.skipif(not ON_GPU and not INTERPRETED, reason="needs a GPU or TRITON_INTERPRET=1"),
    pytest.mark.skipif(
        (ops.triton_version() or (0,)) < ops.MIN_TRITON,
        reason=f"fourbit's Triton kernels need Triton {ops.MIN_TRITON}, found {ops.triton_version()}",
    ),
]

QUANT_SHAPES = [(1,), (7,), (3, 37), (130,), (2, 97), (5, 7, 9), (300, 64)]
if ON_GPU:
    QUANT_SHAPES += [(4099,), (255, 4097), (11008, 4096), (1, 14337)]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096] if ON_GPU else [32, 64, 256, 4096]


def code_table(quant_type: str) -> torch.Tensor:
    return get_4bit_type(quant_type, device=DEVICE)


def sample(shape, dtype, special: bool) -> torch.Tensor:
    data = (torch.randn(shape, device=DEVICE) * 3).to(dtype)
    flat = data.view(-1)
    flat[::7] = 0
    if special and flat.numel() > 70:
        flat[:64] = 0  # a whole zero block for small blocksizes
        flat[65] = float("nan")
        flat[-2] = float("inf")
    return data


def nested_statistics(absmax: torch.Tensor, nested: bool) -> tuple[torch.Tensor, dict]:
    """The absmax argument and nested-statistics keyword arguments of a (nested) 4-bit state."""
    if not nested:
        return absmax, {}
    dynamic = create_dynamic_map().to(DEVICE)
    offset = absmax.mean()
    codes, scale = reference.quantize_blockwise(absmax - offset, dynamic, 256)
    return codes, dict(nested_absmax=scale, nested_code=dynamic, nested_offset=offset, nested_blocksize=256)


def close_or_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    if INTERPRETED and expected.dtype == torch.bfloat16:
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, rtol=2**-7, atol=0, equal_nan=True)
    else:
        assert_same_bits(actual, expected)


def case_turn(configs, config, dtype: torch.dtype) -> int:
    """The turn (``in_turn``) of a ``pairwise_cases`` case: its configuration's index, plus one for
    float16, so that a configuration's two cases take opposite turns."""
    return configs.index(config) + (dtype == torch.float16)


def pairwise_cases(configs) -> list:
    """(config, dtype, nested) cases for forced-configuration tests: each configuration in both
    16-bit dtypes, plain statistics with one and nested with the other, alternating, so that every
    pair of configuration, dtype and statistics runs in half the cases of the full product (each
    case compiles kernels of its own, which is most of the GPU suite's time)."""
    cases = []
    for index, config in enumerate(configs):
        for dtype, nested in ((torch.bfloat16, index % 2 == 1), (torch.float16, index % 2 == 0)):
            name = f"{config}-{describe_dtype(dtype)}-{'nested' if nested else 'plain'}"
            cases.append(pytest.param(config, dtype, nested, id=name))
    return cases


def in_turn(choices: tuple, turn: int) -> tuple:
    """Every other one of ``choices`` (row counts), starting at ``turn % 2``: cases that take turns
    cover all of them, each compiling about half the kernel specializations they need."""
    return choices[turn % 2 :: 2]


def graded_weight(n: int, k: int, blocksize: int, nested: bool, tiled: bool) -> tuple:
    """An NF4 weight whose absmax grows 2x from one block of nested statistics to the next (so
    that a step scaled by its neighbour's nested absmax is off by 2x or more): packed bytes
    (tiled or in rows), absmax, statistics keyword arguments, float64 dense."""
    code = code_table("nf4")
    nested_block = torch.arange(n * k, device=DEVICE).reshape(n, k) // (blocksize * 256)
    weight = torch.randn(n, k, device=DEVICE) * 2.0 ** (nested_block % 3).float()
    packed, absmax = reference.quantize_4bit(weight, code, blocksize, torch.uint8)
    absmax, extra = nested_statistics(absmax, nested)
    dense = reference.dequantize_4bit(packed, absmax, code, blocksize, (n, k), torch.float64, **extra)
    return (layout.tile(packed, (n, k)) if tiled else packed), absmax, extra, dense


def one_step_rows(k: int, first: int, rows: int) -> torch.Tensor:
    """``rows`` bf16 input rows, row i nonzero only on 64-column step ``first + i`` (modulo K's
    steps): each output then holds one step's products, scaled as that step alone is."""
    step = torch.arange(k, device=DEVICE) // 64
    keep = step[None, :] == (first + torch.arange(rows, device=DEVICE))[:, None] % (k // 64)
    return (torch.randn(rows, k, device=DEVICE) * keep).to(torch.bfloat16)


def assert_within_rounding(out: torch.Tensor, x: torch.Tensor, dense: torch.Tensor, message: object) -> None:
    """Every output within 16-bit rounding of float64: 2**-7 of the sum of its products' sizes."""
    out = out.double()
    error = (out - x.double() @ dense.t()).abs()
    assert (error <= 2**-7 * (x.double().abs() @ dense.abs().t()) + 1e-6).all(), message
