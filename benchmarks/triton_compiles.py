"""Record the Triton compiles a run of fourbit makes on a GPU, then compile them again with any
Triton for a GPU that is not there, and compare: how a Triton release changes the kernels' code
(SASS instructions, the main loop's, barriers, shared and local memory, registers) without a GPU
that runs it.

  python benchmarks/triton_compiles.py record compiles.json        # on a CUDA machine
  python benchmarks/triton_compiles.py replay compiles.json new.json  # anywhere: the Triton on the path
  PYTHONPATH=/path/to/other/triton python benchmarks/triton_compiles.py replay compiles.json old.json
  python benchmarks/triton_compiles.py compare old.json new.json

``record`` runs the kernel benchmark's products (1-2048 rows), quantize, dequantize and a training
step; a compile is its kernel, signature, specialization and options. ``replay`` compiles each
for ``--arch`` (default 90, Hopper) with the fragment kernel's register budget applied as the
library applies it (``launch.needs_register_budget``), and reads the SASS with the cuobjdump that
Triton bundles. A compile keeps the launch's specializations (pointers and integers divisible by
16): a signature written by hand without them can compile to other code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from types import SimpleNamespace

import triton
import triton.language as tl
from ncu_sass_summary import Instruction, main_loop


def _encoded(value: object) -> object:
    """A constexpr value as JSON (Triton dtypes by name)."""
    if isinstance(value, tl.constexpr):
        return _encoded(value.value)
    if isinstance(value, tl.dtype):
        return {"dtype": value.name}
    if isinstance(value, (list, tuple)):
        return [_encoded(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record a constexpr of type {type(value).__name__}")


def _decoded(value: object) -> object:
    if isinstance(value, dict):
        return tl.dtype(value["dtype"])
    if isinstance(value, list):
        return tuple(_decoded(item) for item in value)
    return value


def record(path: str) -> None:
    """Run the library's kernels on this GPU and write every compile they make to ``path``."""
    import torch
    from triton.runtime.jit import JITFunction

    import fourbit
    from fourbit.tools import bench

    compiles = []
    compile_one = JITFunction._do_compile

    def recording(self, key, signature, device, constexprs, options, attrs, warmup):
        compiles.append({
            "module": self.fn.__module__, "name": self.fn.__name__, "signature": signature,
            "constexprs": [[list(path), _encoded(value)] for path, value in constexprs.items()],
            "attrs": [[list(path), value] for path, value in attrs.items()],
            "options": {name: getattr(options, name) for name in ("num_warps", "num_stages", "maxnreg",
                                                                   "enable_fp_fusion")},
        })  # fmt: skip
        return compile_one(self, key, signature, device, constexprs, options, attrs, warmup)

    JITFunction._do_compile = recording
    shapes = [(4096, 4096), (28672, 8192), (4096, 14336), (14336, 4096)]
    device = torch.device("cuda")
    for dtype in (torch.bfloat16, torch.float16):
        bench.run(shapes, [dtype], [1, 8, 16, 64, 256, 2048], device, min_time=0.01, with_bnb=False)
        layer = fourbit.nn.Linear4bit(4096, 4096, bias=False, compute_dtype=dtype, quant_type="nf4")
        layer.load_state_dict({"weight": torch.randn(4096, 4096) * 0.02})
        layer = layer.to(device)
        for rows in (1, 64, 512):  # the backward decodes the weight
            layer(torch.randn(rows, 4096, device=device, dtype=dtype, requires_grad=True)).sum().backward()
    torch.cuda.synchronize()
    with open(path, "w") as file:
        json.dump(compiles, file)
    print(f"{len(compiles)} compiles of {len({c['name'] for c in compiles})} kernels written to {path}")


def _cuobjdump() -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        raise SystemExit(f"no cuobjdump next to this Triton ({tool})")
    return tool


def sass_instructions(sass: str) -> list[Instruction]:
    """The instructions of cuobjdump's SASS listing of one kernel, in ``ncu_sass_summary``'s form
    (no samples)."""
    return [
        Instruction(int(address, 16), text.strip(), 0, 0, {})
        for address, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", sass)
    ]


def sass_counts(cubin: bytes) -> dict[str, int]:
    """Instructions (no NOPs), barriers, shared loads and stores, global loads, local-memory
    accesses and registers a thread of one compiled kernel, and the instructions of its main loop
    (``ncu_sass_summary.main_loop``: what a change to the loop moves, per iteration)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        sass = subprocess.run([_cuobjdump(), "-sass", file.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([_cuobjdump(), "-res-usage", file.name], capture_output=True, text=True,
                               check=True).stdout  # fmt: skip
    ops = [op for op in re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass) if op != "NOP"]

    def count(*prefixes: str) -> int:
        return sum(op.startswith(prefixes) for op in ops)

    return {"instructions": len(ops), "barriers": count("BAR"), "shared_loads": count("LDS"),
            "shared_stores": count("STS"), "global_loads": count("LDG"), "local": count("LDL", "STL"),
            "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
            "loop": len(main_loop(sass_instructions(sass)))}  # fmt: skip


def compile_record(entry: dict, arch: int) -> dict:
    """Compile one recorded compile for sm_``arch`` with the Triton on the path."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fourbit.kernels.triton import fragment_grid, launch

    kernel = getattr(importlib.import_module(entry["module"]), entry["name"])
    source = ASTSource(
        kernel, entry["signature"], {tuple(path): _decoded(value) for path, value in entry["constexprs"]},
        {tuple(path): [tuple(attribute) for attribute in value] for path, value in entry["attrs"]},
    )  # fmt: skip
    options = {name: value for name, value in entry["options"].items() if value is not None}
    target = GPUTarget("cuda", arch, 32)

    def compiled(options: dict) -> dict:
        binary = triton.compile(source, target=target, options=options)
        return {**sass_counts(binary.asm["cubin"]), "shared": binary.metadata.shared}

    counts = compiled(options)
    registers = fragment_grid.REGISTERS if entry["name"] == "_fragment_mma_kernel" else 0
    if launch.needs_register_budget(SimpleNamespace(n_regs=counts["registers"]), registers, options):
        counts = {**compiled({**options, "maxnreg": registers}), "register_budget": registers}
    return counts


def replay(path: str, out: str, arch: int) -> None:
    """Compile every compile recorded in ``path`` again and write the counts to ``out``."""
    with open(path) as file:
        entries = json.load(file)
    results = []
    for entry in entries:
        names = list(entry["signature"])
        constants = {names[path[0]]: value for path, value in entry["constexprs"] if len(path) == 1}
        results.append({"name": entry["name"], "constants": constants, **compile_record(entry, arch)})
        print(entry["name"], results[-1], flush=True)
    with open(out, "w") as file:
        json.dump({"triton": triton.__version__, "arch": arch, "compiles": results}, file)


def compare(first: str, second: str) -> None:
    """Print per kernel the range of each count in two replays of the same record."""
    replays = []
    for path in (first, second):
        with open(path) as file:
            replays.append(json.load(file))
    if len(replays[0]["compiles"]) != len(replays[1]["compiles"]):
        raise SystemExit("the two replays come from different records")
    columns = ["instructions", "loop", "barriers", "shared_loads", "shared_stores", "local", "registers"]
    kernels: dict[str, list[tuple[dict, dict]]] = defaultdict(list)
    for a, b in zip(replays[0]["compiles"], replays[1]["compiles"], strict=True):
        kernels[a["name"]].append((a, b))
    versions = " / ".join(f"Triton {r['triton']}" for r in replays)
    print(f"sm_{replays[0]['arch']}, {versions}\n")
    print("| kernel | compiles | " + " | ".join(columns) + " |")
    print("|---|---:|" + "---|" * len(columns))
    for name, pairs in kernels.items():
        cells = []
        for column in columns:
            spans = [_span([pair[side].get(column, 0) for pair in pairs]) for side in (0, 1)]
            cells.append(spans[0] if spans[0] == spans[1] else " / ".join(spans))
        print(f"| {name} | {len(pairs)} | " + " | ".join(cells) + " |")


def _span(values: list[int]) -> str:
    return f"{min(values)}" if min(values) == max(values) else f"{min(values)}-{max(values)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("record").add_argument("out")
    replaying = commands.add_parser("replay")
    replaying.add_argument("record")
    replaying.add_argument("out")
    replaying.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for Hopper")
    comparing = commands.add_parser("compare")
    comparing.add_argument("first")
    comparing.add_argument("second")
    arguments = parser.parse_args()
    if arguments.command == "record":
        record(arguments.out)
    elif arguments.command == "replay":
        replay(arguments.record, arguments.out, arguments.arch)
    else:
        compare(arguments.first, arguments.second)


if __name__ == "__main__":
    sys.exit(main())
