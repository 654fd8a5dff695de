"""CPU kernels: the native library (``native``) where it builds, else the inductor-compiled path
(``compiled``), which itself falls back to the reference.

``PreparedWeight`` is the CPU's prepared product (``ops._prepared_kernels["cpu"]``): the weight's
pointers gathered once, then one native call per product. Few input rows are multiplied with
the weight decoded in registers (nothing decoded is written); more rows decode the weight
natively and hand it to torch's matrix multiply.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Sequence
from math import prod

import torch

from ...formats import NESTED_BLOCKSIZE, NestedStatistics
from .. import reference
from . import compiled, native

__all__ = [
    "AMX_LARGE_WEIGHT",
    "AMX_LARGE_WEIGHT_MAX_ROWS",
    "AMX_MAX_ROWS",
    "AMX_PIECE_BYTES",
    "AVX2_16_BIT_FUSED_MAX_ROWS",
    "AVX512_FUSED_MAX_ROWS",
    "FUSED_MAX_ROWS",
    "PreparedWeight",
    "amx_max_rows",
    "amx_piece_rows",
    "dequantize_4bit",
    "fused_max_rows",
    "gemm_dtype",
    "linear_4bit",
    "prepare",
    "quantize_4bit",
]

#: Input rows up to which the product decodes the weight in registers; beyond, decoded chunks of
#: the weight go to torch's GEMM, which reuses each weight value across many rows. The AVX2 and
#: portable kernels take one or two weight rows a pass and keep this limit (AVX2 float32 rows).
FUSED_MAX_ROWS = 12
#: The same for bfloat16 and float16 inputs on AVX2, whose byte-shuffle kernel (product_avx2.h)
#: beat decode + a float32 GEMM (no 16-bit GEMM there) 1.2-2.2x at 13-14 rows, and at 16 rows by
#: up to 1.35x (bfloat16) or evenly (float16) (2 AVX2-only Zen 3 cores; docs/performance.md).
AVX2_16_BIT_FUSED_MAX_ROWS = 16
#: The same for the AVX-512 kernels, which take several weight rows a pass (bfloat16 inputs only
#: with AVX512-BF16; without it bfloat16 keeps ``FUSED_MAX_ROWS``). Measured on 2 Zen 4 cores
#: (4096x4096, 11008x4096, 4096x1024, 1024x1024, float32, bfloat16 and float16; docs/performance.md):
#: 1.1-2.3x faster than decode + GEMM at 16-24 rows, even or slower from 32.
AVX512_FUSED_MAX_ROWS = 24
#: The same for bfloat16 inputs on CPUs with AMX (``native.AMX``), whose kernel decodes each weight
#: row once for all input rows and multiplies on the tile unit (``amx_max_rows``). float32 inputs
#: take it too when ``torch.get_float32_matmul_precision()`` is "high" or "medium": each product
#: is then three bfloat16 products of high and low parts (about 5e-6 relative error), as torch
#: allows for its own float32 matmuls at that setting.
AMX_MAX_ROWS = 256
#: ... and for weights of at least ``AMX_LARGE_WEIGHT`` elements, whose decode + GEMM pays its
#: decode over more rows. Measured on 2 Intel Xeon cores against decode + GEMM, bfloat16 (the
#: tile unit in pieces, ``amx_piece_rows``): 384x384 to 1024x3584 faster up to 256 rows and 3-24%
#: slower at 384; 4096x4096, 11008x4096 and 4096x11008 4-36% faster at 256-512 rows, 5% slower
#: at 1024 on 4096x4096 (docs/performance.md).
AMX_LARGE_WEIGHT_MAX_ROWS = 512
AMX_LARGE_WEIGHT = 1 << 23
#: The most bytes of input one AMX call takes (bfloat16 rows, or float32 rows' two bfloat16
#: parts); more rows run as several calls. Every 16 weight rows read the call's whole input
#: again, from L3 once it outgrows L2 (2 MB a core there): 4096x4096 at 256 bfloat16 rows took
#: 6.4-7.0 ms in one call, 4.7 in two of 128 rows.
AMX_PIECE_BYTES = 1 << 20
#: Bytes of decoded weight per chunk on the many-rows path: few enough to stay in the caches, many
#: enough that each GEMM is wide (8 MB measured 5-25% faster than 2 MB from 256 to 2048 rows of
#: 4096x4096, bfloat16 and float32, and as fast on MiniLM-sized weights; docs/performance.md).
CHUNK_BYTES = 1 << 23
#: Input rows from which each chunk's GEMM writes output columns in place (see ``_chunked``).
COLUMN_SLICE_ROWS = 256


@functools.cache
def gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype torch's GEMM takes for ``dtype`` rows on the many-rows path: float32 for a 16-bit
    dtype that oneDNN has no GEMM for on this CPU (its fallback ran 3.5x slower than float32 for
    float16 on a Zen 4, and 4x slower for bfloat16 on an AVX2-only EPYC), else ``dtype``."""
    probe = {torch.float16: "_is_mkldnn_fp16_supported", torch.bfloat16: "_is_mkldnn_bf16_supported"}.get(dtype)
    if probe is None:
        return dtype
    supported = getattr(torch.ops.mkldnn, probe, None)
    return dtype if supported is not None and supported() else torch.float32


def amx_max_rows(n_out: int, k: int, dtype: torch.dtype) -> float:
    """The most input rows the AMX kernel takes for an ``n_out`` x ``k`` weight (more go to
    decode + GEMM). float32 rows (three tile products each, where torch's precision allows) have
    no limit: against decode + a float32 GEMM they measured 1.2-3.6x faster from 128 to 3200 rows
    on weights from 1536x384 to 4096x11008, and even on 384x1536 at 3200 rows."""
    if dtype == torch.float32:
        return math.inf
    return AMX_LARGE_WEIGHT_MAX_ROWS if n_out * k >= AMX_LARGE_WEIGHT else AMX_MAX_ROWS


def amx_piece_rows(k: int, dtype: torch.dtype) -> int:
    """Input rows per call of the AMX kernel: as many whole tiles of 16 rows as
    ``AMX_PIECE_BYTES`` of input hold (2 bytes an element, float32's two bfloat16 parts 4), at
    least one tile."""
    element = 4 if dtype == torch.float32 else 2
    return max(16, AMX_PIECE_BYTES // (element * max(k, 1)) // 16 * 16)


def fused_max_rows(isa: int, dtype: torch.dtype) -> int:
    """The most input rows the register-decoding product takes for variant ``isa`` and ``dtype``."""
    if isa >= native.AVX512_BF16 or (isa == native.AVX512 and dtype != torch.bfloat16):
        return AVX512_FUSED_MAX_ROWS
    if isa == native.AVX2 and dtype in (torch.bfloat16, torch.float16):
        return AVX2_16_BIT_FUSED_MAX_ROWS
    return FUSED_MAX_ROWS


class PreparedWeight:
    """One packed weight's native arguments, gathered once: a product or a dequantize is then one
    call into the library. The tensors are the caller's (converted copies only where the library
    takes another dtype or a contiguous array); whoever keeps one rebuilds it when the weight's
    tensors are replaced. ``borrowed`` says that it read every tensor where it lies, so that its
    pointers stay right for any tensors at the same addresses (``_op_prepared``)."""

    def __init__(
        self,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        code: torch.Tensor,
        blocksize: int,
        shape: Sequence[int],
        nested: NestedStatistics | None = None,
    ) -> None:
        self.arguments: tuple | None = (packed, absmax, code, blocksize, tuple(shape))
        self.nested = nested
        self.blocksize, self.shape = blocksize, tuple(shape)
        self.nested_blocksize = nested.blocksize if nested is not None else 1
        self.n_out, self.k = (int(size) for size in shape) if len(shape) == 2 else (0, 0)
        self.numel = prod(shape)
        # everything the library reads must stay alive as long as the pointers do
        self._keep: list[torch.Tensor] = []
        self.borrowed = True
        # the library turns the table's zeros into +0.0 itself (the reference's decode table)
        weight = native.Weight(
            self._held(packed.reshape(-1).view(torch.uint8), packed), self._held(code.float().reshape(-1), code)
        )
        weight.blocksize = blocksize
        if nested is None:
            weight.absmax = self._held(absmax.float(), absmax)
        else:
            weight.qabsmax = self._held(absmax, absmax)
            # 256 entries, one for every 8-bit code: the kernels load the whole table
            code = nested.code.float().reshape(-1)
            if code.numel() < 256:
                code = torch.nn.functional.pad(code, (0, 256 - code.numel()))
            weight.nested_code = self._held(code, nested.code)
            weight.nested_absmax = self._held(nested.absmax.float(), nested.absmax)
            weight.offset = self._held(nested.offset.float().reshape(1), nested.offset)
            weight.nested_blocksize = nested.blocksize
        self._weight = weight
        self._pointer = ctypes.byref(weight)
        # the shapes the AMX kernel takes (amx.h: whole blocks of 64 and more, 16 weight rows)
        blocks = self.k // blocksize if blocksize else 0
        self._amx_shape = (
            blocksize % 64 == 0 and self.k % blocksize == 0 and blocks <= native.MAX_RUN and self.n_out >= 16
        )
        library = native.library()
        self._linear, self._dequantize = library.fourbit_linear, library.fourbit_dequantize
        self._dequantize_range = library.fourbit_dequantize_range
        self._dequantize_range_widened = library.fourbit_dequantize_range_widened

    def _held(self, tensor: torch.Tensor, source: torch.Tensor) -> int:
        """The address of ``tensor`` (made from the caller's ``source``) as one contiguous array, kept alive."""
        tensor = tensor.contiguous()
        self._keep.append(tensor)
        self.borrowed = self.borrowed and tensor.data_ptr() == source.data_ptr()
        return tensor.data_ptr()

    def release(self) -> None:
        """Drop every reference to the caller's tensors (``borrowed`` weights only): the pointers
        then read whatever lies at those addresses when called."""
        if not self.borrowed:
            raise RuntimeError("a weight with converted copies must keep them")
        self._keep, self.arguments, self.nested = [], None, None

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight decoded to ``dtype`` (float32, bfloat16 or float16)."""
        out = native.empty(self.shape, dtype)
        code = native.dtype_code(dtype)
        self._dequantize(self._pointer, self.numel, out.data_ptr(), code, native.isa(), torch.get_num_threads())
        return out

    def linear(self, A: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``A @ W.T + bias`` in A's dtype; float32 accumulation."""
        dtype_code = native.dtype_code(A.dtype)
        if dtype_code is None or self.n_out == 0:
            if self.arguments is None:
                raise RuntimeError("a released weight takes only the library's dtypes (see _op_prepared)")
            return compiled.linear_4bit(A, *self.arguments, bias, *(self.nested or ()))
        if bias is not None and bias.dtype != A.dtype:
            bias = bias.to(A.dtype)
        if self.k == 0:  # the kernels size their prefetches and chunks by K
            return reference.product_without_columns(A, self.n_out, bias)
        shape = A.shape
        # a contiguous input as it is (its rows are prod(shape[:-1])): right after a kernel has
        # streamed the weight through the caches, every torch call runs cold, a reshape's view
        # about 40 us (docs/performance.md)
        contiguous = A.is_contiguous()
        x = A if contiguous or len(shape) == 2 else A.reshape(-1, self.k)
        rows = prod(shape[:-1])
        isa = native.isa()
        if A.dtype == torch.float32:  # float32 products in bfloat16 parts only where torch allows them
            precision = torch.get_float32_matmul_precision()
            if isa == native.AMX and precision == "highest":
                isa = native.AMX - 1
            elif precision == "medium":
                dtype_code = native.F32_BF16
        amx = isa == native.AMX and A.dtype in (torch.bfloat16, torch.float32) and self._amx_shape
        if rows > (amx_max_rows(self.n_out, self.k, A.dtype) if amx else fused_max_rows(isa, A.dtype)):
            return self._chunked(x.reshape(-1, self.k), bias).view(*shape[:-1], self.n_out)
        if not contiguous:
            x = x.contiguous()
        out = native.empty((*shape[:-1], self.n_out), A.dtype)
        bias_pointer = None if bias is None or not rows else bias.contiguous().data_ptr()
        piece = amx_piece_rows(self.k, A.dtype) if amx else max(rows, 1)
        for start in range(0, rows, piece):  # rows of the input and the output, both contiguous
            count = min(piece, rows - start)
            self._linear(
                self._pointer, self.n_out, self.k, x.data_ptr() + start * self.k * x.element_size(), count,
                bias_pointer, out.data_ptr() + start * self.n_out * out.element_size(), dtype_code, isa,
                torch.get_num_threads(),
            )  # fmt: skip
        return out

    def _chunked(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Many rows: decode CHUNK_BYTES of weight rows at a time into one buffer that stays in
        cache and hand each chunk to torch's GEMM. From ``COLUMN_SLICE_ROWS`` input rows on, each
        chunk's GEMM writes its columns of the output in place (BLAS takes a column slice: its
        rows are a fixed stride apart); with fewer rows, narrow column slices multiply slowly, so
        each chunk writes its rows of the transposed output and one copy turns it around.

        A 16-bit dtype on a CPU without GEMMs of it (``gemm_dtype``): the chunk is decoded in that
        dtype, as the reference decodes it, and widened to float32 as it is decoded
        (``fourbit_dequantize_range_widened``), then multiplied in float32 with the widened input;
        the output is rounded to the dtype once."""
        dtype, gemm = x.dtype, gemm_dtype(x.dtype)
        if bias is not None:
            bias = bias.to(gemm)
        x = x.to(gemm)
        n_out, k = self.n_out, self.k
        blocksize = self.blocksize
        # chunks start on a packed byte, an absmax block and (nested) a group of absmax codes
        unit = blocksize * self.nested_blocksize
        step = unit // math.gcd(k, unit)
        rows_per_chunk = max(step, CHUNK_BYTES // (k * x.element_size()) // step * step)
        buffer = torch.empty((min(rows_per_chunk, n_out), k), dtype=gemm)
        decode = self._dequantize_range if gemm == dtype else self._dequantize_range_widened
        code, isa, threads = native.dtype_code(dtype), native.isa(), torch.get_num_threads()
        if rows_per_chunk >= n_out and gemm == dtype:
            # one chunk: torch's own product of the decoded weight, as F.linear would run it (the
            # same bits as one full-width slice below, measured 4-19% quicker on MiniLM-sized weights)
            decode(self._pointer, 0, n_out * k, buffer.data_ptr(), code, isa, threads)
            return torch.nn.functional.linear(x, buffer, bias)
        by_columns = x.shape[0] >= COLUMN_SLICE_ROWS or rows_per_chunk >= n_out
        if by_columns:
            out = native.empty((x.shape[0], n_out), gemm)
        else:
            out, x = native.empty((n_out, x.shape[0]), gemm), x.t()
        for start in range(0, n_out, rows_per_chunk):
            stop = min(n_out, start + rows_per_chunk)
            weight = buffer[: stop - start]
            decode(self._pointer, start * k, (stop - start) * k, weight.data_ptr(), code, isa, threads)
            if by_columns:
                left, right, target, part = (
                    x,
                    weight.t(),
                    out[:, start:stop],
                    None if bias is None else bias[start:stop],
                )
            else:
                left, right, target = weight, x, out[start:stop]
                part = None if bias is None else bias[start:stop, None]
            if part is None:
                torch.mm(left, right, out=target)
            else:
                torch.addmm(part, left, right, out=target)
        out = out if by_columns else out.t()
        return out.contiguous() if out.dtype == dtype else out.to(dtype, memory_format=torch.contiguous_format)


def quantize_4bit(
    A: torch.Tensor, code: torch.Tensor, blocksize: int, quant_storage: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``reference.quantize_4bit``: natively for whole blocks of float32,
    bfloat16 or float16 values, else through the compiled path."""
    numel = A.numel()
    dtype = native.dtype_code(A.dtype)
    if dtype is None or numel == 0 or numel % blocksize or not native.available():
        return compiled.quantize_4bit(A, code, blocksize, quant_storage)
    values = A.detach().contiguous()
    midpoints, order = reference.sorted_code(code.float())
    midpoints = midpoints.contiguous()
    order = order.to(torch.uint8).contiguous()
    packed = native.empty((numel // 2,), torch.uint8)
    absmax = torch.empty(numel // blocksize, dtype=torch.float32)
    native.library().fourbit_quantize(
        values.data_ptr(), dtype, numel // blocksize, blocksize, midpoints.data_ptr(), order.data_ptr(),
        packed.data_ptr(), absmax.data_ptr(), native.isa(), torch.get_num_threads(),
    )  # fmt: skip
    return packed.view(quant_storage).unsqueeze(1), absmax


#: The op path's prepared weights whose tensors are read where they lie (``PreparedWeight.borrowed``),
#: by those tensors' addresses and layouts (``_op_key``). Under torch.compile every product comes
#: through the op, with new aliases of the same tensors each call; gathering the pointers again
#: took about 40 us a call on a 2-core CPU. A kept weight holds no tensor, only addresses that
#: are part of its key, so it reads whatever tensors lie there now.
_op_weights: dict[tuple, PreparedWeight] = {}
#: Weights kept before the op path starts over (a model has a few hundred).
OP_WEIGHTS_LIMIT = 4096


def _op_key(tensors: Sequence[torch.Tensor], blocksize: int, shape: Sequence[int], nested_blocksize: int) -> tuple:
    """What a borrowed ``PreparedWeight`` of ``tensors`` depends on: their addresses and layouts,
    and the weight's sizes."""
    layouts = tuple((t.data_ptr(), t.dtype, t.shape, t.stride()) for t in tensors)
    return (blocksize, tuple(shape), nested_blocksize, layouts)


def _op_prepared(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    nested: NestedStatistics | None,
) -> PreparedWeight:
    """The prepared weight of an op call: a kept one for tensors it reads where they lie, else a new one."""
    tensors = (packed, absmax, code) if nested is None else (packed, absmax, code, *nested[:3])
    key = _op_key(tensors, blocksize, shape, nested.blocksize if nested is not None else 1)
    prepared = _op_weights.get(key)
    if prepared is None:
        prepared = PreparedWeight(packed, absmax, code, blocksize, shape, nested)
        if prepared.borrowed:
            prepared.release()
            if len(_op_weights) >= OP_WEIGHTS_LIMIT:
                _op_weights.clear()
            _op_weights[key] = prepared
    return prepared


def prepare(*arguments, **options) -> PreparedWeight | None:
    """A ``PreparedWeight`` when the native library is available, else None (the op path)."""
    return PreparedWeight(*arguments, **options) if native.available() else None


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
) -> torch.Tensor:
    """Same contract as ``reference.dequantize_4bit``."""
    if native.dtype_code(dtype) is not None and native.available():
        nested = NestedStatistics.of(nested_absmax, nested_code, nested_offset, nested_blocksize)
        return _op_prepared(packed, absmax, code, blocksize, shape, nested).dequantize(dtype)
    return compiled.dequantize_4bit(
        packed, absmax, code, blocksize, shape, dtype, nested_absmax, nested_code, nested_offset, nested_blocksize
    )


def linear_4bit(
    A: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    bias: torch.Tensor | None = None,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_offset: torch.Tensor | None = None,
    nested_blocksize: int = NESTED_BLOCKSIZE,
) -> torch.Tensor:
    """Same contract as ``reference.linear_4bit``."""
    if native.available() and native.dtype_code(A.dtype) is not None and len(shape) == 2 and shape[0]:
        nested = NestedStatistics.of(nested_absmax, nested_code, nested_offset, nested_blocksize)
        return _op_prepared(packed, absmax, code, blocksize, shape, nested).linear(A, bias)
    return compiled.linear_4bit(
        A, packed, absmax, code, blocksize, shape, bias, nested_absmax, nested_code, nested_offset, nested_blocksize
    )
