"""Triton 4-bit dequantize, bit-identical with ``fourbit.kernels.reference``: ``code * scale``
(nested: the absmax from ``code * scale + offset``) without fused multiply-adds, hence
``enable_fp_fusion=False``. The code table comes as ``reference.decode_table`` (zero entries
+0.0), cached per code tensor. ``DequantizeLaunch`` prepares one decode once, for the products'
decode + cuBLAS path, which repeats it on every call."""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

import torch
import triton
import triton.language as tl

from ... import layout
from ...formats import NESTED_BLOCKSIZE, NestedStatistics, packed_nbytes
from ..derived import decode_table
from . import tuning
from .common import block_scale, nested_arguments, word_shifts
from .launch import KernelLaunch, pointers

#: Packed bytes per program of the any-length kernel (the word kernel's program size is tuned per
#: GPU: ``tuning.KernelTables.dequantize``).
BYTES_PER_PROGRAM = 1024


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr,
    absmax_ptr,
    code_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    nested_offset_ptr,
    out_ptr,
    n,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    BYTES_PER_PROGRAM: tl.constexpr,
):
    pid = tl.program_id(0)
    byte = pid.to(tl.int64) * BYTES_PER_PROGRAM + tl.arange(0, BYTES_PER_PROGRAM)
    in_range = byte < (n + 1) // 2
    packed = tl.load(packed_ptr + byte, mask=in_range, other=0).to(tl.int32)
    high = tl.load(code_ptr + (packed >> 4))
    low = tl.load(code_ptr + (packed & 15))
    scale = block_scale(
        absmax_ptr, (2 * byte) // BLOCKSIZE, in_range, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
        NESTED, NESTED_BLOCKSIZE,
    )  # fmt: skip
    values = tl.interleave(high * scale, low * scale).to(out_ptr.dtype.element_ty)
    element = pid.to(tl.int64) * 2 * BYTES_PER_PROGRAM + tl.arange(0, 2 * BYTES_PER_PROGRAM)
    tl.store(out_ptr + element, values, mask=element < n)


@triton.jit
def _dequantize_words_kernel(
    words_ptr,
    absmax_ptr,
    code_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    nested_offset_ptr,
    out_ptr,
    n_words,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    WORDS_PER_PROGRAM: tl.constexpr,
    TILED_STEPS: tl.constexpr,
):
    """8 elements per int32 word, written as 8 consecutive outputs (element count a multiple of 8).
    With ``TILED_STEPS`` (K // 64, not 0) the words are whole row groups of ``fourbit.layout``'s
    tiles, read in memory order and written where their rows put them; a constant, so that the
    64-bit divisions by it compile to multiplications."""
    pid = tl.program_id(0)
    stored = pid.to(tl.int64) * WORDS_PER_PROGRAM + tl.arange(0, WORDS_PER_PROGRAM)
    in_range = stored < n_words
    words = tl.load(words_ptr + stored, mask=in_range, other=0)
    if TILED_STEPS:  # tile t = (row group, step), its word i = (row in group, word in step)
        tile, i = stored // 128, stored % 128
        word = ((tile // TILED_STEPS) * 16 + i // 8) * (TILED_STEPS * 8) + (tile % TILED_STEPS) * 8 + i % 8
    else:
        word = stored
    values = tl.load(code_ptr + ((words[:, None] >> word_shifts()[None, :]) & 15))
    scale = block_scale(
        absmax_ptr, (8 * word) // BLOCKSIZE, in_range, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
        NESTED, NESTED_BLOCKSIZE,
    )  # fmt: skip
    out = (values * scale[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + 8 * word[:, None] + tl.arange(0, 8)[None, :], out, mask=in_range[:, None])


#: Compiled decodes shared by every ``DequantizeLaunch`` that Triton specializes alike, so that a
#: decode prepared for one call (``dequantize_4bit``, the op's chunked products) launches directly
#: from the second such call on instead of through the JIT (bounded: cleared when full).
_kernel_launches: dict[tuple, KernelLaunch] = {}
_MAX_KERNEL_LAUNCHES = 1024


def _kernel_launch(
    kernel: triton.JITFunction, grid: tuple[int, ...], options: dict, device: torch.device, before: tuple,
    dtype: torch.dtype, after: tuple,
) -> KernelLaunch:  # fmt: skip
    """The launch of ``kernel`` for arguments like ``(*before, out of dtype, *after)``: keyed on all
    Triton specializes on (the tensors' dtypes and 16-byte alignment, the plain values)."""
    tensors = tuple((tensor.dtype, tensor.data_ptr() % 16) for tensor in before)
    key = (kernel, grid, tuple(options.items()), device, tensors, dtype, after)
    launch = _kernel_launches.get(key)
    if launch is None:
        if len(_kernel_launches) >= _MAX_KERNEL_LAUNCHES:
            _kernel_launches.clear()
        launch = _kernel_launches[key] = KernelLaunch(kernel, grid, options, device)
    return launch


class DequantizeLaunch:
    """The decode of one packed weight (or of a run of its rows) into ``shape`` of ``dtype``,
    with its kernel, grid and arguments chosen once: a call allocates the output and launches.
    The tensors are the caller's: build a new one when they are replaced. The compiled kernel is
    shared with every decode specialized alike (``_kernel_launch``)."""

    __slots__ = ("after", "before", "device", "dtype", "launch", "pointers", "shape")

    def __init__(
        self,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        code: torch.Tensor,
        blocksize: int,
        shape: Sequence[int],
        dtype: torch.dtype,
        nested: NestedStatistics | None = None,
        tiled: bool = False,
        config: tuning.DequantizeConfig | None = None,
    ) -> None:
        """``tiled``: ``packed`` holds whole row groups of ``fourbit.layout``'s tiles (``shape``
        2-D, as ``layout.can_tile`` requires). ``config`` overrides the device's tables (tuning)."""
        self.shape, self.dtype, self.device = tuple(shape), dtype, packed.device
        n = prod(self.shape)
        data = packed.reshape(-1).view(torch.uint8)
        statistics, *specialized = nested_arguments(absmax, nested)
        options = {"enable_fp_fusion": False}
        table = decode_table(code)
        self.launch: KernelLaunch | None = None
        if not n:
            return
        if tiled or (n % 8 == 0 and data.storage_offset() % 4 == 0):
            words, warps = config or tuning.for_device(self.device).dequantize
            kernel, grid = _dequantize_words_kernel, (triton.cdiv(n // 8, words),)
            options["num_warps"] = warps
            self.before = (data.view(torch.int32), absmax, table, *statistics)
            self.after = (n // 8, blocksize, *specialized, words, self.shape[-1] // 64 if tiled else 0)
        else:
            kernel, grid = _dequantize_4bit_kernel, (triton.cdiv(packed_nbytes(n), BYTES_PER_PROGRAM),)
            self.before = (data, absmax, table, *statistics)
            self.after = (n, blocksize, *specialized, BYTES_PER_PROGRAM)
        self.launch = _kernel_launch(kernel, grid, options, self.device, self.before, dtype, self.after)
        self.pointers = pointers(self.before)  # the tensors in ``before`` keep them valid

    def __call__(self) -> torch.Tensor:
        launch = self.launch
        if launch is not None and launch.direct():
            return self.run_with(self.pointers)
        out = torch.empty(size=self.shape, dtype=self.dtype, device=self.device)
        if launch is not None:
            launch(*self.before, out, *self.after)
        return out

    def run_with(self, weight: Sequence[int]) -> torch.Tensor:
        """The decode of the weight at ``weight``, the pointers of ``before``'s tensors, laid out
        and aligned as they are (only when ``launch.direct()``)."""
        out = torch.empty(size=self.shape, dtype=self.dtype, device=self.device)
        self.launch.run(*weight, out.data_ptr(), *self.after)
        return out


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_offset: torch.Tensor | None = None,
    nested_blocksize: int = NESTED_BLOCKSIZE,
    tiled: bool = False,
) -> torch.Tensor:
    """Same contract as ``ops.dequantize_4bit``: tiled weights are decoded from their tiles."""
    nested = NestedStatistics.of(nested_absmax, nested_code, nested_offset, nested_blocksize)
    if tiled and packed.storage_offset() * packed.element_size() % 4:  # the word kernel reads int32 words
        packed, tiled = layout.untile(packed, shape), False
    return DequantizeLaunch(packed, absmax, code, blocksize, shape, dtype, nested, tiled)()
