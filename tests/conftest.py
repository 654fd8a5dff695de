"""pytest configuration: GPU tests skip cleanly where no CUDA device is present, and without a
GPU the Triton kernels run in Triton's interpreter (set before anything imports Triton, because
Triton reads the setting once)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, so statistical bounds give the same answer each run."""
    torch.manual_seed(0)
