"""Triton ``A @ W.T + bias`` for a packed 4-bit weight W.

Up to 16 rows of 16-bit input (blocksizes of 64 and more, K a multiple of the blocksize) run
``fragments``: ``mma.sync`` with each lane's operand fragment decoded through a shared-memory
table of code pairs. Up to 64 rows otherwise run a tensor-core kernel that decodes each packed
word in registers with byte permutes (``byte_permute``), and up to 256 rows run it with
batch-wide tiles when the weight has rows enough to occupy the GPU, or columns enough to split
K until it does; none writes the decoded weight out. Other few-row inputs (float32, K not a
multiple of the blocksize, the interpreter) run a CUDA-core multiply-accumulate kernel with a
table lookup. The remaining cases (prefill, training, small weights under many rows) decode the
weight in chunks of rows with the dequantize kernel and hand each chunk to cuBLAS: the extra
memory is one chunk, never the whole decoded weight.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence

import torch
import triton

from ...formats import NestedStatistics
from ...layout import TILE_ROWS
from .. import reference
from ..derived import float16_table
from . import dispatch, fragments, wgmma, wgmma_wide
from .common import nested_arguments
from .dequantize import DequantizeLaunch, dequantize_4bit
from .gemv import gemv_any_kernel, gemv_words_kernel
from .launch import ProductLaunch
from .tensor_core import decode_dot_kernel
from .tuning import CHUNK_BYTES

#: What a weight's launch cache keeps for inputs that take the chunked path (decode + cuBLAS):
#: a marker, so that such calls skip choosing and preparing a configuration each time.
CHUNKED = object()


@functools.cache
def _flatten_rows(k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda A: A.reshape(-1, k).contiguous()


def _after(first: Callable, then: Callable | None) -> Callable:
    """``first``, then ``then`` (when given)."""
    return first if then is None else lambda A: then(first(A))


def _word_tensors(weight: PreparedWeight) -> tuple:
    """The tensor-core kernel's weight arguments: packed words, absmax, code, nested statistics."""
    return (weight.bytes.view(torch.int32), weight.absmax, weight.code, *weight.statistics)


@functools.cache
def _gemv_tensors(words: bool, half: bool) -> Callable[[PreparedWeight], tuple]:
    """The CUDA-core kernels' weight arguments: packed words or bytes, absmax, the code table
    (float16 with ``half``), nested statistics."""

    def bind(weight: PreparedWeight) -> tuple:
        data = weight.bytes.view(torch.int32) if words else weight.bytes
        table = float16_table(weight.code) if half else weight.code
        return (data, weight.absmax, table, *weight.statistics)

    return bind


def chunked_product(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    n_out: int,
    chunks: Sequence[tuple[int, int, Callable[[], torch.Tensor]]],
) -> torch.Tensor:
    """``x @ W.T + bias`` from the decodes of W's chunks of rows: ``(start, stop, decode)`` each,
    whose call returns rows ``start:stop`` of W; cuBLAS writes each product into its columns. A
    weight in one chunk is one ``F.linear`` (less host time than an output filled by slices)."""
    if len(chunks) == 1:
        return torch.nn.functional.linear(x, chunks[0][2](), bias)
    out = torch.empty((x.shape[0], n_out), dtype=x.dtype, device=x.device)
    for start, stop, decode in chunks:
        columns = out[:, start:stop]
        if bias is not None:
            torch.addmm(bias[start:stop], x, decode().t(), out=columns)
        else:
            torch.mm(x, decode().t(), out=columns)
    return out


#: The op's launches, per weight layout (``PreparedWeight.layout``): the op runs once per call
#: under torch.compile, and a launch built once serves every weight of the same layout.
_layout_launches: dict[tuple, dict[tuple, ProductLaunch]] = {}


class PreparedWeight:
    """A packed 4-bit weight made ready for the Triton products, once.

    Keeps the views of the packed bytes, the float tables and the statistics each kernel takes,
    and one ``ProductLaunch`` per input signature, so that a repeated product costs an output
    allocation and a launch. The tensors are the caller's, not copies: whoever keeps a prepared
    weight rebuilds it when the weight's tensors are replaced. Split-K launches use the zeroed
    workspace kept per device and stream (``launch.split_buffers``).
    """

    #: Input signatures kept per weight (prefill lengths vary; decoding repeats a few).
    MAX_LAUNCHES = 64

    def __init__(
        self,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        code: torch.Tensor,
        blocksize: int,
        shape: Sequence[int],
        nested: NestedStatistics | None = None,
        tiled: bool = False,
    ) -> None:
        self.packed = packed
        self.tiled = tiled
        self.absmax = absmax
        self.code = code.float()
        self.blocksize = blocksize
        self.n_out, self.k = (int(size) for size in shape)
        self.nested_statistics = nested
        # the kernels' three statistics tensors, and what they specialize on (NESTED, NESTED_BLOCKSIZE)
        self.statistics, self.nested, self.nested_blocksize = nested_arguments(absmax, nested)
        self.bytes = packed.reshape(-1).view(torch.uint8)
        self._launches: dict[tuple, ProductLaunch] = {}
        self._shared = False
        self._chunk_plans: dict[torch.dtype, list] = {}
        self._decodes: dict[torch.dtype, DequantizeLaunch] = {}

    @staticmethod
    def input_key(A: torch.Tensor, bias: torch.Tensor | None, deterministic: bool, captured: bool) -> tuple:
        """What a launch kept for inputs like ``A`` depends on: everything Triton specializes on
        that can differ between calls, the choice of products that sum partial products across
        programs (whose order varies: ``deterministic``), and whether a CUDA graph records the
        call (``captured``: ``tuning.KernelTables.captured``)."""
        return (
            A.shape,
            A.stride(),
            A.dtype,
            A.data_ptr() % 16,
            None if bias is None else (bias.dtype, bias.data_ptr() % 16),
            deterministic,
            captured,
        )

    @property
    def launches(self) -> dict[tuple, ProductLaunch | object]:
        """The launches kept by input key (``input_key``), ``CHUNKED`` for the chunked path."""
        return self._launches

    def layout(self) -> tuple:
        """Everything a launch depends on besides the input: the device, the sizes, and the dtype
        and 16-byte alignment of each tensor (Triton specializes on both)."""
        tensors = (self.bytes, self.absmax, self.code, *self.statistics)
        pointers = tuple((tensor.dtype, tensor.data_ptr() % 16) for tensor in tensors)
        sizes = (self.n_out, self.k, self.blocksize, self.nested, self.nested_blocksize, self.tiled)
        return (self.bytes.device, *sizes, pointers)

    def share_launches(self) -> None:
        """Use (and fill) the launches kept for every weight of this layout, binding this weight's
        tensors at each call, instead of launches of its own."""
        launches = _layout_launches.get(layout := self.layout())
        if launches is None:
            if len(_layout_launches) >= 256:
                _layout_launches.clear()
            launches = _layout_launches[layout] = {}
        self._launches, self._shared = launches, True

    def linear(self, A: torch.Tensor, bias: torch.Tensor | None = None, config: Sequence | str | None = None):
        """``A @ W.T + bias`` in A's dtype (``bias`` already in A's dtype)."""
        deterministic = torch.are_deterministic_algorithms_enabled()
        captured = A.is_cuda and torch._C._cuda_isCurrentStreamCapturing()
        if config is None:
            key = self.input_key(A, bias, deterministic, captured)
            launch = self._launches.get(key)
            if launch is CHUNKED:
                return self._chunked_rows(A, bias)
            if launch is not None:
                return launch(A, bias, launch.bind(self) if self._shared else None)
        n_out, k = self.n_out, self.k
        if not k:  # nothing to launch, and no reshape of A to (-1, 0)
            return reference.product_without_columns(A, n_out, bias)
        x = A.reshape(-1, k)
        if x.stride(-1) != 1:
            x = x.contiguous()
        m = x.shape[0]
        if not (m and n_out):
            return torch.empty((*A.shape[:-1], n_out), dtype=A.dtype, device=A.device)
        if config is None:
            chosen = dispatch.choose_config(x, n_out, k, self.blocksize, self.packed, deterministic, captured)
            launch = self._prepare(x, bias, chosen, deterministic)
        else:
            launch = self._prepare(x, bias, config)
        before = None if launch is None else self._complete(launch, A, x)
        if config is None:  # later calls like this one take the same launch (or go straight to the chunks)
            self._remember(key, CHUNKED if launch is None else launch)
            if not captured and A.is_cuda:
                self._ready_for_capture(A, x, bias, key, chosen, deterministic)
        if launch is None:
            return self._chunked(x, bias).view(*A.shape[:-1], n_out)
        return launch(A, bias, before)

    def _complete(self, launch: ProductLaunch, A: torch.Tensor, x: torch.Tensor) -> tuple | None:
        """Give a fresh ``launch`` its output shape and input copy for inputs like ``A`` (whose
        rows are ``x``); the weight's tensors to pass to its calls when launches are shared."""
        launch.out_shape = (*A.shape[:-1], self.n_out)
        if x.data_ptr() != A.data_ptr():  # the rows are a copy: every call makes it
            launch.prepare_input = _after(_flatten_rows(self.k), launch.prepare_input)
        if not self._shared:
            return None
        before, launch.before, launch.pointers = launch.before, None, None  # it keeps no weight alive
        return before

    def _ready_for_capture(
        self, A: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, key: tuple, chosen: tuple | str,
        deterministic: bool,
    ) -> None:  # fmt: skip
        """Where the tables for CUDA graphs (``tuning.KernelTables.captured``) choose another
        product for calls like this one, build that launch and run it once now: a capture may
        not load a kernel, and captures follow an eager warm-up of the same call."""
        other = dispatch.choose_config(x, self.n_out, self.k, self.blocksize, self.packed, deterministic, True)
        captured_key = (*key[:-1], True)
        if other == chosen or captured_key in self._launches:
            return
        try:
            launch = self._prepare(x, bias, other, deterministic)
            if launch is None:
                self._chunked(x, bias)  # its decode compiles on first use too
            else:
                launch(A, bias, self._complete(launch, A, x))
        except Exception as error:  # a compile failure here must not fail the eager call
            warnings.warn(
                f"fourbit: the product for CUDA graphs {other} could not be prepared ({type(error).__name__}: "
                f"{error}); captures take the eager one, {chosen}",
                RuntimeWarning,
                stacklevel=4,
            )
            launch = self._launches[key]
        self._remember(captured_key, CHUNKED if launch is None else launch)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole weight decoded to ``dtype``, in rows whatever its layout (a gradient's
        product with it), through a decode launch built once per dtype."""
        decode = self._decodes.get(dtype)
        if decode is None:
            if self.tiled and self.bytes.storage_offset() % 4:  # the word kernel reads int32 words
                return dequantize_4bit(self.packed, self.absmax, self.code, self.blocksize, (self.n_out, self.k), dtype,
                                       *self.nested_statistics or (), tiled=True)  # fmt: skip
            decode = self._decodes[dtype] = DequantizeLaunch(
                self.packed, self.absmax, self.code, self.blocksize, (self.n_out, self.k), dtype,
                self.nested_statistics, self.tiled,
            )  # fmt: skip
        return decode()

    def _prepare(
        self, x: torch.Tensor, bias: torch.Tensor | None, config: Sequence | str, deterministic: bool = False
    ) -> ProductLaunch | None:
        """The launch of ``config`` for inputs like ``x`` (None for the chunked path). With
        ``deterministic``, automatic K splits stay within a program or a thread block cluster
        (the same sums in the same order on every call): none across programs whose partial
        sums meet by atomics."""
        if isinstance(config, tuple) and config[0] == "fragments":
            processors = dispatch.processors(x.device)
            return fragments.fragment_launch(self, x, bias is not None, config[1:], processors, deterministic)
        if isinstance(config, tuple) and config[0] == "wgmma":
            return wgmma.wgmma_launch(self, x, bias is not None, 1 if deterministic else (*config[1:], 1)[0])
        if isinstance(config, tuple) and config[0] == "wgmma_wide":
            cluster = config[1] if len(config) > 1 else 1  # programs that split K: deterministic sums
            program_rows = config[2] if len(config) > 2 else wgmma_wide.PROGRAM_ROWS[0]
            processors = dispatch.processors(x.device)
            return wgmma_wide.wgmma_wide_launch(self, x, bias is not None, processors, cluster, program_rows)
        if isinstance(config, tuple) and config[0] == "fused":
            if deterministic:
                return self._fused(x, bias is not None, (*config[1:4], 1, *config[5:]), cover=False)
            return self._fused(x, bias is not None, config[1:])
        if isinstance(config, tuple) and config[0] == "wide":
            block_n, block_m, block_k, warps, stages, splits = (*config[1:], 1)[:6]
            config = (block_n, block_m, block_k, splits, warps, stages, True)
            return self._fused(x, bias is not None, config, cover=False)
        if config == "chunked":
            return None
        return self._gemv(x, bias is not None, config, deterministic)

    def _gemv(self, x: torch.Tensor, has_bias: bool, config: Sequence, deterministic: bool = False) -> ProductLaunch:
        """The CUDA-core multiply-accumulate kernel (a ``KernelTables.gemv`` entry ``config``;
        its automatic K split is one split with ``deterministic``)."""
        m, n_out, k, blocksize = x.shape[0], self.n_out, self.k, self.blocksize
        rows, block_n, block_k, split_k, num_warps, lookup_mode = config
        if lookup_mode not in ("half", "gather"):
            raise ValueError(f"the CUDA-core kernel's lookup is 'half' or 'gather', got {lookup_mode!r}")
        words = k % 8 == 0 and k % blocksize == 0  # always so for a tiled weight
        block_k = max(16, min(block_k, triton.next_power_of_2(k)))
        kernel = gemv_words_kernel if words else gemv_any_kernel
        split_k = split_k or (1 if deterministic else dispatch.split_k(n_out, k, block_n, block_k, x.device))
        # float32 inputs keep float32 codes: their products promise float32 accuracy
        half = lookup_mode == "half" and x.dtype != torch.float32
        grid = (triton.cdiv(n_out, block_n), split_k)
        return ProductLaunch(
            kernel, grid, {"num_warps": num_warps}, self, _gemv_tensors(words, half),
            (m, n_out, k, x.stride(0), n_out, rows, block_n, block_k, split_k, blocksize, self.nested,
             self.nested_blocksize, has_bias, *((self.tiled,) if words else ())),
            m, n_out, x.dtype, x.device, grid[0] if split_k > 1 else 0,
        )  # fmt: skip

    def _fused(self, x: torch.Tensor, has_bias: bool, config: Sequence, cover: bool = True) -> ProductLaunch:
        """The tensor-core kernel; with ``cover``, K splits are added (``dispatch.covering_splits``) beyond
        the configured ones until the programs cover the multiprocessors twice."""
        block_n, block_m, block_k, split_k, num_warps, num_stages, scale_weights = config
        m, n_out, k = x.shape[0], self.n_out, self.k
        block_k = 64 if self.tiled else min(block_k, k & -k)  # a power of two dividing K (tiled: 64)
        grid, block_m = dispatch.fused_grid(m, n_out, k, (block_n, block_m, block_k, split_k), x.device, cover)
        split_k, programs = grid[2], grid[0] * grid[1]
        return ProductLaunch(
            decode_dot_kernel, grid, {"num_warps": num_warps, "num_stages": num_stages}, self, _word_tensors,
            (m, n_out, k, x.stride(0), n_out, block_n, block_m, block_k, split_k, self.blocksize,
             self.nested, self.nested_blocksize, scale_weights, has_bias, self.tiled),
            m, n_out, x.dtype, x.device, programs if split_k > 1 else 0,
        )  # fmt: skip

    def _remember(self, key: tuple, launch: ProductLaunch | object) -> None:
        """Keep ``launch`` (or ``CHUNKED``) for calls whose inputs match ``key``."""
        if len(self._launches) >= self.MAX_LAUNCHES:
            self._launches.clear()
        self._launches[key] = launch

    def _chunked_rows(self, A: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The chunked product of ``A``'s rows (at least one), shaped like ``A`` with N columns."""
        x = A.reshape(-1, self.k)
        if x.stride(-1) != 1:
            x = x.contiguous()
        return self._chunked(x, bias).view(*A.shape[:-1], self.n_out)

    def _chunked(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Decode CHUNK_BYTES of weight rows at a time; cuBLAS writes each product into its columns."""
        return chunked_product(x, bias, self.n_out, self.chunk_plan(x.dtype))

    def chunk_plan(self, dtype: torch.dtype) -> list[tuple[int, int, DequantizeLaunch]]:
        """The chunked path's row ranges and the prepared decode of each into ``dtype``, built once."""
        plan = self._chunk_plans.get(dtype)
        if plan is None:
            plan = self._chunk_plans[dtype] = self._plan_chunks(dtype)
        return plan

    def _plan_chunks(self, dtype: torch.dtype) -> list[tuple[int, int, DequantizeLaunch]]:
        """The row ranges of the chunks and the prepared decode of each into ``dtype``."""
        n_out, k, blocksize = self.n_out, self.k, self.blocksize
        # a chunk must start on a packed byte, an absmax block, (nested) a group of absmax codes and
        # (tiled) a row group of tiles
        unit = blocksize * (self.nested_blocksize if self.nested else 1)
        step = unit // math.gcd(k, unit)
        if self.tiled:
            step = math.lcm(step, TILE_ROWS)
        rows_per_chunk = max(step, CHUNK_BYTES // (k * dtype.itemsize) // step * step)
        plan = []
        for start in range(0, n_out, rows_per_chunk):
            stop = min(n_out, start + rows_per_chunk)
            first, last = start * k, stop * k  # element range of the chunk
            nested = self.nested_statistics
            if nested is not None:
                nested = nested._replace(absmax=nested.absmax[first // unit :])
            decode = DequantizeLaunch(
                self.bytes[first // 2 : -(-last // 2)], self.absmax[first // blocksize : -(-last // blocksize)],
                self.code, blocksize, (stop - start, k), dtype, nested, self.tiled,
            )  # fmt: skip
            plan.append((start, stop, decode))
        return plan
