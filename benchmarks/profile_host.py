"""Where the host time of eager 4-bit calls goes: cProfile over a loop of calls (a GPU run).

    python benchmarks/profile_host.py --shape 4096x4096 --rows 1 [--profile quantize_4bit]

Prints the wall time per call of ``matmul_4bit``, of the Triton kernel launch alone and of
``quantize_4bit``, then the functions with the most own time in the ``--profile`` case. Eager
calls of small layers are bounded by this host work.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

import fourbit
import fourbit.functional as F4
from fourbit.kernels.triton import linear as triton_linear


def per_call(fn, calls: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4096x4096")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--profile", default="matmul_4bit", help="the case to profile")
    args = parser.parse_args()
    n, k = (int(part) for part in args.shape.split("x"))
    weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
    packed, state = F4.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    x = torch.randn(args.rows, k, dtype=torch.bfloat16, device="cuda")
    layer = fourbit.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").cuda()
    arguments = dict(F4.op_arguments(state, x.device), blocksize=64, shape=[n, k])
    cases = {
        "triton linear_4bit (direct)": lambda: triton_linear.linear_4bit(x, packed, **arguments),
        "torch.ops.fourbit.linear_4bit": lambda: torch.ops.fourbit.linear_4bit(x, packed, **arguments),
        "matmul_4bit": lambda: fourbit.matmul_4bit(x, packed.t(), state),
        "Linear4bit": lambda: layer(x),
        "torch.matmul (bf16)": lambda: torch.matmul(x, weight.t()),
        "quantize_4bit": lambda: F4.quantize_4bit(weight, quant_type="nf4", compress_statistics=True),
    }
    for name, fn in cases.items():
        print(f"{name}: {per_call(fn, args.calls):.1f} us per eager call")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.calls):
        cases[args.profile]()
    torch.cuda.synchronize()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
