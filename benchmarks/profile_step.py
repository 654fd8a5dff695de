"""Host time of each linear call inside eager decode steps: bf16, bitsandbytes and fourbit.

    python benchmarks/profile_step.py --device cuda --layers 8 --batches 1 8
    python benchmarks/profile_step.py --device cpu                 # hidden 1024, 4 layers

``profile_host.py`` times one layer's calls back to back, which keeps its code and data in the
host's caches; a model's decode step runs each projection once between attention, norms and
transformers' own Python, so every call starts cold. This times the calls where users make
them: ``bench_generate.py``'s Llama model (every projection of the decoder layers a
``Linear4bit``, or ``nn.Linear`` for bf16), a prefill, then ``--steps`` eager one-token steps
with transformers' dynamic cache. A wrapper around each projection's ``forward`` sums its host
time (the wrapper's own cost, under a microsecond, is the same for every library). All models
live in one process and take turns for ``--rounds`` rounds; each keeps its quickest round.
Prints us a projection call, and a step's host and wall time (the step's host time is taken
before synchronizing), with fourbit's ratios to bf16 and to bitsandbytes.
"""

from __future__ import annotations

import argparse
import inspect
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from bench_generate import add_model_arguments, library_model, model_settings
from lean_loop import sync
from torch import nn


@contextmanager
def timed_projections(model: nn.Module) -> Iterator[list]:
    """Within the block, every ``nn.Linear`` (``Linear4bit`` included) of the decoder layers adds
    its calls' host seconds and count to the yielded ``[seconds, calls]``."""
    total = [0.0, 0]
    patched = [module for module in model.model.layers.modules() if isinstance(module, nn.Linear)]
    for module in patched:

        def timed(x: torch.Tensor, _forward=module.forward) -> torch.Tensor:
            start = time.perf_counter()
            out = _forward(x)
            total[0] += time.perf_counter() - start
            total[1] += 1
            return out

        module.forward = timed  # an instance attribute: nn.Module.__call__ finds it first
    try:
        yield total
    finally:
        for module in patched:
            del module.forward


def _cache_keyword(model: nn.Module) -> str:
    """The keyword the model's forward takes its KV cache by (transformers renamed it)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def decode_steps(
    model: nn.Module, batch: int, prompt: int, steps: int, device: torch.device
) -> tuple[float, float, float]:
    """(us a projection call during the decode steps, ms of host time a step, ms of wall time a
    step) over ``steps`` greedy one-token steps after a prefill of ``prompt`` tokens."""
    from transformers import DynamicCache

    torch.manual_seed(1)
    tokens = torch.randint(1, model.config.vocab_size, (batch, prompt), device=device)
    keyword = _cache_keyword(model)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        token = model(tokens, use_cache=True, **{keyword: cache}).logits[:, -1:].argmax(-1)
        sync(device)
        host = wall = 0.0
        with timed_projections(model) as projections:
            for _ in range(steps):
                start = time.perf_counter()
                logits = model(token, use_cache=True, **{keyword: cache}).logits
                issued = time.perf_counter()
                sync(device)
                host += issued - start
                wall += time.perf_counter() - start
                token = logits[:, -1:].argmax(-1)
    seconds, calls = projections
    return 1e6 * seconds / max(calls, 1), 1e3 * host / steps, 1e3 * wall / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--steps", type=int, default=64, help="decode steps a round")
    args = parser.parse_args()
    device, layers, shapes = model_settings(args)
    models = {name: library_model(name, layers, device, shapes) for name in args.libraries}
    models = {name: model for name, model in models.items() if model is not None}
    for model in models.values():  # warm-up: compiles, tunes and allocates what the rounds reuse
        for batch in args.batches:
            decode_steps(model, batch, args.prompt, 2, device)
    best: dict[tuple[str, int], tuple[float, float, float]] = {}
    for _ in range(args.rounds):
        for batch in args.batches:
            for name, model in models.items():
                cell = decode_steps(model, batch, args.prompt, args.steps, device)
                best[(name, batch)] = min(best.get((name, batch), cell), cell)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n# host time of the projections in eager decode steps: {layers} layers, {shapes}, prompt {args.prompt}, "
          f"{args.steps} steps, quickest of {args.rounds} rounds; {where}, torch {torch.__version__}\n")  # fmt: skip
    print("| library | batch | us a projection call | ms a step, host | ms a step, wall | call vs bf16 | call vs bnb |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for batch in args.batches:
        for name in models:
            call, host, wall = best[(name, batch)]
            ratios = [
                f"{call / best[(other, batch)][0]:.2f}x" if (other, batch) in best and other != name else "-"
                for other in ("bf16", "bitsandbytes")
            ]
            print(f"| {name} | {batch} | {call:.1f} | {host:.2f} | {wall:.2f} | {' | '.join(ratios)} |")


if __name__ == "__main__":
    main()
