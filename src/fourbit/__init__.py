"""fourbit: 4-bit (NF4 / FP4) weight quantization for PyTorch, compatible with bitsandbytes.

``import fourbit as bnb`` runs bitsandbytes' 4-bit code: ``bnb.functional.quantize_4bit``,
``bnb.matmul_4bit``, and (in ``fourbit.nn``) ``Params4bit`` and ``Linear4bit``.
"""

from . import functional, nn, ops, ops_grouped  # noqa: F401  (ops_grouped defines fourbit::linear_4bit_group)
from .autograd import matmul_4bit
from .formats import get_4bit_type

__version__ = "0.1.0"

__all__ = ["__version__", "compile_options", "functional", "get_4bit_type", "matmul_4bit", "nn", "ops"]


def __getattr__(name: str):
    if name == "compile_options":  # imported when used: it reads torch's inductor modules
        from .compiled_groups import compile_options

        return compile_options
    raise AttributeError(f"module 'fourbit' has no attribute {name!r}")
