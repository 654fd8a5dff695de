"""Where a kernel's warps wait, from Nsight Compute's per-instruction table.

Reads what ``ncu -i REPORT --page source --csv --print-source sass`` writes (a report taken with
``--set full``: ``gpu_session.sh``'s ``stalls`` stage makes one) and prints the stall reasons'
shares of the warp samples, samples and executed instructions by opcode, the main loop's
instructions (the longest backward branch before the first ``EXIT``: its body, counted
statically, what a change to the loop moves) and the instructions that took the most samples.

    python benchmarks/ncu_sass_summary.py wide_sass_256.csv [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import csv
import re
from dataclasses import dataclass

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


@dataclass
class Instruction:
    """One SASS instruction's row: its address, text, samples, executions and samples by reason."""

    address: int
    text: str
    samples: int
    executed: int
    stalls: dict[str, int]

    @property
    def opcode(self) -> str:
        """The opcode without its predicate and modifiers (``@!P0 LDG.E.64 ...`` -> ``LDG``)."""
        words = self.text.split()
        word = words[1] if words and words[0].startswith("@") and len(words) > 1 else (words or ["?"])[0]
        return word.split(".")[0]


def read_table(path: str) -> list[Instruction]:
    """The instructions of the first kernel in ncu's CSV (a line naming the kernel, a header, then
    a row an instruction); the stall columns are those named ``stall_*`` that count all samples."""
    with open(path, newline="") as file:
        rows = list(csv.reader(file))
    start = next(i for i, row in enumerate(rows) if "Address" in row and "Source" in row)
    header = rows[start]
    column = {name: i for i, name in enumerate(header)}
    reasons = [name for name in header if name.startswith("stall_") and "Not Issued" not in name]

    def number(row: list[str], name: str) -> int:
        text = row[column[name]].strip() if name in column and column[name] < len(row) else ""
        return int(text.replace(",", "")) if text.replace(",", "").isdigit() else 0

    instructions = []
    for row in rows[start + 1 :]:
        if len(row) < len(header) or not row[column["Address"]].startswith("0x"):
            break  # the next kernel's table, or the end
        instructions.append(Instruction(
            int(row[column["Address"]], 16), row[column["Source"]].strip(), number(row, SAMPLES),
            number(row, EXECUTED), {name[len("stall_"):]: number(row, name) for name in reasons},
        ))  # fmt: skip
    return instructions


def main_loop(instructions: list[Instruction]) -> list[Instruction]:
    """The body of the longest loop before the first ``EXIT``: from a backward branch's target to
    the branch (waits that retry from blocks placed after the exit are not loops of their own)."""
    index = {instruction.address: i for i, instruction in enumerate(instructions)}
    end = next((i for i, ins in enumerate(instructions) if ins.opcode == "EXIT"), len(instructions))
    best = (0, 0)
    for i, instruction in enumerate(instructions[:end]):
        target = re.search(r"BRA\b.*?0x([0-9a-f]+)", instruction.text)
        if target and int(target.group(1), 16) in index:
            first = index[int(target.group(1), 16)]
            if first <= i and i - first > best[1] - best[0]:
                best = (first, i)
    return instructions[best[0] : best[1] + 1] if best != (0, 0) else []


def summary(instructions: list[Instruction], top: int = 25) -> str:
    """The printed summary of one kernel's table."""
    total = sum(instruction.samples for instruction in instructions) or 1
    reasons: collections.Counter = collections.Counter()
    samples: collections.Counter = collections.Counter()
    executed: collections.Counter = collections.Counter()
    for instruction in instructions:
        reasons.update(instruction.stalls)
        samples[instruction.opcode] += instruction.samples
        executed[instruction.opcode] += instruction.executed
    lines = [f"{total} warp samples, {len(instructions)} instructions", "stall reasons:"]
    for name, count in reasons.most_common(12):
        if count:
            lines.append(f"  {name:20s} {count:8d} {100 * count / total:5.1f}%")
    lines.append("by opcode: samples, share, warp instructions executed")
    for name, count in samples.most_common(20):
        lines.append(f"  {name:14s} {count:8d} {100 * count / total:5.1f}% {executed[name]:12d}")
    loop = main_loop(instructions)
    shape = collections.Counter(instruction.opcode for instruction in loop)
    lines.append(f"main loop: {len(loop)} instructions, {sum(i.samples for i in loop) / total:.0%} of the samples")
    lines.append("  " + " ".join(f"{name}:{count}" for name, count in shape.most_common(30)))
    lines.append("most sampled instructions:")
    for instruction in sorted(instructions, key=lambda ins: -ins.samples)[:top]:
        worst = ", ".join(f"{name} {count}" for name, count in collections.Counter(instruction.stalls).most_common(2))
        lines.append(f"  {instruction.samples:6d} {instruction.address:#x} {instruction.text[:60]:60s} {worst}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", help="ncu --page source --csv --print-source sass output")
    parser.add_argument("--top", type=int, default=25, help="most sampled instructions to list")
    arguments = parser.parse_args(argv)
    print(summary(read_table(arguments.table), arguments.top))


if __name__ == "__main__":
    main()
