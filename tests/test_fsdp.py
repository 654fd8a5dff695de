"""FSDP2 (fully_shard) of 4-bit models: two processes, compared with one (see fsdp_worker.py).

On the CPU the processes talk over gloo (runs in CI); on a machine with two GPUs the same checks
run over NCCL.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fsdp_worker import STEPS, load_example

WORKER = Path(__file__).resolve().parent / "fsdp_worker.py"
STORAGES = ["uint8", "bfloat16", "float32"]
TIMEOUT = 300  # seconds; the CPU run takes about 10


def run_worker(tmp_path: Path, cpu: bool) -> dict:
    output = tmp_path / "result.json"
    env = {**os.environ, "FSDP_TEST_CPU": "1" if cpu else "0", "OMP_NUM_THREADS": "1"}
    if cpu and Path("/sys/class/net/lo").exists():
        # gloo otherwise connects through the address the host name resolves to, which a machine
        # without a network may not route (the workers then wait until the timeout)
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # a session of their own, so that a timeout stops the workers too: they hold the output pipes
    with subprocess.Popen(
        [*command, str(WORKER), str(output), *STORAGES],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    ) as process:
        try:
            _, stderr = process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:  # name where the workers stood
            os.killpg(process.pid, signal.SIGKILL)
            _, stderr = process.communicate()
            pytest.fail(f"the FSDP2 workers did not finish in {TIMEOUT} s; their stderr ends:\n{stderr[-4000:]}")
    assert process.returncode == 0, stderr[-4000:]
    return json.loads(output.read_text())


def single_process_reference(device: str) -> tuple[torch.Tensor, list[float]]:
    example = load_example()
    tokens = example.batch(99, 4).to(device)
    model = example.build_model(device=device)
    with torch.no_grad():
        forward = model(tokens).cpu()
    losses, _ = example.train(model, STEPS, device=device)
    return forward, losses


def check(results: dict, device: str, backend: str) -> None:
    assert results["backend"] == backend
    forward, losses = single_process_reference(device)
    storages = STORAGES
    if results["integer_parameter_error"]:
        # torch's own limit (2.11: fully_shard makes every shard require grad), not fourbit's
        assert "only Tensors of floating point dtype can require gradients" in results["integer_parameter_error"]
        assert torch.__version__ < "2.13"
        storages = [storage for storage in STORAGES if storage != "uint8"]
    for storage in storages:
        result = results[f"torch.{storage}"]
        sharded = torch.tensor(result["forward"], dtype=forward.dtype)
        if device == "cpu":
            assert torch.equal(sharded, forward), storage
        else:
            torch.testing.assert_close(sharded, forward, rtol=1e-2, atol=1e-2)
        assert result["losses"] == pytest.approx(losses, rel=1e-4), storage
        assert result["losses"][-1] < result["losses"][0]
        assert result["bytes_unchanged"], storage
        assert result["dcp_equal"], storage
        assert result["full_state_dict_equal"] and result["full_state_dict_plain"], storage
        assert result["packed_dtype"] == f"torch.{storage}"
    assert "not quantized yet" in results["unquantized_error"]
    assert "move the model to its device" in results["unquantized_error"]
    expected = {"torch.bfloat16": "ok"} | ({} if results["integer_parameter_error"] else {"torch.uint8": "ok"})
    assert results["assigned_params4bit"] == expected
    assert "split its 3 packed torch.bfloat16 rows unevenly over 2 processes" in results["uneven_16bit_error"]
    assert results["mixed_precision"]["torch.bfloat16"] == "ok torch.bfloat16"
    assert results["mixed_precision"]["torch.float16"] == "ok torch.bfloat16"
    if device == "cuda":
        assert results["moved_by_fully_shard"] == "ok"
    assert "cast the packed bytes" in results["mixed_precision"]["torch.float32"]


@pytest.mark.skipif(
    torch.__version__ < (2, 8), reason="FSDP2 before torch 2.8 needs one dtype for all of a module's parameters"
)
@pytest.mark.cpu_only
def test_fsdp2_on_two_cpu_processes(tmp_path):
    check(run_worker(tmp_path, cpu=True), "cpu", "gloo")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_fsdp2_on_two_gpus(tmp_path):
    check(run_worker(tmp_path, cpu=False), "cuda", "nccl")


def test_a_packed_shard_is_gathered_as_its_bytes():
    """The all-gather hooks move raw bytes: signalling-NaN patterns in a bf16 view survive, and the
    gathered weight keeps its storage dtype whatever dtype a mixed-precision policy asks for."""
    from fourbit.nn.sharded import PackedShard

    packed = torch.tensor([0x7F9A, 0x1234, -0x0066, 0x7FC1], dtype=torch.int16).view(torch.bfloat16).reshape(4, 1)
    shard = packed.as_subclass(PackedShard)
    (gather_input,), metadata = shard.fsdp_pre_all_gather(None)
    assert gather_input.dtype == torch.uint8
    assert type(gather_input) is torch.Tensor
    world = torch.cat([gather_input, gather_input])  # what two processes' inputs gather into
    weight, inner = shard.fsdp_post_all_gather((world,), metadata, torch.float32)
    assert weight.dtype == torch.bfloat16 and weight.shape == (8, 1)
    assert torch.equal(weight.view(torch.int16), torch.cat([packed, packed]).view(torch.int16))
    assert inner == (world,)
    assert shard.fsdp_post_all_gather((world,), metadata, torch.float32, out=weight) is None
    assert type(torch.narrow(shard, 0, 0, 2)) is PackedShard  # views FSDP2 takes keep the hooks
    restored = pickle.loads(pickle.dumps(shard))
    assert type(restored) is torch.Tensor and torch.equal(restored.view(torch.int16), packed.view(torch.int16))
