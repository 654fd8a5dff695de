"""The PTX of the byte-permute decoder and of the fragment kernel's table fill, executed by a
small emulator of the instructions they use.

The inline assembly runs only on NVIDIA GPUs (tests/test_triton.py and
tests/test_triton_tensor_core.py check it there). Here the same text is interpreted instruction
by instruction (the decoder on random words, the fill for every thread of a program), so CI
checks selectors, byte orders and table addresses without a GPU; ``plane_words`` runs as a
Triton kernel (interpreted without a GPU).
"""

from __future__ import annotations

import pytest
import torch
from helpers import describe_dtype
from ptx_emulator import MASK, Trapped, run_thread

triton = pytest.importorskip("triton", minversion="3.6")  # fourbit.ops.MIN_TRITON
import triton.language as tl  # noqa: E402

from fourbit.formats import get_4bit_type  # noqa: E402
from fourbit.kernels.triton.byte_permute import _DECODE_ASM, plane_words  # noqa: E402
from fourbit.kernels.triton.ptx import (  # noqa: E402
    COMPACT_ROW_BYTES,
    SPREAD_ROW_BYTES,
    SPREAD_TABLE_OFFSET,
    lookups_ptx,
    table_bytes,
    table_ptx,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # conftest.py interprets Triton without a GPU


@triton.jit
def _plane_words_kernel(code_ptr, out_ptr, DTYPE: tl.constexpr):
    p0, p1, p2, p3, p4, p5, p6, p7 = plane_words(code_ptr, DTYPE)
    tl.store(out_ptr + 0, p0)
    tl.store(out_ptr + 1, p1)
    tl.store(out_ptr + 2, p2)
    tl.store(out_ptr + 3, p3)
    tl.store(out_ptr + 4, p4)
    tl.store(out_ptr + 5, p5)
    tl.store(out_ptr + 6, p6)
    tl.store(out_ptr + 7, p7)


def _planes(code: torch.Tensor, dtype: torch.dtype) -> list[int]:
    out = torch.zeros(8, dtype=torch.int32, device=DEVICE)
    _plane_words_kernel[(1,)](code.to(DEVICE), out, DTYPE=tl.float16 if dtype == torch.float16 else tl.bfloat16)
    return [int(word) & MASK for word in out.cpu()]


def _run(asm: str, inputs: dict[str, int]) -> dict[str, int]:
    """Execute the straight-line PTX ``asm`` with operands ``$n`` bound from ``inputs``; returns
    every register, 16-bit outputs included."""
    return run_thread(asm, inputs, {}, {})


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=describe_dtype)
def test_decoder_asm_looks_up_every_nibble_in_element_order(quant_type, dtype):
    code = get_4bit_type(quant_type)
    planes = _planes(code, dtype)
    expected_bits = code.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
    words = [*torch.randint(0, 2**32, (300,), dtype=torch.int64).tolist(), 0, MASK, 0x01234567, 0x89ABCDEF]
    for word in words:
        operands = {f"${8 + i + 1}": planes[i] for i in range(8)}
        operands["$8"] = word
        regs = _run(_DECODE_ASM.value, operands)
        data = word.to_bytes(4, "little")
        nibbles = [nibble for byte in data for nibble in (byte >> 4, byte & 15)]  # element order
        decoded = [regs[f"${i}"] for i in range(8)]
        assert decoded == [int(expected_bits[q]) for q in nibbles], hex(word)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=describe_dtype)
def test_plane_words_split_each_rounded_code_into_bytes(quant_type, dtype):
    code = get_4bit_type(quant_type)
    words = _planes(code, dtype)
    bits = (code.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF).tolist()  # torch rounds to nearest even
    for entry, value in enumerate(bits):
        word, byte = divmod(entry, 4)
        assert (words[word] >> (8 * byte)) & 0xFF == value >> 8
        assert (words[4 + word] >> (8 * byte)) & 0xFF == value & 0xFF


def _filled_table(row_bytes: int, threads: int, planes: list[int], nested: list[int]) -> tuple[int, dict, list]:
    """The table's address, the shared words a program of ``threads`` threads stores by
    ``table_ptx(row_bytes)`` (its static array at 1024, or its dynamic shared memory from 512),
    and what the fill returned to each thread."""
    shared: dict[int, int] = {}
    returned = []
    dynamic = 200 * 1024
    symbols = {"fourbit_code_table": 1024, "global_smem": 512, "%dynamic_smem_size": dynamic}
    base = 1024 if row_bytes == COMPACT_ROW_BYTES else 512 + SPREAD_TABLE_OFFSET
    for tid in range(threads):
        inputs = {f"${i + 1}": planes[i] for i in range(8)}
        inputs |= {f"${9 + i}": nested[tid + i * threads] if tid + i * threads < 256 else 0 for i in range(4)}
        special = {"%tid.x": tid, "%ntid.x": threads, "%laneid": tid % 32, **symbols}
        returned.append(run_thread(table_ptx(row_bytes, dynamic), inputs, special, shared)["$0"])
    return base, shared, returned


@pytest.mark.parametrize("row_bytes", [COMPACT_ROW_BYTES, SPREAD_ROW_BYTES])
@pytest.mark.parametrize("threads", [64, 128, 256, 512])
def test_the_fragment_table_fill_gives_every_lane_every_pair_and_the_nested_codes(threads, row_bytes):
    """Every thread of a program runs the fill: entry ``row_bytes * v + 4 * lane`` of the table
    holds byte value v's two codes (high nibble in the low half) whatever the program's size, each
    lane gets its own column's address (compact) or offset (spread), the nested codes follow the
    pairs, and nothing is written outside, for programs of 2-16 warps (``fragment_plan``'s widest).
    (Each thread stores four nested codes, so a program needs two warps or more: fragment_launch.)"""
    code = get_4bit_type("nf4")
    planes = _planes(code, torch.bfloat16)
    nested = [((0x3F000000 + i) & MASK) for i in range(256)]  # any 32-bit patterns, one per code
    bits = [int(b) & 0xFFFF for b in code.to(torch.bfloat16).view(torch.int16).tolist()]
    base, shared, returned = _filled_table(row_bytes, threads, planes, nested)
    lane_base = base if row_bytes == COMPACT_ROW_BYTES else 0
    assert returned == [lane_base + 4 * (tid % 32) for tid in range(threads)]
    expected = {
        base + row_bytes * v + 4 * lane: bits[v >> 4] | bits[v & 15] << 16 for v in range(256) for lane in range(32)
    }
    expected |= {base + 256 * row_bytes + 4 * i: nested[i] for i in range(256)}
    assert shared == expected
    assert max(shared) < base + table_bytes(row_bytes)


def test_a_spread_table_traps_in_too_little_dynamic_shared_memory():
    """The fill stops the program when the launch gave less dynamic shared memory than it needs."""
    special = {"%tid.x": 0, "%ntid.x": 64, "%laneid": 0, "global_smem": 0, "%dynamic_smem_size": 4096}
    with pytest.raises(Trapped):
        run_thread(table_ptx(SPREAD_ROW_BYTES, 4097), {f"${i}": 0 for i in range(1, 13)}, special, {})
    run_thread(table_ptx(SPREAD_ROW_BYTES, 4096), {f"${i}": 0 for i in range(1, 13)}, special, {})


@pytest.mark.parametrize("row_bytes", [COMPACT_ROW_BYTES, SPREAD_ROW_BYTES])
def test_a_lanes_lookups_read_its_own_column_of_each_packed_bytes_row(row_bytes):
    """The steps' lookups (prmt + multiply-add in a compact table, one prmt in a spread one) give
    every lane the two codes of each of its 16 packed bytes, in byte order, from its own column."""
    code = get_4bit_type("fp4")
    planes = _planes(code, torch.bfloat16)
    bits = [int(b) & 0xFFFF for b in code.to(torch.bfloat16).view(torch.int16).tolist()]
    base, shared, returned = _filled_table(row_bytes, 64, planes, [0] * 256)
    asm = "\n".join(lookups_ptx("$0", row_bytes))
    words = [*torch.randint(0, 2**32, (6, 4), dtype=torch.int64).tolist(), [0, MASK, 0x01234567, 0x89ABCDEF]]
    for lane, word in zip([0, 5, 31, 17, 2, 30, 9], words, strict=True):
        inputs = {"$0": returned[lane]} | {f"w{i}": word[i] for i in range(4)}
        # each lane's entries only: another lane's column would give the same codes
        column = {a: v for a, v in shared.items() if (a - base) % row_bytes == 4 * lane}
        regs = run_thread(asm, inputs, {"fourbit_code_table": 1024, "global_smem": 512}, column)
        data = [byte for w in word for byte in w.to_bytes(4, "little")]
        looked_up = [regs[f"g{i}"] for i in range(8)] + [regs[f"h{i}"] for i in range(8)]
        assert looked_up == [bits[byte >> 4] | bits[byte & 15] << 16 for byte in data], (lane, word)
