"""Host time of eager calls: fourbit's Linear4bit next to F.linear, nn.Linear and bitsandbytes.

    python benchmarks/profile_host.py --shapes 4096x4096 4096x14336 --rows 1 [--profile] [--layers]

The op row is ``torch.ops.fourbit.linear_4bit`` with the same weight: what a compiled graph
calls without CUDA graphs; ``--register-autograd`` adds a copy of the op whose gradient is
registered through ``torch.library.register_autograd``, as fourbit's was before its own Autograd
kernel (``ops_autograd``). Host time per call is the time to issue a burst of calls, measured
before synchronizing (the GPU is still busy then, so this is what the host spends, not the
kernels): the quickest of ``--rounds`` bursts, the calls taking turns. Wall time per call
includes the final synchronization. ``--profile`` prints cProfile's heaviest functions of
fourbit's call. Kernels per call are counted with torch.profiler.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import time
from collections.abc import Callable
from functools import partial
from unittest import mock

import torch
import torch.nn.functional as F

import fourbit


def host_and_wall_us(fn, calls: int = 200) -> tuple[float, float]:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return host / calls * 1e6, wall / calls * 1e6


def kernels_per_call(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        fn()
        torch.cuda.synchronize()
    return sum(event.device_type == torch.autograd.DeviceType.CUDA for event in trace.events())


#: Both 4-bit libraries' layers: NF4 with nested statistics, bf16 compute, no bias.
SETTINGS = dict(bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)


def layers(n: int, k: int, weight: torch.Tensor) -> dict[str, torch.nn.Module]:
    dense = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    dense.weight.data.copy_(weight)
    result = {"nn.Linear": dense}
    result["fourbit Linear4bit"] = fourbit.nn.Linear4bit(k, n, **SETTINGS)
    try:
        import bitsandbytes

        result["bitsandbytes Linear4bit"] = bitsandbytes.nn.Linear4bit(k, n, **SETTINGS)
    except Exception as error:
        print(f"bitsandbytes not measured: {error}")
    for name in list(result)[1:]:
        result[name].load_state_dict(dense.state_dict())
        result[name] = result[name].cuda()
    return result


def op_call(module: fourbit.nn.Linear4bit, x: torch.Tensor):
    """``torch.ops.fourbit.linear_4bit`` with ``module``'s weight: what a compiled graph calls
    (through the dispatcher and the op's CUDA entry, not the module's prepared product)."""
    from fourbit.prepared import op_arguments

    state = module.weight.quant_state
    arguments = op_arguments(state, x.device)
    packed = module.weight.data
    return partial(torch.ops.fourbit.linear_4bit, x, packed, blocksize=state.blocksize, shape=list(state.shape),
                   **arguments)  # fmt: skip


def register_autograd_copy():
    """A copy of ``fourbit::linear_4bit`` (same schema and per-backend kernels) whose gradient
    goes through ``torch.library.register_autograd``: the op as it was registered before its own
    Autograd kernel (``ops_autograd``), kept to measure the difference."""
    from fourbit import ops_autograd

    library = torch.library.Library("fourbit_profile", "DEF")
    library.define("linear_4bit(" + str(torch.ops.fourbit.linear_4bit.default._schema).split("(", 1)[1])
    for backend in (torch._C.DispatchKey.CPU, torch._C.DispatchKey.CUDA):
        kernel = ops_autograd._direct_kernels.get(torch._C.DispatchKeySet(backend).raw_repr())
        if kernel is not None:
            library.impl("linear_4bit", kernel, backend.name)

    def backward(ctx, grad):
        raise RuntimeError("the profiling copy of the op has no gradient")

    torch.library.register_autograd("fourbit_profile::linear_4bit", backward, lib=library)
    register_autograd_copy.library = library  # the registrations live as long as the library object
    return torch.ops.fourbit_profile.linear_4bit


def prepared_under(module: fourbit.nn.Linear4bit, x: torch.Tensor, patches: list[tuple[object, str, object]]):
    """``module``'s call on ``x``, its launch for such inputs prepared (and kept) while each
    ``(owner, name, value)`` of ``patches`` replaces ``owner.name``."""
    with contextlib.ExitStack() as stack, torch.no_grad():
        for owner, name, value in patches:
            stack.enter_context(mock.patch.object(owner, name, value))
        module(x)
    return partial(module, x)


def with_captured_tables(module: fourbit.nn.Linear4bit, x: torch.Tensor):
    """``module``'s call on ``x`` with the launch it keeps for such inputs chosen by the tables of
    products recorded into CUDA graphs (``tuning.KernelTables.captured``: on an H200 these copy
    inputs into fragment order and stage them for ``wgmma``, a second kernel a call), beside the
    eager tables' choice."""
    from fourbit.kernels.triton import tuning

    chosen = tuning.for_device
    return prepared_under(module, x, [(tuning, "for_device", lambda device: chosen(device).captured or chosen(device))])


def without_dependent_launches(module: fourbit.nn.Linear4bit, x: torch.Tensor):
    """``module``'s call on ``x`` with its few-row launch built as an ordinary launch, not as a
    programmatic dependent (``launch.dependent_launches``): what Hopper's dependent launch costs
    the host while the kernel before it still runs."""
    from fourbit.kernels.triton import fragment_groups, fragments

    never = lambda device: False  # noqa: E731
    return prepared_under(module, x, [(fragments, "dependent_launches", never),
                                      (fragment_groups, "dependent_launches", never)])  # fmt: skip


def layer_calls(module: fourbit.nn.Linear4bit, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Each layer of ``module``'s eager call on ``x``, from its ``forward`` down to Triton's
    launcher, as calls of their own: the host time a layer adds is its row less the next one's.
    The rows below ``PreparedWeight.linear`` follow the path this input takes: the kept launch
    (with its input staging where it has one), or the decode and cuBLAS product of the chunked
    path. Empty where the call is not a kept launch (the CPU's kernels)."""
    from fourbit.kernels.triton.launch import ProductLaunch, pointers
    from fourbit.kernels.triton.linear import CHUNKED

    with torch.no_grad():
        module(x)  # prepares the product and its launch for such inputs
    prepared = module._prepared[1]
    kernel = getattr(prepared, "kernel", None)
    if not hasattr(kernel, "input_key"):
        return {}
    key = kernel.input_key(x, None, torch.are_deterministic_algorithms_enabled(), False)
    launch = kernel.launches.get(key)
    calls = {
        "  Linear4bit.forward": partial(module.forward, x),
        "  ops.PreparedLinear": partial(prepared, x, None),
        "  PreparedWeight.linear": partial(kernel.linear, x, None),
    }
    if launch is CHUNKED:
        return {**calls, **_chunked_calls(kernel, x)}
    if not isinstance(launch, ProductLaunch) or not launch.launch.direct():
        return {}
    before = launch.bind(kernel) if launch.pointers is None else None  # a shared launch binds the weight
    weight = launch.pointers if before is None else pointers(before)
    out = torch.empty(launch.out_shape, dtype=launch.dtype, device=x.device)
    workspace, counters = launch._split_buffers() if launch.tiles else (out, out)
    staged = x if launch.prepare_input is None else launch.prepare_input(x)
    pointer = out.data_ptr()
    arguments = (staged.data_ptr(), *weight, pointer, pointer, workspace.data_ptr(), counters.data_ptr(),
                 *launch.after)  # fmt: skip
    calls["  ProductLaunch"] = partial(launch, x, None, before)
    if launch.prepare_input is not None:
        calls["  the input's staging (a kernel)"] = partial(launch.prepare_input, x)
    calls["  KernelLaunch.run"] = partial(launch.launch.run, *arguments)
    allocate = partial(torch.empty, size=launch.out_shape, dtype=launch.dtype, device=x.device)
    calls["  the output's torch.empty"] = allocate  # as the launch allocates it: the size by keyword
    return calls


def _chunked_calls(kernel, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The chunked path's layers for a weight decoded in one chunk: the decode (its allocation
    and launch), the decoded weight's allocation, and cuBLAS's product with the decoded weight."""
    plan = kernel.chunk_plan(x.dtype)
    if len(plan) != 1:
        return {}
    decode = plan[0][2]
    decoded = decode()
    return {
        "  the weight's decode (a kernel)": decode,
        "  the decoded weight's torch.empty": partial(
            torch.empty, size=decode.shape, dtype=decode.dtype, device=x.device
        ),
        "  F.linear with the decoded weight": partial(F.linear, x, decoded),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x14336", "28672x8192"], help="N x K")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5, help="bursts per call, taking turns; the quickest counts")
    parser.add_argument("--profile", action="store_true", help="cProfile fourbit's Linear4bit call")
    parser.add_argument(
        "--captured-tables",
        action="store_true",
        help="a row for fourbit's call with the launch the tables of CUDA graph captures choose (on an H200: "
        "inputs copied into fragment order at 5-16 rows of large weights, a second kernel)",
    )
    parser.add_argument(
        "--no-dependent",
        action="store_true",
        help="a row for fourbit's call with its few-row launch made an ordinary launch, not a programmatic dependent",
    )
    parser.add_argument(
        "--layers",
        action="store_true",
        help="rows for each layer of fourbit's call, from Linear4bit.forward down to the kernel's launcher",
    )
    parser.add_argument(
        "--register-autograd",
        action="store_true",
        help="a row for a copy of the op registered through torch.library.register_autograd (as it was before)",
    )
    args = parser.parse_args()
    copy = register_autograd_copy() if args.register_autograd else None
    print(f"# host time per eager call, us: {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| shape | rows | call | host us | wall us | kernels | host vs F.linear |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for text in args.shapes:
        n, k = (int(part) for part in text.split("x"))
        weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        modules = layers(n, k, weight)
        if args.captured_tables:  # a module of its own: its kept launches are chosen apart
            modules["captured"] = fourbit.nn.Linear4bit(k, n, **SETTINGS)
            modules["captured"].load_state_dict(modules["nn.Linear"].state_dict())
            modules["captured"] = modules["captured"].cuda()
        if args.no_dependent:
            modules["independent"] = fourbit.nn.Linear4bit(k, n, **SETTINGS)
            modules["independent"].load_state_dict(modules["nn.Linear"].state_dict())
            modules["independent"] = modules["independent"].cuda()
        for rows in args.rows:
            x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
            cases = {"F.linear": partial(F.linear, x, weight)}
            own = ("captured", "independent")  # modules whose launches are prepared apart, below
            cases.update({name: partial(module, x) for name, module in modules.items() if name not in own})
            cases["fourbit op (compiled graphs' call)"] = op_call(modules["fourbit Linear4bit"], x)
            if copy is not None:
                call = op_call(modules["fourbit Linear4bit"], x)
                cases["the op through register_autograd"] = partial(copy, *call.args, **call.keywords)
            if args.captured_tables:
                cases["fourbit Linear4bit, captured tables"] = with_captured_tables(modules["captured"], x)
            if args.no_dependent:
                cases["fourbit Linear4bit, no dependent launch"] = without_dependent_launches(modules["independent"], x)
            if args.layers:
                cases.update(layer_calls(modules["fourbit Linear4bit"], x))
            with torch.no_grad():
                # the calls take turns, and each keeps its quickest burst: the host's noise
                # (other processes, frequency) then weighs on every call alike
                best: dict[str, tuple[float, float]] = {}
                for _ in range(args.rounds):
                    for name, fn in cases.items():
                        host, wall = host_and_wall_us(fn, args.calls)
                        best[name] = min(best.get(name, (host, wall)), (host, wall))
                reference = best["F.linear"][0]
                for name, fn in cases.items():
                    host, wall = best[name]
                    count = kernels_per_call(fn)
                    print(f"| {text} | {rows} | {name} | {host:.1f} | {wall:.1f} | {count} | {host / reference:.2f}x |")
                if args.profile:
                    profiler = cProfile.Profile()
                    profiler.enable()
                    for _ in range(args.calls):
                        cases["fourbit Linear4bit"]()
                    torch.cuda.synchronize()
                    profiler.disable()
                    pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
