"""Modules and parameters: ``Params4bit``, ``Linear4bit``, ``LinearNF4``, ``LinearFP4``, the
4-bit embedding tables (``Embedding4bit``, ``EmbeddingNF4``, ``EmbeddingFP4``), and the 4-bit
parametrization of any parameter (``fourbit.nn.parametrize``)."""

from . import parametrize
from .embedding import Embedding4bit, EmbeddingFP4, EmbeddingNF4
from .linear import Linear4bit, LinearFP4, LinearNF4
from .params import Params4bit

__all__ = [
    "Embedding4bit",
    "EmbeddingFP4",
    "EmbeddingNF4",
    "Linear4bit",
    "LinearFP4",
    "LinearNF4",
    "Params4bit",
    "parametrize",
]
