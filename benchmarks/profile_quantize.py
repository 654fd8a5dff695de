"""Kernel-by-kernel CUDA time of one quantize_4bit call (nested statistics), via torch.profiler.

python benchmarks/profile_quantize.py --shape 28672x8192
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import fourbit.functional as F4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="28672x8192")
    parser.add_argument("--no-nested", action="store_true")
    args = parser.parse_args()
    rows, cols = (int(part) for part in args.shape.split("x"))
    weight = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    options = dict(quant_type="nf4", compress_statistics=not args.no_nested)
    for _ in range(3):
        F4.quantize_4bit(weight, **options)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            F4.quantize_4bit(weight, **options)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
