"""Run one configuration of the Triton 4-bit linear a few times, for a profiler (ncu) to read.

    ncu -k regex:decode_dot --section SpeedOfLight python benchmarks/profile_linear.py \\
        --shape 28672x8192 --rows 1 --config fused,128,16,64,0,4,4,0

The config is the comma-separated tuple of ``linear_4bit``'s ``config`` argument (0/1 for flags;
e.g. ``fragments,1,4,4`` for the register-fragment kernel, ``-k regex:fragment``),
or "chunked"; without one the library's own choice runs.
"""

from __future__ import annotations

import argparse

import torch

import fourbit.functional as F4
from fourbit.kernels.triton import op_entry


def parse_config(text: str | None) -> tuple | str | None:
    if text is None or text == "chunked":
        return text
    name, *numbers = text.split(",")
    values = [int(value) for value in numbers]
    if name == "fused":  # the last field is the SCALE_WEIGHTS flag
        return (name, *values[:-1], bool(values[-1]))
    return (name, *values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="28672x8192")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--config", default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n, k = (int(part) for part in args.shape.split("x"))
    weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
    packed, state = F4.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    x = torch.randn(args.rows, k, dtype=torch.bfloat16, device="cuda")
    tensors = F4.op_arguments(state, weight.device)
    for _ in range(args.repeat):
        op_entry.linear_4bit(x, packed, blocksize=64, shape=(n, k), config=parse_config(args.config), **tensors)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
