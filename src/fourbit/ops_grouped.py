"""``fourbit::linear_4bit_group``: the products of several 4-bit weights with one input, side by
side in one output (the weights of q, k and v; of gate and up).

Nothing calls it in eager code: the graph pass of ``fourbit.compiled_groups`` puts it in place
of sibling ``fourbit::linear_4bit`` calls under ``torch.compile``. CUDA tensors run one
fragment-kernel launch for all members where the kernel takes the stacked rows
(``kernels.triton.fragment_groups.linear_4bit_group``); every other case runs the members'
``linear_4bit`` products and concatenates them. It has no gradient formula: the pass runs after
autograd has been traced.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from .formats import NESTED_BLOCKSIZE
from .kernels.triton_support import triton_enabled

__all__ = ["GROUPED_DEVICES", "linear_4bit_group", "member_products"]

_LIBRARY = torch.library.Library("fourbit", "FRAGMENT")
_LIBRARY.define(
    "linear_4bit_group(Tensor A, Tensor[] packed, Tensor[] absmax, Tensor[] code, SymInt blocksize, SymInt[] n_outs, "
    "Tensor?[] bias, Tensor?[] nested_absmax, Tensor?[] nested_code, Tensor?[] nested_offset, "
    f"SymInt nested_blocksize={NESTED_BLOCKSIZE}, bool tiled=False) -> Tensor"
)


def member_products(
    A: Tensor,
    packed: Sequence[Tensor],
    absmax: Sequence[Tensor],
    code: Sequence[Tensor],
    blocksize: int,
    n_outs: Sequence[int],
    bias: Sequence[Tensor | None],
    nested_absmax: Sequence[Tensor | None],
    nested_code: Sequence[Tensor | None],
    nested_offset: Sequence[Tensor | None],
    nested_blocksize: int = NESTED_BLOCKSIZE,
    tiled: bool = False,
) -> Tensor:
    """Each member's ``fourbit::linear_4bit`` product of ``A``, concatenated along the last
    dimension: the op's definition, and what any device without a grouped kernel runs."""
    k = A.shape[-1]
    return torch.cat(
        [
            torch.ops.fourbit.linear_4bit(
                A,
                packed[i],
                absmax[i],
                code[i],
                blocksize,
                [n_outs[i], k],
                bias[i],
                nested_absmax[i],
                nested_code[i],
                nested_offset[i],
                nested_blocksize,
                tiled,
            )
            for i in range(len(packed))
        ],
        dim=-1,
    )


_LIBRARY.impl("linear_4bit_group", member_products, "CompositeExplicitAutograd")
#: Device types whose ``linear_4bit_group`` is one launch (elsewhere it runs its members).
GROUPED_DEVICES: tuple[str, ...] = ()
if triton_enabled() and torch.cuda.is_available():
    from .kernels.triton import fragment_groups

    _LIBRARY.impl("linear_4bit_group", fragment_groups.linear_4bit_group, "CUDA")
    GROUPED_DEVICES = ("cuda",)


@torch.library.register_fake("fourbit::linear_4bit_group", lib=_LIBRARY)
def _(A: Tensor, packed: Sequence[Tensor], absmax: Sequence[Tensor], code: Sequence[Tensor], blocksize: int,
      n_outs: Sequence[int], *statistics_and_layout: object, **named: object) -> Tensor:  # fmt: skip
    """The output's shape: A's rows, the members' columns side by side."""
    return A.new_empty((*A.shape[:-1], sum(n_outs)))


#: ``A`` and the members through the dispatcher (``torch.ops.fourbit.linear_4bit_group``).
linear_4bit_group = torch.ops.fourbit.linear_4bit_group
