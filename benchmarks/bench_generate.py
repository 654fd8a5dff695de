"""End-to-end generation: bf16 vs bitsandbytes NF4 vs fourbit NF4, side by side in one run.

    python benchmarks/bench_generate.py --device cuda --layers 8      # Llama-3-8B-shaped layers
    python benchmarks/bench_generate.py --device cpu                  # hidden 1024, 4 layers

The model is transformers' ``LlamaForCausalLM`` with random weights (nothing is downloaded).
Every projection of the decoder layers becomes a ``Linear4bit`` the way users write it:
``Params4bit(weight, ...)`` assigned to the layer's weight, then ``.to(device)``. Modes:

- ``eager``: greedy ``generate`` with the default dynamic cache;
- ``compiled``: greedy ``generate`` with ``cache_implementation="static"``, which transformers
  compiles itself (``torch.compile``, CUDA graphs on a GPU); with ``--skip-module-guards``, through
  a ``CompileConfig`` whose guard filter is torch's ``skip_guard_on_all_nn_modules_unsafe``
  (docs/transformers.md, "Compiled generation");
- ``lean``: a gpt-fast style loop (``lean_loop.py``): static cache, eager prefill (compiled with
  ``--compile-prefill``, gpt-fast's ``--compile_prefill``), then the one-token step under
  ``torch.compile`` replayed as one CUDA graph (GPU only), showing what the kernels allow once
  the host is out of the way.

Libraries: ``bf16``, ``bitsandbytes``, ``fourbit``, and ``fourbit-grouped`` (fourbit's model with
sibling 4-bit products grouped in the compiled and lean modes: ``fourbit.compile_options``).

Each library runs in a process of its own when several are named; ``--rounds N`` runs those
processes N times, taking turns, and reports each cell's median round with the range of the
rounds' own ratios (a process's speed can move by 20% from one to the next). Prints tokens/s
(new tokens over the whole ``generate`` time, prefill included) and, on a GPU,
the peak memory during generation, with the ratios of fourbit to bf16 and to bitsandbytes; then
each model's memory after loading (on the CPU: the bytes of its tensors and 4-bit statistics).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from lean_loop import run_lean
from lean_loop import sync as _sync
from torch import nn

#: Llama-3-8B's shapes; --device cpu uses CPU_SHAPES instead.
GPU_SHAPES = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                  vocab_size=128256)  # fmt: skip
CPU_SHAPES = dict(hidden_size=1024, intermediate_size=3584, num_attention_heads=16, num_key_value_heads=4,
                  vocab_size=32000)  # fmt: skip


def build_model(layers: int, device: torch.device, shapes: dict, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=4096, rope_theta=500000.0,
                         torch_dtype=dtype, **shapes)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.generation_config.pad_token_id = 0
    return model.eval()


def quantize(model: nn.Module, library, dtype: torch.dtype, device: torch.device, lm_head: bool = False) -> None:
    """Every ``nn.Linear`` of the decoder layers becomes ``library.nn.Linear4bit`` (NF4, nested);
    with ``lm_head``, the output projection too, as gpt-fast and torchao quantize it (transformers'
    quantization configs keep it in 16 bits)."""
    targets = [(f"model.layers.{name}", module) for name, module in model.model.layers.named_modules()
               if isinstance(module, nn.Linear)]  # fmt: skip
    if lm_head:
        targets.append(("lm_head", model.lm_head))
    for name, linear in targets:
        layer = library.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=dtype, quant_type="nf4", compress_statistics=True,
                                      device="meta")  # fmt: skip
        layer.weight = library.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, blocksize=64)  # fmt: skip
        if linear.bias is not None:
            layer.bias = linear.bias
        layer = layer.to(device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
        del linear
    gc.collect()


#: The package each library name quantizes with.
LIBRARY_MODULES = {"bitsandbytes": "bitsandbytes", "fourbit": "fourbit", "fourbit-grouped": "fourbit"}
#: The table's columns, in order (those measured).
LIBRARIES = ("bf16", "bitsandbytes", "fourbit", "fourbit-grouped")


def library_model(name: str, layers: int, device: torch.device, shapes: dict, lm_head: bool = False):
    """The bf16 model, its projections quantized by library ``name`` unless it is "bf16"
    (``quantize``); None, with a line saying why, when the library cannot be imported."""
    library = None
    if name != "bf16":
        try:
            library = importlib.import_module(LIBRARY_MODULES[name])
        except Exception as error:  # bitsandbytes absent, or without a native library here
            print(f"skipping {name}: {error}")
            return None
    model = build_model(layers, device, shapes, torch.bfloat16)
    if library is not None:
        quantize(model, library, torch.bfloat16, device, lm_head=lm_head)
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers and of its 4-bit weights' statistics (what
    ``memory_allocated`` would count; the CPU has no allocator statistics)."""

    def state_bytes(state) -> int:
        if state is None:
            return 0
        tensors = [value for value in vars(state).values() if isinstance(value, torch.Tensor)]
        return sum(t.nbytes for t in tensors) + state_bytes(getattr(state, "state2", None))

    total = sum(t.nbytes for t in model.parameters()) + sum(t.nbytes for t in model.buffers())
    return total + sum(
        state_bytes(getattr(m.weight, "quant_state", None)) for m in model.modules() if hasattr(m, "weight")
    )


def run_generate(
    model, prompt: torch.Tensor, new_tokens: int, device: torch.device, **options
) -> tuple[float, list, float]:
    """Seconds for one greedy ``generate`` of ``new_tokens`` tokens, the tokens, and NaN (its
    decode steps are not timed apart from its prefill)."""
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             **options)  # fmt: skip
    _sync(device)
    return time.perf_counter() - start, out[:, prompt.shape[1] :].tolist(), float("nan")


def forced_agreement(model, batch: int, args, device: torch.device, reference: list) -> float:
    """The share of the lean loop's predictions that equal ``reference``'s tokens when every step
    is given the reference's previous token: near 1 unless the loop computes something else
    (free-running greedy tokens of a random model part ways at the first near-tie)."""
    torch.manual_seed(1)
    prompt = torch.randint(1, model.config.vocab_size, (batch, args.prompt), device=device)
    _, predicted, _ = run_lean(model, prompt, args.new_tokens, device, forced=reference,
                               compile_prefill=args.compile_prefill)  # fmt: skip
    return (torch.tensor(predicted) == torch.tensor(reference)).float().mean().item()


def measure(
    model, mode: str, batch: int, args, device: torch.device, grouped: bool = False
) -> tuple[float, float, float, list]:
    """(tokens/s, peak GiB during generation, ms a decode step or NaN, tokens) for one mode and
    batch, after warm-up runs: the fastest of the repeats. ``grouped``: sibling 4-bit products
    grouped in the compiled and lean modes."""
    torch.manual_seed(1)
    prompt = torch.randint(1, model.config.vocab_size, (batch, args.prompt), device=device)
    if mode == "lean":
        grouping = _grouping_options() if grouped else None
        runner = lambda: run_lean(  # noqa: E731
            model, prompt, args.new_tokens, device, options=grouping, compile_prefill=args.compile_prefill
        )
    else:
        options = {"cache_implementation": "static"} if mode == "compiled" else {}
        if mode == "compiled" and (args.skip_module_guards or grouped):
            options["compile_config"] = _compile_config(args, grouped)
        runner = lambda: run_generate(model, prompt, args.new_tokens, device, **options)  # noqa: E731
    for _ in range(args.warmup):
        runner()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, tokens, step = min((runner() for _ in range(args.repeats)), key=lambda result: result[0])
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return batch * args.new_tokens / seconds, peak, 1e3 * step, tokens


def _compile_config(args, grouped: bool):
    """transformers' default compile settings (``mode="reduce-overhead"``, spelled as the option it
    sets: torch.compile takes a mode or options) with module guards skipped and (or) 4-bit
    products grouped."""
    from transformers import CompileConfig

    options = {"triton.cudagraphs": True}
    if args.skip_module_guards:
        options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    if grouped:
        options.update(_grouping_options())
    return CompileConfig(mode=None, options=options)


def _grouping_options() -> dict:
    """torch.compile options that group sibling 4-bit products (``fourbit.compile_options``)."""
    from fourbit import compile_options

    return compile_options()


def run_library(name: str, args, device: torch.device, layers: int, shapes: dict, modes: list) -> dict:
    """Every mode and batch for one library's model: {"results": {(mode, batch): (tokens/s, peak
    GiB, ms a decode step or NaN)}, "memory": GiB after loading}, or {} when the library cannot be
    imported."""
    cuda = device.type == "cuda"
    model = library_model(name, layers, device, shapes, lm_head=args.quantize_lm_head)
    if model is None:
        return {}
    _sync(device)
    memory = (torch.cuda.memory_allocated(device) if cuda else model_bytes(model)) / 2**30
    results = {}
    first_tokens: dict[int, list] = {}  # per batch, the tokens of the first mode that ran
    for mode in modes:
        for batch in args.batches:
            try:
                grouped = args.group_products or name == "fourbit-grouped"
                tokens_per_s, peak, step, tokens = measure(model, mode, batch, args, device, grouped)
            except Exception as error:
                print(f"{name} {mode} batch {batch} failed: {type(error).__name__}: {str(error)[:300]}")
                continue
            results[(mode, batch)] = (tokens_per_s, peak, step)
            reference = first_tokens.setdefault(batch, tokens)
            same = (torch.tensor(tokens) == torch.tensor(reference)).float().mean().item()
            line = f"{name:13s} {mode:9s} batch {batch:3d}: {tokens_per_s:9.1f} tokens/s, "
            line += f"peak {peak:.2f} GiB, " if cuda else ""
            line += f"{same:.0%} of tokens as in {modes[0]}"
            if mode == "lean" and reference is not tokens:
                line += f" ({forced_agreement(model, batch, args, device, reference):.0%} teacher-forced)"
            print(line, flush=True)
    return {"results": results, "memory": memory}


def run_isolated(script: str, args, run_library, device: torch.device, layers: int, shapes: dict, modes: list) -> dict:
    """Each of ``args.libraries`` measured by ``run_library`` (which returns {"results": {(mode,
    batch): cell}, "memory": GiB}), as {(library, mode, batch): cell}, with each library's memory
    in ``args.memory``. When several are named, or ``args.rounds`` is above 1, each runs in a
    fresh Python process (``script`` given that one library and ``--result-file``): a library
    measured after another in one process inherits its compiled graphs, caches and allocator
    state, which measurably slowed whichever ran later. The libraries take turns for
    ``args.rounds`` rounds; each key's cell is its median round (by the cell's first field) and
    ``args.rounds_results`` keeps every round's cells. In a child process, this writes the
    library's cells to the result file and exits."""
    if args.result_file:
        measured = run_library(args.libraries[0], args, device, layers, shapes, modes)
        cells = [[mode, batch, *cell] for (mode, batch), cell in measured.get("results", {}).items()]
        with open(args.result_file, "w") as file:
            json.dump({"results": cells, "memory": measured["memory"]} if measured else {}, file)
        sys.exit(0)
    rounds = getattr(args, "rounds", 1)
    per_round: dict[tuple[str, str, int], list[tuple]] = {}
    args.memory = {}
    for _ in range(rounds):
        for name in args.libraries:
            if len(args.libraries) == 1 and rounds == 1:
                measured = run_library(name, args, device, layers, shapes, modes)
            else:
                measured = _run_child(script, name)
            if measured:
                for key, cell in measured["results"].items():
                    per_round.setdefault((name, *key), []).append(cell)
                args.memory[name] = measured["memory"]
    args.rounds_results = per_round
    return {key: median_cell(cells) for key, cells in per_round.items()}


def median_cell(cells: list[tuple]) -> tuple:
    """The cell of the median round by its first field (the lower middle one of an even count): a
    measured cell, not a mix of rounds."""
    return sorted(cells, key=lambda cell: cell[0])[(len(cells) - 1) // 2]


def ratio_text(args, results: dict, a: tuple, b: tuple, field: int = 0) -> str:
    """Field ``field`` of cell ``a`` over cell ``b`` (keys of ``results``), of their median
    rounds; with several rounds, followed by the range of the ratios within each round (the two
    ran one after the other there)."""
    if a not in results or b not in results:
        return "-"
    text = f"{results[a][field] / results[b][field]:.2f}x"
    rounds_a, rounds_b = args.rounds_results[a], args.rounds_results[b]
    if len(rounds_a) > 1 and len(rounds_a) == len(rounds_b):
        ratios = [x[field] / y[field] for x, y in zip(rounds_a, rounds_b, strict=True)]
        text += f" ({min(ratios):.2f}-{max(ratios):.2f}, median {statistics.median(ratios):.2f})"
    return text


def _run_child(script: str, name: str) -> dict:
    """``script`` with this process's arguments, for library ``name`` alone, in a new process."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "result.json")
        command = [sys.executable, os.path.abspath(script), *sys.argv[1:], "--libraries", name, "--result-file", path]
        subprocess.run(command, check=True)
        with open(path) as file:
            saved = json.load(file)
    if not saved:
        return {}
    return {
        "results": {(mode, int(batch)): tuple(cell) for mode, batch, *cell in saved["results"]},
        "memory": saved["memory"],
    }


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every end-to-end benchmark of the Llama model takes."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, help="decoder layers (default 8 on a GPU, 4 on the CPU)")
    parser.add_argument("--libraries", nargs="+", default=["bf16", "bitsandbytes", "fourbit"])
    parser.add_argument("--threads", type=int, help="torch.set_num_threads on the CPU")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run each library's process this many times, taking turns; report the median round",
    )
    parser.add_argument("--result-file", help=argparse.SUPPRESS)  # one library, run by run_isolated


def model_settings(args) -> tuple[torch.device, int, dict]:
    """(device, decoder layers, model shapes) from ``add_model_arguments``' options; sets the
    CPU threads."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    return device, args.layers or (8 if cuda else 4), GPU_SHAPES if cuda else CPU_SHAPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--modes", nargs="+", default=None, choices=["eager", "compiled", "lean"])
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--quantize-lm-head",
        action="store_true",
        help="quantize the output projection too (gpt-fast and torchao do; transformers does not)",
    )
    parser.add_argument(
        "--group-products",
        action="store_true",
        help="compiled and lean modes: group sibling 4-bit products (fourbit.compile_options)",
    )
    parser.add_argument(
        "--compile-prefill",
        action="store_true",
        help="lean mode: compile the prefill too (gpt-fast's --compile_prefill; no CUDA graph)",
    )
    parser.add_argument(
        "--skip-module-guards",
        action="store_true",
        help="compiled mode: skip dynamo's guards on modules (a model that does not change)",
    )
    args = parser.parse_args()
    device, layers, shapes = model_settings(args)
    cuda = device.type == "cuda"
    modes = args.modes or (["eager", "compiled", "lean"] if cuda else ["eager"])
    results = run_isolated(__file__, args, run_library, device, layers, shapes, modes)
    memory = args.memory
    where = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    head = "4-bit lm_head" if args.quantize_lm_head else "bf16 lm_head"
    head += ", module guards skipped" if args.skip_module_guards else ""
    head += ", 4-bit products grouped" if args.group_products else ""
    head += ", lean prefill compiled" if args.compile_prefill and "lean" in modes else ""
    head += f", median of {args.rounds} rounds" if args.rounds > 1 else ""
    print(f"\n# generate: {layers} layers, {head}, {shapes}, prompt {args.prompt}, {args.new_tokens} new tokens; "
          f"{where}, torch {torch.__version__}\n")  # fmt: skip
    names = table_libraries(results)
    ratios = [("fourbit", "bf16"), ("fourbit", "bitsandbytes")]
    ratios += [("fourbit-grouped", "bf16"), ("fourbit-grouped", "fourbit")] if "fourbit-grouped" in names else []
    print(f"| mode | batch | {' | '.join(f'{SHORT[name]} tok/s' for name in names)} | "
          f"{' | '.join(f'{SHORT[a]}/{SHORT[b]}' for a, b in ratios)} | "
          f"peak GiB {' / '.join(SHORT[name] for name in names)} |")  # fmt: skip
    print(f"|---|---:|{'---:|' * (len(names) + len(ratios))}---|")
    for mode in modes:
        for batch in args.batches:
            cells = [results.get((name, mode, batch)) for name in names]
            speed = [f"{cell[0]:.1f}" if cell else "-" for cell in cells]
            peaks = " / ".join(f"{cell[1]:.2f}" if cell and cell[1] == cell[1] else "-" for cell in cells)  # nan: CPU
            over = [ratio_text(args, results, (a, mode, batch), (b, mode, batch)) for a, b in ratios]
            print(f"| {mode} | {batch} | {' | '.join(speed)} | {' | '.join(over)} | {peaks} |")
    print("\nmodel memory after loading, GiB: " + ", ".join(f"{k} {v:.2f}" for k, v in memory.items()))
    if "lean" in modes:
        print_lean_steps(args, results, names)
    if "compiled" in modes and "lean" in modes:
        print_step_split(results, args.batches, names)


#: Column names.
SHORT = {"bf16": "bf16", "bitsandbytes": "bnb", "fourbit": "fourbit", "fourbit-grouped": "grouped"}


def table_libraries(results: dict) -> list[str]:
    """The table's libraries: bf16, bitsandbytes and fourbit always (a dash where not measured),
    and fourbit-grouped where measured."""
    return [name for name in LIBRARIES if name != "fourbit-grouped" or any(key[0] == name for key in results)]


def print_lean_steps(args, results: dict, names: list[str]) -> None:
    """The lean loop's decode steps alone, ms a step: its tokens/s above include the eager prefill,
    which is bound by host time; the steps replay one CUDA graph each, so they show the GPU work."""
    fast = names[2:]
    print(f"\nlean loop, ms a decode step (prefill excluded): {' / '.join(SHORT[name] for name in names)}, "
          f"the speed over bf16's of {' and '.join(SHORT[name] for name in fast)}")  # fmt: skip
    for batch in args.batches:
        cells = [results.get((name, "lean", batch)) for name in names]
        steps = " / ".join(f"{cell[2]:.3f}" if cell else "-" for cell in cells)
        ratio = ", ".join(ratio_text(args, results, ("bf16", "lean", batch), (name, "lean", batch), 2) for name in fast)
        print(f"  batch {batch}: {steps}, {ratio}")


def print_step_split(results: dict, batches: list, names: list[str]) -> None:
    """ms a step in transformers' compiled loop and in the lean loop, and their difference: the
    lean loop replays one CUDA graph a token, so the difference is the host time that transformers'
    loop (which reads a result back every token) and dynamo's guard check add to each step."""
    print("\nms a step: compiled / lean / compiled minus lean (host time per token in transformers' loop)")
    for name in names:
        for batch in batches:
            compiled, lean = results.get((name, "compiled", batch)), results.get((name, "lean", batch))
            if compiled and lean:
                step, replay = 1e3 * batch / compiled[0], 1e3 * batch / lean[0]
                print(f"  {name}, batch {batch}: {step:.2f} / {replay:.2f} / {step - replay:.2f}")


if __name__ == "__main__":
    main()
