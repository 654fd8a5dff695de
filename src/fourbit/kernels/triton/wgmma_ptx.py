"""The PTX text of Hopper's ``wgmma`` kernels (``wgmma``, ``wgmma_wide``), built by plain string
builders so that it can be read and tested without a GPU: a step's decode into the instruction's
register operand and its products, the ring of staged inputs and the ring's barriers. The table
lookups are ``ptx``'s.
"""

from __future__ import annotations

from .ptx import COMPACT_ROW_BYTES, lookups_ptx

__all__ = [
    "cluster_sum_constraints",
    "cluster_sum_ptx",
    "wgmma_constraints",
    "wgmma_issue_ptx",
    "wgmma_ring_ptx",
    "wgmma_step_ptx",
    "wgmma_wait_ptx",
    "wide_constraints",
    "wide_drain_constraints",
    "wide_release_ptx",
    "wide_step_ptx",
]


#: Byte offsets between the ``wgmma`` kernel's staged core matrices (8 input rows x 16 bytes):
#: along K (the two of an instruction's 16 columns) and along the input rows (no swizzle).
WGMMA_K_OFFSET = 128
WGMMA_ROW_OFFSET = 256


def _wgmma_lines(rows: int, element: str, slot: str, accumulators: str, scale_d: list[str]) -> list[str]:
    """PTX that issues one step's four ``wgmma.m64n{rows}k16`` over the staged inputs at shared
    address ``slot`` into ``accumulators``, the lane's decoded pairs g0 .. g7 and h0 .. h7 as the
    register operand (instruction j takes columns 4j .. 4j + 3 of the lane's 16, as in
    ``step_ptx``); ``scale_d[j]`` says whether instruction j adds to the accumulators. The
    descriptors differ in their low word only (the start address), added to in 32 bits."""
    lines = [
        f"shr.u32 a, {slot}, 4;\nand.b32 a, a, 0x3FFF;\nor.b32 a, a, {(WGMMA_K_OFFSET >> 4) << 16};",
        f"mov.b32 t, {WGMMA_ROW_OFFSET >> 4};\nmov.b64 desc0, {{a, t}};",
        *(f"add.u32 a, a, {rows * 32 >> 4};\nmov.b64 desc{j}, {{a, t}};" for j in range(1, 4)),
        "wgmma.fence.sync.aligned;",
    ]
    for j in range(4):
        fragment = f"g{2 * j}, h{2 * j}, g{2 * j + 1}, h{2 * j + 1}"
        lines.append(
            f"wgmma.mma_async.sync.aligned.m64n{rows}k16.f32.{element}.{element} {{{accumulators}}}, "
            f"{{{fragment}}}, desc{j}, {scale_d[j]}, 1, 1, 0;"
        )
    return lines


def wgmma_step_ptx(rows: int, element: str) -> str:
    """PTX for one 64-column step of the ``wgmma`` kernel in one thread of a warpgroup: the
    lane's two weight rows decoded by the shared table (as ``step_ptx``) into the register
    operand of four ``wgmma.m64n{rows}k16`` over the inputs staged at shared address $(P+5),
    waited for, and the step's products scaled by the rows' absmax into the accumulators. The
    accumulators are ``rows / 4`` int64 operands, two float32 each (``$0 ..`` new, after the
    six others the old); the others are the rows' words (two int64), their scales and the
    lane's table address. ``element`` is the PTX type of the 16-bit values (bf16 or f16)."""
    pairs = rows // 4
    count = rows // 2
    w_g, w_h, scale_g, scale_h, table, slot = (f"${pairs + i}" for i in range(6))
    lines = [
        "{",
        f".reg .b32 w<4>, g<8>, h<8>, t, a;\n.reg .b64 desc<4>;\n.reg .f32 d<{count}>, o<2>, n<2>;",
        ".reg .pred first, rest;\nmov.b32 t, 0;\nsetp.ne.b32 first, t, 0;\nsetp.eq.b32 rest, t, 0;",
        f"mov.b64 {{w0, w1}}, {w_g};\nmov.b64 {{w2, w3}}, {w_h};",
        *lookups_ptx(table),
        *_wgmma_lines(rows, element, slot, ", ".join(f"d{i}" for i in range(count)), ["first"] + ["rest"] * 3),
    ]
    lines.append("wgmma.commit_group.sync.aligned;\nwgmma.wait_group.sync.aligned 0;")
    for i in range(pairs):  # pair i: accumulators 2i, 2i + 1, of row g (i even) or g + 8
        scale = scale_g if i % 2 == 0 else scale_h
        lines.append(
            f"mov.b64 {{o0, o1}}, ${pairs + 6 + i};\nfma.rn.f32 n0, d{2 * i}, {scale}, o0;\n"
            f"fma.rn.f32 n1, d{2 * i + 1}, {scale}, o1;\nmov.b64 ${i}, {{n0, n1}};"
        )
    lines.append("}")
    return "\n".join(lines)


def wgmma_constraints(rows: int) -> str:
    """Inline-asm constraints of ``wgmma_step_ptx(rows, ...)``."""
    pairs = rows // 4
    return ",".join(["=l"] * pairs + ["l", "l", "f", "f", "r", "r"] + ["l"] * pairs)


def wgmma_ring_ptx(ring_bytes: int, slots: int, consumers: int = 0, sync: bool = True) -> str:
    """PTX that returns ($0) the shared address of the ``wgmma`` kernels' ring: the last
    ``ring_bytes`` of the dynamic shared memory, whose last ``8 * slots`` bytes (``16 * slots``
    with ``consumers``) are the slots' barriers, which thread 0 sets up: one "full" barrier a
    slot, then (with ``consumers``) one "empty" barrier a slot that ``consumers`` threads arrive
    on. Traps when the launch gave less dynamic shared memory. With ``sync`` the program's
    threads then wait for one another, so that the set-up is visible to all; without, thread 0
    may use the barriers at once (its first copies) and the program's next ``bar.sync`` (the
    shared table's fill) must come before any other thread waits on them."""
    barrier_bytes = 8 * slots * (2 if consumers else 1)
    counts = [1] * slots + [consumers] * (slots if consumers else 0)
    lines = [
        "{",
        ".reg .b32 b, s, t;\n.reg .pred few, lead;",
        "mov.u32 b, global_smem;\nmov.u32 s, %dynamic_smem_size;",
        f"setp.lt.u32 few, s, {ring_bytes};\n@few trap;",
        f"add.u32 b, b, s;\nsub.u32 $0, b, {ring_bytes};\nsub.u32 b, b, {barrier_bytes};",
        "mov.u32 t, %tid.x;\nsetp.eq.u32 lead, t, 0;",
        *(f"@lead mbarrier.init.shared::cta.b64 [b+{8 * i}], {count};" for i, count in enumerate(counts)),
        "@lead fence.mbarrier_init.release.cluster;",
        *(["bar.sync 0;"] if sync else []),
        "}",
    ]
    return "\n".join(lines)


def wgmma_issue_ptx(step_bytes: int, empty_offset: int = 0) -> str:
    """PTX by which thread 0 copies staged step $5 (``step_bytes`` each from global address $1)
    into the ring slot at shared address $2 when $3 is non-zero, completing on the slot's "full"
    barrier $4; the other threads branch past it, so that the warps that issue nothing spend
    three instructions on it. With ``empty_offset`` (the wide kernel's ring), thread 0 first
    waits, when $6 is non-zero, for phase $7 of the slot's "empty" barrier, ``empty_offset``
    bytes past the full one: the slot's last readers are done."""
    wait = [
        f"setp.eq.u32 p, $6, 0;\n@p bra fourbit_issue_released;\nadd.u32 e, $4, {empty_offset};",
        "fourbit_issue_release_wait:\nmbarrier.try_wait.parity.shared::cta.b64 done, [e], $7;",
        "@!done bra fourbit_issue_release_wait;\nfourbit_issue_released:",
    ]
    return "\n".join(
        [
            "{",
            ".reg .pred p, done;\n.reg .b32 t, e;\n.reg .b64 source;",
            "mov.u32 t, %tid.x;\nsetp.ne.u32 p, t, 0;\n@p bra fourbit_issue_done;",
            *(wait if empty_offset else []),
            "setp.eq.u32 p, $3, 0;\n@p bra fourbit_issue_done;",
            f"mul.wide.u32 source, $5, {step_bytes};\nadd.s64 source, source, $1;",
            f"mbarrier.arrive.expect_tx.shared::cta.b64 _, [$4], {step_bytes};",
            f"cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [$2], [source], {step_bytes}, [$4];",
            "fourbit_issue_done:\nmov.b32 $0, 0;",
            "}",
        ]
    )


def wgmma_wait_ptx(sync: bool = True) -> str:
    """PTX that waits (``sync``) for the program's threads, so that no ``wgmma`` still reads the
    slot the next copy refills, then for phase $2 of the slot barrier at $1; returns the slot's
    address $3."""
    return "\n".join(
        [
            "{",
            ".reg .pred p;" + ("\nbar.sync 0;" if sync else ""),
            "fourbit_wgmma_wait:\nmbarrier.try_wait.parity.shared::cta.b64 p, [$1], $2;\n@!p bra fourbit_wgmma_wait;",
            "mov.b32 $0, $3;",
            "}",
        ]
    )


def wide_release_ptx(empty_offset: int) -> str:
    """PTX by which a thread arrives on a slot's "empty" barrier (``empty_offset`` bytes past its
    "full" barrier $1) when $2 is non-zero: the slot it read is no longer read (its ``wgmma``
    were waited for)."""
    return (
        "{\n.reg .pred p;\n.reg .b32 e;\nsetp.ne.b32 p, $2, 0;\n"
        f"add.u32 e, $1, {empty_offset};\n@p mbarrier.arrive.shared::cta.b64 _, [e];\nmov.b32 $0, 0;\n}}"
    )


def wide_step_ptx(rows: int, element: str, row_bytes: int = COMPACT_ROW_BYTES) -> str:
    """PTX for one 64-column step of the wide ``wgmma`` kernel in one thread: its two weight rows'
    words ($2C, $2C+1, int64; C = rows / 2) decoded by the shared table ($2C+4) as ``step_ptx``
    does, scaled by the rows' absmax ($2C+2, $2C+3) and rounded once to ``element`` as the decode
    that feeds cuBLAS rounds them (bf16: two packed instructions a pair, ``_split_scale``; f16,
    whose range the absmax may leave: in float32), then four ``wgmma.m64n{rows}k16`` over
    the inputs at shared address $2C+5 added to the accumulators $0 .. $(C-1) (tied to the next
    C operands). The products are left running; the step issued before is waited for, so that
    its ring slot may be refilled and its operand registers reused. ``row_bytes`` says how the
    table is laid out (``table_ptx``)."""
    count = rows // 2
    w_g, w_h, scale_g, scale_h, table, slot = (f"${2 * count + i}" for i in range(6))
    lines = [
        "{",
        ".reg .b32 w<4>, g<8>, h<8>, t, a, lo, hi, sg<2>, sh<2>;\n.reg .b16 l16, h16;\n.reg .b64 desc<4>;",
        f"mov.b64 {{w0, w1}}, {w_g};\nmov.b64 {{w2, w3}}, {w_h};",
        *lookups_ptx(table, row_bytes),
    ]
    pairs = [(f"g{i}", scale_g, "sg") for i in range(8)] + [(f"h{i}", scale_h, "sh") for i in range(8)]
    if element == "bf16":
        lines += _split_scale(scale_g, "sg") + _split_scale(scale_h, "sh")
        for pair, _, split in pairs:  # code x high part, plus code x low part, rounded once
            lines.append(f"mul.rn.bf16x2 t, {pair}, {split}1;\nfma.rn.bf16x2 {pair}, {pair}, {split}0, t;")
    else:
        for pair, scale, _ in pairs:
            lines.append(f"mov.b32 {{l16, h16}}, {pair};\ncvt.f32.f16 lo, l16;\ncvt.f32.f16 hi, h16;")
            lines.append(f"mul.f32 lo, lo, {scale};\nmul.f32 hi, hi, {scale};\ncvt.rn.f16x2.f32 {pair}, hi, lo;")
    lines += _wgmma_lines(rows, element, slot, ", ".join(f"${i}" for i in range(count)), ["1"] * 4)
    lines += ["wgmma.commit_group.sync.aligned;", "wgmma.wait_group.sync.aligned 1;", "}"]
    return "\n".join(lines)


def _split_scale(scale: str, split: str) -> list[str]:
    """PTX that splits the float32 ``scale`` into two bf16 parts, each in both halves of a 32-bit
    register: ``{split}0`` its rounding to bf16, ``{split}1`` the rest rounded to bf16. Their sum
    holds 16 of the scale's bits, so that a bf16 code times the high part plus its product with
    the low part, summed by one ``fma`` (one rounding), is the code times the float32 scale
    rounded once to bf16 (bar ties within 2**-17 of it): as the float32 scaling rounds it."""
    return [
        f"cvt.rn.bf16x2.f32 {split}0, {scale}, {scale};\nand.b32 lo, {split}0, 0xFFFF0000;",
        f"sub.f32 lo, {scale}, lo;\ncvt.rn.bf16x2.f32 {split}1, lo, lo;",
    ]


def wide_constraints(rows: int) -> str:
    """Inline-asm constraints of ``wide_step_ptx(rows, ...)``: the accumulators tied in and out."""
    return wide_drain_constraints(rows) + ",l,l,f,f,r,r"


def wide_drain_constraints(rows: int) -> str:
    """Constraints of an asm block that takes the wide kernel's ``rows / 2`` accumulators and
    gives them back in the same registers (tied)."""
    count = rows // 2
    return ",".join(["=f"] * count + [str(i) for i in range(count)])


#: Bytes between one accumulator's values and the next in a program's tile of partial sums: one
#: float32 a thread of the wide kernel's 256.
PARTIAL_STRIDE = 256 * 4


def cluster_share(count: int, cluster: int) -> int:
    """Accumulators of ``count`` (four an 8-row chunk of outputs) each program of a cluster of
    ``cluster`` adds and writes: whole chunks, the last program's share short where ``cluster``
    does not divide them."""
    chunks = count // 4
    return 4 * -(-chunks // cluster)


def cluster_sum_ptx(count: int, cluster: int) -> str:
    """PTX that adds a thread's ``count`` accumulators ($S .. $S+count-1; S = ``cluster_share``)
    across the ``cluster`` programs of a thread block cluster, each of which took a part of K.
    Every program stores its partial sums at shared address $S+count (thread-major: value i of
    thread t at ``i * PARTIAL_STRIDE + 4t``, no bank shared within a warp); after a cluster
    barrier, program $S+count+1 (its rank) reads values ``rank * S ..`` (below ``count``; zeros
    past it in the last program's share) of its thread from every program of the cluster in
    rank order, so the sums do not depend on which program finishes first, and returns them
    ($0 .. $S-1). A last cluster barrier keeps every program's shared memory until all have
    read it. The program's threads must be done with that memory (the first ``bar.sync``)."""
    share = cluster_share(count, cluster)
    partials, rank = f"${share + count}", f"${share + count + 1}"
    lines = [
        "{",
        f".reg .b32 base, mine, r<{cluster}>;\n.reg .f32 v;\n.reg .pred inside;",
        "bar.sync 0;",
        f"mov.u32 base, %tid.x;\nshl.b32 base, base, 2;\nadd.u32 base, base, {partials};",
        *(f"st.shared.f32 [base+{i * PARTIAL_STRIDE}], ${share + i};" for i in range(count)),
        "barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;",
        f"mad.lo.u32 mine, {rank}, {share * PARTIAL_STRIDE}, base;",
        f"setp.lt.u32 inside, {rank}, {cluster - 1};",
        *(f"mapa.shared::cluster.u32 r{r}, mine, {r};" for r in range(cluster)),
    ]
    for j in range(share):
        guard = ""
        if (cluster - 1) * share + j >= count:  # past the accumulators in the last program's share
            lines.append(f"mov.b32 ${j}, 0;")
            guard = "@inside "
        lines.append(f"{guard}ld.shared::cluster.f32 ${j}, [r0+{j * PARTIAL_STRIDE}];")
        for r in range(1, cluster):
            lines.append(f"{guard}ld.shared::cluster.f32 v, [r{r}+{j * PARTIAL_STRIDE}];")
            lines.append(f"{guard}add.rn.f32 ${j}, ${j}, v;")
    lines += ["barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;", "}"]
    return "\n".join(lines)


def cluster_sum_constraints(count: int, cluster: int) -> str:
    """Inline-asm constraints of ``cluster_sum_ptx(count, cluster)``."""
    return ",".join(["=f"] * cluster_share(count, cluster) + ["f"] * count + ["r", "r"])
