"""The ``fourbit bench`` command and its tool (``fourbit.tools.bench``): what it times, how it
takes turns over cold weight copies, the copy bandwidth it reports, and its refusals of bad input."""

from __future__ import annotations

import pytest
import torch
from test_cli import fourbit

pytestmark = pytest.mark.cpu_only  # the commands run with FOURBIT_DISABLE_TRITON=1 on the CPU


def test_bench_runs(tmp_path):
    result = fourbit("bench", "--device", "cpu", "--shapes", "64x128", "--dtypes", "float32", "--batches", "1")
    assert result.returncode == 0, result.stderr
    assert "fourbit kernel benchmark" in result.stdout and "64x128" in result.stdout


def test_bench_times_only_the_operations_asked_for(monkeypatch, capsys):
    """--ops: the table holds those operations' rows only, and nothing else is timed; an unknown
    operation is refused by name."""
    from fourbit.tools import bench

    timed: list[str] = []
    monkeypatch.setattr(bench, "_median_ms", lambda fns, device, min_time: timed.append(fns[0]) or 1.0)
    arguments = ["--device", "cpu", "--shapes", "64x128", "--dtypes", "float32", "--batches", "1", "2", "--no-bnb"]
    bench.main([*arguments, "--ops", "matmul_4bit"])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "64x128" in line]
    assert [line.split("|")[1].strip() for line in table] == ["matmul_4bit", "matmul_4bit"]
    assert len(timed) == 4  # fourbit and torch, two batches
    timed.clear()
    bench.main(arguments)
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "64x128" in line]
    assert [line.split("|")[1].strip() for line in table] == [
        "quantize", "dequantize", "matmul_4bit", "Linear4bit", "matmul_4bit", "Linear4bit"
    ]  # fmt: skip
    with pytest.raises(SystemExit) as stopped:
        bench.main([*arguments, "--ops", "gemm"])
    assert stopped.value.code == 2 and "argument --ops: invalid choice: 'gemm'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"unknown operations \['gemm'\]"):
        bench.run([(64, 128)], [torch.float32], [1], torch.device("cpu"), with_bnb=False, ops=["gemm"])


def test_bench_prints_each_shapes_lines_before_timing_the_next(monkeypatch, capsys):
    """The table comes out shape by shape, so that a run stopped part way keeps what it timed;
    an operation that cannot be timed is reported on stderr, outside the table."""
    from fourbit.tools import bench

    printed_before: list[str] = []
    shape_rows = bench._shape_rows

    def rows_of(n, k, *args):
        printed_before.append(capsys.readouterr().out)
        return shape_rows(n, k, *args)

    def median_ms(fns, device, min_time):
        if getattr(fns[0], "func", None) is torch.matmul:
            raise RuntimeError("cannot be captured\nmore")
        return 1.0

    monkeypatch.setattr(bench, "_shape_rows", rows_of)
    monkeypatch.setattr(bench, "_median_ms", median_ms)
    bench.main(["--device", "cpu", "--shapes", "64x128", "32x256", "--dtypes", "float32", "--batches", "1",
                "--no-bnb", "--ops", "matmul_4bit"])  # fmt: skip
    captured = capsys.readouterr()
    assert "| op | shape |" in printed_before[0] and "64x128" not in printed_before[0]
    assert "| matmul_4bit | 64x128 | float32 | 1 | 1.000 | - |" in printed_before[1]
    assert "32x256" not in printed_before[1] and "| matmul_4bit | 32x256 |" in captured.out
    assert "not timed" not in "".join(printed_before) + captured.out
    assert captured.err.count("not timed: <built-in method matmul") == 1 and "cannot be captured" in captured.err


def test_bench_takes_a_thread_count_and_refuses_a_bad_one(capsys):
    from fourbit.tools import bench

    before = torch.get_num_threads()
    try:
        for bad, message in [("0", "must be at least 1, got 0"), ("two", "must be a whole number, got 'two'")]:
            with pytest.raises(SystemExit) as stopped:
                bench.main(["--device", "cpu", "--shapes", "64x128", "--threads", bad])
            assert stopped.value.code == 2 and f"argument --threads: {message}" in capsys.readouterr().err
        bench.main(["--device", "cpu", "--shapes", "64x128", "--dtypes", "float32", "--batches", "1",
                    "--min-time", "0.01", "--no-bnb", "--threads", "1"])  # fmt: skip
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_bench_refuses_a_malformed_shape_or_batch(capsys):
    from fourbit.tools import bench

    for option, bad, message in [
        ("--shapes", "abc", "takes NxK with N and K whole numbers of at least 1, got 'abc'"),
        ("--shapes", "0x64", "takes NxK with N and K whole numbers of at least 1, got '0x64'"),
        ("--shapes", "64x128x3", "takes NxK with N and K whole numbers of at least 1, got '64x128x3'"),
        ("--batches", "0", "must be at least 1, got 0"),
    ]:
        with pytest.raises(SystemExit) as stopped:
            bench.main(["--device", "cpu", option, bad])
        assert stopped.value.code == 2 and f"argument {option}: {message}" in capsys.readouterr().err


def test_bench_cold_takes_turns_over_copies_of_each_weight(monkeypatch, capsys):
    """--cold MIB: each column's calls rotate over copies of its own weight that fill MIB, so that
    none finds its weight cached; without it, one weight each."""
    from fourbit.nn import Linear4bit
    from fourbit.tools import bench

    timed: list[list] = []
    monkeypatch.setattr(bench, "_median_ms", lambda fns, device, min_time: timed.append(list(fns)) or 1.0)
    arguments = ["--device", "cpu", "--shapes", "64x128", "--dtypes", "float32", "--batches", "1", "--no-bnb"]
    bench.main([*arguments, "--cold", "1"])
    assert "1 MiB of weight copies" in capsys.readouterr().out
    dense = 64 * 128 * 4
    quantize, quantize_copy, dequantize, dequantize_copy, matmul, matmul_torch, layer, layer_torch = timed
    assert len(quantize) == len(quantize_copy) == len(dequantize_copy) == len(matmul_torch) == len(layer_torch)
    assert len(quantize) == -(-(1 << 20) // dense)
    assert len(dequantize) == len(matmul) == len(layer) > len(quantize)  # packed copies are smaller
    modules = [fn.func for fn in layer]
    assert all(isinstance(module, Linear4bit) for module in modules)
    assert len({module.weight.data_ptr() for module in modules}) == len(modules)  # every copy its own bytes
    assert len({fn.args[0].data_ptr() for fn in quantize}) == len(quantize)
    timed.clear()
    bench.main(arguments)
    assert "weight copies" not in capsys.readouterr().out
    assert [len(fns) for fns in timed] == [1] * 8
    for device, cold in [("cuda", "2"), ("cpu", "-1")]:
        with pytest.raises(SystemExit, match="on the CPU or with --cuda-graphs"):
            bench.main(["--device", device, "--cold", cold])


def test_bench_cold_graph_replays_run_every_copy_and_time_one(monkeypatch):
    """With --cuda-graphs each replay runs every copy in turn (weights from memory, not L2), and the
    time of a call is the replay's divided by the copies; eager CUDA calls time the first alone."""
    import triton.testing

    from fourbit.tools import bench

    calls: list[int] = []
    replays: list = []
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda fn, **kw: replays.append(fn) or fn() or 6.0)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: fn() or 5.0)
    copies = [lambda i=i: calls.append(i) for i in range(3)]
    monkeypatch.setattr(bench, "CUDA_GRAPHS", True)
    assert bench._median_ms(copies, torch.device("cuda"), 0.1) == 2.0
    assert calls == [0, 1, 2] and len(replays) == 1
    monkeypatch.setattr(bench, "CUDA_GRAPHS", False)
    calls.clear()
    assert bench._median_ms(copies, torch.device("cuda"), 0.1) == 5.0 and calls == [0]
    ran: list = []
    monkeypatch.setattr(bench, "run", lambda *args, **kwargs: ran.append(bench.COLD_BYTES) or [])
    monkeypatch.setattr(bench, "copy_bandwidth_gbps", lambda device: None)
    monkeypatch.setattr(bench, "describe_device", lambda device: "a GPU")
    try:
        bench.main(["--device", "cuda", "--cold", "256", "--cuda-graphs", "--no-bnb"])
    finally:
        bench.CUDA_GRAPHS, bench.COLD_BYTES = False, 0
    assert ran == [256 << 20]


def test_copy_bandwidth_is_measured():
    from fourbit.tools import bench

    assert bench.copy_bandwidth_gbps(torch.device("cpu"), nbytes=1 << 20) > 0


def test_the_copy_bandwidth_is_timed_eagerly_under_cuda_graphs(monkeypatch):
    """A graph-replay table's "% of copy" divides by the eager copy rate, not a replayed copy's."""
    from fourbit.tools import bench

    timed: list = []

    def median_ms(fns, device, min_time, graphs=None):
        fns[0]()
        timed.append(graphs if graphs is not None else bench.CUDA_GRAPHS)
        return 2.0

    monkeypatch.setattr(bench, "CUDA_GRAPHS", True)
    monkeypatch.setattr(bench, "_median_ms", median_ms)
    assert bench.copy_bandwidth_gbps(torch.device("cpu"), nbytes=1 << 20) == pytest.approx(2 * (1 << 20) / 2.0 / 1e6)
    assert timed == [False]


@pytest.mark.gpu
@pytest.mark.parametrize(("graphs", "cold"), [(False, 0), (True, 0), (True, 2)])
def test_bench_runs_on_cuda(graphs, cold, capsys):
    """The CUDA table, eager or replayed as CUDA graphs (over copies of each weight with --cold),
    with the copy bandwidth it reports."""
    from fourbit.tools import bench

    arguments = ["--device", "cuda", "--shapes", "256x512", "--dtypes", "bfloat16", "--batches", "1", "64"]
    options = [*(["--cuda-graphs"] if graphs else []), *(["--cold", str(cold)] if cold else [])]
    try:
        bench.main([*arguments, "--min-time", "0.01", "--no-bnb", *options])
    finally:
        bench.CUDA_GRAPHS, bench.COLD_BYTES = False, 0
    out = capsys.readouterr().out
    assert "256x512" in out and "measured copy bandwidth" in out
    assert ("CUDA graph replays" in out) == graphs
    assert ("2 MiB of weight copies" in out) == bool(cold)
    assert out.count("| Linear4bit |") == 2


def test_table_times_keep_microseconds():
    """Times under 0.1 ms keep four decimals, so a few-microsecond product is not rounded to whole
    microseconds; ratios come from the unrounded times."""
    from fourbit.tools import bench

    row = bench.Row("matmul_4bit", "4096x4096", "bfloat16", "1", 0.00712, 0.0109, None)
    cells = [cell.strip() for cell in bench.table_line(row).split("|")]
    assert cells[5:10] == ["0.0071", "0.0109", "-", "0.65x", "-"]
    row = bench.Row("matmul_4bit", "28672x8192", "bfloat16", "16", 0.06049, 0.1107, 0.36512)
    assert [cell.strip() for cell in bench.table_line(row).split("|")][5:8] == ["0.0605", "0.111", "0.365"]
