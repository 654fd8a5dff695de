"""Triton kernels for CUDA: 4-bit quantize, dequantize, and the fused dequantize + matmul.

Importing this package needs Triton; ``fourbit.ops`` imports it only when Triton is present.
The kernels also run on CPU tensors under ``TRITON_INTERPRET=1`` (slowly), which is how CI
checks their logic without a GPU.
"""

from . import linear, op_entry
from .dequantize import dequantize_4bit
from .dispatch import prefers_tiles
from .linear import PreparedWeight
from .op_entry import linear_4bit
from .quantize import quantize_4bit, quantize_blockwise

__all__ = [
    "PreparedWeight",
    "dequantize_4bit",
    "linear",
    "linear_4bit",
    "op_entry",
    "prefers_tiles",
    "quantize_4bit",
    "quantize_blockwise",
]
