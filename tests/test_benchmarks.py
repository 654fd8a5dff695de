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


def test_bench_train_prints_its_table():
    out = _run("bench_train.py", "--device", "cpu", "--layers", "1", "--batches", "1", "--sequence", "8",
               "--libraries", "fourbit", "--warmup", "0", "--repeats", "1")  # fmt: skip
    cells = _row(out, "1")
    assert NUMBER.match(cells[3]) and NUMBER.match(cells[4]), cells  # fourbit ms a step and tokens/s
