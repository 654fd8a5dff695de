"""Quantize a random 4096x4096 matrix to NF4 and FP4 and print error, size and time."""

from __future__ import annotations

import time

import torch

import fourbit.functional as F4


def main() -> None:
    torch.manual_seed(0)
    weight = torch.randn(4096, 4096, dtype=torch.bfloat16)
    dense_mb = weight.numel() * weight.element_size() / 2**20
    print(
        f"{'type':<6}{'nested':<8}{'MB':>8}{'vs bf16':>9}{'mean abs err':>14}{'quantize ms':>13}{'dequantize ms':>15}"
    )
    for quant_type in ("nf4", "fp4"):
        for nested in (False, True):
            start = time.perf_counter()
            packed, state = F4.quantize_4bit(weight, quant_type=quant_type, compress_statistics=nested)
            quantized = time.perf_counter()
            restored = F4.dequantize_4bit(packed, state)
            done = time.perf_counter()
            stats = sum(t.numel() * t.element_size() for t in state.as_dict(packed=True).values())
            size_mb = (packed.numel() * packed.element_size() + stats) / 2**20
            error = (restored.float() - weight.float()).abs().mean().item()
            print(
                f"{quant_type:<6}{nested!s:<8}{size_mb:>8.2f}{size_mb / dense_mb:>9.1%}{error:>14.4f}"
                f"{(quantized - start) * 1e3:>13.1f}{(done - quantized) * 1e3:>15.1f}"
            )


if __name__ == "__main__":
    main()
