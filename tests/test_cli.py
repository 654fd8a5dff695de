"""The fourbit command, run as a user runs it: ``python -m fourbit`` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from fourbit import checkpoint

pytestmark = pytest.mark.cpu_only  # the commands run with FOURBIT_DISABLE_TRITON=1 on the CPU

SUBCOMMANDS = ["quantize", "inspect", "bench", "demo"]


def fourbit(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "FOURBIT_DISABLE_TRITON": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fourbit", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fourbit: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_file(
        {
            "embed_tokens.weight": torch.randn(100, 64),
            "layers.0.proj.weight": torch.randn(128, 64, dtype=torch.bfloat16),
            "layers.0.proj.bias": torch.randn(128),
            "layers.0.out.weight": torch.randn(64, 128, dtype=torch.float16),
            "layers.0.norm.weight": torch.ones(64),
            "step": torch.tensor([3], dtype=torch.int64),
        },
        path,
    )
    return path


@pytest.mark.parametrize("command", [None, *SUBCOMMANDS])
def test_help(command):
    result = fourbit(*([command] if command else []), "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: fourbit")
    if command is None:
        assert all(name in result.stdout for name in SUBCOMMANDS)


def test_no_command_is_a_usage_error():
    result = fourbit()
    assert result.returncode == 2 and "usage: fourbit" in result.stderr


def test_quantize_and_inspect(float_checkpoint, tmp_path):
    out = tmp_path / "q.safetensors"
    result = fourbit("quantize", float_checkpoint, "-o", out, "--quant-type", "fp4", "--blocksize", "128")
    assert result.returncode == 0, result.stderr
    summary = result.stdout
    assert "fp4, blocksize 128, nested statistics" in summary
    assert summary.splitlines()[-3].split()[:2] == ["quantized", "2"]
    assert summary.splitlines()[-2].split()[:2] == ["kept", "4"]
    state = load_file(out)
    assert state["layers.0.proj.weight"].dtype == torch.uint8
    assert "layers.0.proj.weight.quant_state.bitsandbytes__fp4" in state
    assert torch.equal(state["embed_tokens.weight"], load_file(float_checkpoint)["embed_tokens.weight"])

    inspected = fourbit("inspect", out)
    assert inspected.returncode == 0, inspected.stderr
    assert f"{out}: fourbit" in inspected.stdout
    assert "| layers.0.proj.weight | 128x64 | bfloat16 | fp4 | 128 | yes | uint8 |" in inspected.stdout
    assert "| layers.0.out.weight | 64x128 | float16 | fp4 | 128 | yes | uint8 |" in inspected.stdout
    assert "4-bit tensors: 2" in inspected.stdout and "other tensors: 4" in inspected.stdout
    listed = fourbit("inspect", out, "--all")
    assert "| embed_tokens.weight | 100x64 | float32 |" in listed.stdout


def test_the_summary_names_what_it_leaves_and_why():
    """Kept tensors of three or more dimensions (mixture-of-experts weights) and transposed
    Conv1D weights get a line each, so that a model that stays mostly float says why."""
    from fourbit.file_quantization import TensorReport
    from fourbit.tools.cli import format_quantize_summary

    reports = [
        TensorReport("h.0.attn.c_attn.weight", (64, 192), torch.float32, True, 49152, 7000, 0.01, 0.09, True),
        TensorReport("experts.gate_up_proj", (8, 256, 64), torch.bfloat16, False, 262144, 262144),
        TensorReport("norm.weight", (64,), torch.float32, False, 256, 256),
    ]
    lines = format_quantize_summary(reports).splitlines()
    assert lines[1].split()[:2] == ["quantized", "1"] and lines[2].split()[:2] == ["kept", "2"]
    assert lines[-2] == "(1 Conv1D weights, stored (in, out), quantized as (out, in), as bitsandbytes does)"
    assert lines[-1].startswith("(1 kept tensors of 3 or more dimensions, 0.26 MB: batched weights")
    assert len(format_quantize_summary(reports[2:]).splitlines()) == 4


def test_quantize_options(float_checkpoint, tmp_path):
    out = tmp_path / "q.safetensors"
    result = fourbit("quantize", float_checkpoint, "-o", out, "--no-double-quant", "--skip", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    description = checkpoint.describe(out)
    assert {info.name for info in description.quantized} == {
        "embed_tokens.weight",
        "layers.0.proj.weight",
        "layers.0.out.weight",
    }
    assert not any(info.nested for info in description.quantized)


def test_inspect_plain_and_bitsandbytes_layout(float_checkpoint, tmp_path):
    assert "model.safetensors: plain" in fourbit("inspect", float_checkpoint).stdout
    ours = tmp_path / "q.safetensors"
    fourbit("quantize", float_checkpoint, "-o", ours, "-q")
    theirs = tmp_path / "theirs.safetensors"
    save_file(load_file(ours), theirs)  # same tensors, written without fourbit's metadata
    assert f"{theirs}: bitsandbytes layout" in fourbit("inspect", theirs).stdout


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


# --------------------------------------------------------------------------- bad input


def test_quantize_and_inspect_a_sharded_folder(float_checkpoint, tmp_path):
    tensors = load_file(float_checkpoint)
    folder = tmp_path / "model"
    folder.mkdir()
    names = sorted(tensors)
    save_file({name: tensors[name] for name in names[:3]}, folder / "model-00001-of-00002.safetensors")
    save_file({name: tensors[name] for name in names[3:]}, folder / "model-00002-of-00002.safetensors")
    (folder / "config.json").write_text("{}")
    out = tmp_path / "nf4"
    result = fourbit("quantize", folder, "-o", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-3].split()[:2] == ["quantized", "2"]
    assert sorted(path.name for path in out.iterdir()) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    inspected = fourbit("inspect", out)
    assert inspected.returncode == 0, inspected.stderr
    assert "4-bit tensors: 2" in inspected.stdout and "other tensors: 4" in inspected.stdout


def test_missing_file(tmp_path):
    out = tmp_path / "q.safetensors"
    assert_one_line_error(fourbit("quantize", tmp_path / "absent.safetensors", "-o", out), "no such file")
    assert not out.exists()
    assert_one_line_error(fourbit("inspect", tmp_path / "absent.safetensors"), "no such file")


def test_not_a_safetensors_file(tmp_path):
    bogus = tmp_path / "model.safetensors"
    bogus.write_text("this is not a checkpoint")
    out = tmp_path / "q.safetensors"
    assert_one_line_error(fourbit("quantize", bogus, "-o", out), "not a valid safetensors file")
    assert_one_line_error(fourbit("inspect", bogus), "not a valid safetensors file")
    assert list(tmp_path.iterdir()) == [bogus]


def test_unsupported_dtype(tmp_path):
    source = tmp_path / "f64.safetensors"
    save_file({"layer.weight": torch.randn(8, 8, dtype=torch.float64)}, source)
    out = tmp_path / "q.safetensors"
    assert_one_line_error(fourbit("quantize", source, "-o", out), "'layer.weight' has dtype torch.float64", "--skip")
    assert sorted(tmp_path.iterdir()) == [source]


def test_existing_output_needs_force(float_checkpoint, tmp_path):
    out = tmp_path / "q.safetensors"
    out.write_bytes(b"keep me")
    assert_one_line_error(fourbit("quantize", float_checkpoint, "-o", out), "exists", "--force")
    assert out.read_bytes() == b"keep me"
    assert fourbit("quantize", float_checkpoint, "-o", out, "--force", "-q").returncode == 0
    assert "layers.0.proj.weight.absmax" in load_file(out)
    assert_one_line_error(fourbit("quantize", out, "-o", out), "replace the input")


def test_corrupt_checkpoint(float_checkpoint, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(float_checkpoint.read_bytes()[:-100])
    out = tmp_path / "q.safetensors"
    assert_one_line_error(fourbit("quantize", truncated, "-o", out), "not a valid safetensors file")
    assert_one_line_error(fourbit("inspect", truncated), "not a valid safetensors file")
    assert sorted(tmp_path.iterdir()) == [truncated]

    quantized = tmp_path / "quantized.safetensors"
    fourbit("quantize", float_checkpoint, "-o", quantized, "-q")
    state = load_file(quantized)
    state["layers.0.proj.weight.quant_state.bitsandbytes__nf4"] = torch.tensor([123, 34, 0], dtype=torch.uint8)
    broken = tmp_path / "broken.safetensors"
    save_file(state, broken)
    assert_one_line_error(fourbit("inspect", broken), "corrupt 4-bit statistics for 'layers.0.proj.weight'")


def test_bad_option_is_a_usage_error(float_checkpoint, tmp_path):
    result = fourbit("quantize", float_checkpoint, "-o", tmp_path / "q.safetensors", "--blocksize", "48")
    assert result.returncode == 2 and "invalid choice" in result.stderr
    assert not (tmp_path / "q.safetensors").exists()


def test_output_directory_missing(float_checkpoint, tmp_path):
    assert_one_line_error(
        fourbit("quantize", float_checkpoint, "-o", tmp_path / "absent" / "q.safetensors"), "no such directory"
    )


def _unreadable_dtype_file(path) -> None:
    """A safetensors file holding an F6_E2M3 tensor, a dtype torch cannot load."""
    import json
    import struct

    header = json.dumps({"t": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0")


def test_a_dtype_torch_cannot_load_is_a_one_line_error(tmp_path):
    source = tmp_path / "f6.safetensors"
    _unreadable_dtype_file(source)
    assert_one_line_error(fourbit("inspect", source), "F6_E2M3")
    assert_one_line_error(fourbit("quantize", source, "-o", tmp_path / "out.safetensors"), "F6_E2M3")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_quantize_on_cuda_without_cuda_is_a_one_line_error(float_checkpoint, tmp_path):
    result = fourbit("quantize", float_checkpoint, "-o", tmp_path / "out.safetensors", "--device", "cuda")
    assert_one_line_error(result, "no CUDA device")


def _corrupt(path, float_checkpoint, tmp_path, change) -> None:
    state = checkpoint.load_state_dict(_quantized(float_checkpoint, tmp_path))
    change(state)
    save_file(state, path)


def _quantized(float_checkpoint, tmp_path):
    path = tmp_path / "q.safetensors"
    if not path.exists():
        assert fourbit("quantize", float_checkpoint, "-o", path, "-q").returncode == 0
    return path


def _json_dtype_int8(state) -> None:
    import fourbit.functional as F4

    key = next(key for key in state if ".quant_state.bitsandbytes__" in key)
    entries = F4.unpack_tensor_to_dict(state[key])
    entries["dtype"] = "int8"
    state[key] = F4.pack_dict_to_tensor(entries)


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda state: state.update({"layers.0.proj.weight": state["layers.0.proj.weight"][:-1]}), "bytes"),
        (
            lambda state: state.update(
                {"layers.0.proj.weight": state["layers.0.proj.weight"].reshape(-1).view(torch.int32)}
            ),
            "int32",
        ),
        (_json_dtype_int8, "int8"),
    ],
    ids=["short-packed-bytes", "int32-storage", "json-dtype-int8"],
)
def test_inspect_refuses_corrupt_4bit_entries_as_loading_does(float_checkpoint, tmp_path, change, fragment):
    path = tmp_path / "corrupt.safetensors"
    _corrupt(path, float_checkpoint, tmp_path, change)
    assert_one_line_error(fourbit("inspect", path), "corrupt 4-bit statistics", fragment)


def test_quantize_writes_the_requested_quant_storage(float_checkpoint, tmp_path):
    path = tmp_path / "bf16.safetensors"
    assert fourbit("quantize", float_checkpoint, "-o", path, "--quant-storage", "bfloat16", "-q").returncode == 0
    state = load_file(path)
    assert state["layers.0.proj.weight"].dtype == torch.bfloat16
    assert state["layers.0.norm.weight"].dtype == torch.float32  # kept tensors keep their dtype
