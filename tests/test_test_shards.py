"""FOURBIT_TEST_SHARD (conftest.py), which the GPU session uses to run a long file as several
processes: the shards are disjoint, dealt round, and together run every test once. And
FOURBIT_TEST_DEVICES (helpers.available_devices), with which it leaves the CPU cases and the
tests marked ``cpu_only`` to CI. And the session's count of the files that failed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import available_devices

FILE = Path(__file__).resolve().parent / "test_formats.py"


def collected(shard: str | None, file: Path = FILE, devices: str | None = None) -> list[str]:
    env = {key: value for key, value in os.environ.items() if key not in ("FOURBIT_TEST_SHARD", "FOURBIT_TEST_DEVICES")}
    if shard is not None:
        env["FOURBIT_TEST_SHARD"] = shard
    if devices is not None:
        env["FOURBIT_TEST_DEVICES"] = devices
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", str(file)],
        capture_output=True, text=True, env=env, cwd=FILE.parent.parent,
    )  # fmt: skip
    if shard is not None and result.returncode == 4:  # a usage error
        raise ValueError(result.stderr)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return [line for line in result.stdout.splitlines() if "::" in line]


def test_shards_are_dealt_round_and_cover_every_test_once():
    everything = collected(None)
    assert len(everything) > 6
    shards = [collected(f"{index}/3") for index in range(3)]
    assert [everything[index::3] for index in range(3)] == shards


@pytest.mark.parametrize("shard", ["3/3", "one/two"])
def test_a_malformed_shard_is_a_usage_error(shard):
    with pytest.raises(ValueError, match="FOURBIT_TEST_SHARD"):
        collected(shard)


def test_test_devices_keep_only_the_devices_named(monkeypatch):
    monkeypatch.delenv("FOURBIT_TEST_DEVICES", raising=False)
    everything = available_devices()
    assert everything[0] == "cpu" and ("cuda" in everything) == torch.cuda.is_available()
    monkeypatch.setenv("FOURBIT_TEST_DEVICES", "cuda")
    assert available_devices() == [device for device in everything if device == "cuda"]
    monkeypatch.setenv("FOURBIT_TEST_DEVICES", "cpu, cuda")
    assert available_devices() == everything
    monkeypatch.setenv("FOURBIT_TEST_DEVICES", "gpu")
    with pytest.raises(ValueError, match="unknown devices"):
        available_devices()


def test_cpu_only_tests_are_left_out_without_the_cpu_but_gpu_tests_stay():
    fsdp = FILE.with_name("test_fsdp.py")
    everything = collected(None, fsdp)
    assert "tests/test_fsdp.py::test_fsdp2_on_two_cpu_processes" in everything
    assert collected(None, fsdp, devices="cuda") == [name for name in everything if "two_cpu_processes" not in name]
    if importlib.util.find_spec("bitsandbytes") is not None:  # else the file skips itself
        kept = collected(None, FILE.with_name("test_bnb_compat.py"), devices="cuda")
        assert len(kept) == 2 and all("cuda_quantization" in name for name in kept), kept


@pytest.mark.cpu_only
def test_the_gpu_session_counts_failed_errored_and_stopped_files_but_not_empty_ones(tmp_path):
    """``gpu_session.sh``'s tests stage: a file with a failing test, one that cannot be
    collected and one stopped after FILE_TIMEOUT count as failures; one whose tests were all
    deselected (pytest's exit 5) is reported, not counted."""
    cases = {
        "test_passes.py": "def test_passes():\n    pass\n",
        "test_fails.py": "def test_fails():\n    assert False\n",
        "test_broken.py": "import not_a_module_anywhere\n",
        "test_stops.py": "import time\n\ndef test_sleeps():\n    time.sleep(60)\n",
        "test_empty.py": "X = 1\n",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "STAGES": "tests",
        "FILES": " ".join(str(tmp_path / name) for name in cases),
        "OUT": str(out),
        "JOBS": "5",
        "FILE_TIMEOUT": "10",
        "PYTHON": sys.executable,
        "PATH": os.environ.get("PATH", ""),
    }
    script = FILE.parent.parent / "benchmarks" / "gpu_session.sh"
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd=FILE.parent.parent)
    summary = (out / "tests.log").read_text()
    assert "files with failures: 3" in result.stdout, result.stdout + result.stderr
    for name, status in [
        ("passes", "0"),
        ("fails", "1"),
        ("broken", "2"),
        ("stops", "124"),
        ("empty", "5 (no test selected)"),
    ]:
        assert f"test_{name}: exit {status} after" in summary, summary
    assert "process time: " in result.stdout
    assert (out / "test_logs.tgz").exists()
