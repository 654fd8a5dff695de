"""Decoding packed 4-bit codes to 16-bit floats with byte permutes (PTX ``prmt``), no memory lookup.

A ``prmt`` picks four bytes out of two 32-bit registers by four 3-bit selectors, so it looks four
nibbles up in an 8-entry byte table at once. The 16 codes, rounded to bfloat16 or float16, are
split into their high and low bytes ("planes"), each a 16-entry byte table held in four
registers: two ``prmt`` look the four low-three-bit indices up in both halves of a plane and a
third picks each byte's half by the index's top bit. Two more ``prmt`` interleave the planes into
16-bit values: 2.75 integer instructions per weight, where a gather from a table in memory costs
a load per weight. The PTX text comes from ``ptx.decode_asm``. PTX runs only on NVIDIA GPUs:
under the Triton interpreter, callers use the gather path instead.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .ptx import decode_asm

_DECODE_ASM = tl.constexpr(decode_asm())

_CONSTRAINTS = tl.constexpr("=h," * 8 + "r" + ",r" * 8)


@triton.jit
def plane_words(code_ptr, DTYPE: tl.constexpr):
    """The 16-entry float32 table at ``code_ptr`` rounded to ``DTYPE`` (bfloat16 or float16) as
    eight int32 scalars: four words of high bytes, then four of low bytes, entry ``i`` in byte
    ``i % 4`` of word ``i // 4``. Built once per program from the table itself, so any code
    table works and nothing is cached on the host."""
    code = tl.load(code_ptr + tl.arange(0, 16))
    if tl.float16 == DTYPE:
        bits = code.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    else:  # round to nearest even in integers (finite codes): exact under the interpreter too
        full = code.to(tl.int32, bitcast=True)
        bits = ((full + 0x7FFF + ((full >> 16) & 1)) >> 16) & 0xFFFF
    shifts = 8 * (tl.arange(0, 16) % 4)
    word = tl.arange(0, 16) // 4
    high = (bits >> 8) << shifts
    low = (bits & 0xFF) << shifts
    return (
        tl.sum(tl.where(word == 0, high, 0)),
        tl.sum(tl.where(word == 1, high, 0)),
        tl.sum(tl.where(word == 2, high, 0)),
        tl.sum(tl.where(word == 3, high, 0)),
        tl.sum(tl.where(word == 0, low, 0)),
        tl.sum(tl.where(word == 1, low, 0)),
        tl.sum(tl.where(word == 2, low, 0)),
        tl.sum(tl.where(word == 3, low, 0)),
    )


@triton.jit
def decode_words(words, planes, DTYPE: tl.constexpr):
    """The codes of the 2-d ``words`` (int32, 8 nibbles each) as ``DTYPE`` (bfloat16 or float16),
    ``(rows, 8 * columns)`` in element order, looked up in the eight ``plane_words``."""
    p0, p1, p2, p3, p4, p5, p6, p7 = planes
    args = [words, p0, p1, p2, p3, p4, p5, p6, p7]
    if tl.float16 == DTYPE:
        e0, e1, e2, e3, e4, e5, e6, e7 = tl.inline_asm_elementwise(
            _DECODE_ASM, _CONSTRAINTS, args, (tl.float16,) * 8, True, 1
        )
    else:
        e0, e1, e2, e3, e4, e5, e6, e7 = tl.inline_asm_elementwise(
            _DECODE_ASM, _CONSTRAINTS, args, (tl.bfloat16,) * 8, True, 1
        )
    # join adds a last axis, so the element at [..., a, b, c] is 4a + 2b + c: c is the outer join
    joined = tl.join(tl.join(tl.join(e0, e4), tl.join(e2, e6)), tl.join(tl.join(e1, e5), tl.join(e3, e7)))
    return tl.reshape(joined, (words.shape[0], 8 * words.shape[1]))
