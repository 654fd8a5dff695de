"""Decoding packed 4-bit codes to 16-bit floats with byte permutes (PTX ``prmt``), no memory lookup.

A ``prmt`` picks four bytes out of two 32-bit registers by four 3-bit selectors, so it looks four
nibbles up in an 8-entry byte table at once. The 16 codes, rounded to bfloat16 or float16, are
split into their high and low bytes ("planes"), each a 16-entry byte table held in four
registers: two ``prmt`` look the four low-three-bit indices up in both halves of a plane and a
third picks each byte's half by the index's top bit. Two more ``prmt`` interleave the planes into
16-bit values: 2.75 integer instructions per weight, where a gather from a table in memory costs
a load per weight. PTX runs only on NVIDIA GPUs: under the Triton interpreter, callers use the
gather path instead.
"""

from __future__ import annotations

import triton
import triton.language as tl


def decode_word_ptx(word: str, pairs: tuple[str, str, str, str], planes: tuple[str, ...]) -> str:
    """PTX that decodes the little-endian int32 register ``word`` (byte j holds element 2j in its
    high nibble and element 2j + 1 in its low one) into four 32-bit ``pairs`` of 16-bit values,
    elements (0, 1), (2, 3), (4, 5), (6, 7), the lower element in the low half. ``planes`` names
    the eight ``plane_words`` (four of high bytes, then four of low bytes). Uses the scratch
    registers ``s, c, t, u, hi, lo`` (declared by ``DECODE_SCRATCH``).

    Each half word is four nibbles: ``s`` holds their low three bits as ``prmt`` selectors, ``c``
    picks byte i from the first (0-3) or second (4-7) half of a plane by nibble i's top bit.
    Nibble i selects byte i of ``hi``/``lo``; the last ``prmt`` of each pair puts an element's
    low and high byte side by side (nibble 1, element 0, in the low half).
    """
    h0, h1, h2, h3, l0, l1, l2, l3 = planes

    def half(first: str, second: str) -> str:
        return (
            f"prmt.b32 t, {h0}, {h1}, s;\nprmt.b32 u, {h2}, {h3}, s;\nprmt.b32 hi, t, u, c;\n"
            f"prmt.b32 t, {l0}, {l1}, s;\nprmt.b32 u, {l2}, {l3}, s;\nprmt.b32 lo, t, u, c;\n"
            f"prmt.b32 {first}, lo, hi, 0x4051;\nprmt.b32 {second}, lo, hi, 0x6273;\n"
        )

    return (
        f"and.b32 s, {word}, 0x77777777;\nshr.u32 t, {word}, 1;\nand.b32 t, t, 0x44444444;\n"
        "or.b32 c, t, 0x3210;\n"
        + half(pairs[0], pairs[1])
        + "shr.u32 s, s, 16;\nshr.u32 c, c, 16;\nor.b32 c, c, 0x3210;\n"
        + half(pairs[2], pairs[3])
    )


#: Declarations of the scratch registers ``decode_word_ptx`` uses.
DECODE_SCRATCH = ".reg .b32 s, c, t, u, hi, lo;\n"


def _decode_asm() -> str:
    """PTX for one int32 word of packed data ($8): its eight elements as 16-bit values $0 .. $7,
    looked up in the plane words $9 .. $16."""
    planes = tuple(f"${i}" for i in range(9, 17))
    unpack = "".join(f"mov.b32 {{${2 * i}, ${2 * i + 1}}}, p{i};\n" for i in range(4))
    return (
        "{\n"
        + DECODE_SCRATCH
        + ".reg .b32 p0, p1, p2, p3;\n"
        + decode_word_ptx("$8", ("p0", "p1", "p2", "p3"), planes)
        + unpack
        + "}\n"
    )


_DECODE_ASM = tl.constexpr(_decode_asm())

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
