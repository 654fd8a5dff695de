"""Tables derived from a code table (``kernels/derived.py``) and CUDA memory kept across calls
(``kernels/kept_memory.py``): found again for the same memory, rebuilt after a change, never
handed to other memory, and made outside CUDA-graph pools."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from triton_cases import code_table


def test_derived_tables_follow_the_code_tensor():
    """A table derived from a code tensor is reused for that tensor, rebuilt after an in-place
    change, and never handed to another tensor (not even one at a freed table's address)."""
    from fourbit.kernels.derived import derived

    builds = []

    def build(code):
        builds.append(code)
        return code * 2

    nf4 = code_table("nf4")
    first = derived(nf4, "test-double", build)
    assert derived(nf4, "test-double", build) is first and len(builds) == 1
    nf4.mul_(1.0)  # bumps the version
    derived(nf4, "test-double", build)
    assert len(builds) == 2
    del nf4, first
    fp4 = code_table("fp4")  # may reuse the freed address and id
    assert torch.equal(derived(fp4, "test-double", build), fp4 * 2)


def test_derived_tables_are_shared_by_views_of_one_code_and_dropped_with_its_memory():
    """Another view of the same code memory (as a compiled backward receives a saved code table)
    finds its table; a view of other memory, or the memory once its owner's data is replaced,
    does not."""
    from fourbit.kernels.derived import derived

    builds = []

    def build(code):
        builds.append(code)
        return code * 2

    buffer = torch.cat([code_table("nf4"), code_table("fp4")])
    first = derived(buffer[:16], "test-views", build)
    assert derived(buffer[:16], "test-views", build) is first and len(builds) == 1
    assert torch.equal(derived(buffer[16:], "test-views", build), code_table("fp4") * 2) and len(builds) == 2
    buffer[:16].mul_(-1.0)  # through a view: the shared version counter moves
    assert torch.equal(derived(buffer[:16], "test-views", build), -code_table("nf4") * 2) and len(builds) == 3
    view = buffer[:16]
    table = derived(view, "test-views", build)
    assert torch.equal(table, -code_table("nf4") * 2) and len(builds) == 3
    buffer.data = torch.cat([code_table("fp4"), code_table("nf4")])  # the owner's memory replaced
    assert torch.equal(derived(buffer[:16], "test-views", build), code_table("fp4") * 2) and len(builds) == 4


def _alias(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor over ``tensor``'s memory with no base and a version counter of its own, as
    inductor passes a graph input's view in every call."""
    return torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(
        tensor.untyped_storage(), tensor.storage_offset(), tensor.shape, tensor.stride()
    )


def test_derived_tables_are_found_through_fresh_aliases_and_follow_the_owner():
    """A compiled graph passes the code as a new alias in every call: each finds the table (not
    built again on every call), and an in-place change made through the first owner still
    rebuilds it, also when the entry was first built from an alias."""
    from fourbit.kernels.derived import derived

    builds = []

    def build(code):
        builds.append(code)
        return code * 2

    buffer = torch.cat([code_table("nf4"), code_table("fp4")])
    code = buffer[16:]
    first = derived(code, "test-alias", build)
    assert _alias(code)._base is None
    assert all(derived(_alias(code), "test-alias", build) is first for _ in range(3)) and len(builds) == 1
    fresh = _alias(code)._version
    buffer.mul_(-1.0)  # through the owner, invisible to a new alias's own version counter
    assert _alias(code)._version == fresh
    assert torch.equal(derived(_alias(code), "test-alias", build), -code_table("fp4") * 2) and len(builds) == 2
    assert derived(_alias(code), "test-alias", build) is derived(code, "test-alias", build) and len(builds) == 2

    other = code_table("nf4")
    table = derived(_alias(other), "test-alias", build)  # the alias that built it is gone now
    assert derived(_alias(other), "test-alias", build) is table and derived(other, "test-alias", build) is table
    assert len(builds) == 3


def test_derived_tables_of_many_live_codes_are_all_kept_and_freed_ones_dropped():
    """A model has one code table per layer: past the first limit every live one keeps its
    tables, while those of freed code tables are dropped when the cache fills."""
    from fourbit.kernels import derived as cache

    def never(code):
        raise AssertionError("built again")

    codes = [code_table("nf4") for _ in range(600)]
    tables = [cache.derived(code, "test-many", lambda table: table * 2) for code in codes]
    assert all(cache.derived(code, "test-many", never) is table for code, table in zip(codes, tables, strict=True))
    del codes, tables
    kept = [code_table("fp4") for _ in range(cache._limit)]  # enough new entries to reach the limit
    for code in kept:
        cache.derived(code, "test-fill", lambda table: table * 2)
    assert not any("test-many" in key for key in cache._entries)
    assert all(torch.equal(cache.derived(code, "test-fill", never), code * 2) for code in kept)


@pytest.mark.gpu
def test_derived_tables_are_not_kept_from_a_graph_capture():
    from fourbit.kernels.derived import _entries, derived

    code = code_table("nf4")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        derived(code, "test-capture", lambda table: table * 2)
    assert not any("test-capture" in key for key in _entries)


@pytest.mark.gpu
def test_cuda_tables_are_built_on_a_helper_thread_on_the_callers_stream():
    """Outside a capture a CUDA table is built off the calling thread (whose allocations a
    CUDA-graph warmup sends to the graph's pool), on the caller's stream; a table that needs
    another builds it in place, and a build's error reaches the caller."""
    from fourbit.kernels.derived import derived

    code = code_table("nf4")
    seen = {}

    def build(table):
        seen["thread"], seen["stream"] = threading.current_thread(), torch.cuda.current_stream()
        return derived(table, "test-inner", lambda inner: inner * 3) * 2

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        table = derived(code, "test-helper", build)
    assert seen["thread"] is not threading.current_thread() and seen["stream"] == stream
    assert torch.equal(table, code * 6)

    def refuse(table):
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        derived(code, "test-error", refuse)


def test_kept_memory_is_made_in_place_on_the_cpu_and_on_the_helper_thread():
    """Only CUDA allocations move to the helper thread; elsewhere ``make`` runs where it is called
    (and the helper's own nested requests run in place instead of waiting on themselves)."""
    from fourbit.kernels import kept_memory

    assert kept_memory.kept_on_device(torch.device("cpu"), threading.current_thread) is threading.current_thread()
    nested = kept_memory._helper().submit(
        lambda: kept_memory.kept_on_device(torch.device("cuda", 0), threading.current_thread)
    )
    helper = nested.result(timeout=30)
    assert helper is not threading.current_thread() and helper.name.startswith(kept_memory._HELPER_NAME)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_starts_a_table_helper_of_its_own():
    """The helper thread that builds CUDA tables does not survive a fork: a child that used the
    parent's executor would wait forever on a thread it does not have."""
    from fourbit.kernels import kept_memory

    parent = kept_memory._helper()
    assert parent.submit(lambda: 7).result() == 7
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running the parent's teardown
        try:
            helper = kept_memory._helper()
            ok = helper is not parent and helper.submit(lambda: 7).result(timeout=30) == 7
        except BaseException:
            ok = False
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    os.close(read)


@pytest.mark.gpu
def test_a_compiled_graph_finds_its_decode_tables_in_every_call(monkeypatch):
    """A compiled graph passes the code table as an alias inductor makes afresh in every call:
    the chunked product's decode table is found in each, not built again (it was, on the helper
    thread, in every call)."""
    import fourbit
    from fourbit.kernels import derived
    from fourbit.kernels.triton import dispatch
    from fourbit.kernels.triton.op_entry import KeptChunks, _op_launches

    x = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16)
    if dispatch.choose_config(x, 4096, 4096, 64) != "chunked":
        pytest.skip("this GPU's tables multiply 256 rows of a 4096x4096 weight without chunks")
    layer = fourbit.nn.Linear4bit(4096, 4096, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").cuda()
    compiled = torch.compile(layer, fullgraph=True)
    builds = []

    def counted(device, make):
        builds.append(device)
        return make()

    with torch.no_grad():
        expected = layer(x)
        for _ in range(2):
            compiled(x)
        assert any(isinstance(kept, KeptChunks) for kept in _op_launches.values())
        monkeypatch.setattr(derived, "kept_on_device", counted)
        outputs = [compiled(x) for _ in range(3)]
    assert builds == []
    for out in outputs:
        torch.testing.assert_close(out, expected)
