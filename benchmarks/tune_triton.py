"""Time candidate tile configurations of the Triton 4-bit linear kernels on this GPU.

    python benchmarks/tune_triton.py                # NF4, bf16, blocksize 64, nested statistics

Prints, for each weight shape and input row count, every candidate's median time (CUDA graph
replays, so launch overhead does not hide the kernel) and the best one, next to bf16 cuBLAS.
The winners go into GEMV_TABLE / TILE_TABLE in fourbit/kernels/triton/linear.py.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from triton.testing import do_bench_cudagraph

import fourbit.functional as F4
from fourbit.kernels.triton import linear as triton_linear

GEMV_CANDIDATES = [
    (1, 16, 256, 0, 4), (1, 32, 256, 0, 4), (1, 64, 128, 0, 4), (1, 32, 512, 0, 8), (1, 64, 256, 1, 8),
    (1, 128, 128, 1, 8), (1, 16, 512, 0, 4), (2, 32, 256, 0, 4), (4, 16, 256, 0, 4), (4, 32, 256, 0, 8),
]  # fmt: skip
DOT_CANDIDATES = [
    ("dot", 16, 64, 128, 4, 4), ("dot", 16, 128, 128, 4, 4), ("dot", 16, 32, 256, 4, 3), ("dot", 32, 64, 128, 4, 4),
    ("dot", 64, 64, 128, 4, 4), ("dot", 64, 128, 64, 4, 4), ("dot", 64, 128, 128, 8, 3), ("dot", 128, 128, 64, 8, 3),
    ("dot", 128, 256, 64, 8, 3), ("dot", 128, 128, 128, 8, 3), ("dot", 256, 128, 64, 8, 3),
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "28672x8192"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 16, 64, 256, 2048])
    parser.add_argument("--rep", type=int, default=200, help="milliseconds of timing per candidate")
    args = parser.parse_args()
    for text in args.shapes:
        n, k = (int(part) for part in text.split("x"))
        weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        packed, state = F4.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
        tensors = F4.op_arguments(state, weight.device)
        for rows in args.rows:
            x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
            cublas = do_bench_cudagraph(partial(torch.matmul, x, weight.t()), rep=args.rep, return_mode="median")
            candidates = [c for c in GEMV_CANDIDATES if c[0] >= rows] if rows <= 4 else []
            candidates += [c for c in DOT_CANDIDATES if c[1] <= max(16, 4 * rows)]
            results = []
            for config in candidates:
                run = partial(
                    triton_linear.linear_4bit, x, packed, blocksize=64, shape=(n, k), config=config, **tensors
                )
                try:
                    results.append((do_bench_cudagraph(run, rep=args.rep, return_mode="median"), config))
                except Exception as error:  # a configuration that does not compile or fit is skipped
                    print(f"  {config}: {type(error).__name__}: {str(error)[:80]}")
            results.sort(key=lambda item: item[0])
            print(f"{n}x{k} rows={rows}: cuBLAS bf16 {cublas * 1e3:.1f} us")
            for milliseconds, config in results[:4]:
                print(f"  {milliseconds * 1e3:8.1f} us  {milliseconds / cublas:5.2f}x cuBLAS  {config}")


if __name__ == "__main__":
    main()
