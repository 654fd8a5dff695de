"""Host time of a small torch launch through one process's life with fourbit.

    python benchmarks/launch_probe.py --device cuda
    python benchmarks/launch_probe.py --device cpu --size 256

A process that runs fourbit's products was seen to run every other torch operator 2-3x slower on
the host than a bf16 process does (docs/performance.md, the compiled prefill). This times one
cheap operator (an in-place add on a small tensor, ``--launches`` times, the device idle before)
after each step a model's life takes: importing fourbit, quantizing weights, an eager product of
many rows and of one row (Hopper's programmatic dependent launch), a compiled product, many eager
products. The step after which the time per launch jumps is the one to look at.
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_generate import _sync


def launch_us(tensor: torch.Tensor, launches: int, device: torch.device) -> tuple[float, float]:
    """Microseconds a launch of ``tensor.add_(1)``: until the loop returns (host) and until the
    device is done (wall), the device idle at the start."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(launches):
        tensor.add_(1)
    host = time.perf_counter()
    _sync(device)
    return 1e6 * (host - start) / launches, 1e6 * (time.perf_counter() - start) / launches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=4096, help="the weights' rows and columns")
    parser.add_argument("--launches", type=int, default=2000)
    args = parser.parse_args()
    device = torch.device(args.device)
    small = torch.zeros(16, device=device)
    rows: list[tuple[str, float, float]] = []

    def record(step: str) -> None:
        launch_us(small, args.launches // 4, device)  # warm
        rows.append((step, *launch_us(small, args.launches, device)))

    record("torch only")
    import fourbit

    record("fourbit imported")
    layers = [
        fourbit.nn.Linear4bit(args.size, args.size, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        for _ in range(4)
    ]
    layers = [layer.to(device) for layer in layers]
    record("4 weights quantized")
    many = torch.randn(32, args.size, device=device, dtype=torch.bfloat16)
    one = torch.randn(1, args.size, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        layers[0](many)
        record("an eager product of 32 rows")
        layers[1](one)
        record("an eager product of 1 row")
        compiled = torch.compile(layers[2], fullgraph=True)
        compiled(many)
        compiled(many)
        record("a compiled product of 32 rows")
        for _ in range(100):
            for layer in layers:
                layer(many)
        record("400 eager products of 32 rows")
        dense = torch.randn(args.size, args.size, device=device, dtype=torch.bfloat16)
        for _ in range(400):
            torch.nn.functional.linear(many, dense)
        record("400 F.linear of 32 rows")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# one in-place add on 16 values, {args.launches} launches a row; {where}, torch {torch.__version__}\n")
    print("| after | host us a launch | wall us a launch |\n|---|---:|---:|")
    for step, host, wall in rows:
        print(f"| {step} | {host:.2f} | {wall:.2f} |")


if __name__ == "__main__":
    main()
