"""A decoder's projections, layer after layer: bf16 vs bitsandbytes NF4 vs fourbit NF4, in one run.

    python benchmarks/bench_layers.py --device cuda                 # 8 Llama-3-8B layers, 1 and 8 rows
    python benchmarks/bench_layers.py --device cuda --per-shape     # and each projection shape alone
    python benchmarks/bench_layers.py --device cpu                  # hidden 1024, 4 layers

Each layer calls its seven projections (q, k, v, o, gate, up, down) as a Llama layer does, with
the small elementwise kernels a model runs between them standing in for the norms, attention and
the gated activation, so that every product follows what it follows in a model: the time a
decode step spends in its products, without attention's and the host loop's. Eagerly, and on a
GPU also as one CUDA graph of all layers (replays: the launches cost no host time), in
microseconds a layer. ``--per-shape`` adds, for each projection, the weights of that projection
in all layers one after another in one graph: microseconds a product against the time its 4-bit
bytes take at ``--copy-gbps`` (default: a 1 GiB device copy measured here, bytes read plus
written, as ``bench_kernels.py`` counts it). Weights are random,
scaled so that activations keep their size; every library gets the same ones.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

#: (hidden, intermediate, key/value width): Llama-3-8B on a GPU, a small model on the CPU.
GPU_SHAPE = (4096, 14336, 1024)
CPU_SHAPE = (1024, 3584, 256)
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


def projection_shapes(hidden: int, intermediate: int, kv: int) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each projection of a layer."""
    return {"q": (hidden, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, hidden),
            "gate": (intermediate, hidden), "up": (intermediate, hidden), "down": (hidden, intermediate)}  # fmt: skip


def dense_weights(layers: int, shapes: dict, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Random weights of each layer, rows of norm about 1 so that products keep their inputs' size."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    return [
        {name: (torch.randn(n, k, generator=generator) * k**-0.5).to(device, dtype) for name, (n, k) in shapes.items()}
        for _ in range(layers)
    ]


class Grouped(nn.Module):
    """fourbit ``Linear4bit`` layers that take one input, run as one grouped CUDA launch: the
    kernel of ``fourbit::linear_4bit_group`` (``kernels.triton.fragment_groups``), called directly
    as the graph pass of ``fourbit.compile_options`` has a compiled model call it; their outputs
    side by side."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(layers)
        self.widths = [layer.out_features for layer in layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from fourbit.kernels.triton.fragment_groups import linear_4bit_group

        states = [layer.weight.quant_state for layer in self.members]
        return linear_4bit_group(
            x, [layer.weight.data.as_subclass(torch.Tensor) for layer in self.members],
            [state.absmax for state in states], [state.code for state in states], states[0].blocksize, self.widths,
            [None] * len(states), [state.state2.absmax for state in states], [state.state2.code for state in states],
            [state.offset for state in states], states[0].state2.blocksize, states[0].tiled,
        )  # fmt: skip


def build_layers(library: str, weights: list[dict], dtype: torch.dtype) -> list[dict[str, nn.Module]]:
    """Each layer's projections as ``library``'s modules: ``nn.Linear`` (bf16) or a ``Linear4bit``
    built as users build it (``Params4bit`` of the weight, then ``.to(device)``), NF4, nested;
    ``fourbit-grouped`` adds q/k/v and gate/up as ``Grouped`` launches (CUDA)."""
    if library == "fourbit-grouped":
        built = build_layers("fourbit", weights, dtype)
        for projections in built:
            projections["qkv"] = Grouped([projections[name] for name in ("q", "k", "v")])
            projections["gate_up"] = Grouped([projections[name] for name in ("gate", "up")])
        return built
    if library == "bf16":
        module = nn.Linear
    elif library == "bitsandbytes":
        import bitsandbytes as bnb

        module = bnb.nn.Linear4bit
    else:
        import fourbit as bnb

        module = bnb.nn.Linear4bit
    built = []
    for layer in weights:
        projections = {}
        for name, weight in layer.items():
            n, k = weight.shape
            if library == "bf16":
                linear = module(k, n, bias=False, device=weight.device, dtype=dtype)
                linear.weight.data.copy_(weight)
            else:
                linear = module(k, n, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
                linear.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4",
                                                  compress_statistics=True)  # fmt: skip
                linear = linear.to(weight.device)
            projections[name] = linear.eval()
        built.append(projections)
    return built


def forward(layers: list[dict[str, nn.Module]], x: torch.Tensor) -> torch.Tensor:
    """The layers' projections in a model's order, elementwise kernels between them."""
    for p in layers:
        y = x * 0.5  # the attention norm
        if "qkv" in p:
            q, k, v = p["qkv"](y).split(p["qkv"].widths, -1)
        else:
            q, k, v = p["q"](y), p["k"](y), p["v"](y)
        attention = q * torch.sigmoid(k.sum(-1, keepdim=True) + v.sum(-1, keepdim=True))  # attention's place
        x = x + p["o"](attention)
        z = x * 0.5  # the MLP norm
        gate, up = p["gate_up"](z).split(p["gate_up"].widths, -1) if "gate_up" in p else (p["gate"](z), p["up"](z))
        x = x + p["down"](torch.nn.functional.silu(gate) * up)
    return x


def per_call_us(fn: Callable[[], object], device: torch.device, min_time: float) -> float:
    """Median of rounds of ``fn`` calls, microseconds a call (a CUDA sync around each round)."""
    fn()
    rounds = []
    deadline = time.perf_counter() + min_time
    calls = 1
    while len(rounds) < 5 or (time.perf_counter() < deadline and len(rounds) < 100):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        rounds.append(elapsed / calls * 1e6)
        calls = max(1, min(1000, int(0.02 / max(elapsed / calls, 1e-7))))  # rounds of about 20 ms
    rounds.sort()
    return rounds[len(rounds) // 2]


def graph_of(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """``fn`` recorded into a CUDA graph after two eager warm-up calls; returns its replay."""
    fn()
    fn()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


@torch.no_grad()
def measure(
    library: str,
    weights: list[dict],
    row_counts: list[int],
    per_shape: bool,
    min_time: float,
    times: dict,
    shape_times: dict,
) -> None:
    """Time ``library``'s layers: into ``times`` us a layer by (library, mode, rows), into
    ``shape_times`` (``per_shape``, GPU) us a product by (library, projection, rows)."""
    first = weights[0]["q"]
    device, dtype, layers = first.device, first.dtype, len(weights)
    cuda = device.type == "cuda"
    built = build_layers(library, weights, dtype)
    for rows in row_counts:
        x = torch.randn(rows, first.shape[1], device=device, dtype=dtype)
        run = lambda x=x: forward(built, x)  # noqa: E731
        if not torch.isfinite(run()).all():
            raise RuntimeError(f"{library} gave non-finite outputs at {rows} rows")
        times[(library, "eager", rows)] = per_call_us(run, device, min_time) / layers
        if cuda:
            times[(library, "graph", rows)] = per_call_us(graph_of(run, device), device, min_time) / layers
        if cuda and per_shape:
            for name in built[0]:
                inputs = torch.randn(rows, first.shape[1] if name != "down" else weights[0]["down"].shape[1],
                                     device=device, dtype=dtype)  # fmt: skip
                alone = lambda name=name, inputs=inputs: [layer[name](inputs) for layer in built]  # noqa: E731
                shape_times[(library, name, rows)] = per_call_us(graph_of(alone, device), device, min_time) / layers


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, help="decoder layers (default 8 on a GPU, 4 on the CPU)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="input rows (the batch of a decode step)")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("HIDDEN", "INTERMEDIATE", "KV"),
                        help="hidden, intermediate and key/value widths (default Llama-3-8B's on a GPU)")  # fmt: skip
    named = "bf16, bitsandbytes, fourbit, fourbit-grouped (CUDA: q/k/v and gate/up one launch each)"
    parser.add_argument("--libraries", nargs="+", default=["bf16", "bitsandbytes", "fourbit"], help=named)
    parser.add_argument("--per-shape", action="store_true", help="also each projection's weights alone (GPU)")
    parser.add_argument("--copy-gbps", type=float, help="the copy rate the per-shape floor uses")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds of timing per cell")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads on the CPU")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = args.layers or (8 if cuda else 4)
    shapes = projection_shapes(*(args.shape or (GPU_SHAPE if cuda else CPU_SHAPE)))
    dtype = torch.bfloat16
    libraries = list(args.libraries)
    if "fourbit-grouped" in libraries and not cuda:
        parser.error("fourbit-grouped runs the grouped CUDA launch: it needs --device cuda")
    if "bitsandbytes" in libraries:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as error:  # not installed, or no native library for this device
            print(f"bitsandbytes left out: {type(error).__name__}: {error}")
            libraries.remove("bitsandbytes")
    weights = dense_weights(layers, shapes, device, dtype)
    modes = ("eager", "graph") if cuda else ("eager",)
    times: dict[tuple[str, str, int], float] = {}
    shape_times: dict[tuple[str, str, int], float] = {}
    for library in libraries:
        measure(library, weights, args.rows, args.per_shape, args.min_time, times, shape_times)
        if cuda:
            torch.cuda.empty_cache()

    where = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"\n# {len(shapes)} projections a layer, {layers} layers, {'x'.join(map(str, shapes['gate']))} MLP: {where}")
    print("\nus a layer (products and the elementwise kernels between them)\n")
    header = ["mode", "rows", *libraries]
    if "fourbit" in libraries:
        header += [f"fourbit / {other}" for other in libraries if other != "fourbit"]
    if "fourbit-grouped" in libraries and "fourbit" in libraries:
        header += ["grouped / fourbit"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for mode in modes:
        for rows in args.rows:
            cells = [mode, str(rows), *(f"{times[(library, mode, rows)]:.1f}" for library in libraries)]
            if "fourbit" in libraries:
                mine = times[("fourbit", mode, rows)]
                cells += [ratio(mine, times[(other, mode, rows)]) for other in libraries if other != "fourbit"]
            if "fourbit-grouped" in libraries and "fourbit" in libraries:
                cells.append(ratio(times[("fourbit-grouped", mode, rows)], mine))
            print("| " + " | ".join(cells) + " |")
    if shape_times:
        from fourbit.tools.bench import copy_bandwidth_gbps

        gbps = args.copy_gbps or copy_bandwidth_gbps(device)
        print(f"\nus a product, one projection's {layers} weights in a row (CUDA graph); floor: the 4-bit bytes "
              f"(half a byte a weight, an absmax byte a 64) at the copy rate, {gbps:.0f} GB/s\n")  # fmt: skip
        print("| projection | shape | rows | " + " | ".join(libraries) + " | 4-bit floor |")
        print("|" + "---|" * (4 + len(libraries)))
        groups = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")} if "fourbit-grouped" in libraries else {}
        for rows in args.rows:
            for name, members in [*((name, (name,)) for name in shapes), *groups.items()]:
                elements = sum(shapes[member][0] * shapes[member][1] for member in members)
                floor = (elements / 2 + elements / 64) / (gbps * 1e9) * 1e6
                cells = [f"{shape_times[(library, name, rows)]:.2f}" if (library, name, rows) in shape_times else "-"
                         for library in libraries]  # fmt: skip
                shape = " + ".join("x".join(map(str, shapes[member])) for member in members)
                print(f"| {name} | {shape} | {rows} | " + " | ".join(cells) + f" | {floor:.2f} |")


if __name__ == "__main__":
    main()
