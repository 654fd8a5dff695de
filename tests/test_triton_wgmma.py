"""Hopper's ``wgmma`` product kernel (17-64 rows): forced, against a float64 reference (GPU of
compute capability 9.0); its staged inputs and PTX text (anywhere Triton runs)."""

from __future__ import annotations

import itertools
import re
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from ptx_emulator import run_thread
from triton_cases import DEVICE, NEEDS_TRITON, ON_GPU, code_table, nested_statistics, pairwise_cases

from fourbit import layout
from fourbit.kernels import reference
from fourbit.kernels import triton as kernels
from fourbit.kernels.triton import dispatch, launch, tuning, wgmma, wgmma_ptx

pytestmark = NEEDS_TRITON

HOPPER = ON_GPU and torch.cuda.get_device_capability() == (9, 0)
needs_hopper = pytest.mark.skipif(not HOPPER, reason="wgmma needs a GPU of compute capability 9.0")


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize(("config", "dtype", "nested"), pairwise_cases([("wgmma", 1), ("wgmma", 3)]))
def test_wgmma_kernel_against_a_float64_reference(config, dtype, nested):
    """The ``wgmma`` kernel, forced, over 17 to 64 input rows (both instruction sizes, partial
    ones), weight rows that fill no warpgroup, blocksizes from 64 to 4096, K splits that do and
    do not divide K, rows and tiles, and strided inputs."""
    for quant_type, (n, k, blocksize) in itertools.product(
        ["nf4", "fp4"], [(300, 256, 64), (100, 4096, 128), (17, 512, 256), (130, 4096, 4096), (208, 768, 64)]
    ):
        code = code_table(quant_type)
        packed, absmax = reference.quantize_4bit(torch.randn(n, k, device=DEVICE), code, blocksize, torch.uint8)
        absmax, extra = nested_statistics(absmax, nested)
        dense = reference.dequantize_4bit(packed, absmax, code, blocksize, (n, k), torch.float64, **extra)
        tiled = layout.can_tile((n, k))
        weight = layout.tile(packed, (n, k)) if tiled else packed
        for rows in (17, 32, 33, 64):
            x = torch.randn(rows, 2 * k, device=DEVICE).to(dtype)[:, -k:]
            bias = torch.randn(n, device=DEVICE).to(dtype)
            out = kernels.linear_4bit(
                x, weight, absmax, code, blocksize, (n, k), bias, **extra, tiled=tiled, config=config
            )
            expected = x.double() @ dense.t() + bias.double()
            assert out.dtype == dtype and out.shape == (rows, n)
            error = ((out.double() - expected).norm() / expected.norm()).item()
            assert error < 1e-2, (quant_type, n, k, blocksize, rows, error)
            assert (out.double() - expected).abs().max() < 0.05 * expected.abs().max(), "an element is off"


@pytest.mark.gpu
@needs_hopper
def test_wgmma_kernel_gives_the_products_of_the_fragment_kernel_within_rounding():
    """At 17-64 rows the ``wgmma`` kernel sums each step as the fragment kernel does, so the two
    (the fragment kernel run on 16-row slices) agree to the output's rounding."""
    n, k, blocksize = 1024, 2048, 64
    code = code_table("nf4")
    packed, absmax = reference.quantize_4bit(torch.randn(n, k, device=DEVICE), code, blocksize, torch.uint8)
    absmax, extra = nested_statistics(absmax, True)
    x = torch.randn(48, k, device=DEVICE).to(torch.bfloat16)
    out = kernels.linear_4bit(x, packed, absmax, code, blocksize, (n, k), **extra, config=("wgmma", 1))
    slices = [
        kernels.linear_4bit(x[i : i + 16], packed, absmax, code, blocksize, (n, k), **extra, config=("fragments", 4, 1))
        for i in range(0, 48, 16)
    ]
    torch.testing.assert_close(out, torch.cat(slices), rtol=1.6e-2, atol=1e-2)


@pytest.mark.gpu
@needs_hopper
def test_the_h200_tables_send_17_to_32_rows_of_large_weights_to_wgmma():
    """``choose_config``: 17-32 rows of a weight with two waves of 64-row programs take ``wgmma``,
    33-64 rows the wide kernel (whose rule such weights meet); 16 rows and weights of fewer
    programs take neither."""
    if tuning.for_device(torch.device(DEVICE)) is not tuning.H200:
        pytest.skip("not an H200: the wgmma rule is in its tables")
    programs = int(tuning.H200.wgmma.min_waves * dispatch.processors(torch.device(DEVICE)))
    large, small = 64 * programs, 64 * programs - 64
    cases = [(17, large, "wgmma"), (32, large, "wgmma"), (33, large, "wgmma_wide"), (64, large, "wgmma_wide"),
             (16, large, "fragments"), (32, small, "fused")]  # fmt: skip
    for rows, n_out, expected in cases:
        x = torch.randn(rows, 1024, device=DEVICE, dtype=torch.bfloat16)
        chosen = dispatch.choose_config(x, n_out, 1024, 64)
        assert chosen[0] == expected, (rows, n_out, chosen)


@pytest.mark.gpu
@needs_hopper
def test_a_product_recorded_into_a_cuda_graph_takes_the_captured_tables():
    """A weight with one wave of 64-row programs: its 32-row products run on ``wgmma`` when a
    CUDA graph records them (``KernelTables.captured``) and on the tensor-core kernel eagerly;
    each path's result is that kernel's, and the two launches are kept apart."""
    if tuning.for_device(torch.device(DEVICE)) is not tuning.H200:
        pytest.skip("not an H200: the captured tables are its own")
    n, k = 64 * dispatch.processors(torch.device(DEVICE)), 1024
    code = code_table("nf4")
    packed, absmax = reference.quantize_4bit(torch.randn(n, k, device=DEVICE), code, 64, torch.uint8)
    weight = kernels.PreparedWeight(packed, absmax, code, 64, (n, k))
    x = torch.randn(32, k, device=DEVICE, dtype=torch.bfloat16)
    eager_config = dispatch.choose_config(x, n, k, 64, packed)
    assert eager_config[0] == "fused"
    with torch.no_grad():
        eager = weight.linear(x)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            weight.linear(x)  # warm up outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            recorded = weight.linear(x)
        graph.replay()
        torch.cuda.synchronize()
        forced_wgmma = weight.linear(x, None, ("wgmma", 1))
        forced_eager = weight.linear(x, None, eager_config)
    assert not torch.equal(forced_wgmma, forced_eager)  # the kernels sum in different orders
    assert torch.equal(recorded, forced_wgmma)
    assert torch.equal(eager, forced_eager)
    assert torch.equal(weight.linear(x), eager)  # the eager launch is still the eager one


def test_wgmma_kernel_refuses_more_rows_than_an_instruction_takes_and_k_of_part_of_a_block():
    """Clear errors for inputs the kernel cannot take, before anything launches."""
    weight = type("Weight", (), {"k": 1024, "n_out": 128, "blocksize": 64})()
    with pytest.raises(ValueError, match="at most 64 input rows, got 65"):
        wgmma.wgmma_launch(weight, torch.empty(65, 1024, dtype=torch.bfloat16), False)
    weight.k = 1000
    with pytest.raises(ValueError, match="multiple of the blocksize"):
        wgmma.wgmma_launch(weight, torch.empty(32, 1000, dtype=torch.bfloat16), False)


@pytest.mark.parametrize("rows", wgmma.ROW_TILES)
def test_staged_inputs_lay_each_step_out_as_the_instruction_reads_it(rows):
    """``WgmmaInputs``: staged step s, instruction j, core matrix b, half h, row r and column c
    hold input row 8b + r, column 64s + 16(c // 2) + 4j + 2h + c % 2 (the columns a lane's packed
    weight word holds), rows past the input's zero; strided rows are read where they are."""
    m, k = rows - 5, 256
    x = torch.randn(m, 2 * k, device=DEVICE).to(torch.bfloat16)[:, :k]
    staged = wgmma.WgmmaInputs(rows, k, torch.device(DEVICE))(x).view(torch.bfloat16)
    padded = torch.zeros(rows, k, dtype=torch.bfloat16, device=DEVICE)
    padded[:m] = x
    # column 64s + 16t + 4j + 2h + e of row 8b + r goes to [s, j, b, h, r, t, e]
    expected = padded.view(rows // 8, 8, k // 64, 4, 4, 2, 2).permute(2, 4, 0, 5, 1, 3, 6).reshape(-1)
    assert torch.equal(staged, expected)


def test_inputs_of_part_of_an_iteration_are_staged_to_whole_iterations_with_zeros():
    """K of 5.75 iterations (1472 columns) is staged as 6 (``staged_columns``): its own columns
    as a K of whole iterations would stage them, then zeros (the kernels copy every step)."""
    rows, k = 32, 1472
    x = torch.randn(rows - 3, k, device=DEVICE).to(torch.bfloat16)
    staged = wgmma.WgmmaInputs(rows, k, torch.device(DEVICE))(x).view(torch.bfloat16)
    assert wgmma.staged_columns(k) == 1536 and staged.numel() == rows * 1536
    whole = torch.zeros(rows - 3, 1536, device=DEVICE, dtype=torch.bfloat16)
    whole[:, :k] = x
    assert torch.equal(staged, wgmma.WgmmaInputs(rows, 1536, torch.device(DEVICE))(whole).view(torch.bfloat16))
    assert staged[rows * k :].abs().sum() == 0 and staged[: rows * k].abs().sum() > 0


def test_inputs_past_a_tile_are_staged_as_blocks_of_it_one_after_another():
    """Inputs of more rows than the tile: block i holds rows ``i * rows`` on, laid out as a tile's
    own staged inputs (the last block padded with zeros)."""
    rows, k, m = 64, 256, 150
    x = torch.randn(m, k, device=DEVICE).to(torch.bfloat16)
    staged = wgmma.WgmmaInputs(rows, k, torch.device(DEVICE), blocks=3)(x).view(torch.bfloat16)
    assert staged.numel() == 3 * rows * k
    for block, start in enumerate(range(0, m, rows)):
        alone = wgmma.WgmmaInputs(rows, k, torch.device(DEVICE))(x[start : start + rows]).view(torch.bfloat16)
        assert torch.equal(staged[block * rows * k : (block + 1) * rows * k], alone), block
    assert staged[-rows * k :].abs().sum() > 0


@pytest.mark.parametrize("rows", wgmma.ROW_TILES)
def test_wgmma_step_ptx_names_every_operand_its_constraints_declare(rows):
    """The step's PTX refers to exactly the operands its constraints declare, multiplies with four
    instructions of ``rows`` columns and waits for them before scaling."""
    text = wgmma_ptx.wgmma_step_ptx(rows, "bf16")
    constraints = wgmma_ptx.wgmma_constraints(rows).split(",")
    used = {int(number) for number in re.findall(r"\$(\d+)", text)}
    assert used == set(range(len(constraints)))
    assert len(re.findall(rf"wgmma\.mma_async\.sync\.aligned\.m64n{rows}k16\.f32\.bf16\.bf16", text)) == 4
    assert text.index("wgmma.wait_group.sync.aligned 0") < text.index("fma.rn.f32")


@pytest.mark.parametrize("empty_offset", [0, 64])
def test_thread_0_alone_copies_a_live_step_from_its_place_in_the_staged_inputs(empty_offset):
    """Run as each of a program's threads (the PTX emulator): thread 0 alone copies staged step $5
    (4096 bytes a step from $1) into the slot $2 on its "full" barrier $4, and only when the step
    is live ($3); the wide kernel's ring (``empty_offset``) first waits, when told ($6), for
    phase $7 of the slot's "empty" barrier. The other threads branch past it all."""
    text = wgmma_ptx.wgmma_issue_ptx(4096, empty_offset)
    base, step, slot, full = 1 << 40, 37, 2048, 9000
    for live, wait in ((1, 1), (0, 1), (1, 0)):
        inputs = {"$1": base, "$2": slot, "$3": live, "$4": full, "$5": step, "$6": wait, "$7": 1}
        for tid in (0, 1, 31, 32, 255):
            events = []
            run_thread(text, inputs, {"%tid.x": tid}, {}, events)
            expected = []
            if tid == 0 and empty_offset and wait:
                expected.append(("wait", full + empty_offset, 1))
            if tid == 0 and live:
                expected += [("expect", full, 4096), ("copy", slot, base + step * 4096, 4096, full)]
            assert events == expected, (live, wait, tid)


@pytest.mark.parametrize("rows", [32, 64, 96, 128, 192, 256])
def test_a_steps_four_descriptors_step_through_the_slot_by_one_instructions_inputs(rows):
    """The four ``wgmma`` of a step (both kernels' row tiles) read the slot's inputs 16 columns
    apart: run in the PTX emulator, descriptor j is the slot's address plus ``j * rows * 32``
    bytes in 16-byte units (bits 0-13), the core matrices' strides along K and the rows above it."""
    lines = wgmma_ptx._wgmma_lines(rows, "bf16", "$9", "d0", ["1"] * 4)
    text = "\n".join(lines[: lines.index("wgmma.fence.sync.aligned;")])
    strides = (wgmma_ptx.WGMMA_K_OFFSET >> 4) << 16 | (wgmma_ptx.WGMMA_ROW_OFFSET >> 4) << 32
    for slot in (1024, 50176, 200704):  # a ring anywhere in 227 KiB
        regs = run_thread(text, {"$9": slot}, {}, {})
        for j in range(4):
            assert regs[f"desc{j}"] == ((slot + j * rows * 32) >> 4) | strides, (slot, j)
    issued = "\n".join(lines)
    for j in range(4):  # each instruction takes its own
        assert f"{{d0}}, {{g{2 * j}, h{2 * j}, g{2 * j + 1}, h{2 * j + 1}}}, desc{j}, " in issued


class _Compiled:
    """A compiled kernel as ``KernelLaunch`` sees it, recording its launches."""

    def __init__(self, packed: tuple) -> None:
        self.metadata = SimpleNamespace(shared=40)
        self.packed_metadata = packed
        self.function = 1234
        self.n_regs = 100
        self.runs: list[tuple] = []

    def _init_handles(self) -> None:
        pass

    def run(self, *arguments) -> None:
        self.runs.append(arguments)


def _launch_with_extra_shared(monkeypatch, packed: tuple, head_shared: int = 0, cluster: int = 1) -> tuple:
    """A ``KernelLaunch`` asking 4096 bytes of its own (past ``head_shared`` left to Triton) over
    a fake compiled kernel that takes 40 of its own, a profiler listening, in clusters of
    ``cluster``; the kernel and the driver calls it made."""
    compiled, allowed = _Compiled(packed), []
    monkeypatch.setattr(launch, "DIRECT", True)
    monkeypatch.setattr(launch, "CLUSTER_LAUNCH", True)
    monkeypatch.setattr(launch, "_hooked", lambda: True)
    monkeypatch.setattr(launch, "_allow_dynamic_shared", lambda function, size: allowed.append((function, size)))
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 77, raising=False)
    kernel = SimpleNamespace(warmup=lambda *arguments, grid, **options: compiled, __name__="_kernel")
    return (
        launch.KernelLaunch(
            kernel,
            (3, 2),
            {"num_warps": 4},
            torch.device("cuda", 0),
            extra_shared=4096,
            head_shared=head_shared,
            cluster=cluster,
        ),
        compiled,
        allowed,
    )


def test_a_launch_with_shared_memory_of_its_own_asks_the_driver_once_and_always_launches_directly(monkeypatch):
    """The launch adds ``extra_shared`` to Triton's dynamic shared memory (rounded up to 128
    bytes), allows it to the function once, and launches the compiled kernel directly on every
    call, even with a profiler listening (only that launch carries the memory)."""
    kernel_launch, compiled, allowed = _launch_with_extra_shared(monkeypatch, (4, 1, 40, 1, 1, 1))
    x = torch.zeros(4)
    kernel_launch(x, 5)
    kernel_launch(x, 6)
    assert allowed == [(1234, 128 + 4096)]
    assert [run[:9] for run in compiled.runs] == [(3, 2, 1, 77, 1234, (4, 1, 4224, 1, 1, 1), None, None, None)] * 2
    assert compiled.runs[0][9:] == (x.data_ptr(), 5)  # the first call hands over pointers as ints
    assert compiled.runs[1][9] is x and compiled.runs[1][10] == 6  # later ones as given, as every direct launch
    assert kernel_launch.direct()


def test_a_launch_with_shared_memory_of_its_own_refuses_metadata_it_cannot_read_and_old_triton(monkeypatch):
    """Launch metadata without the shared size where Triton's CUDA backends keep it is an error,
    before anything launches; so is a Triton whose launches cannot be made directly."""
    kernel_launch, compiled, allowed = _launch_with_extra_shared(monkeypatch, (4, 1))
    with pytest.raises(RuntimeError, match="unknown order"):
        kernel_launch(torch.zeros(4), 5)
    assert compiled.runs == [] and allowed == []
    monkeypatch.setattr(launch, "DIRECT", False)
    with pytest.raises(RuntimeError, match=r"Triton 3\.3 or newer"):
        launch.KernelLaunch(SimpleNamespace(), (1,), {}, torch.device("cuda", 0), extra_shared=64)


def test_a_launch_in_clusters_packs_the_cluster_where_tritons_launch_reads_it(monkeypatch):
    """In clusters of two the launch hands Triton's launch metadata with two CTAs a cluster (which
    Triton's launch multiplies the grid's first dimension by) and the grid of clusters; metadata
    that already asks for clusters is not Triton's order; a Triton whose launch was not checked
    refuses clusters before anything compiles."""
    kernel_launch, compiled, allowed = _launch_with_extra_shared(monkeypatch, (4, 1, 40, 1, 1, 1), cluster=2)
    kernel_launch(torch.zeros(4), 5)
    assert [run[:9] for run in compiled.runs] == [(3, 2, 1, 77, 1234, (4, 2, 4224, 1, 1, 1), None, None, None)]
    kernel_launch, compiled, allowed = _launch_with_extra_shared(monkeypatch, (4, 2, 40, 1, 1, 1), cluster=2)
    with pytest.raises(RuntimeError, match="unknown order"):
        kernel_launch(torch.zeros(4), 5)
    assert compiled.runs == [] and allowed == []
    monkeypatch.setattr(launch, "CLUSTER_LAUNCH", False)
    with pytest.raises(RuntimeError, match=r"clusters need Triton 3\.6 or 3\.9, not"):
        launch.KernelLaunch(SimpleNamespace(), (1,), {}, torch.device("cuda", 0), extra_shared=64, cluster=2)


@pytest.mark.parametrize("head_shared", [32, 40, 1024])
def test_a_launch_whose_data_starts_past_tritons_refuses_a_kernel_that_took_more(monkeypatch, head_shared):
    """Where the kernel's PTX keeps data from ``head_shared`` bytes into the dynamic shared
    memory, a compile in which Triton took more of it for itself (40 bytes) is an error before
    anything launches; at most that much launches."""
    kernel_launch, compiled, allowed = _launch_with_extra_shared(monkeypatch, (4, 1, 40, 1, 1, 1), head_shared)
    if head_shared < 40:
        with pytest.raises(RuntimeError, match=f"40 bytes of shared memory of its own.*starts at {head_shared}"):
            kernel_launch(torch.zeros(4), 5)
        assert compiled.runs == [] and allowed == []
    else:
        kernel_launch(torch.zeros(4), 5)
        assert allowed == [(1234, 128 + 4096)] and len(compiled.runs) == 1
