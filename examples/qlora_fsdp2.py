"""QLoRA with FSDP2: a small causal transformer made 4-bit, LoRA adapters, sharded with fully_shard.

    torchrun --standalone --nproc_per_node=2 examples/qlora_fsdp2.py            # CPU: gloo
    torchrun --standalone --nproc_per_node=2 examples/qlora_fsdp2.py --steps 50 # GPUs: nccl, one GPU per process
    python examples/qlora_fsdp2.py                                              # one process, no sharding

The base weights are frozen NF4 ``Linear4bit`` layers (fourbit.convert.quantize_model); each one
is wrapped in a ``LoRALinear`` whose two small float layers are the only trainable parameters.
``--no-quant`` trains the same model with unquantized frozen weights (the baseline). The data is
synthetic (each token follows from the previous one by a fixed rule), so the loss goes down fast.
LoRA lives here, not in fourbit: fourbit provides the 4-bit base layers.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fourbit.convert import quantize_model


class Block(nn.Module):
    """Pre-norm attention + MLP."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.mlp_norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        h = self.attn_norm(x)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, dim // self.heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)), is_causal=True)
        x = x + self.o(attended.transpose(1, 2).reshape(batch, length, dim))
        return x + self.down(F.gelu(self.up(self.mlp_norm(x))))


class TinyCausalLM(nn.Module):
    def __init__(self, vocab: int = 128, dim: int = 128, layers: int = 2, heads: int = 4, hidden: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


class LoRALinear(nn.Module):
    """A frozen base layer plus a trainable low-rank update: ``base(x) + (x A^T B^T) * alpha / rank``."""

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x.to(self.lora_a.weight.dtype))).to(x.dtype) * self.scale


def add_lora(model: nn.Module, rank: int = 8) -> None:
    """Wrap every linear layer of the blocks in a LoRALinear and freeze everything else."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for block in model.blocks:
        for name in ("q", "k", "v", "o", "up", "down"):
            setattr(block, name, LoRALinear(getattr(block, name), rank))


def build_model(
    quantize: bool = True,
    quant_storage: torch.dtype = torch.uint8,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    dim: int = 128,
    layers: int = 2,
) -> TinyCausalLM:
    """The same model on every process: seeded float weights, 4-bit base layers, LoRA adapters."""
    torch.manual_seed(seed)
    model = TinyCausalLM(dim=dim, layers=layers, heads=max(dim // 64, 2), hidden=2 * dim).to(dtype)
    if quantize:
        quantize_model(model, quant_type="nf4", quant_storage=quant_storage, device=device, progress=False)
    add_lora(model)
    model.to(device)
    for name, parameter in model.named_parameters():  # adapters train in float32
        if "lora_" in name:
            parameter.data = parameter.data.float()
    return model


def shard(model: TinyCausalLM, device: torch.device) -> TinyCausalLM:
    """FSDP2 over every process on ``device``'s type: one unit per block, plus the root (embeddings,
    norm, head). The mesh is explicit because fully_shard's default is CUDA whenever a GPU exists."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def batch(step: int, size: int, length: int = 32, vocab: int = 128) -> torch.Tensor:
    """Sequences where each next token is (5 * token + 3) mod vocab, from seeded random starts."""
    generator = torch.Generator().manual_seed(1000 + step)
    tokens = torch.empty(size, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (size,), generator=generator)
    for position in range(1, length):
        tokens[:, position] = (5 * tokens[:, position - 1] + 3) % vocab
    return tokens


def train(
    model: nn.Module,
    steps: int,
    global_batch: int = 8,
    lr: float = 3e-3,
    rank: int = 0,
    world: int = 1,
    device: torch.device | str = "cpu",
    log: bool = False,
) -> tuple[list[float], list[float]]:
    """Train the trainable parameters; each process takes its slice of the global batch.

    Returns the global mean loss and the wall time of every step.
    """
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} does not split over {world} processes")
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    share = global_batch // world
    losses, times = [], []
    for step in range(steps):
        start = time.perf_counter()
        tokens = batch(step, global_batch)[rank * share : (rank + 1) * share].to(device)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        reported = loss.detach().clone()
        if world > 1:
            dist.all_reduce(reported)
            reported /= world
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(reported.item())
        if log and rank == 0:
            print(f"step {step:3d}  loss {losses[-1]:.4f}  {times[-1] * 1e3:7.1f} ms")
    return losses, times


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="global batch (split over processes)")
    parser.add_argument("--dim", type=int, default=128, help="model width (the GPU comparison uses 2048)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--no-quant", action="store_true", help="baseline: frozen weights stay unquantized")
    parser.add_argument(
        "--quant-storage",
        default="bfloat16",
        choices=["uint8", "bfloat16", "float16", "float32"],
        help="dtype the packed bytes are stored as (bfloat16 by default: FSDP2 before torch 2.13 shards no uint8)",
    )
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bf16 on GPU")
    args = parser.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    model = build_model(
        not args.no_quant, getattr(torch, args.quant_storage), device, dtype, dim=args.dim, layers=args.layers
    )
    if world > 1:
        shard(model, device)
    kind = "bf16 baseline" if args.no_quant else f"NF4 (quant_storage={args.quant_storage})"
    if rank == 0:
        print(f"{kind}, {dtype}, {world} process(es) on {device.type}, global batch {args.batch}")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = train(model, args.steps, args.batch, rank=rank, world=world, device=device, log=True)
    peaks = [torch.cuda.max_memory_allocated(device) / 2**20 if cuda else 0.0]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, peaks[0])
        peaks = gathered
    if rank == 0:
        steady = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
        memory = f"; peak memory per GPU {', '.join(f'{p:.1f}' for p in peaks)} MiB" if cuda else ""
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; median step {steady * 1e3:.1f} ms{memory}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
