"""pytest configuration: GPU tests skip cleanly where no CUDA device is present, and without a
GPU the Triton kernels run in Triton's interpreter (set before anything imports Triton, because
Triton reads the setting once). Tests marked ``cpu_only`` are left out where FOURBIT_TEST_DEVICES
leaves out the CPU (the GPU session: CI runs them)."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import available_devices

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _leave_out_cpu_only(config, items)
    _keep_shard(config, items)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _leave_out_cpu_only(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without the CPU among the test devices, deselect the tests marked ``cpu_only`` (those also
    marked ``gpu`` stay: a CPU-only file's one GPU test)."""
    if "cpu" in available_devices():
        return
    left_out = [item for item in items if "cpu_only" in item.keywords and "gpu" not in item.keywords]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if item not in left_out]


def _keep_shard(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With FOURBIT_TEST_SHARD=i/n, only every n-th collected test from the i-th on, so that
    processes can share a long file (dealt round, the slow parametrizations of one test spread
    over all of them)."""
    shard = os.environ.get("FOURBIT_TEST_SHARD")
    if not shard:
        return
    try:
        index, count = (int(part) for part in shard.split("/"))
    except ValueError:
        raise pytest.UsageError(f"FOURBIT_TEST_SHARD must look like 0/3, got {shard!r}") from None
    if not 0 <= index < count:
        raise pytest.UsageError(f"FOURBIT_TEST_SHARD {shard!r}: the index must be in [0, {count})")
    kept = items[index::count]
    config.hook.pytest_deselected(items=[item for position, item in enumerate(items) if position % count != index])
    items[:] = kept


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, so statistical bounds give the same answer each run."""
    torch.manual_seed(0)


@pytest.fixture
def h200_without_a_gpu(monkeypatch):
    """The H200's tables on 132 multiprocessors, every kernel supported as on the GPU (the fragment
    kernel to 16 rows, ``wgmma`` to its rows, clusters launched), so kernel choices run without one."""
    from fourbit.kernels.triton import dispatch, tuning

    monkeypatch.setattr(dispatch, "INTERPRETED", False)
    monkeypatch.setattr(dispatch, "fragments_supported", lambda x, k, blocksize, packed=None: x.shape[0] <= 16)
    monkeypatch.setattr(
        dispatch, "wgmma_supported", lambda x, k, blocksize, packed=None, max_rows=64: x.shape[0] <= max_rows
    )
    monkeypatch.setattr(dispatch, "fused_supported", lambda x, k, blocksize: True)
    monkeypatch.setattr(dispatch, "processors", lambda device: 132)
    monkeypatch.setattr(dispatch, "CLUSTER_LAUNCH", True)
    monkeypatch.setattr(tuning, "for_device", lambda device: tuning.H200)
