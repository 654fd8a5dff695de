"""QLoRA training steps: LoRA on a bf16 base vs on bitsandbytes NF4 vs on fourbit NF4, in one run.

    python benchmarks/bench_train.py --device cuda --layers 8      # Llama-3-8B-shaped layers
    python benchmarks/bench_train.py --device cpu                  # hidden 1024, 4 layers

The model is ``bench_generate``'s: transformers' ``LlamaForCausalLM`` with random weights, its
decoder projections made ``Linear4bit`` (NF4, nested statistics, bf16 compute) the way users
write it. peft then adds LoRA adapters (rank 16) to every projection, as a QLoRA recipe does
(``fourbit.integrations.peft.get_peft_model`` for fourbit, ``peft.get_peft_model`` otherwise).
A step is the forward of a causal-LM loss over ``--batch`` sequences of ``--sequence`` random
tokens, its backward (through the frozen 4-bit weights to the adapters) and an AdamW update of
the adapters. Eager, as trainers run by default; ``--gradient-checkpointing`` recomputes each
layer's forward in the backward, as memory-bound QLoRA runs do; ``--compile`` compiles the
model (``torch.compile``'s default mode: no CUDA graph, so each 4-bit product and each decode of
the backward goes through the ops' entries).

Each library runs in a process of its own when several are named. Prints the median step time,
tokens/s and (on a GPU) the peak memory of the steps, with the ratios of fourbit to bf16 and to
bitsandbytes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_generate import add_model_arguments, library_model, model_settings, ratio_text, run_isolated

#: The projections a QLoRA recipe adapts: all of them.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapted_model(name: str, args, device: torch.device, layers: int, shapes: dict):
    """The library's model with LoRA adapters on every projection, in training mode; None when
    the library cannot be imported."""
    from peft import LoraConfig

    model = library_model(name, layers, device, shapes)
    if model is None:
        return None
    config = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS, use_dora=args.dora
    )
    if name == "fourbit":
        from fourbit.integrations.peft import get_peft_model
    else:
        from peft import get_peft_model
    model = get_peft_model(model, config)
    model = model.to(device)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if args.compile:
        model.compile()
    return model.train()


def run_library(name: str, args, device: torch.device, layers: int, shapes: dict, modes: list) -> dict:
    """Median step time and peak memory at each batch: {"results": {("train", batch): (tokens/s,
    peak GiB, ms per step)}, "memory": GiB after loading}, or {} without the library."""
    cuda = device.type == "cuda"
    model = adapted_model(name, args, device, layers, shapes)
    if model is None:
        return {}
    memory = torch.cuda.memory_allocated(device) / 2**30 if cuda else float("nan")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    results = {}
    for batch in args.batches:
        torch.manual_seed(1)
        tokens = torch.randint(1, model.config.vocab_size, (batch, args.sequence), device=device)

        def step(tokens: torch.Tensor = tokens) -> float:
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(device)
            return time.perf_counter() - start

        try:
            for _ in range(args.warmup):
                step()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            seconds = statistics.median(step() for _ in range(args.repeats))
        except Exception as error:
            print(f"{name} batch {batch} failed: {type(error).__name__}: {str(error)[:300]}")
            continue
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
        results[("train", batch)] = (batch * args.sequence / seconds, peak, seconds * 1e3)
        line = (
            f"{name:13s} batch {batch:3d}: {seconds * 1e3:8.1f} ms a step, {results[('train', batch)][0]:9.1f} tokens/s"
        )
        print(line + (f", peak {peak:.2f} GiB" if cuda else ""), flush=True)
    return {"results": results, "memory": memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="sequences a step (default 1 4)")
    parser.add_argument("--sequence", type=int, help="tokens a sequence (default 512 on a GPU, 128 on the CPU)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--dora", action="store_true", help="DoRA adapters (peft's use_dora) instead of LoRA")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (default mode)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device, layers, shapes = model_settings(args)
    cuda = device.type == "cuda"
    args.batches = args.batches or [1, 4]
    args.sequence = args.sequence or (512 if cuda else 128)
    results = run_isolated(__file__, args, run_library, device, layers, shapes, ["train"])
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    settings = (", DoRA" if args.dora else "") + (", gradient checkpointing" if args.gradient_checkpointing else "")
    settings += ", compiled" if args.compile else ""
    settings += f", median of {args.rounds} rounds" if args.rounds > 1 else ""
    print(f"\n# QLoRA training step: {layers} layers, adapters of rank {args.rank} on every projection, "
          f"{args.sequence} tokens a sequence{settings}; {where}, torch {torch.__version__}\n")  # fmt: skip
    print("| batch | bf16 ms | bnb ms | fourbit ms | fourbit tok/s | fourbit/bf16 time | fourbit/bnb time | "
          "peak GiB bf16 / bnb / fourbit |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for batch in args.batches:
        cells = [results.get((name, "train", batch)) for name in ("bf16", "bitsandbytes", "fourbit")]
        times = [f"{cell[2]:.1f}" if cell else "-" for cell in cells]
        speed = f"{cells[2][0]:.0f}" if cells[2] else "-"
        peaks = " / ".join(f"{cell[1]:.2f}" if cell and cell[1] == cell[1] else "-" for cell in cells)  # nan: CPU
        fourbit = ("fourbit", "train", batch)
        over = [ratio_text(args, results, fourbit, (name, "train", batch), 2) for name in ("bf16", "bitsandbytes")]
        print(f"| {batch} | {' | '.join(times)} | {speed} | {' | '.join(over)} | {peaks} |")


if __name__ == "__main__":
    main()
