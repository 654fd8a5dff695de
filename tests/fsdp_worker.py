"""Run by tests/test_fsdp.py under torchrun (2 processes, gloo on CPU or NCCL on GPUs).

Shards the QLoRA example model with FSDP2 for each quant_storage and writes, from rank 0, a JSON
file with what the test compares against a single process: the sharded forward output, the
training losses, whether the 4-bit bytes survived training, the DCP round trip, the full state
dict gathered on rank 0, and the error for an unquantized model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "qlora_fsdp2.py"
STEPS = 4


def load_example():
    spec = importlib.util.spec_from_file_location("qlora_fsdp2", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def packed_entries(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The 4-bit weights and their statistics in a full state dict."""
    return {key: value for key, value in state.items() if ".base.weight" in key}


def scramble(model: torch.nn.Module) -> None:
    """Overwrite every parameter shard and 4-bit statistic, so that only a load can bring them back.

    (DCP loads into tensors of the saved sizes, so the model is built from the same base weights:
    the packed QuantState JSON has the same length.)"""
    from fourbit.nn import Linear4bit

    with torch.no_grad():
        for parameter in model.parameters():
            local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
            local.view(torch.uint8).fill_(7)
        for module in model.modules():
            if isinstance(module, Linear4bit):
                module.quant_state.absmax.zero_()


def mesh_of(device: torch.device):
    """All processes on ``device``'s type (fully_shard's default mesh is CUDA whenever a GPU exists,
    which would put the gloo run's shards on one GPU)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def check_storage(example, storage: torch.dtype, rank: int, world: int, device: torch.device, workdir: str) -> dict:
    tokens = example.batch(99, 4).to(device)
    model = example.shard(example.build_model(quant_storage=storage, device=device), device)
    with torch.no_grad():
        forward = model(tokens).cpu()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    before = {k: v.clone() for k, v in packed_entries(get_model_state_dict(model, options=options)).items()}
    losses, _ = example.train(model, STEPS, rank=rank, world=world, device=device)
    after = packed_entries(get_model_state_dict(model, options=options))
    unchanged = rank != 0 or (before.keys() == after.keys() and all(same_bytes(before[k], after[k]) for k in before))

    with torch.no_grad():
        trained = model(tokens).cpu()
    path = os.path.join(workdir, f"dcp-{storage}")
    dcp.save(model.state_dict(), checkpoint_id=path)
    restored = example.shard(example.build_model(quant_storage=storage, device=device), device)
    scramble(restored)
    state = restored.state_dict()
    dcp.load(state, checkpoint_id=path)
    restored.load_state_dict(state)
    with torch.no_grad():
        dcp_equal = torch.equal(restored(tokens).cpu(), trained)

    full = get_model_state_dict(model, options=options)
    full_keys_ok = full_equal = True
    if rank == 0:
        plain = example.build_model(quant_storage=storage, device=device, seed=2)
        plain.load_state_dict(full)
        with torch.no_grad():
            full_equal = torch.equal(plain(tokens).cpu(), trained)
        full_keys_ok = "blocks.0.q.base.weight.quant_state.bitsandbytes__nf4" in full and all(
            not hasattr(value, "placements") for value in full.values()
        )
    return {
        "forward": forward.tolist(),
        "losses": losses,
        "bytes_unchanged": bool(unchanged),
        "dcp_equal": bool(dcp_equal),
        "full_state_dict_equal": bool(full_equal),
        "full_state_dict_plain": bool(full_keys_ok),
        "packed_dtype": str(before["blocks.0.q.base.weight"].dtype) if rank == 0 else None,
    }


def mixed_precision(example, device: torch.device) -> dict:
    """An FSDP2 MixedPrecisionPolicy casts floating parameters: bf16-stored 4-bit weights under a bf16
    policy are not cast and work; 16-bit ones are gathered as bytes (PackedShard), so fp16 storage
    is not cast either; float32-stored ones would be, and Linear4bit refuses them."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    tokens = example.batch(7, 2).to(device)
    outcome = {}
    for storage in (torch.bfloat16, torch.float16, torch.float32):
        model = example.build_model(quant_storage=storage, device=device)
        for block in model.blocks:
            fully_shard(block, mesh=mesh_of(device), mp_policy=policy)
        fully_shard(model, mesh=mesh_of(device), mp_policy=policy)
        try:
            with torch.no_grad():
                outcome[str(storage)] = f"ok {model(tokens).dtype}"
        except RuntimeError as error:
            outcome[str(storage)] = str(error)
    return outcome


def integer_parameter_error(device: torch.device) -> str:
    """ "" when this torch's FSDP2 shards a frozen uint8 parameter, else its error (torch 2.11 wraps
    every shard in ``nn.Parameter(...)`` with requires_grad=True, which integer tensors refuse)."""
    from torch.distributed.fsdp import fully_shard

    holder = torch.nn.Module()
    holder.packed = torch.nn.Parameter(torch.zeros(8, 1, dtype=torch.uint8, device=device), requires_grad=False)
    try:
        fully_shard(holder, mesh=mesh_of(device))
    except RuntimeError as error:
        return str(error)
    return ""


def unquantized_error(device: torch.device) -> str:
    """The first forward of a Linear4bit sharded by fully_shard while its float weight was never
    quantized (sharding itself works: torch.chunk of an unquantized Params4bit is allowed)."""
    from torch.distributed.fsdp import fully_shard

    from fourbit.nn import Linear4bit

    layer = Linear4bit(64, 32, quant_type="nf4", device=device)
    try:
        fully_shard(layer, mesh=mesh_of(device))
        layer(torch.randn(2, 64, device=device))
    except RuntimeError as error:
        return str(error)
    return ""


def moved_by_fully_shard(device: torch.device) -> str:
    """fully_shard of a CPU-built layer on a GPU mesh moves it, which quantizes it like any ``.to``."""
    from torch.distributed.fsdp import fully_shard

    from fourbit.nn import Linear4bit

    torch.manual_seed(5)
    dense = torch.nn.Linear(64, 32)
    layer = Linear4bit(64, 32, quant_type="nf4", quant_storage=torch.bfloat16)
    layer.load_state_dict(dense.state_dict())
    reference = Linear4bit(64, 32, quant_type="nf4", quant_storage=torch.bfloat16)
    reference.load_state_dict(dense.state_dict())
    reference = reference.to(device)
    fully_shard(layer, mesh=mesh_of(device))
    x = torch.randn(3, 64, device=device)
    with torch.no_grad():
        return "ok" if torch.equal(layer(x), reference(x)) else "different"


def signalling_nans(packed: torch.Tensor) -> int:
    """How many elements of ``packed`` (bytes viewed as bfloat16) are signalling-NaN bit patterns,
    which a copy through float32 would change."""
    bits = packed.reshape(-1).view(torch.int16).int() & 0xFFFF
    return int((((bits & 0x7F80) == 0x7F80) & ((bits & 0x7F) != 0) & ((bits & 0x40) == 0)).sum())


def assigned_params4bit(device: torch.device, storage: torch.dtype) -> str:
    """A Params4bit assigned to ``Linear4bit.weight`` (transformers' and peft's pattern), moved to
    the device, then sharded: the gathered bytes and the forward match the unsharded layer. Its
    bf16 view holds signalling-NaN patterns, which FSDP2's CUDA all-gather of bf16 would change."""
    from torch.distributed.fsdp import fully_shard

    from fourbit.nn import Linear4bit, Params4bit

    torch.manual_seed(6)
    weight = torch.randn(64, 64)

    def build() -> Linear4bit:
        layer = Linear4bit(64, 64, bias=False, quant_type="nf4")
        layer.weight = Params4bit(weight.clone(), requires_grad=False, quant_type="nf4", quant_storage=storage)
        return layer.to(device)

    layer, reference = build(), build()
    if signalling_nans(reference.weight.data) == 0:
        return "the weight holds no signalling-NaN pattern: the check would prove nothing"
    fully_shard(layer, mesh=mesh_of(device))
    gathered = {}
    layer.register_forward_pre_hook(lambda module, args: gathered.update(weight=module.weight.detach().clone()))
    x = torch.randn(3, 64, device=device)
    try:
        with torch.no_grad():
            output = layer(x)
    except RuntimeError as error:
        return str(error)
    if not same_bytes(gathered["weight"], reference.weight.data):
        return "gathered bytes differ"
    with torch.no_grad():
        return "ok" if torch.equal(output, reference(x)) else "different"


def uneven_16bit_error(device: torch.device) -> str:
    """fully_shard of a bf16-stored weight whose packed rows do not split evenly: a clear error."""
    from torch.distributed.fsdp import fully_shard

    from fourbit.nn import Linear4bit

    layer = Linear4bit(6, 2, bias=False, quant_type="nf4", quant_storage=torch.bfloat16).to(device)  # 3 rows
    try:
        fully_shard(layer, mesh=mesh_of(device))
    except ValueError as error:
        return str(error)
    return "no error"


def main() -> None:
    output = Path(sys.argv[1])
    storages = [getattr(torch, name) for name in sys.argv[2:]] or [torch.uint8]
    cuda = torch.cuda.is_available() and os.environ.get("FSDP_TEST_CPU") != "1"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    example = load_example()
    workdir = tempfile.mkdtemp() if rank == 0 else None
    shared = [workdir]
    dist.broadcast_object_list(shared, src=0)
    integer_error = integer_parameter_error(device)
    if integer_error:
        storages = [storage for storage in storages if storage.is_floating_point]
    results = {str(storage): check_storage(example, storage, rank, world, device, shared[0]) for storage in storages}
    results["integer_parameter_error"] = integer_error
    results["unquantized_error"] = unquantized_error(device)
    # bfloat16, and uint8 where this torch's FSDP2 shards it
    assigned = [torch.bfloat16] + ([] if integer_error else [torch.uint8])
    results["assigned_params4bit"] = {str(storage): assigned_params4bit(device, storage) for storage in assigned}
    results["uneven_16bit_error"] = uneven_16bit_error(device)
    if device.type == "cuda":
        results["moved_by_fully_shard"] = moved_by_fully_shard(device)
    results["mixed_precision"] = mixed_precision(example, device)
    results["backend"] = dist.get_backend()
    if rank == 0:
        output.write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
