"""Host time of one compiled decode-step call before any kernel runs: dynamo's guards and the graph's inputs.

    python benchmarks/profile_compiled_call.py --device cpu --layers 8 32
    python benchmarks/profile_compiled_call.py --device cuda --layers 8 --libraries bf16 fourbit

transformers' compiled ``generate`` calls its compiled one-token step once a token; before the
step's kernels run, dynamo checks the guards of what the trace read from Python objects and
gathers the graph's inputs (parameters, buffers, fourbit's statistics buffers). That host time is
paid every token by every library, and fourbit's layers read more than ``nn.Linear`` does. This
compiles ``bench_generate.py``'s Llama step (static cache, one token) with a backend that runs
the traced graph once and then returns its first outputs, so a call costs only dynamo's side:
timed with the guards, and again with every guard dropped (``guard_filter_fn``), the difference
being the guard check. Prints us a call (quickest of ``--rounds`` bursts), the graph's inputs and
the guard tree's lines, per library and layer count.
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_generate import CPU_SHAPES, GPU_SHAPES, library_model
from lean_loop import sync


def compiled_step(model, guards: bool = True):
    """``model``'s one-token step compiled with a backend that runs the graph only while
    compiling, and what it saw: {"inputs": the graph's inputs}."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=64)
    seen: dict[str, int] = {}

    def backend(graph: torch.fx.GraphModule, example: list):
        seen["inputs"] = len(example)
        out = graph(*example)
        return lambda *arguments: out

    def step(token: torch.Tensor, position: torch.Tensor):
        return model(token, past_key_values=cache, cache_position=position, use_cache=True, logits_to_keep=1).logits

    options = None if guards else {"guard_filter_fn": lambda entries: [False] * len(entries)}
    return torch.compile(step, backend=backend, fullgraph=True, options=options), step, seen


def guard_lines(step) -> int:
    """Lines of the guard tree of ``step``'s first compiled entry (0 where torch cannot show it)."""
    entries = torch._C._dynamo.eval_frame._debug_get_cache_entry_list(step.__code__)
    try:
        return str(entries[0].guard_manager).count("\n")
    except (AttributeError, IndexError, RuntimeError):
        return 0


def call_us(compiled, device: torch.device, calls: int, rounds: int) -> float:
    """us a call of ``compiled`` on a one-token batch: the quickest of ``rounds`` bursts."""
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    position = torch.zeros(1, dtype=torch.long, device=device)
    best = float("inf")
    with torch.no_grad():
        compiled(token, position)  # compiles
        for _ in range(rounds):
            sync(device)
            start = time.perf_counter()
            for _ in range(calls):
                compiled(token, position)
            best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, nargs="+", default=[8])
    parser.add_argument("--libraries", nargs="+", default=["bf16", "fourbit"])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (the host's work is serial)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    print(f"# one compiled decode-step call, host us (no kernels): {device}, torch {torch.__version__}\n")
    print("| layers | library | with guards | without guards | guard check | graph inputs | guard lines |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for layers in args.layers:
        for name in args.libraries:
            model = library_model(name, layers, device, shapes)
            if model is None:
                continue
            torch._dynamo.reset()
            compiled, step, seen = compiled_step(model)
            guarded = call_us(compiled, device, args.calls, args.rounds)
            lines, inputs = guard_lines(step), seen["inputs"]
            torch._dynamo.reset()
            compiled, step, seen = compiled_step(model, guards=False)
            bare = call_us(compiled, device, args.calls, args.rounds)
            cells = f"{guarded:.1f} | {bare:.1f} | {guarded - bare:.1f} | {inputs} | {lines}"
            print(f"| {layers} | {name} | {cells} |", flush=True)
            del model, compiled, step


if __name__ == "__main__":
    main()
