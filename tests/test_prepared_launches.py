"""Prepared Triton products: launches kept per input signature and shared per weight layout,
split-K products that finish in the kernel and leave their workspace zeroed, direct launches
that match the JIT's bit for bit, and one kernel per eager batch-one call (on a GPU; without one
the Triton parts run in the interpreter). The layer-level preparation: ``test_prepared.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fourbit.functional as F4
from fourbit.formats import nested_op_arguments
from fourbit.nn import Linear4bit
from fourbit.prepared import weight_arguments

ON_GPU = torch.cuda.is_available()

triton = pytest.importorskip("triton", minversion="3.6")  # fourbit.ops.MIN_TRITON
from fourbit.kernels import triton as kernels  # noqa: E402
from fourbit.kernels.triton import launch  # noqa: E402

TRITON_DEVICE = "cuda" if ON_GPU else "cpu"


def _prepared_weight(n: int, k: int, nested: bool = True):
    weight = torch.randn(n, k, device=TRITON_DEVICE)
    packed, state = F4.quantize_4bit(weight, quant_type="nf4", compress_statistics=nested)
    prepared = kernels.PreparedWeight(packed, blocksize=64, shape=(n, k), **weight_arguments(state, packed.device))
    return prepared, F4.dequantize_4bit(packed, state)


@pytest.mark.parametrize("rows", [1, 3])
def test_split_k_products_finish_in_the_kernel_and_leave_the_workspace_zeroed(rows):
    n, k = 48, 512
    prepared, dense = _prepared_weight(n, k)
    bias = torch.randn(n, device=TRITON_DEVICE)
    config = (4, 16, 64, 4, 4, "gather")  # ROWS, BLOCK_N, BLOCK_K, four K splits, warps, lookup
    for seed in range(3):  # the same workspace serves each call
        x = torch.randn(rows, k, device=TRITON_DEVICE, generator=torch.Generator(TRITON_DEVICE).manual_seed(seed))
        out = prepared.linear(x, bias, config=config)
        torch.testing.assert_close(out, x @ dense.t() + bias, rtol=1e-4, atol=1e-4)
        workspace, counters = launch.split_buffers(torch.device(TRITON_DEVICE), 1, 1)
        assert not workspace.any() and not counters.any()


def test_launches_are_kept_per_input_signature():
    prepared, dense = _prepared_weight(40, 256)
    for rows in (1, 2, 1, 2, 1):
        x = torch.randn(rows, 256, device=TRITON_DEVICE)
        torch.testing.assert_close(prepared.linear(x), x @ dense.t(), rtol=1e-4, atol=1e-4)
    assert len(prepared._launches) == 2
    x = torch.randn(4, 257, device=TRITON_DEVICE)[:, :256]  # another stride: another launch
    torch.testing.assert_close(prepared.linear(x), x @ dense.t(), rtol=1e-4, atol=1e-4)
    assert len(prepared._launches) == 3


def test_the_op_shares_launches_between_weights_of_one_layout_and_binds_each_weight():
    first, first_dense = _prepared_weight(40, 256)
    second, second_dense = _prepared_weight(40, 256)
    x = torch.randn(2, 256, device=TRITON_DEVICE)
    first.share_launches()
    second.share_launches()
    assert first._launches is second._launches
    torch.testing.assert_close(first.linear(x), x @ first_dense.t(), rtol=1e-4, atol=1e-4)
    (launch,) = first._launches.values()
    assert launch.before is None and launch.pointers is None  # the shared launch keeps no weight alive
    torch.testing.assert_close(second.linear(x), x @ second_dense.t(), rtol=1e-4, atol=1e-4)
    assert len(second._launches) == 1
    other_layout, _ = _prepared_weight(40, 512)
    other_layout.share_launches()
    assert other_layout._launches is not first._launches


def test_weights_share_launches_only_when_their_tensors_match_in_dtype_and_alignment():
    """A shared launch is launched directly with another weight's pointers, so the layout key
    holds everything Triton specializes a pointer on: dtype and 16-byte alignment."""
    prepared, _ = _prepared_weight(40, 256, nested=False)
    args = (prepared.packed, prepared.absmax, prepared.code, 64, (40, 256))
    assert kernels.PreparedWeight(*args).layout() == prepared.layout()
    other_dtype = kernels.PreparedWeight(prepared.packed, prepared.absmax.bfloat16(), *args[2:])
    assert other_dtype.layout() != prepared.layout()
    shifted = torch.cat([prepared.absmax.new_zeros(1), prepared.absmax])[1:]  # 4 bytes off
    assert kernels.PreparedWeight(prepared.packed, shifted, *args[2:]).layout() != prepared.layout()


def test_the_op_serves_each_weight_its_own_product_through_shared_launches():
    weights = [_prepared_weight(40, 256) for _ in range(3)]
    x = torch.randn(3, 256, device=TRITON_DEVICE)
    for prepared, dense in weights * 2:
        out = kernels.linear_4bit(x, prepared.packed, blocksize=64, shape=(40, 256), **_op_arguments(prepared))
        torch.testing.assert_close(out, x @ dense.t(), rtol=1e-4, atol=1e-4)


def test_a_chunked_product_chooses_its_path_once_per_input_signature(monkeypatch):
    """Inputs that take the chunked path (decode + cuBLAS; 300 rows take it on every device) are
    remembered like a kernel's launch: the next call with the same signature neither chooses
    nor prepares a configuration again, and gives the same product."""
    from fourbit.kernels.triton import dispatch

    chosen: list[int] = []
    choose = dispatch.choose_config

    def choose_counted(x, *args):  # the eager choices (a GPU's first call may also choose for graphs)
        if len(args) < 6 or not args[5]:
            chosen.append(x.shape[0])
        return choose(x, *args)

    monkeypatch.setattr(dispatch, "choose_config", choose_counted)
    prepared, dense = _prepared_weight(40, 256)
    x = torch.randn(300, 256, device=TRITON_DEVICE)
    first = prepared.linear(x)
    assert chosen == [300] and kernels.linear.CHUNKED in prepared._launches.values()
    torch.testing.assert_close(first, x @ dense.t(), rtol=1e-4, atol=1e-4)
    assert torch.equal(prepared.linear(x), first) and chosen == [300]
    assert torch.equal(prepared.linear(x.view(3, 100, 256)), first.view(3, 100, 40)) and chosen == [300, 300]
    assert torch.equal(prepared.linear(x[:299]), first[:299]) and chosen == [300, 300, 299]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_chunked_path_plans_its_decodes_once_per_dtype(dtype, monkeypatch):
    monkeypatch.setattr(kernels.linear, "CHUNK_BYTES", 64 * 256 * dtype.itemsize)  # 64 rows a chunk
    prepared, dense = _prepared_weight(200, 256)
    bias = torch.randn(200, device=TRITON_DEVICE, dtype=dtype)
    for seed in range(2):
        x = torch.randn(3, 256, device=TRITON_DEVICE, generator=torch.Generator(TRITON_DEVICE).manual_seed(seed))
        out = prepared.linear(x.to(dtype), bias, config="chunked")
        expected = x.to(dtype).float() @ dense.to(dtype).float().t() + bias.float()
        assert ((out.float() - expected).norm() / expected.norm()).item() < 1e-2
        if seed == 0:
            plan = prepared._chunk_plans[dtype]
    assert prepared._chunk_plans[dtype] is plan  # the second call decoded with the first call's plan
    assert [(start, stop) for start, stop, _ in plan] == [(0, 64), (64, 128), (128, 192), (192, 200)]


def _op_arguments(prepared) -> dict:
    return dict(absmax=prepared.absmax, code=prepared.code, **nested_op_arguments(prepared.nested_statistics))


def test_the_op_keeps_its_launch_with_the_callers_pointers_only():
    """The op's Triton entry keeps a launch with the pointers of the caller's own tensors and no
    tensor; a launch whose kernel reads a converted copy (a code table in another dtype) is not
    kept. (In the interpreter a kept launch is not taken: it launches only directly; the GPU
    tests below take it.)"""
    prepared, dense = _prepared_weight(64, 256)
    x = torch.randn(2, 256, device=TRITON_DEVICE)  # float32: the kernel reads the code table as given
    kernels.op_entry._op_launches.clear()
    assert _relative_error(_op_product(x, prepared), x, dense) < 1e-5
    ((launch, pointers),) = kernels.op_entry._op_launches.values()
    statistics = prepared.nested_statistics
    given = {t.data_ptr() for t in (prepared.packed, prepared.absmax, prepared.code, *statistics[:3])}
    assert pointers and set(pointers) <= given
    assert launch.before is None and launch.pointers is None  # shared per layout: no weight kept
    kernels.op_entry._op_launches.clear()
    assert _relative_error(_op_product(x, prepared, code=prepared.code.double()), x, dense) < 1e-5
    assert not kernels.op_entry._op_launches


def test_the_op_keeps_a_chunked_product_that_reads_the_callers_memory_only(monkeypatch):
    """The op's chunked path (decode + cuBLAS) is kept as each chunk's decode and pointers, all
    inside the caller's tensors (the decode table aside, looked up per call), with no tensor; a
    decode reading memory the caller did not pass is not kept. (The interpreter launches nothing
    directly, so the plan is checked as a GPU's first call would leave it.)"""
    from fourbit.kernels.triton.op_entry import KeptChunks

    monkeypatch.setattr(kernels.linear, "CHUNK_BYTES", 64 * 256 * 4)  # 64 rows a chunk
    prepared, dense = _prepared_weight(200, 256)
    x = torch.randn(3, 256, device=TRITON_DEVICE)
    assert _relative_error(prepared.linear(x, config="chunked"), x, dense) < 1e-5
    monkeypatch.setattr(launch.KernelLaunch, "direct", lambda self: True)  # compiled, as on a GPU
    statistics = prepared.nested_statistics
    given = (prepared.packed, prepared.absmax, prepared.code, *statistics[:3])
    assert KeptChunks.of(prepared, x.dtype, given[:3]) is None  # the nested statistics not given
    kept = KeptChunks.of(prepared, x.dtype, given)
    assert [(start, stop) for start, stop, _, _ in kept.chunks] == [(0, 64), (64, 128), (128, 192), (192, 200)]
    extents = [(t.data_ptr(), t.data_ptr() + t.nbytes) for t in given]
    for _, _, decode, weight_pointers in kept.chunks:
        assert decode.before is None
        table = kernels.op_entry._TABLE
        assert all(any(low <= p < high for low, high in extents) for p in weight_pointers[:table])
        assert all(any(low <= p < high for low, high in extents) for p in weight_pointers[table + 1 :])


def test_decodes_specialized_alike_share_one_compiled_launch():
    """A decode prepared for one call (``dequantize_4bit``, the op's chunks) takes the compiled
    launch of an earlier decode that Triton specializes alike, and only such a decode's."""
    from fourbit.kernels.triton.dequantize import DequantizeLaunch

    first, _ = _prepared_weight(64, 256)
    second, second_dense = _prepared_weight(64, 256)
    other, _ = _prepared_weight(128, 256)

    def decode(weight, dtype=torch.float32):
        return DequantizeLaunch(weight.packed, weight.absmax, weight.code, 64, (weight.n_out, 256), dtype,
                                weight.nested_statistics)  # fmt: skip

    assert decode(first).launch is decode(second).launch
    assert decode(first).launch is not decode(other).launch  # another size: another grid
    assert decode(first).launch is not decode(first, torch.bfloat16).launch
    assert torch.equal(decode(second)(), second_dense)


def _op_product(x: torch.Tensor, prepared, **changes) -> torch.Tensor:
    arguments = {**_op_arguments(prepared), **changes}
    return kernels.linear_4bit(x, prepared.packed, blocksize=64, shape=(prepared.n_out, prepared.k), **arguments)


def _relative_error(out: torch.Tensor, x: torch.Tensor, dense: torch.Tensor) -> float:
    expected = x.double() @ dense.double().t()
    return ((out.double() - expected).norm() / expected.norm()).item()


# --------------------------------------------------------------------------- GPU only

gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")


def _kernels_launched(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        fn()
        torch.cuda.synchronize()
    return [event.name for event in trace.events() if event.device_type == torch.autograd.DeviceType.CUDA]


@gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 4096), (4096, 1024)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_an_eager_batch_one_call_launches_one_kernel(shape, dtype):
    n, k = shape
    layer = Linear4bit(k, n, bias=True, compute_dtype=dtype, quant_type="nf4").cuda()
    layer.bias.data = layer.bias.data.to(dtype)
    x = torch.randn(1, k, device="cuda", dtype=dtype)
    with torch.no_grad():
        for _ in range(2):
            layer(x)  # compiles, prepares, launches once through the JIT
        names = _kernels_launched(lambda: layer(x))
        expected = F.linear(x, F4.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype), layer.bias)
        torch.testing.assert_close(layer(x), expected, rtol=2e-2, atol=2e-2)
    assert len(names) == 1, names


@gpu
def test_direct_launches_match_the_jit_launch_bit_for_bit():
    prepared, _ = _prepared_weight(4096, 4096)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    first = prepared.linear(x)  # through the JIT
    (entry,) = prepared._launches.values()
    assert entry.launch.compiled is not None
    again = prepared.linear(x)  # direct: Triton's C launch itself where its version allows
    assert torch.equal(first, again)
    if launch._version(triton.__version__) in launch._RAW_LAUNCH_TRITONS:
        assert entry.launch.raw is not None
        entry.launch.raw = None  # through Triton's launcher object
        assert torch.equal(prepared.linear(x), again)
    unaligned = torch.randn(1, 4104, device="cuda", dtype=torch.bfloat16)[:, 1:4097]
    torch.testing.assert_close(prepared.linear(unaligned), prepared.linear(unaligned.clone()), rtol=0, atol=0)


class _Launcher36:
    """The shape of Triton 3.6's launcher object: its call finds no scratch memory to allocate
    and passes everything on to the C launch function (here a recorder)."""

    def __init__(self, record, global_scratch=0, profile_scratch=0):
        self.launch = record
        self.global_scratch_size, self.profile_scratch_size = global_scratch, profile_scratch
        self.launch_cooperative_grid, self.launch_pdl = False, True

    def __call__(self, gridX, gridY, gridZ, stream, function, *args):
        self.launch(gridX, gridY, gridZ, stream, function, self.launch_cooperative_grid, self.launch_pdl,
                    None, None, *args)  # fmt: skip


def test_the_raw_launch_passes_what_the_launcher_object_would(monkeypatch):
    monkeypatch.setattr(launch.triton, "__version__", "3.6.0")
    calls = []
    record = lambda *arguments: calls.append(arguments)  # noqa: E731
    kept = launch.KernelLaunch(None, (3, 2), {}, torch.device("cpu"))
    kept.compiled = (_Launcher36(record), 1234, (4, 1, 0))
    monkeypatch.setattr(launch.torch._C, "_cuda_getCurrentRawStream", lambda index: 77, raising=False)
    kept.run(10, 20, 30)  # through the object
    kept.raw = (record, launch.raw_launcher(_Launcher36(print), 1234, (4, 1, 0))[1])
    kept.run(10, 20, 30)  # straight to the C function
    assert calls[0] == calls[1] == (3, 2, 1, 77, 1234, False, True, None, None, (4, 1, 0), None, None, None, 10, 20, 30)


def test_the_raw_launch_is_taken_only_where_it_was_checked(monkeypatch):
    monkeypatch.setattr(launch.triton, "__version__", "3.6.0")
    assert launch.raw_launcher(_Launcher36(print), 1, ()) is not None  # a C function, no scratch
    assert launch.raw_launcher(_Launcher36(lambda *a: None), 1, ()) is None  # a Python wrapper
    assert launch.raw_launcher(_Launcher36(print, global_scratch=64), 1, ()) is None
    assert launch.raw_launcher(_Launcher36(print, profile_scratch=64), 1, ()) is None

    class Other(_Launcher36):
        def __call__(self, gridX, gridY, gridZ, stream, function, kernel_metadata, *args):
            pass

    assert launch.raw_launcher(Other(print), 1, ()) is None
    monkeypatch.setattr(launch.triton, "__version__", "3.9.0")
    assert launch.raw_launcher(_Launcher36(print), 1, ()) is None


@gpu
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_the_op_launches_shared_products_directly_for_each_weight(rows):
    """The op path (one launch kept per weight layout, each call binding its weight): after the
    first call, every weight of the layout launches directly with its own pointers, and each
    result is that weight's own product (split K sums in any order: equal up to rounding)."""
    weights = [_prepared_weight(4096, 4096)[0] for _ in range(3)]
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    own = [prepared.linear(x) for prepared in weights]  # each through the JIT, launches of its own
    for _ in range(2):
        for prepared, expected in zip(weights, own, strict=True):
            out = kernels.linear_4bit(x, prepared.packed, blocksize=64, shape=(4096, 4096), **_op_arguments(prepared))
            assert ((out.float() - expected.float()).norm() / expected.float().norm()).item() < 1e-2
    shared = next(
        launches for layout, launches in kernels.linear._layout_launches.items() if layout[1:3] == (4096, 4096)
    )
    kernel_launches = [launch for launch in shared.values() if launch is not kernels.linear.CHUNKED]
    assert all(launch.launch.compiled is not None for launch in kernel_launches)


@gpu
def test_chunked_decodes_launch_directly_and_match_the_jit_bit_for_bit():
    prepared, _ = _prepared_weight(4096, 4096)
    x = torch.randn(300, 4096, device="cuda", dtype=torch.bfloat16)
    first = prepared.linear(x, config="chunked")  # decodes through the JIT
    (decode,) = [decode for _, _, decode in prepared._chunk_plans[torch.bfloat16]]
    assert decode.launch.compiled is not None
    assert torch.equal(prepared.linear(x, config="chunked"), first)  # direct


@gpu
def test_launches_on_another_stream_use_their_own_workspace():
    prepared, _ = _prepared_weight(4096, 4096)
    x = torch.randn(2, 4096, device="cuda", dtype=torch.bfloat16)
    expected = prepared.linear(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        results = [prepared.linear(x) for _ in range(20)]
    plain = [prepared.linear(x) for _ in range(20)]
    torch.cuda.synchronize()
    for result in results + plain:
        torch.testing.assert_close(result, expected, rtol=1e-2, atol=1e-2)


def test_the_first_eager_call_prepares_the_launch_a_cuda_graph_would_take(monkeypatch):
    """Where the tables for CUDA graphs choose another product, the first eager call of an input
    signature builds that launch too and runs it once (a capture may not load a kernel), kept
    under the captured key; when it cannot be built, a warning says so and captures keep the
    eager launch. (The choices are forced, and the preparation called as a GPU's eager call
    would, so this also runs in the interpreter.)"""
    from fourbit.kernels.triton import dispatch

    eager, graphs = (2, 16, 64, 1, 4, "half"), (2, 32, 64, 1, 4, "gather")  # CUDA-core kernels, 2 rows
    monkeypatch.setattr(dispatch, "choose_config", lambda x, *args: graphs if args[5:6] == (True,) else eager)
    prepared, dense = _prepared_weight(40, 256)
    x = torch.randn(2, 256, device=TRITON_DEVICE)
    torch.testing.assert_close(prepared.linear(x), x @ dense.t(), rtol=1e-4, atol=1e-4)
    if not ON_GPU:  # a CPU tensor is never captured: prepare as a GPU's first eager call does
        (key,) = prepared._launches
        prepared._ready_for_capture(x, x, None, key, eager, False)
    (key,) = (key for key in prepared._launches if not key[-1])
    captured = prepared._launches[(*key[:-1], True)]
    assert captured is not prepared._launches[key]
    assert captured.launch.compiled is not None or not launch.DIRECT  # compiled, loaded and run
    torch.testing.assert_close(captured(x, None), x @ dense.t(), rtol=1e-4, atol=1e-4)

    chunks, _ = _prepared_weight(40, 256)  # graphs that would take decode + cuBLAS: decoded once now
    monkeypatch.setattr(dispatch, "choose_config", lambda x, *args: "chunked" if args[5:6] == (True,) else eager)
    chunks.linear(x)
    (key,) = (key for key in chunks._launches if not key[-1])
    if not ON_GPU:
        chunks._ready_for_capture(x, x, None, key, eager, False)
    assert chunks._launches[(*key[:-1], True)] is kernels.linear.CHUNKED and chunks._chunk_plans

    monkeypatch.setattr(dispatch, "choose_config", lambda x, *args: graphs if args[5:6] == (True,) else eager)
    broken, _ = _prepared_weight(40, 256)
    prepare = broken._prepare
    monkeypatch.setattr(
        broken,
        "_prepare",
        lambda x, bias, config, *rest: 1 / 0 if config == graphs else prepare(x, bias, config, *rest),
    )
    with pytest.warns(RuntimeWarning, match=r"product for CUDA graphs .* could not be prepared \(ZeroDivisionError"):
        broken.linear(x)
        if not ON_GPU:
            (key,) = broken._launches
            broken._ready_for_capture(x, x, None, key, eager, False)
    (key,) = (key for key in broken._launches if not key[-1])
    assert broken._launches[(*key[:-1], True)] is broken._launches[key]


@gpu
def test_the_cuda_op_finds_its_launch_by_address_and_prepares_nothing_again(monkeypatch):
    """The op's CUDA entry keeps each launch by its tensors' addresses and the input's signature:
    a repeated call builds no ``PreparedWeight``; a new signature builds one, once."""
    prepared, dense = _prepared_weight(1024, 2048)
    kernels.op_entry._op_launches.clear()
    built = []
    original = kernels.PreparedWeight.__init__

    def counted(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(kernels.PreparedWeight, "__init__", counted)
    for rows in (1, 5, 40, 300):  # 300 rows: the chunked path (decode + cuBLAS) on every device
        x = torch.randn(rows, 2048, device="cuda", dtype=torch.bfloat16)
        first = _op_product(x, prepared)
        assert len(built) == 1, rows
        for _ in range(2):
            torch.testing.assert_close(_op_product(x, prepared), first, rtol=1e-2, atol=1e-2)
        assert len(built) == 1, rows
        assert _relative_error(first, x, dense) < 1e-2
        built.clear()
    kept = list(kernels.op_entry._op_launches.values())
    assert len(kept) == 4 and sum(isinstance(launch, kernels.op_entry.KeptChunks) for launch in kept) == 1


@gpu
@pytest.mark.parametrize("rows", [2, 300])
def test_the_cuda_op_keeps_no_weight_alive_and_serves_new_weights_at_old_addresses(rows):
    """Kept launches (and kept chunked products) hold addresses, not tensors: a deleted weight is
    freed, and a weight that lands at the same addresses gets the kept launch and its own products."""
    import gc
    import weakref

    def product(seed: int):
        torch.manual_seed(seed)
        prepared, dense = _prepared_weight(512, 1024)
        x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
        for _ in range(2):
            assert _relative_error(_op_product(x, prepared), x, dense) < 1e-2
        return weakref.ref(prepared.packed)

    kernels.op_entry._op_launches.clear()
    first = product(0)
    gc.collect()
    assert first() is None
    assert len(kernels.op_entry._op_launches) == 1
    product(1)  # the caching allocator may hand out the freed addresses: either way, its own products


@gpu
def test_the_cuda_op_keeps_no_launch_that_reads_a_converted_copy():
    """A code table in another dtype is converted for the kernel: that launch is used once and
    not kept (the copy would be gone by the next call), and the products stay right."""
    prepared, dense = _prepared_weight(256, 1024, nested=False)
    x = torch.randn(3, 1024, device="cuda", dtype=torch.bfloat16)
    kernels.op_entry._op_launches.clear()
    for _ in range(2):
        assert _relative_error(_op_product(x, prepared, code=prepared.code.double()), x, dense) < 1e-2
    assert not kernels.op_entry._op_launches
