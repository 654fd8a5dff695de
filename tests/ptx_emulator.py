"""A small emulator of the PTX that fourbit's kernels inline, so that CI checks its logic (selectors,
byte orders, table addresses, who reads which sums) without a GPU: one thread at a time,
instruction by instruction, over 32-bit registers and a dict of shared memory."""

from __future__ import annotations

import re

import numpy as np

MASK = 0xFFFFFFFF
#: Where a cluster's window puts a program's shared memory (``mapa``): its rank times this.
CLUSTER_RANK = 1 << 24


def cluster_address(address: int, rank: int) -> int:
    """The address of program ``rank``'s shared ``address`` in the emulated cluster window."""
    return rank * CLUSTER_RANK + address


def float_bits(value: float) -> int:
    """The bits of ``value`` rounded to float32."""
    return int(np.array(value, dtype=np.float32).view(np.uint32))


def bits_float(bits: int) -> np.float32:
    """The float32 whose bits are ``bits``."""
    return np.array(bits, dtype=np.uint32).view(np.float32)[()]


def split_at(asm: str, barrier: str) -> list[str]:
    """``asm`` cut after each line that starts with ``barrier``, each part run as a block (the
    braces of the whole dropped): the phases between which every thread must pass the barrier."""
    parts, current = [], []
    for line in asm.splitlines():
        current.append(line)
        if line.strip().startswith(barrier):
            parts.append("\n".join(current))
            current = []
    return [*parts, "\n".join(current)]


def prmt(a: int, b: int, selector: int) -> int:
    """``prmt.b32`` in its default mode: byte i of the result is byte ``selector[4i:4i+3] & 7``
    of ``b:a``, or that byte's sign replicated when bit 3 of the selector nibble is set."""
    source = (b << 32) | a
    result = 0
    for i in range(4):
        nibble = (selector >> (4 * i)) & 15
        byte = (source >> (8 * (nibble & 7))) & 0xFF
        if nibble & 8:
            byte = 0xFF if byte & 0x80 else 0
        result |= byte << (8 * i)
    return result


class Trapped(Exception):
    """The emulated thread ran ``trap``."""


def run_thread(
    asm: str, inputs: dict[str, int], special: dict[str, int], shared: dict[int, int], events: list | None = None
) -> dict[str, int]:
    """Execute ``asm`` (straight-line, or with labels, predicated branches and stores) as one thread
    whose special registers (``%tid.x`` ...) and symbol addresses are ``special``; stores land in
    ``shared`` (byte address -> 32-bit word). Barriers pass: a caller that needs every thread past
    one runs the text before it for all threads first (``split_at``). Shared addresses in a
    cluster's window (``mapa``) carry the program's rank above bit 24 (``cluster_address``), so
    that one ``shared`` holds every program's memory when each program's addresses carry its rank.
    The ring's barrier waits (always done at once), arrivals and bulk copies are appended to
    ``events``: ``("wait", barrier, parity)``, ``("expect", barrier, bytes)``, ``("copy",
    destination, source, bytes, barrier)``."""
    lines = [line.strip().rstrip(";") for line in asm.splitlines()]
    lines = [line for line in lines if line and line not in "{}" and not line.startswith((".reg", ".shared"))]
    labels = {line[:-1]: i for i, line in enumerate(lines) if line.endswith(":")}
    regs = dict(inputs)

    def value(token: str) -> int:
        token = token.strip()
        if token in special:
            return special[token]
        if "+" in token:  # an address operand's register plus offset
            base, offset = token.split("+")
            return (value(base) + int(offset, 0)) & MASK
        return int(token, 0) & MASK if token[0].isdigit() else regs[token]

    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.endswith(":") or line.startswith(("bar.sync", "barrier.cluster")):
            continue
        predicate = None
        if line.startswith("@"):
            predicate, line = line.split(None, 1)
            if predicate.startswith("@!") == bool(regs[predicate.lstrip("@!")]):
                continue
        if line == "trap":
            raise Trapped
        op, operands = line.split(None, 1)
        if op == "bra":
            i = labels[operands.strip()]
            continue
        if op.startswith(("mbarrier.", "cp.async.bulk")):
            kind = {"mbarrier.try_wait": "wait", "mbarrier.arrive": "expect", "cp.async.bulk": "copy"}
            name = next(name for prefix, name in kind.items() if op.startswith(prefix))
            parts = [part.strip().strip("[]") for part in operands.split(",")]
            if name == "wait":  # its predicate first
                regs[parts.pop(0)] = True
            events.append((name, *(value(part) for part in parts if part != "_")))
            continue
        if op.startswith("st.shared"):
            address, data = re.fullmatch(r"\[(\S+)\], \{?([^}]*)\}?", operands).groups()
            base = value(address)
            for offset, word in enumerate(data.split(",")):
                shared[base + 4 * offset] = value(word)
            continue
        if op.startswith("ld.shared"):
            dest, address = re.fullmatch(r"(\S+), \[(\S+)\]", operands).groups()
            regs[dest] = shared[value(address)]
            continue
        pack = re.fullmatch(r"(\S+), \{(\S+), (\S+)\}", operands)
        if op == "mov.b64" and pack:  # mov.b64 pair, {lo, hi}
            pair, low, high = pack.groups()
            regs[pair] = value(low) | value(high) << 32
            continue
        unpack = re.fullmatch(r"\{(\S+), (\S+)\}, (\S+)", operands)
        if op == "mov.b32" and unpack:  # mov.b32 {lo, hi}, pair
            low, high, pair = unpack.groups()
            regs[low], regs[high] = value(pair) & 0xFFFF, value(pair) >> 16
            continue
        dest, *args = (part.strip() for part in operands.split(","))
        args = [value(arg) for arg in args]
        if op in ("mov.u32", "mov.b32"):
            regs[dest] = args[0]
        elif op == "and.b32":
            regs[dest] = args[0] & args[1]
        elif op == "or.b32":
            regs[dest] = args[0] | args[1]
        elif op == "shr.u32":
            regs[dest] = args[0] >> args[1]
        elif op == "shl.b32":
            regs[dest] = (args[0] << args[1]) & MASK
        elif op == "add.u32":
            regs[dest] = (args[0] + args[1]) & MASK
        elif op == "mul.lo.u32":
            regs[dest] = (args[0] * args[1]) & MASK
        elif op == "mad.lo.u32":
            regs[dest] = (args[0] * args[1] + args[2]) & MASK
        elif op == "setp.lt.u32":
            regs[dest] = args[0] < args[1]
        elif op == "setp.eq.u32":
            regs[dest] = args[0] == args[1]
        elif op == "setp.ne.u32":
            regs[dest] = args[0] != args[1]
        elif op == "mul.wide.u32":
            regs[dest] = args[0] * args[1]
        elif op == "add.s64":
            regs[dest] = (args[0] + args[1]) % (1 << 64)
        elif op == "prmt.b32":
            regs[dest] = prmt(*args)
        elif op == "mapa.shared::cluster.u32":
            regs[dest] = cluster_address(args[0] % CLUSTER_RANK, args[1])
        elif op == "add.rn.f32":
            regs[dest] = float_bits(bits_float(args[0]) + bits_float(args[1]))
        else:
            raise AssertionError(f"the emulator does not know {op}")
    return regs
