"""Modules and parameters: ``Params4bit``, ``Linear4bit``, ``LinearNF4``, ``LinearFP4``, and the
4-bit parametrization of any parameter (``fourbit.nn.parametrize``)."""

from . import parametrize
from .linear import Linear4bit, LinearFP4, LinearNF4
from .params import Params4bit

__all__ = ["Linear4bit", "LinearFP4", "LinearNF4", "Params4bit", "parametrize"]
