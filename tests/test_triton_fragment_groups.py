"""One fragment-kernel launch over several weights that share an input (``fragment_groups``).

On a GPU the grouped products are compared with each weight's own launch (bit for bit where
both take the same configuration and K is not split across programs) and with a float64
reference; the agreement rules need no GPU.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from triton_cases import DEVICE, NEEDS_TRITON, ON_GPU, code_table, nested_statistics

from fourbit import layout
from fourbit.formats import NestedStatistics
from fourbit.kernels import reference
from fourbit.kernels.triton import PreparedWeight
from fourbit.kernels.triton.fragment_grid import fragment_plan
from fourbit.kernels.triton.fragment_groups import group_launch

pytestmark = NEEDS_TRITON


def _weight(n: int, k: int, nested: bool, tiled: bool = False, blocksize: int = 64, quant_type: str = "nf4"):
    """(PreparedWeight, float64 dense) of a random ``n x k`` weight."""
    code = code_table(quant_type)
    packed, absmax = reference.quantize_4bit(torch.randn(n, k, device=DEVICE) * k**-0.5, code, blocksize, torch.uint8)
    absmax, extra = nested_statistics(absmax, nested)
    dense = reference.dequantize_4bit(packed, absmax, code, blocksize, (n, k), torch.float64, **extra)
    statistics = (
        NestedStatistics(extra["nested_absmax"], extra["nested_code"], extra["nested_offset"], 256) if nested else None
    )
    if tiled:
        packed = layout.tile(packed, (n, k))
    return PreparedWeight(packed, absmax, code, blocksize, (n, k), statistics, tiled=tiled), dense


def _processors() -> int:
    return torch.cuda.get_device_properties(DEVICE).multi_processor_count if ON_GPU else 4


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("nested", "tiled", "biased"), [(True, True, False), (False, False, True), (True, False, True)]
)
def test_a_grouped_launch_gives_each_weights_own_products(nested, tiled, biased):
    """q/k/v-like weights (rows that fill no program, one weight of a single row group) in one
    launch: the output's columns are each weight's products, bit for bit those of its own launch
    with the same configuration, for 1 to 16 input rows, with and without biases."""
    assert ON_GPU
    torch.manual_seed(0)
    k = 1024
    members = [_weight(n, k, nested, tiled) for n in (272, 16, 48)]
    weights = [weight for weight, _ in members]
    for rows in (1, 3, 8, 16):
        x = torch.randn(rows, k, device=DEVICE).to(torch.bfloat16)
        biases = [torch.randn(w.n_out, device=DEVICE).to(torch.bfloat16) if biased else None for w in weights]
        for config in [(4, 1, 4), (4, 1, 2), (2, 1, 1)]:
            launch = group_launch(weights, biases, x, config, _processors())
            out = launch(x, biases[0])
            assert out.shape == (rows, sum(w.n_out for w in weights))
            own = [w.linear(x, b, ("fragments", *config, 0)) for w, b in zip(weights, biases, strict=True)]
            own = torch.cat(own, 1)
            assert torch.equal(out, own), (rows, config)


@pytest.mark.gpu
@pytest.mark.parametrize("count", [2, 3])
def test_a_grouped_launch_that_splits_k_across_programs_is_within_rounding_of_float64(count):
    """K split across programs (partial sums in a workspace laid out as the output) and the
    tables' own choice (at 16 rows, programs of 8 warps sharing each row group's K:
    ``fragment_plan``), against a float64 reference."""
    assert ON_GPU
    torch.manual_seed(1)
    k = 4096
    members = [_weight(n, k, True) for n in (128, 64, 96)[:count]]
    weights = [weight for weight, _ in members]
    expected_weight = torch.cat([dense for _, dense in members])
    row_groups = sum(weight.n_out // 16 for weight in weights)
    assert fragment_plan(row_groups, k, 2, 4, _processors()) == (8, 8, 1)
    for rows in (1, 8, 16):
        x = torch.randn(rows, k, device=DEVICE).to(torch.bfloat16)
        expected = x.double() @ expected_weight.t()
        for config in [(4, 4, 1), (4, 2, 2), (4, 0)]:
            out = group_launch(weights, [None] * count, x, config, _processors())(x, None)
            error = ((out.double() - expected).norm() / expected.norm()).item()
            assert error < 1e-2, (rows, config, error)


def test_weights_that_the_kernel_would_specialize_apart_are_refused():
    """The members must agree in K, blocksize and statistics kind; biases all or none."""
    x = torch.zeros(1, 256, device=DEVICE, dtype=torch.bfloat16)
    nested, _ = _weight(64, 256, True)
    plain, _ = _weight(64, 256, False)
    other_k, _ = _weight(64, 512, True)
    other_blocksize, _ = _weight(64, 256, True, blocksize=128)
    for weights in ([nested, plain], [nested, other_k], [nested, other_blocksize]):
        with pytest.raises(ValueError, match="must agree"):
            group_launch(weights, [None, None], x, (4, 1, 1), 4)
    bias = torch.zeros(64, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="for every weight"):
        group_launch([nested, nested], [bias, None], x, (4, 1, 1), 4)
    with pytest.raises(ValueError, match="2 to 3 weights"):
        group_launch([nested], [None], x, (4, 1, 1), 4)
    with pytest.raises(ValueError, match="2 to 3 weights"):
        group_launch([nested] * 4, [None] * 4, x, (4, 1, 1), 4)


@pytest.mark.gpu
def test_the_cuda_group_op_entry_groups_what_it_can_and_runs_the_rest_one_by_one():
    """``fragment_groups.linear_4bit_group`` (the op's CUDA entry): a q/k/v-like group at 1-16 rows
    takes one kept grouped launch; 17 rows, where the fragment kernel does not run, and members
    of different statistics kinds run one by one. Each within rounding of float64."""
    from fourbit.kernels.triton import fragment_groups

    assert ON_GPU
    torch.manual_seed(2)
    k = 2048

    def call(x, weights):
        stats = [w.nested_statistics for w in weights]
        return fragment_groups.linear_4bit_group(
            x, [w.packed for w in weights], [w.absmax for w in weights], [w.code for w in weights],
            weights[0].blocksize, [w.n_out for w in weights], [None] * len(weights),
            [s.absmax if s else None for s in stats], [s.code if s else None for s in stats],
            [s.offset if s else None for s in stats], 256, True,
        )  # fmt: skip

    def check(out, x, members):
        expected = x.double() @ torch.cat([dense for _, dense in members]).t()
        assert out.shape == expected.shape
        error = ((out.double() - expected).norm() / expected.norm()).item()
        assert error < 1e-2, (x.shape, error)

    members = [_weight(n, k, True, tiled=True) for n in (512, 128, 128)]
    weights = [weight for weight, _ in members]
    fragment_groups._group_launches.clear()
    for rows in (1, 8, 16):
        x = torch.randn(2, rows, k, device=DEVICE).to(torch.bfloat16)[0]
        check(call(x, weights), x, members)
    assert len(fragment_groups._group_launches) == 3
    x = torch.randn(17, k, device=DEVICE).to(torch.bfloat16)
    check(call(x, weights), x, members)
    mixed = [members[0], _weight(128, k, False, tiled=True)]
    x = torch.randn(4, k, device=DEVICE).to(torch.bfloat16)
    check(call(x, [weight for weight, _ in mixed]), x, mixed)
    assert len(fragment_groups._group_launches) == 3


@pytest.mark.gpu
def test_the_group_op_on_cuda_tensors_takes_the_grouped_launch():
    """``torch.ops.fourbit.linear_4bit_group`` on CUDA tensors dispatches to the grouped launch
    (one kept launch for a repeated call) and agrees with the members' products."""
    from fourbit import ops_grouped
    from fourbit.kernels.triton import fragment_groups

    assert ON_GPU
    torch.manual_seed(3)
    k = 1024
    members = [_weight(n, k, True) for n in (256, 64)]
    weights = [weight for weight, _ in members]
    stats = [w.nested_statistics for w in weights]
    arguments = (
        [w.packed for w in weights], [w.absmax for w in weights], [w.code for w in weights], 64,
        [w.n_out for w in weights], [None, None], [s.absmax for s in stats], [s.code for s in stats],
        [s.offset for s in stats], 256, False,
    )  # fmt: skip
    x = torch.randn(1, 3, k, device=DEVICE).to(torch.bfloat16)
    fragment_groups._group_launches.clear()
    out = ops_grouped.linear_4bit_group(x, *arguments)
    again = ops_grouped.linear_4bit_group(x, *arguments)
    assert len(fragment_groups._group_launches) == 1
    assert torch.equal(out, again)
    assert out.shape == (1, 3, 320)
    expected = ops_grouped.member_products(x, *arguments)
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_a_grouped_launch_places_each_member_by_its_first_program_column_and_offsets():
    """The arguments a grouped launch hands the kernel (built without a GPU): each member's first
    program, rows, output column, and offsets that lead from the first member's tensors (and
    bias) to its own; the grid covers every member's programs."""
    from fourbit.kernels.triton.fragment_arguments import fragment_tensors
    from fourbit.kernels.triton.fragment_groups import GroupLaunch

    members = [_weight(n, 512, True)[0] for n in (100, 32, 48)]
    biases = [torch.zeros(w.n_out, dtype=torch.bfloat16, device=DEVICE) for w in members]
    x = torch.zeros(3, 512, dtype=torch.bfloat16, device=DEVICE)
    launch = group_launch(members, biases, x, (4, 1, 2), processors=8)
    assert isinstance(launch, GroupLaunch)
    # 4 warps, 2 sharing K: 32 weight rows a program
    assert launch.launch.grid == (4 + 1 + 2, 1, 1)
    assert launch.columns == 180 and launch.out_shape == (3, 180)
    m, n, k, _, stride_om, *rest = launch.after
    assert (m, n, k, stride_om) == (3, 100, 512, 180)
    places = [rest[:10], rest[10:20]]
    for member, bias, place, (first, column) in zip(members[1:], biases[1:], places, [(4, 100), (5, 132)], strict=True):
        assert place[:3] == [first, member.n_out, column]
        tensors = zip(fragment_tensors(member), fragment_tensors(members[0]), place[3:9], strict=True)
        for tensor, base, offset in tensors:
            assert base.data_ptr() + offset * base.element_size() == tensor.data_ptr()
        assert biases[0].data_ptr() + place[9] * 2 == bias.data_ptr()
    assert rest[20] == 3  # WEIGHTS


def test_a_released_grouped_launch_keeps_its_pointers_and_no_tensor():
    """``GroupLaunch.release`` (what the kept launches of the op's CUDA entry do after their first
    call): the kernel's pointer arguments stay, and the weights can be freed."""
    import gc
    import weakref

    members = [_weight(n, 512, True)[0] for n in (64, 32)]
    x = torch.zeros(2, 512, dtype=torch.bfloat16, device=DEVICE)
    launch = group_launch(members, [None, None], x, (4, 1, 1), processors=8)
    pointers, after = launch.pointers, launch.after
    references = [weakref.ref(member.packed) for member in members]
    launch.release()
    del members
    gc.collect()
    assert all(reference() is None for reference in references)
    assert launch.before is None and launch.members is None
    assert launch.pointers == pointers and launch.after == after


@pytest.mark.gpu
def test_the_cuda_group_op_entry_keeps_no_weight_alive_and_serves_new_weights_at_old_addresses():
    """The op's kept launches hold addresses, not tensors: a deleted group's weights are freed,
    and weights that land at the same addresses get the kept launch and their own products."""
    import gc
    import weakref

    from fourbit import ops_grouped
    from fourbit.kernels.triton import fragment_groups

    assert ON_GPU
    k = 1024

    def products(seed: int):
        torch.manual_seed(seed)
        members = [_weight(n, k, True) for n in (256, 64)]
        weights = [weight for weight, _ in members]
        stats = [w.nested_statistics for w in weights]
        x = torch.randn(4, k, device=DEVICE).to(torch.bfloat16)
        out = ops_grouped.linear_4bit_group(
            x, [w.packed for w in weights], [w.absmax for w in weights], [w.code for w in weights], 64,
            [w.n_out for w in weights], [None, None], [s.absmax for s in stats], [s.code for s in stats],
            [s.offset for s in stats], 256, False,
        )  # fmt: skip
        expected = x.double() @ torch.cat([dense for _, dense in members]).t()
        error = ((out.double() - expected).norm() / expected.norm()).item()
        assert error < 1e-2, error
        return weakref.ref(weights[0].packed)

    fragment_groups._group_launches.clear()
    first = products(0)
    gc.collect()
    assert first() is None
    assert len(fragment_groups._group_launches) == 1
    products(1)  # the caching allocator may hand out the freed addresses: either way, its own products


@pytest.mark.gpu
def test_the_cuda_group_op_entry_keeps_no_launch_that_reads_a_converted_copy():
    """A code table in another dtype is converted for the kernel: that launch is used once and not
    kept (the copy it reads would be gone by the next call), and the products stay right."""
    from fourbit import ops_grouped
    from fourbit.kernels.triton import fragment_groups

    assert ON_GPU
    torch.manual_seed(4)
    k = 1024
    members = [_weight(n, k, False) for n in (128, 64)]
    weights = [weight for weight, _ in members]
    x = torch.randn(2, k, device=DEVICE).to(torch.bfloat16)
    fragment_groups._group_launches.clear()
    for _ in range(2):
        out = ops_grouped.linear_4bit_group(
            x, [w.packed for w in weights], [w.absmax for w in weights], [w.code.double() for w in weights], 64,
            [w.n_out for w in weights], [None, None], [None, None], [None, None], [None, None], 256, False,
        )  # fmt: skip
        expected = x.double() @ torch.cat([dense for _, dense in members]).t()
        assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-2
    assert not fragment_groups._group_launches
