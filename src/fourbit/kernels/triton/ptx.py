"""The PTX text the Triton kernels inline, built in one place by plain string builders, so that
it can be read and tested without a GPU:

* the byte-permute decode of a packed word into 16-bit values (``byte_permute``, and inside the
  fragment kernel's steps);
* the shared table of code pairs (compact or spread), a step's lookups in it, one 64-column step
  of the fragment kernel's (``fragments``) ``mma.sync`` products, and the nested-code lookup;
* the quantizer's (``quantize``) shared lane table: its fill and one entry's read.

The ``wgmma`` kernels' PTX is ``wgmma_ptx``'s.
"""

from __future__ import annotations

__all__ = [
    "COMPACT_ROW_BYTES",
    "DECODE_SCRATCH",
    "PAIRS",
    "SPREAD_ROW_BYTES",
    "SPREAD_TABLE_OFFSET",
    "TABLE_WORDS",
    "decode_asm",
    "decode_word_ptx",
    "lane_table_entry_ptx",
    "lane_table_fill_ptx",
    "lookups_ptx",
    "nested_code_ptx",
    "step_constraints",
    "step_ptx",
    "table_bytes",
    "table_ptx",
]


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


def decode_asm() -> str:
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


#: 32-bit words of the compact shared table: 256 byte values x 32 lanes of code pairs, then the
#: 256 float32 codes of nested statistics.
PAIRS = 256 * 32
TABLE_WORDS = PAIRS + 256
#: Bytes from one byte value's row of code pairs to the next: 32 lanes of 4 bytes (compact), or
#: twice that (spread), so that one byte permute forms a lookup's offset (value x 256 + lane x 4)
#: where the compact table takes a byte permute and a multiply-add. A compact table is a static
#: array; a spread one (65 KiB, more than a static array may take) lies in the dynamic shared
#: memory at ``SPREAD_TABLE_OFFSET``, a constant, which ptxas folds into each lookup's load.
COMPACT_ROW_BYTES = 128
SPREAD_ROW_BYTES = 256
#: Where a spread table starts in the dynamic shared memory: past Triton's own use of it, which
#: the launch checks (``launch.KernelLaunch``'s ``head_shared``).
SPREAD_TABLE_OFFSET = 1024


def table_bytes(row_bytes: int) -> int:
    """Shared bytes of the table whose rows of code pairs are ``row_bytes`` apart (its nested codes included)."""
    return 256 * row_bytes + 4 * 256


def _table_start(row_bytes: int, register: str) -> str:
    """PTX that puts the table's shared address in ``register``."""
    if row_bytes == COMPACT_ROW_BYTES:
        return f"mov.u32 {register}, fourbit_code_table;"
    return f"mov.u32 {register}, global_smem;\nadd.u32 {register}, {register}, {SPREAD_TABLE_OFFSET};"


def table_ptx(row_bytes: int = COMPACT_ROW_BYTES, dynamic: int = 0) -> str:
    """PTX that fills the shared table (once per program; every thread runs it) and returns this
    lane's address in it (compact) or its byte offset in a row (spread, ``row_bytes`` 256; it
    traps when the dynamic shared memory is under the ``dynamic`` bytes the program needs).
    Pair entry ``row_bytes * v + 4 * lane`` holds the two 16-bit codes of packed byte value ``v``
    (high nibble in the low half), looked up by byte permutes in the plane words $1 .. $8; after
    the pairs come the nested codes, of which each thread stores the ones among $9 .. $12 (codes
    ``tid``, ``tid + threads``, ...) that exist.

    Thread ``tid`` fills lanes ``4j .. 4j + 3`` (``j = tid % 8``) of values ``tid / 8``, then every
    ``threads / 8`` more: one decode gives four values, each stored to its four lanes by one
    16-byte store, so a thread stores 16-byte words a quarter as often as 4-byte ones."""
    planes = tuple(f"${i}" for i in range(1, 9))
    stores = []
    for q in range(4):  # value v + q * slots
        if q:
            stores.append(f"mad.lo.u32 a, slots, {row_bytes}, a;")
        stores.append(f"st.shared.v4.b32 [a], {{q{q}, q{q}, q{q}, q{q}}};")
    if row_bytes == COMPACT_ROW_BYTES:
        setup = [f".shared .align 16 .b32 fourbit_code_table[{table_bytes(row_bytes) // 4}];", "{"]
        lane = "mad.lo.u32 $0, t, 4, base;"
    else:
        setup = ["{", f"mov.u32 s, %dynamic_smem_size;\nsetp.lt.u32 more, s, {dynamic};\n@more trap;"]
        lane = "shl.b32 $0, t, 2;"
    return "\n".join(
        [
            setup[0],
            DECODE_SCRATCH + ".reg .b32 q<4>, v, slots, word, a, tid, threads, column, base;\n.reg .pred more;",
            *setup[1:],
            "mov.u32 tid, %tid.x;\nmov.u32 threads, %ntid.x;\nshr.u32 v, tid, 3;\nshr.u32 slots, threads, 3;",
            _table_start(row_bytes, "base"),
            f"mov.u32 t, %laneid;\n{lane}",
            "and.b32 column, tid, 7;\nmad.lo.u32 column, column, 16, base;",
            "fourbit_code_table_pairs:",
            "mul.lo.u32 word, v, 0x01010101;\nmad.lo.u32 word, slots, 0x03020100, word;",  # v, v + S, v + 2S, v + 3S
            decode_word_ptx("word", ("q0", "q1", "q2", "q3"), planes),
            f"mad.lo.u32 a, v, {row_bytes}, column;",
            *stores,
            "mad.lo.u32 v, slots, 4, v;\nsetp.lt.u32 more, v, 256;\n@more bra fourbit_code_table_pairs;",
            f"mad.lo.u32 a, tid, 4, base;\nadd.u32 a, a, {256 * row_bytes};",
            *(
                f"mad.lo.u32 v, threads, {i}, tid;\nsetp.lt.u32 more, v, 256;\n"
                f"@more st.shared.b32 [a], ${9 + i};\nmad.lo.u32 a, threads, 4, a;"
                for i in range(4)
            ),
            "bar.sync 0;",
            "}",
        ]
    )


def step_ptx(tiles: int, element: str, row_bytes: int = COMPACT_ROW_BYTES) -> str:
    """PTX for one 64-column step of one lane: the accumulators ``$0 ..`` (four per tile of input
    rows, the instruction's accumulator fragment) plus the products of the two weight rows' words
    (two int64 operands, two words each) with the input (one int64, four 16-bit values, per
    instruction and tile), scaled by the rows' absmax. The operands after the inputs are the old
    accumulators, the two scales and the lane's table address. ``element`` is the PTX type of
    the 16-bit values (bf16 or f16)."""
    count = 4 * tiles
    row_g, row_h = f"${count}", f"${count + 1}"
    inputs = [f"${count + 2 + i}" for i in range(count)]
    old = [f"${2 * count + 2 + i}" for i in range(count)]
    scale_g, scale_h, table = (f"${3 * count + 2 + i}" for i in range(3))
    lines = [
        "{",
        ".reg .b32 w<4>, g<8>, h<8>, b<2>, t, a;\n.reg .f32 z, d<8>;\nmov.f32 z, 0f00000000;",
        f"mov.b64 {{w0, w1}}, {row_g};",
        f"mov.b64 {{w2, w3}}, {row_h};",
    ]
    lines += lookups_ptx(table, row_bytes)
    for j in range(4):  # instruction j takes columns 4j .. 4j + 3 of the lane's 16
        fragment = f"g{2 * j}, h{2 * j}, g{2 * j + 1}, h{2 * j + 1}"
        for tile in range(tiles):
            out = ", ".join(f"d{4 * tile + c}" for c in range(4))
            accumulator = "z, z, z, z" if j == 0 else out
            lines.append(f"mov.b64 {{b0, b1}}, {inputs[4 * tile + j]};")
            lines.append(
                f"mma.sync.aligned.m16n8k16.row.col.f32.{element}.{element}.f32 "
                f"{{{out}}}, {{{fragment}}}, {{b0, b1}}, {{{accumulator}}};"
            )
    for i in range(count):  # accumulators 0, 1 of a tile are row g's, 2, 3 row g + 8's
        lines.append(f"fma.rn.f32 ${i}, d{i}, {scale_g if i % 4 < 2 else scale_h}, {old[i]};")
    lines.append("}")
    return "\n".join(lines)


def lookups_ptx(table: str, row_bytes: int = COMPACT_ROW_BYTES) -> list[str]:
    """PTX that looks up the 16 packed bytes of words w0 .. w3 (rows g, g, g + 8, g + 8) in the
    shared table (``table``: the lane's address, or in a spread table its offset in a row; see
    ``table_ptx``): pairs g0 .. g7 of row g, h0 .. h7 of row g + 8. Scratch: ``t, a``."""
    lines = [] if row_bytes == COMPACT_ROW_BYTES else [_table_start(row_bytes, "a")]
    for word, pairs in (("w0", "g0 g1 g2 g3"), ("w1", "g4 g5 g6 g7"), ("w2", "h0 h1 h2 h3"), ("w3", "h4 h5 h6 h7")):
        for byte, pair in enumerate(pairs.split()):
            if row_bytes == COMPACT_ROW_BYTES:
                lines.append(
                    f"prmt.b32 t, {word}, 0, 0x444{byte};\nmad.lo.u32 a, t, 128, {table};\nld.shared.b32 {pair}, [a];"
                )
            else:  # the byte as bits 8-15 over the lane's offset (bits 0-7), then the table's address
                lines.append(f"prmt.b32 t, {word}, {table}, 0x76{byte}4;\nadd.u32 t, t, a;\nld.shared.b32 {pair}, [t];")
    return lines


def step_constraints(tiles: int) -> str:
    """Inline-asm constraints of ``step_ptx(tiles, ...)``: outputs, int64 and float operands, the table address."""
    return ",".join(["=f"] * (4 * tiles) + ["l"] * (2 + 4 * tiles) + ["f"] * (4 * tiles + 2) + ["r"])


def nested_code_ptx(row_bytes: int = COMPACT_ROW_BYTES) -> str:
    """PTX that reads nested code ``$1`` (a float32 after the pairs in the shared table, laid out
    as ``table_ptx`` says) into ``$0``."""
    return (
        f"{{\n.reg .b32 a;\n{_table_start(row_bytes, 'a')}\nmad.lo.u32 a, $1, 4, a;\n"
        f"ld.shared.f32 $0, [a + {256 * row_bytes}];\n}}"
    )


def lane_table_fill_ptx(entries: int, columns: int) -> str:
    """The quantizer's PTX that copies its cell table of ``entries`` 64-bit entries (operand $1, a
    global address) into the shared lane table of ``columns`` columns. Every thread runs it once;
    warp ``w`` stores entries ``w, w + warps, ...``, lanes ``l`` and ``l + columns`` the same column."""
    return "\n".join(
        [
            f".shared .align 16 .b64 fourbit_cell_table[{entries * columns}];",
            "{",
            ".reg .b32 column, entry, warps, a;\n.reg .b64 p, v;\n.reg .pred more;",
            f"mov.u32 column, %laneid;\nand.b32 column, column, {columns - 1};",
            "mov.u32 entry, %tid.x;\nshr.u32 entry, entry, 5;\nmov.u32 warps, %ntid.x;\nshr.u32 warps, warps, 5;",
            "fourbit_cell_table_fill:",
            "mul.wide.u32 p, entry, 8;\nadd.s64 p, p, $1;\nld.global.nc.b64 v, [p];",
            f"mov.u32 a, fourbit_cell_table;\nmad.lo.u32 a, entry, {8 * columns}, a;\nmad.lo.u32 a, column, 8, a;",
            "st.shared.b64 [a], v;",
            f"add.u32 entry, entry, warps;\nsetp.lt.u32 more, entry, {entries};\n@more bra fourbit_cell_table_fill;",
            "bar.sync 0;",
            "mov.u32 $0, column;",
            "}",
        ]
    )


def lane_table_entry_ptx(columns: int) -> str:
    """The quantizer's PTX that reads entry $1 of the shared lane table (``lane_table_fill_ptx``)
    from this lane's column into $0."""
    return (
        f"{{\n.reg .b32 a, l;\nmov.u32 l, %laneid;\nand.b32 l, l, {columns - 1};\n"
        f"mov.u32 a, fourbit_cell_table;\nmad.lo.u32 a, l, 8, a;\nmad.lo.u32 a, $1, {8 * columns}, a;\n"
        "ld.shared.b64 $0, [a];\n}"
    )
