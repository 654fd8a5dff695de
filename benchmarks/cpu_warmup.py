"""First-call cost of the compiled CPU path: per op, for a first shape and then a new one.

python benchmarks/cpu_warmup.py      # run in a fresh process: the first call compiles
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import torch

import fourbit
import fourbit.functional as F4


def first_and_next(function: Callable[[], object]) -> tuple[str, object]:
    """ "first / next" seconds of two calls, and the result."""
    start = time.perf_counter()
    result = function()
    first = time.perf_counter() - start
    start = time.perf_counter()
    function()
    return f"{first:.2f} / {time.perf_counter() - start:.3f}", result


def row(weight: torch.Tensor) -> list[str]:
    quantize, (packed, state) = first_and_next(
        partial(F4.quantize_4bit, weight, quant_type="nf4", compress_statistics=True)
    )
    dequantize, _ = first_and_next(partial(F4.dequantize_4bit, packed, state))
    x = torch.randn(1, weight.shape[1], dtype=weight.dtype)
    matmul, _ = first_and_next(partial(fourbit.matmul_4bit, x, packed.t(), state))
    return [quantize, dequantize, matmul]


def main() -> None:
    columns = ["shape", "dtype"] + [f"{op} first / next (s)" for op in ("quantize", "dequantize", "matmul batch 1")]
    print("| " + " | ".join(columns) + " |")
    print("|---" * len(columns) + "|")
    for dtype in (torch.bfloat16, torch.float32):
        for rows, cols in ((4096, 4096), (11008, 4096)):
            cells = row(torch.randn(rows, cols, dtype=dtype))
            print(f"| {rows}x{cols} | {str(dtype).removeprefix('torch.')} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
