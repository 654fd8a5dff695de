"""The Triton entry of ``fourbit::linear_4bit``: what compiled graphs call without CUDA graphs
(``torch.compile``'s default mode, compiled prefills, training), once per product and call, with
the weight as the op's tensors rather than a module's prepared weight.

A call like an earlier one, with its tensors at the same addresses, launches what that call
launched: the product kernel with the weight's pointers (``ProductLaunch.launch_with``), or each
chunk's decode and its cuBLAS product (``KeptChunks``). What is kept holds no tensor, so a deleted
model's weights are freed, and only launches whose kernels read the caller's own memory are kept
(the decodes' table, derived from the code, is looked up at each call): a converted copy would be
gone by the next call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...formats import NESTED_BLOCKSIZE, NestedStatistics
from ..derived import decode_table
from .dequantize import DequantizeLaunch
from .launch import ProductLaunch, pointers
from .linear import CHUNKED, PreparedWeight, chunked_product

__all__ = ["KeptChunks", "linear_4bit"]

#: Where a decode's pointers (``DequantizeLaunch.before``) hold its code table.
_TABLE = 2


class KeptChunks:
    """The chunked product (decode + cuBLAS) of one weight at fixed addresses for one input
    signature, holding no tensor: each chunk's rows, decode launch and pointers."""

    __slots__ = ("chunks", "k", "n_out")

    def __init__(self, chunks: list[tuple[int, int, DequantizeLaunch, tuple[int, ...]]], n_out: int, k: int) -> None:
        self.chunks, self.n_out, self.k = chunks, n_out, k

    @classmethod
    def of(
        cls, weight: PreparedWeight, dtype: torch.dtype, tensors: Sequence[torch.Tensor | None]
    ) -> KeptChunks | None:
        """``weight``'s chunk plan for ``dtype``, kept when every decode reads ``tensors``' memory
        (the code table aside) and launches directly; None otherwise."""
        extents = [(t.data_ptr(), t.data_ptr() + max(1, t.nbytes)) for t in tensors if t is not None]
        chunks = []
        for start, stop, decode in weight.chunk_plan(dtype):
            if decode.launch is None or not decode.launch.direct():
                return None
            weight_pointers = decode.pointers
            read = [p for i, p in enumerate(weight_pointers) if i != _TABLE]
            if not all(any(low <= p < high for low, high in extents) for p in read):
                return None
            decode.before = None  # it keeps no weight alive
            chunks.append((start, stop, decode, weight_pointers))
        return cls(chunks, weight.n_out, weight.k)

    def direct(self) -> bool:
        """Whether every decode may still launch directly (no profiler listens)."""
        return all(decode.launch.direct() for _, _, decode, _ in self.chunks)

    def __call__(self, A: torch.Tensor, bias: torch.Tensor | None, code: torch.Tensor) -> torch.Tensor:
        """The product of ``A`` (at least one row), with ``code``'s decode table looked up now."""
        x = A.reshape(-1, self.k)
        if x.stride(-1) != 1:
            x = x.contiguous()
        table = decode_table(code).data_ptr()
        chunks = [
            (start, stop, lambda d=decode, p=(*p[:_TABLE], table, *p[_TABLE + 1 :]): d.run_with(p))
            for start, stop, decode, p in self.chunks
        ]
        return chunked_product(x, bias, self.n_out, chunks).view(*A.shape[:-1], self.n_out)


#: The op's launches by the op's tensors' addresses and the input's signature (bounded: cleared
#: when full): a call that finds one prepares nothing.
_op_launches: dict[tuple, tuple[ProductLaunch, tuple[int, ...]] | KeptChunks] = {}
_MAX_OP_LAUNCHES = 1024


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
    tiled: bool = False,
    config: Sequence | str | None = None,
) -> torch.Tensor:
    """Same contract as ``ops.linear_4bit`` (``tiled``: the weight is in ``fourbit.layout``'s
    tiles); ``config`` overrides ``choose_config`` (tuning).

    A ``("fragments", num_warps, SPLIT_K)`` tuple forces the register-fragment kernel
    (``dispatch.fragments_supported`` inputs only), ``("wgmma"[, SPLIT_K])`` Hopper's ``wgmma``
    kernel (``dispatch.wgmma_supported`` inputs only), ``("wgmma_wide"[, CLUSTER[,
    PROGRAM_ROWS]])`` the wide ``wgmma`` kernel (the same inputs of any count of rows; K split across
    clusters of CLUSTER programs, default 1, of PROGRAM_ROWS weight rows, 128 or 64, default
    128), a ``("fused", BLOCK_N, BLOCK_M, BLOCK_K, SPLIT_K, num_warps, num_stages,
    SCALE_WEIGHTS)`` tuple the tensor-core kernel (16-bit inputs on a GPU only), a ``("wide",
    BLOCK_N, BLOCK_M, BLOCK_K, num_warps, num_stages[, SPLIT_K])`` tuple the same kernel with
    weights scaled before the dot and SPLIT_K K splits (default 1; fewer where a split would
    keep under 8 K tiles; ``tuning.WideConfig``), a ``(ROWS, BLOCK_N, BLOCK_K, SPLIT_K,
    num_warps, lookup)`` tuple the CUDA-core multiply-accumulate kernel, ``"chunked"`` the
    decode + cuBLAS path.
    """
    tensors = (packed, absmax, code, nested_absmax, nested_code, nested_offset)
    if config is None:
        captured = A.is_cuda and torch._C._cuda_isCurrentStreamCapturing()
        inputs = PreparedWeight.input_key(A, bias, torch.are_deterministic_algorithms_enabled(), captured)
        # everything the launch and its weight arguments follow from: a launch found by this key
        # is right for the tensors at these addresses, whichever they are
        key = (
            tuple(None if tensor is None else (tensor.data_ptr(), tensor.dtype) for tensor in tensors),
            blocksize, tuple(shape), nested_blocksize, tiled, A.device, inputs,
        )  # fmt: skip
        kept = _op_launches.get(key)
        if isinstance(kept, KeptChunks) and kept.direct() and A.numel():
            return kept(A, bias, code)
        if isinstance(kept, tuple) and kept[0].launch.direct():
            return kept[0].launch_with(A, bias, kept[1])
    nested = NestedStatistics.of(nested_absmax, nested_code, nested_offset, nested_blocksize)
    weight = PreparedWeight(packed, absmax, code, blocksize, shape, nested, tiled=tiled)
    weight.share_launches()
    out = weight.linear(A, bias, config)
    launch = weight.launches.get(inputs) if config is None else None
    if isinstance(launch, ProductLaunch):
        # kept only where the kernel reads the caller's tensors themselves: a converted copy
        # (a code table in another dtype) would be gone by the next call
        weight_pointers = pointers(launch.bind(weight))
        given = {tensor.data_ptr() for tensor in tensors if tensor is not None}
        if given.issuperset(weight_pointers):
            _keep(key, (launch, weight_pointers))
    elif launch is CHUNKED and code.dtype == torch.float32 and A.numel():
        # (a code table in another dtype is converted for each prepared weight: its decode table
        # would be derived from a copy)
        chunks = KeptChunks.of(weight, A.dtype, tensors)
        if chunks is not None:
            _keep(key, chunks)
    return out


def _keep(key: tuple, launch: tuple[ProductLaunch, tuple[int, ...]] | KeptChunks) -> None:
    if len(_op_launches) >= _MAX_OP_LAUNCHES:
        _op_launches.clear()
    _op_launches[key] = launch
