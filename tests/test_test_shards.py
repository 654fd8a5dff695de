"""FOURBIT_TEST_SHARD (conftest.py), which the GPU session uses to run a long file as several
processes: the shards are disjoint, dealt round, and together run every test once. And
FOURBIT_TEST_DEVICES (helpers.available_devices), with which it leaves the CPU cases to CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import available_devices

FILE = Path(__file__).resolve().parent / "test_formats.py"


def collected(shard: str | None) -> list[str]:
    env = {key: value for key, value in os.environ.items() if key != "FOURBIT_TEST_SHARD"}
    if shard is not None:
        env["FOURBIT_TEST_SHARD"] = shard
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", str(FILE)],
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
