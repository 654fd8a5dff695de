"""One fragment-kernel launch over several weights that take the same input (q, k and v; gate
and up), their outputs side by side in one tensor.

A few-row product costs a launch and a ramp whatever its size: on an H200 in a CUDA graph, a
1024x4096 weight took 4.4 us for 0.5 us of bytes (docs/performance.md). A grouped launch runs
each weight's programs in one grid: program ``p`` belongs to the last weight whose first program
is at most ``p``, and reaches that weight's tensors by element offsets from the first weight's
(so no table is read before the first weight load, and nothing is concatenated in memory). The
weights must agree on everything the kernel specializes on (K, blocksize, statistics kind,
layout, absmax alignment); each keeps its own code table, statistics and bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ...formats import NESTED_BLOCKSIZE, NestedStatistics
from . import dispatch
from .fragment_arguments import INPUT_DTYPE, checked_config, codes_a_load, fragment_tensors, input_layout
from .fragment_grid import GROUP_STEPS, REGISTERS, STEP, aligned, fragment_plan
from .fragments import fragment_product
from .launch import ProductLaunch, dependent_launches
from .linear import PreparedWeight
from .op_entry import linear_4bit

__all__ = ["MAX_WEIGHTS", "GroupLaunch", "group_launch", "linear_4bit_group"]

#: Weights one grouped launch takes (q, k and v).
MAX_WEIGHTS = 3


@triton.jit
def _member(program, first, n, column, w, absmax, code, nested_absmax, nested_code, nested_offset, bias, current):
    """``current`` (this program's weight: its program index among the weight's, rows, output
    column and the six tensors' and the bias' element offsets, all int64) replaced by the weight
    that starts at program ``first`` where the program is one of its (branch-free)."""
    c0, c1, c2, c3, c4, c5, c6, c7, c8, c9 = current
    member = program >= first
    return (
        tl.where(member, program - first, c0), tl.where(member, n, c1), tl.where(member, column, c2),
        tl.where(member, w, c3), tl.where(member, absmax, c4), tl.where(member, code, c5),
        tl.where(member, nested_absmax, c6), tl.where(member, nested_code, c7), tl.where(member, nested_offset, c8),
        tl.where(member, bias, c9),
    )  # fmt: skip


@triton.jit
def _fragment_group_kernel(
    x_ptr, w_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr, bias_ptr, out_ptr,
    workspace_ptr, counter_ptr, M, N, K, stride_xm, stride_om,
    first_1: tl.int64, n_1: tl.int64, column_1: tl.int64, w_1: tl.int64, absmax_1: tl.int64, code_1: tl.int64,
    nested_absmax_1: tl.int64, nested_code_1: tl.int64, nested_offset_1: tl.int64, bias_1: tl.int64,
    first_2: tl.int64, n_2: tl.int64, column_2: tl.int64, w_2: tl.int64, absmax_2: tl.int64, code_2: tl.int64,
    nested_absmax_2: tl.int64, nested_code_2: tl.int64, nested_offset_2: tl.int64, bias_2: tl.int64,
    WEIGHTS: tl.constexpr, TILES: tl.constexpr, WARPS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, FLOAT16: tl.constexpr,
    HAS_BIAS: tl.constexpr, CODES: tl.constexpr, TILED: tl.constexpr, K_WARPS: tl.constexpr,
    PERMUTED: tl.constexpr, DEPENDENT: tl.constexpr, STRADDLING: tl.constexpr,
):  # fmt: skip
    """``fragments._fragment_mma_kernel`` over up to three weights: the first weight's tensors and
    ``N`` rows, and for the second and third the first program, rows, output column, and each
    tensor's offset in elements from the first weight's (``stride_om``: the outputs' total
    columns). The workspace of split programs is laid out as the output."""
    program = tl.program_id(0).to(tl.int64)
    zero = program * 0
    current = (program, zero + N, zero, zero, zero, zero, zero, zero, zero, zero)
    if WEIGHTS > 1:
        current = _member(program, first_1, n_1, column_1, w_1, absmax_1, code_1, nested_absmax_1, nested_code_1,
                          nested_offset_1, bias_1, current)  # fmt: skip
    if WEIGHTS > 2:
        current = _member(program, first_2, n_2, column_2, w_2, absmax_2, code_2, nested_absmax_2, nested_code_2,
                          nested_offset_2, bias_2, current)  # fmt: skip
    local, n, column, w, absmax, code, nested_absmax, nested_code, nested_offset, bias = current
    fragment_product(
        x_ptr, w_ptr + w, absmax_ptr + absmax, code_ptr + code, nested_absmax_ptr + nested_absmax,
        nested_code_ptr + nested_code, nested_offset_ptr + nested_offset, bias_ptr + bias, out_ptr + column,
        workspace_ptr + column, counter_ptr, local.to(tl.int32), M, n.to(tl.int32), K, stride_xm, stride_om, TILES,
        WARPS, SPLIT_K, BLOCKSIZE, NESTED, NESTED_BLOCKSIZE, FLOAT16, HAS_BIAS, CODES, TILED, K_WARPS, PERMUTED,
        DEPENDENT, STRADDLING,
    )  # fmt: skip


_GROUP_SCALARS = [f"{name}_{index}" for index in (1, 2) for name in
                  ("first", "n", "column", "w", "absmax", "code", "nested_absmax", "nested_code", "nested_offset",
                   "bias")]  # fmt: skip
#: The row counts and the members' places are not specialized: one compile serves every group
#: of a specialization, wherever its tensors lie.
_fragment_group_kernel = triton.jit(_fragment_group_kernel.fn, do_not_specialize=["M", "N", *_GROUP_SCALARS])


class GroupLaunch(ProductLaunch):
    """A ``ProductLaunch`` over several weights; keeps the other weights' tensors (and biases),
    whose places its arguments hold, alive until ``release``."""

    __slots__ = ("members",)

    def release(self) -> None:
        """Keep only the tensors' addresses: a call then launches what the addresses say, which
        is right for any tensors at those addresses (as a cache keyed by them finds), and passes
        its own first weight's tensors (``fragment_tensors``) where it launches through the JIT."""
        self.before = self.members = None


def group_launch(
    weights: Sequence, biases: Sequence[torch.Tensor | None], x: torch.Tensor, config: tuple[int, ...],
    processors: int, deterministic: bool = False,
) -> GroupLaunch:  # fmt: skip
    """The grouped launch for ``weights`` (``linear.PreparedWeight``s on one GPU, 2 to
    ``MAX_WEIGHTS``) with ``biases`` (all None, or one per weight in x's dtype), for inputs like
    the 2-d ``x``; ``config`` as ``fragments.fragment_launch`` takes it. The launch is valid for
    these tensors where they lie now: whoever keeps it rebuilds it when one is replaced. Its
    output is ``(rows, sum of the weights' rows)``; call it with the first bias."""
    if not 2 <= len(weights) <= MAX_WEIGHTS or len(biases) != len(weights):
        raise ValueError(f"a grouped launch takes 2 to {MAX_WEIGHTS} weights and a bias each, got "
                         f"{len(weights)} weights and {len(biases)} biases")  # fmt: skip
    first = weights[0]
    _check_alike(weights, biases)
    warps, split_k, k_warps, permuted = checked_config(config, first.k, first.blocksize)
    m, k = x.shape[0], first.k
    stride_xm, tiles, prepare_input = input_layout(x, k, permuted)
    row_groups = sum(triton.cdiv(weight.n_out, 16) for weight in weights)
    if not split_k:
        warps, k_warps, split_k = fragment_plan(row_groups, k, tiles, warps, processors, k_warps, not deterministic)
    k_warps = k_warps or 1
    split_k = max(1, min(split_k, k // (GROUP_STEPS * STEP)))
    counts = [triton.cdiv(weight.n_out, 16 * (warps // k_warps)) for weight in weights]
    columns = sum(weight.n_out for weight in weights)
    members: list[int] = []
    starts = [sum(counts[:index]) for index in range(len(weights))]
    bias = biases[0]
    for index, weight in enumerate(weights[1:], start=1):
        tensors = zip(fragment_tensors(weight), fragment_tensors(first), strict=True)
        offsets = [_offset(tensor, base) for tensor, base in tensors][:6]
        bias_offset = 0 if bias is None else _offset(biases[index], bias)
        members += [starts[index], weight.n_out, sum(w.n_out for w in weights[:index]), *offsets, bias_offset]
    members += [0] * (2 * 10 - len(members))
    dependent = dependent_launches(x.device)
    launch = GroupLaunch(
        _fragment_group_kernel, (sum(counts), split_k), {"num_warps": warps, "launch_pdl": dependent},
        first, fragment_tensors,
        (m, first.n_out, k, stride_xm, columns, *members, len(weights), tiles, warps, split_k, first.blocksize,
         first.nested, first.nested_blocksize, x.dtype == torch.float16, bias is not None, codes_a_load(first),
         first.tiled, k_warps, permuted, dependent, not aligned(k, first.blocksize)),
        m, columns, x.dtype, x.device, sum(counts) if split_k > 1 else 0, prepare_input, registers=REGISTERS,
        input_dtype=INPUT_DTYPE,
    )  # fmt: skip
    launch.members = (tuple(fragment_tensors(weight) for weight in weights[1:]), tuple(biases))
    return launch


def _check_alike(weights: Sequence, biases: Sequence[torch.Tensor | None]) -> None:
    """Raise where the weights differ in what the kernel specializes on, or the biases in kind."""
    first = weights[0]

    def specialization(weight) -> tuple:
        tensors = fragment_tensors(weight)
        return (weight.bytes.device, weight.k, weight.blocksize, weight.nested, weight.nested_blocksize, weight.tiled,
                codes_a_load(weight), tuple(tensor.dtype for tensor in tensors))  # fmt: skip

    for weight in weights[1:]:
        if specialization(weight) != specialization(first):
            raise ValueError(
                "weights of a grouped launch must agree in device, K, blocksize, statistics, layout and absmax "
                f"alignment: {specialization(first)} against {specialization(weight)}"
            )
    if len({bias is None for bias in biases}) > 1 or len({bias.dtype for bias in biases if bias is not None}) > 1:
        raise ValueError("a grouped launch takes a bias for every weight (of one dtype) or for none")


def _offset(tensor: torch.Tensor, base: torch.Tensor) -> int:
    """Elements from ``base``'s data to ``tensor``'s, both of one dtype."""
    distance = tensor.data_ptr() - base.data_ptr()
    if distance % tensor.element_size():
        raise ValueError(f"a {tensor.dtype} tensor lies {distance} bytes from its group's first: not whole elements")
    return distance // tensor.element_size()


#: Grouped launches by their members' tensors and the input's signature (bounded: cleared when full).
_group_launches: dict[tuple, GroupLaunch] = {}
_MAX_GROUP_LAUNCHES = 256


def linear_4bit_group(
    A: torch.Tensor,
    packed: Sequence[torch.Tensor],
    absmax: Sequence[torch.Tensor],
    code: Sequence[torch.Tensor],
    blocksize: int,
    n_outs: Sequence[int],
    bias: Sequence[torch.Tensor | None],
    nested_absmax: Sequence[torch.Tensor | None],
    nested_code: Sequence[torch.Tensor | None],
    nested_offset: Sequence[torch.Tensor | None],
    nested_blocksize: int = NESTED_BLOCKSIZE,
    tiled: bool = False,
) -> torch.Tensor:
    """``ops_grouped.linear_4bit_group`` on CUDA: one grouped launch where the eager tables give
    the members' stacked rows the fragment kernel and the members agree (``group_launch``),
    else each member's product, concatenated. The launch is kept by every tensor's address (and
    holds none of them, so that a deleted model's weights are freed); a replaced tensor gets a new
    one; a capture reuses the one its eager warm-up built."""
    k = A.shape[-1]
    count = len(packed)
    x = A.reshape(-1, k)
    if x.stride(-1) != 1:
        x = x.contiguous()
    if 2 <= count <= MAX_WEIGHTS and x.shape[0]:
        deterministic = torch.are_deterministic_algorithms_enabled()
        tensors = (*packed, *absmax, *code, *bias, *nested_absmax, *nested_code, *nested_offset)
        # everything a launch's arguments follow from: a launch found by this key is right for
        # the tensors at these addresses, whichever they are
        key = (
            tuple(None if tensor is None else (tensor.data_ptr(), tensor.dtype) for tensor in tensors),
            tuple(n_outs), blocksize, nested_blocksize, tiled,
            x.shape, x.stride(), x.dtype, x.device, x.data_ptr() % 16, deterministic,
        )  # fmt: skip

        def weight(i: int) -> PreparedWeight:
            statistics = NestedStatistics.of(nested_absmax[i], nested_code[i], nested_offset[i], nested_blocksize)
            return PreparedWeight(packed[i], absmax[i], code[i], blocksize, (n_outs[i], k), statistics, tiled=tiled)

        launch = _group_launches.get(key)
        if launch is not None:
            before = None if launch.launch.direct() else fragment_tensors(weight(0))
            return launch(x, bias[0], before).view(*A.shape[:-1], launch.columns)
        weights = [weight(i) for i in range(count)]
        launch = _grouped(weights, list(bias), x, deterministic)
        if launch is not None:
            out = launch(x, bias[0])  # the first call compiles through the JIT, with the tensors it holds
            # kept only where the kernel reads the caller's tensors themselves (not a converted
            # copy, such as a code table in another dtype, which the next call would not find)
            given = {tensor.data_ptr() for tensor in tensors if tensor is not None}
            if all(tensor.data_ptr() in given for w in weights for tensor in fragment_tensors(w)):
                launch.release()  # kept launches must not keep a model's weights alive
                if len(_group_launches) >= _MAX_GROUP_LAUNCHES:
                    _group_launches.clear()
                _group_launches[key] = launch
            return out.view(*A.shape[:-1], launch.columns)
    return torch.cat(
        [linear_4bit(A, packed[i], absmax[i], code[i], blocksize, (n_outs[i], k), bias[i], nested_absmax[i],
                     nested_code[i], nested_offset[i], nested_blocksize, tiled) for i in range(count)],
        dim=-1,
    )  # fmt: skip


def _grouped(weights: list, biases: list, x: torch.Tensor, deterministic: bool) -> GroupLaunch | None:
    """A new grouped launch for ``weights`` and inputs like ``x``, or None where the fragment
    kernel does not take the stacked rows or the members differ."""
    first = weights[0]
    columns = sum(weight.n_out for weight in weights)
    # the eager tables' choice serves captures too: a capture may not load another kernel
    config = dispatch.choose_config(x, columns, first.k, first.blocksize, first.packed, deterministic)
    if not (isinstance(config, tuple) and config[0] == "fragments"):
        return None
    if not all(dispatch.fragments_supported(x, w.k, w.blocksize, w.packed) for w in weights):
        return None
    try:
        return group_launch(weights, biases, x, config[1:], dispatch.processors(x.device), deterministic)
    except ValueError:  # members the kernel would specialize apart: each runs on its own
        return None
