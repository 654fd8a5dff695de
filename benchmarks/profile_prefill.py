"""Where a compiled prefill's time goes: bf16 against fourbit, one process each library in turn.

    python benchmarks/profile_prefill.py --device cuda --layers 8 --batch 8 --libraries bf16 fourbit
    python benchmarks/profile_prefill.py --device cpu --layers 1 --batch 1 --prompt 4

The model is ``bench_generate.py``'s (transformers' Llama, random weights, the same quantization).
Its prefill is compiled as the lean loop's ``--compile-prefill`` compiles it (static cache, the
last position's logits, ``torch.compile(fullgraph=True, dynamic=False)``, no CUDA graph, so each
4-bit product calls the op's entry), then timed, eagerly too, and with ``--eager-first`` timed
again after eager ones. Prints ``torch.profiler``'s operators by self CPU and self device time for
one compiled prefill of each library, then a table: the times (ms, quickest and median), the
garbage collector's share, and the ``PreparedWeight`` objects one compiled prefill builds (0 when
the op's entry finds every launch it keeps). ``--op-calls`` times the 4-bit op's calls inside the
compiled prefill against the same calls replayed back to back.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import statistics
import threading
import time

import torch
from bench_generate import _grouping_options, _sync, add_model_arguments, library_model, model_settings


class CollectorTime:
    """The time Python's cyclic garbage collector spends while active (``gc.callbacks``), and
    its collections per generation: a process with more live objects pays more per collection."""

    def __init__(self) -> None:
        self.seconds, self.collections, self._start, self.active = 0.0, [0, 0, 0], 0.0, False
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if not self.active:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start
            self.collections[info["generation"]] += 1

    def close(self) -> None:
        gc.callbacks.remove(self._callback)


def timed_ms(fn, repeats: int, device: torch.device, reset) -> list[tuple[float, float, float, float]]:
    """Milliseconds of each of ``repeats`` calls of ``fn``, ``reset()`` before each: until it
    returns (host), until the device is done (wall), the process's CPU time over that wall
    time (above 1: other threads of the process were busy meanwhile), and the milliseconds the
    garbage collector took during the call."""
    times = []
    collector = CollectorTime()
    try:
        for _ in range(repeats):
            reset()
            _sync(device)
            collector.seconds = 0.0
            cpu, start = time.process_time(), time.perf_counter()
            collector.active = True
            fn()
            host = time.perf_counter()
            collector.active = False
            _sync(device)
            wall = time.perf_counter() - start
            busy = (time.process_time() - cpu) / wall
            times.append((1e3 * (host - start), 1e3 * wall, busy, 1e3 * collector.seconds))
    finally:
        collector.close()
    return times


def prepared_weights_built(fn) -> int:
    """How many Triton ``PreparedWeight`` objects one call of ``fn`` builds (0 without Triton)."""
    try:
        from fourbit.kernels.triton import PreparedWeight
    except ImportError:
        return 0
    built = []
    original = PreparedWeight.__init__

    def counted(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    PreparedWeight.__init__ = counted
    try:
        fn()
    finally:
        PreparedWeight.__init__ = original
    return len(built)


def python_profile(fn, repeats: int, device: torch.device, reset, top: int) -> str:
    """cProfile's ``top`` functions by own and by cumulative time over ``repeats`` calls of ``fn``: unlike
    ``torch.profiler``, it leaves Triton's launch hooks unset, so the op's entry launches as it
    does untraced."""
    profiler = cProfile.Profile()
    for _ in range(repeats):
        reset()
        _sync(device)
        profiler.enable()
        fn()
        _sync(device)
        profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    for order in ("tottime", "cumulative"):
        stats.sort_stats(order).print_stats(top)
    return text.getvalue()


def op_call_times(fn, repeats: int, reset) -> str:
    """Host microseconds a ``fourbit::linear_4bit`` call takes inside ``fn``: in the op's backend
    kernel, and from the weight's ``__torch_function__`` where the compiled graph goes through it;
    then the same calls replayed back to back through the op. A gap means the calls cost more amid
    the model's other work than alone."""
    from fourbit import ops_autograd
    from fourbit.nn import Params4bit

    op = torch.ops.fourbit.linear_4bit.default
    original = Params4bit.__dict__["__torch_function__"]
    kernels = dict(ops_autograd._direct_kernels)
    outer: list[float] = []
    inner: list[float] = []
    calls: list[tuple] = []

    @classmethod
    def timed_function(cls, func, types, args=(), kwargs=None):
        if func is not op:
            return original.__func__(cls, func, types, args, kwargs)
        start = time.perf_counter()
        result = original.__func__(cls, func, types, args, kwargs)
        outer.append(time.perf_counter() - start)
        return result

    def timed(kernel):
        def run(*args):
            start = time.perf_counter()
            result = kernel(*args)
            inner.append(time.perf_counter() - start)
            calls.append(args)
            return result

        return run

    Params4bit.__torch_function__ = timed_function
    ops_autograd._direct_kernels.update({key: timed(kernel) for key, kernel in kernels.items()})
    try:
        for _ in range(repeats):
            reset()
            fn()
    finally:
        Params4bit.__torch_function__ = original
        ops_autograd._direct_kernels.update(kernels)
    if not inner:
        return "no call of fourbit::linear_4bit reached the backend kernel directly"
    per_prefill = calls[: len(calls) // repeats]
    replayed = []
    for _ in range(repeats):
        start = time.perf_counter()
        for args in per_prefill:
            op(*args)
        replayed.append((time.perf_counter() - start) / len(per_prefill))
    median = statistics.median
    through = f"{1e6 * median(outer):.1f}" if outer else "not used"
    return (
        f"fourbit::linear_4bit, {len(per_prefill)} calls a prefill, host us a call (median): backend kernel "
        f"{1e6 * median(inner):.1f}, from __torch_function__ {through}; the same calls through the op, back to "
        f"back: {1e6 * median(replayed):.1f} a call; a prefill's calls in the backend "
        f"{1e3 * sum(inner) / repeats:.2f} ms"
    )


def profile_library(name: str, args, device: torch.device, layers: int, shapes: dict) -> list[str]:
    """Compile, time and profile one library's prefill, printing the profile; its table rows."""
    from transformers import StaticCache

    model = library_model(name, layers, device, shapes, lm_head=args.quantize_lm_head)
    if model is None:
        return []
    cache = StaticCache(config=model.config, max_cache_len=args.prompt + 1)

    def prefill(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        logits = model(tokens, past_key_values=cache, cache_position=positions, use_cache=True,
                       logits_to_keep=1).logits  # fmt: skip
        return logits[:, -1].argmax(-1, keepdim=True)

    options = _grouping_options() if name == "fourbit-grouped" else None
    compiled = torch.compile(prefill, fullgraph=True, dynamic=False, options=options)
    torch.manual_seed(1)
    tokens = torch.randint(1, model.config.vocab_size, (args.batch, args.prompt), device=device)
    positions = torch.arange(args.prompt, device=device)

    def describe(times: list[tuple[float, float, float, float]]) -> str:
        host, wall, busy, collecting = zip(*times, strict=True)
        median = statistics.median
        return (
            f"{min(wall):.2f} / {median(wall):.2f} | {median(host):.2f} | {median(busy):.2f} | "
            f"{sum(collecting) / len(collecting):.2f}"
        )

    with torch.no_grad():
        for _ in range(3):  # compiles, and recompiles once the cache has been reset
            cache.reset()
            compiled(tokens, positions)
        rows = [("compiled", timed_ms(lambda: compiled(tokens, positions), args.repeats, device, cache.reset))]
        timed_ms(lambda: prefill(tokens, positions), 1, device, cache.reset)  # eager warm-up
        rows.append(("eager", timed_ms(lambda: prefill(tokens, positions), args.repeats, device, cache.reset)))
        if args.eager_first:
            again = timed_ms(lambda: compiled(tokens, positions), args.repeats, device, cache.reset)
            rows.append(("compiled, after eager prefills", again))
        print(f"{name}: {len(gc.get_objects())} Python objects tracked by the garbage collector")
        cache.reset()
        built = prepared_weights_built(lambda: compiled(tokens, positions))
        if args.op_calls:
            calls = op_call_times(lambda: compiled(tokens, positions), args.repeats, cache.reset)
            print(f"{name}, compiled prefill:", calls)
        if args.python_profile:
            for what, fn in (("compiled", compiled), ("eager", prefill)):
                print(f"{name}, {args.repeats} {what} prefills, Python functions:")
                print(python_profile(lambda fn=fn: fn(tokens, positions), args.repeats, device, cache.reset, args.top))
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        cache.reset()
        with torch.profiler.profile(activities=activities) as trace:
            compiled(tokens, positions)
            _sync(device)
    averages = trace.key_averages()
    sorts = ["self_cpu_time_total"] + (["self_device_time_total"] if device.type == "cuda" else [])
    for sort in sorts:
        print(f"{name}, one compiled prefill, by {sort}:")
        print(averages.table(sort_by=sort, row_limit=args.top, max_name_column_width=60))
    return [f"| {name} | {what} | {describe(times)} | {built if what == 'compiled' else ''} |" for what, times in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=15, help="operators in each profile table")
    parser.add_argument("--quantize-lm-head", action="store_true", help="the output projection in 4 bits too")
    parser.add_argument("--python-profile", action="store_true", help="cProfile's view of both prefills")
    parser.add_argument("--op-calls", action="store_true", help="host time of the 4-bit op's calls in the prefill")
    parser.add_argument("--eager-first", action="store_true", help="time the compiled prefill again after eager ones")
    parser.set_defaults(libraries=["bf16", "fourbit"])
    args = parser.parse_args()
    device, layers, shapes = model_settings(args)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    rows = []
    for name in args.libraries:
        rows += profile_library(name, args, device, layers, shapes)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"# prefill: {layers} layers, {args.batch}x{args.prompt} tokens; {where}, torch {torch.__version__}\n")
    print(f"Threads of the process at the end: {', '.join(sorted(t.name for t in threading.enumerate()))}\n")
    print(
        "| library | prefill | ms, quickest / median | host ms, median | process CPU / wall "
        "| garbage collector ms, mean | PreparedWeight built |"
    )
    print("|---|---|---|---|---|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
