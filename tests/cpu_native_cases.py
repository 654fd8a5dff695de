"""Shared by the native CPU kernels' tests: the variants this CPU runs, and sample weights."""

from __future__ import annotations

import torch

import fourbit.functional as F4
from fourbit.formats import NestedStatistics
from fourbit.kernels import cpu
from fourbit.kernels.cpu import native

#: The best instruction set this CPU runs, and every variant up to it.
BEST = native.isa()
VARIANTS = [name for index, name in enumerate(native.ISA_NAMES) if index <= BEST]


def each_variant(request, monkeypatch):
    """The ``variant`` fixture's body: each variant in turn (``FOURBIT_CPU_ISA``), the best one
    again afterwards; a test module makes it its fixture with
    ``variant = pytest.fixture(params=VARIANTS)(each_variant)``."""
    monkeypatch.setenv("FOURBIT_CPU_ISA", request.param)
    assert native.ISA_NAMES[native.refresh_isa()] == request.param
    yield request.param
    monkeypatch.undo()
    native.refresh_isa()


def sample_weight(shape, quant_type, blocksize, nested, seed=0):
    """A quantized random weight with one zero block: its packed bytes and op arguments."""
    torch.manual_seed(seed)
    data = torch.randn(shape)
    data.view(-1)[:blocksize] = 0  # a zero block
    packed, state = F4.quantize_4bit(data, quant_type=quant_type, blocksize=blocksize, compress_statistics=nested)
    return packed, F4.op_arguments(state, packed.device)


def prepared_of(packed, blocksize, shape, arguments) -> cpu.PreparedWeight:
    """The prepared weight of ``sample_weight``'s op arguments (its nested statistics as one value)."""
    flat = dict(arguments)
    names = ("nested_absmax", "nested_code", "nested_offset", "nested_blocksize")
    nested = NestedStatistics.of(*(flat.pop(name) for name in names if name in flat))
    return cpu.PreparedWeight(packed, blocksize=blocksize, shape=shape, nested=nested, **flat)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bits of a float tensor, as integers, for exact comparisons that NaNs do not spoil."""
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)
