"""The end-to-end benchmarks run as documented, at the smallest sizes: each prints its table with
a number in fourbit's cell. Their timings mean nothing here; what counts is that each runs to its
table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script: str, *arguments: str) -> str:
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCHMARKS), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *arguments],
        capture_output=True, text=True, timeout=600, env=environment,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _row(table: str, first_cells: str) -> list[str]:
    """The cells of the table row that starts with ``first_cells``."""
    line = next(line for line in table.splitlines() if line.startswith(f"| {first_cells} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


NUMBER = re.compile(r"^\d+(\.\d+)?$")


def test_bench_generate_prints_its_table():
    out = _run("bench_generate.py", "--device", "cpu", "--layers", "1", "--batches", "1", "--libraries", "bf16",
               "fourbit", "--prompt", "4", "--new-tokens", "2", "--warmup", "0", "--repeats", "1")  # fmt: skip
    cells = _row(out, "eager | 1")
    assert NUMBER.match(cells[2]) and NUMBER.match(cells[4]), cells  # bf16 and fourbit tokens/s
    assert cells[5].endswith("x"), cells  # fourbit/bf16


def test_bench_generate_gives_the_grouped_model_a_column_of_its_own():
    out = _run("bench_generate.py", "--device", "cpu", "--layers", "1", "--batches", "1", "--libraries", "fourbit",
               "fourbit-grouped", "--prompt", "4", "--new-tokens", "2", "--warmup", "0", "--repeats", "1")  # fmt: skip
    header = next(line for line in out.splitlines() if line.startswith("| mode |"))
    assert "grouped tok/s" in header and "grouped/fourbit" in header, header
    cells = _row(out, "eager | 1")
    assert NUMBER.match(cells[4]) and NUMBER.match(cells[5]), cells  # fourbit and grouped tokens/s
    assert cells[9].endswith("x"), cells  # grouped/fourbit


def test_bench_generate_lean_loop_compiles_its_prefill_when_asked():
    out = _run("bench_generate.py", "--device", "cpu", "--layers", "1", "--batches", "1", "--libraries", "fourbit",
               "--modes", "lean", "--compile-prefill", "--prompt", "4", "--new-tokens", "2", "--warmup", "0",
               "--repeats", "1")  # fmt: skip
    assert "lean prefill compiled" in out, out
    cells = _row(out, "lean | 1")
    assert NUMBER.match(cells[4]), cells  # fourbit tokens/s


def test_bench_layers_prints_its_table():
    out = _run("bench_layers.py", "--device", "cpu", "--layers", "1", "--rows", "1", "2", "--shape", "64", "256", "32",
               "--libraries", "bf16", "fourbit", "--min-time", "0.01")  # fmt: skip
    for rows in ("1", "2"):
        cells = _row(out, f"eager | {rows}")
        assert NUMBER.match(cells[2]) and NUMBER.match(cells[3]), cells  # bf16 and fourbit us a layer
        assert cells[4].endswith("x"), cells  # fourbit / bf16


def test_bench_layers_refuses_the_grouped_launch_off_cuda():
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_layers.py"), "--device", "cpu", "--libraries", "fourbit-grouped"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and "needs --device cuda" in result.stderr


def test_profile_step_times_the_projections_inside_decode_steps():
    out = _run("profile_step.py", "--device", "cpu", "--layers", "1", "--batches", "1", "--steps", "2",
               "--libraries", "bf16", "fourbit")  # fmt: skip
    bf16, fourbit = _row(out, "bf16 | 1"), _row(out, "fourbit | 1")
    for cells in (bf16, fourbit):
        call, host, wall = (float(cell) for cell in cells[2:5])
        assert call > 0 and 0 < host <= wall, cells
    assert fourbit[5] == f"{float(fourbit[2]) / float(bf16[2]):.2f}x"


def test_profile_step_restores_every_projection_after_timing_it():
    import torch
    from torch import nn

    sys.path.insert(0, str(BENCHMARKS))
    try:
        import profile_step
    finally:
        sys.path.remove(str(BENCHMARKS))

    class Model(nn.Module):  # the attribute path the timer walks: model.model.layers
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.layers = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))

    model = Model()
    x = torch.randn(2, 4)
    with profile_step.timed_projections(model) as total:
        expected = model.model.layers(x)
    assert total[1] == 2 and total[0] > 0
    assert all("forward" not in module.__dict__ for module in model.modules())
    torch.testing.assert_close(model.model.layers(x), expected)


def test_launch_probe_times_a_launch_after_each_step():
    out = _run("launch_probe.py", "--device", "cpu", "--size", "256", "--launches", "200")
    for step in ("torch only", "fourbit imported", "an eager product of 1 row", "a compiled product of 32 rows"):
        host, wall = (float(cell) for cell in _row(out, step)[1:3])
        assert 0 < host <= wall, (step, host, wall)


def test_bench_train_prints_its_table():
    out = _run("bench_train.py", "--device", "cpu", "--layers", "1", "--batches", "1", "--sequence", "8",
               "--libraries", "fourbit", "--warmup", "0", "--repeats", "1")  # fmt: skip
    cells = _row(out, "1")
    assert NUMBER.match(cells[3]) and NUMBER.match(cells[4]), cells  # fourbit ms a step and tokens/s


def test_bench_train_compiles_the_model_when_asked():
    out = _run("bench_train.py", "--device", "cpu", "--layers", "1", "--batches", "1", "--sequence", "8",
               "--libraries", "fourbit", "--warmup", "1", "--repeats", "1", "--compile")  # fmt: skip
    assert "16 tokens a sequence" not in out and "8 tokens a sequence, compiled;" in out
    cells = _row(out, "1")
    assert NUMBER.match(cells[3]) and NUMBER.match(cells[4]), cells


def test_triton_compiles_replays_a_recorded_compile_for_a_gpu_that_is_not_here(tmp_path):
    """``triton_compiles.py`` compiles a recorded compile (the input copy's kernel) for Hopper
    with the Triton installed, and compares two replays kernel by kernel."""
    import json

    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton bundles no cuobjdump")
    signature = {"x_ptr": "*i64", "out_ptr": "*i64", "M": "i32", "stride_xm": "i32", "total": "i32",
                 "TILES": "constexpr", "BLOCK": "constexpr"}  # fmt: skip
    record = [{
        "module": "fourbit.kernels.triton.fragment_inputs", "name": "_permute_kernel", "signature": signature,
        "constexprs": [[[5], 2], [[6], 1024]],
        "attrs": [[[0], [["tt.divisibility", 16]]], [[1], [["tt.divisibility", 16]]]],
        "options": {"num_warps": 4, "num_stages": 3, "maxnreg": None, "enable_fp_fusion": True},
    }]  # fmt: skip
    (tmp_path / "record.json").write_text(json.dumps(record))
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    replay = subprocess.run(
        [sys.executable, str(BENCHMARKS / "triton_compiles.py"), "replay", str(tmp_path / "record.json"),
         str(tmp_path / "replay.json")], capture_output=True, text=True, timeout=600, env=environment,
    )  # fmt: skip
    assert replay.returncode == 0, replay.stderr[-3000:]
    (counts,) = json.loads((tmp_path / "replay.json").read_text())["compiles"]
    assert counts["instructions"] > 20 and counts["global_loads"] > 0 and counts["registers"] > 0, counts
    assert counts["constants"] == {"TILES": 2, "BLOCK": 1024} and counts["loop"] == 0  # no loop in it
    compared = _run("triton_compiles.py", "compare", str(tmp_path / "replay.json"), str(tmp_path / "replay.json"))
    cells = _row(compared, "_permute_kernel")
    assert cells[1] == "1" and cells[2] == str(counts["instructions"]), cells


def test_triton_compiles_finds_the_main_loop_of_a_listing(monkeypatch):
    """The main loop ``triton_compiles.py`` counts in cuobjdump's listing: from the longest
    backward branch's target to the branch, not a retry placed after the ``EXIT``; encoding
    comments are no instructions."""
    pytest.importorskip("triton")
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    triton_compiles = __import__("triton_compiles")
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
                                                          /* 0x000fe40000000f00 */
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   IMAD R3, R2, 0x2, RZ ;
        /*0030*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0040*/              @!P0 BRA 0x10 ;
        /*0050*/                   BRA 0x30 ;
        /*0060*/                   EXIT ;
        /*0070*/                   BRA 0x0 ;
    """
    instructions = triton_compiles.sass_instructions(sass)
    assert [instruction.address for instruction in instructions] == list(range(0, 0x80, 0x10))
    loop = triton_compiles.main_loop(instructions)
    assert [instruction.opcode for instruction in loop] == ["LDG", "IMAD", "HMMA", "BRA"]


def test_ncu_sass_summary_reads_the_stalls_and_finds_the_main_loop(tmp_path):
    """``ncu_sass_summary.py`` on a table laid out as ncu writes it: the reasons' shares, the
    samples by opcode (predicates and modifiers dropped), and the main loop from its backward
    branch, not the retry branch placed after the kernel's exit."""
    header = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed", "stall_wait",
              "stall_long_sb", "stall_wait (Not Issued)"]  # fmt: skip
    code = [
        ("MOV R1, c[0x0][0x28]", 2, 0),
        ("LDG.E R2, desc[UR4][R4.64]", 0, 0),
        ("IMAD R3, R2, 0x2, RZ", 5, 0),
        ("@!P0 LDG.E.64 R6, desc[UR4][R8.64]", 0, 30),
        ("HMMA.16816.F32 R8, R4, R6, R8", 10, 0),
        ("@P1 BRA 0x7f0000000020", 1, 0),
        ("EXIT", 0, 0),
        ("@!P2 BRA 0x7f0000000010", 0, 2),
    ]
    rows = [["Kernel Name", "_kernel", ""], header]
    for i, (text, wait, long_sb) in enumerate(code):
        rows.append([f"0x{0x7F0000000000 + 16 * i:x}", f"      {text}", str(wait + long_sb), "64", str(wait),
                     str(long_sb), "0"])  # fmt: skip
    table = tmp_path / "sass.csv"
    table.write_text("\n".join(",".join(f'"{cell}"' for cell in row) for row in rows) + "\n")
    out = _run("ncu_sass_summary.py", str(table), "--top", "2")
    assert "50 warp samples, 8 instructions" in out
    assert re.search(r"wait\s+18\s+36\.0%", out) and re.search(r"long_sb\s+32\s+64\.0%", out)
    assert re.search(r"LDG\s+30\s+60\.0%\s+128\b", out) and re.search(r"HMMA\s+10\s+20\.0%", out)
    assert "main loop: 4 instructions, 92% of the samples" in out  # 0x20 .. 0x50, not 0x10 .. 0x70
    assert "  IMAD:1 LDG:1 HMMA:1 BRA:1\n" in out
    most = out.split("most sampled instructions:")[1].splitlines()[1:]
    assert len(most) == 2 and "LDG.E.64" in most[0] and "long_sb 30" in most[0] and "HMMA" in most[1]


def test_profile_prefill_prints_its_profile_and_table():
    out = _run("profile_prefill.py", "--device", "cpu", "--layers", "1", "--batch", "1", "--prompt", "4", "--repeats",
               "2", "--top", "40", "--libraries", "fourbit", "--eager-first", "--python-profile",
               "--op-calls")  # fmt: skip
    # every operator's row is printed (about 20), so the op's row is there however the host's load orders them
    assert "fourbit, one compiled prefill, by self_cpu_time_total:" in out and "fourbit::linear_4bit" in out
    assert "fourbit, 2 eager prefills, Python functions:" in out and "ncalls  tottime" in out  # cProfile's table
    for what in ("compiled", "eager", "compiled, after eager prefills"):
        cells = _row(out, f"fourbit | {what}")
        quickest, median = (float(value) for value in cells[2].split(" / "))
        assert 0 < quickest <= median and 0 < float(cells[3]) <= median and float(cells[4]) > 0, cells
        assert 0 <= float(cells[5]) <= median, cells  # the collector's time falls within the prefill's
    assert _row(out, "fourbit | compiled")[6].isdigit()
    assert re.search(r"fourbit: \d+ Python objects tracked", out)
    # one layer's seven projections, each timed in the backend kernel and replayed
    calls = re.search(r"linear_4bit, (\d+) calls a prefill, host us a call \(median\): backend kernel ([\d.]+)", out)
    assert calls and int(calls[1]) == 7 and float(calls[2]) > 0, out[-2000:]
    assert re.search(r"back to back: [\d.]+ a call", out)


def test_profile_compiled_call_times_the_compiled_step_with_and_without_guards():
    out = _run("profile_compiled_call.py", "--device", "cpu", "--layers", "1", "--calls", "3", "--rounds", "1")
    bf16, fourbit = _row(out, "1 | bf16"), _row(out, "1 | fourbit")
    for cells in (bf16, fourbit):
        guarded, bare, check = (float(cell) for cell in cells[2:5])
        assert guarded > 0 and bare > 0 and check == pytest.approx(guarded - bare, abs=0.11), cells
        assert int(cells[6]) > 0, cells  # the guard tree was read
    # each 4-bit projection adds its statistics buffer to the graph's inputs (7 in a Llama layer)
    assert int(fourbit[5]) == int(bf16[5]) + 7, (bf16, fourbit)


def _fragment_probe():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import cuda_fragment_probe
    finally:
        sys.path.remove(str(BENCHMARKS))
    return cuda_fragment_probe


def test_cuda_fragment_probe_refuses_what_its_kernel_cannot_take():
    """Shapes off the kernel's multiples, other blocksizes and non-bf16 inputs get a ValueError
    before anything is compiled or launched."""
    import torch

    import fourbit.functional as F4

    probe = _fragment_probe()
    weight = torch.randn(32, 512, dtype=torch.bfloat16)
    packed, state = F4.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    x, out = torch.randn(1, 512, dtype=torch.bfloat16), torch.empty(1, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 256 x ksplit"):
        probe.probe_call((4, 1, 1, 16, 0), x, packed, state, out, False)  # K 512 < 256 x 4
    with pytest.raises(ValueError, match="multiple of 256 x ksplit"):
        probe.probe_call((2, 4, 1, 16, 0), x, packed, state, out, False)  # N 32 < 16 x 4
    with pytest.raises(ValueError, match="1-16 rows"):
        probe.probe_call((2, 1, 1, 16, 0), torch.randn(17, 512, dtype=torch.bfloat16), packed, state, out, False)
    with pytest.raises(ValueError, match="contiguous bf16 input"):
        probe.probe_call((2, 1, 1, 16, 0), x.float(), packed, state, out, False)
    packed_128, state_128 = F4.quantize_4bit(weight, blocksize=128, quant_type="nf4")
    with pytest.raises(ValueError, match="blocksize 64"):
        probe.probe_call((2, 1, 1, 16, 0), x, packed_128, state_128, out, False)


@pytest.mark.gpu
@pytest.mark.parametrize("tiled", [True, False], ids=["tiled", "rows"])
@pytest.mark.parametrize("compress_statistics", [True, False], ids=["nested", "plain"])
@pytest.mark.parametrize("rows", [1, 11])
def test_cuda_fragment_probe_products_match_the_dequantized_weights(tiled, compress_statistics, rows):
    """The CUDA probe's products (tiled weights and rows, one and two tiles of input rows, nested
    and plain statistics, K split or not, one pipeline across several row blocks a block, none,
    one or two words a step decoded by byte permutes) are those of the dequantized weight, as
    close as the Triton kernel's."""
    import torch

    import fourbit.functional as F4
    from fourbit.layout import tile

    probe = _fragment_probe()
    n, k = 8192, 2048  # more row blocks than an H200 holds blocks: several a block
    weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
    packed, state = F4.quantize_4bit(weight, blocksize=64, compress_statistics=compress_statistics, quant_type="nf4")
    x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
    reference = x.double() @ F4.dequantize_4bit(packed, state).double().t()
    if tiled:
        packed = tile(packed, (n, k))
    for config in [(8, 1, 1, 16, 0), (2, 4, 2, 16, 1), (4, 2, 1, 8, 2)]:
        out = torch.full((rows, n), float("nan"), dtype=torch.bfloat16, device="cuda")
        probe.probe_call(config, x, packed, state, out, tiled)()
        torch.cuda.synchronize()
        assert probe.relative_error(out, reference) < 5e-3, config
