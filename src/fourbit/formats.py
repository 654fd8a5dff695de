"""The numbers of the 4-bit formats: code tables, the 8-bit dynamic map, the allowed settings,
and the one form nested statistics take from the functional layer down to the kernels.

Everything here is plain data or a small builder of it. Every other module takes its tables
from here, so each number is defined exactly once.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

#: NormalFloat4 (QLoRA): quantiles of N(0, 1), normalised to [-1, 1]; index = the 4-bit value.
NF4_VALUES: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

#: FP4 (1 sign, 2 exponent, 1 mantissa bit) in bit-pattern order, before dividing by 12. The
#: "-0" pattern holds +0.0, as bitsandbytes' table does (its checkpoints store these bytes).
FP4_RAW_VALUES: tuple[float, ...] = (
    0.0,
    0.0625,
    8.0,
    12.0,
    4.0,
    6.0,
    2.0,
    3.0,
    0.0,
    -0.0625,
    -8.0,
    -12.0,
    -4.0,
    -6.0,
    -2.0,
    -3.0,
)

#: Symmetric 4-bit integers, bitsandbytes' optional "int4" table (before normalisation).
INT4_RAW_VALUES: tuple[float, ...] = (7, 6, 5, 4, 3, 2, 1, 0, 0.0, -1, -2, -3, -4, -5, -6, -7)

#: AbnormalFloat4 for blocksize 64 (arXiv:2306.06965), bitsandbytes' optional "af4" table.
AF4_64_VALUES: tuple[float, ...] = (
    1.0,
    0.72424863,
    0.55496234,
    0.42563882,
    0.31675666,
    0.21961274,
    0.12934483,
    0.04273164,
    0.0,
    -0.04934812,
    -0.14982478,
    -0.25607552,
    -0.3736951,
    -0.51243739,
    -0.69441008,
    -1.0,
)

#: 4-bit types that quantize_4bit / dequantize_4bit accept.
QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4")

#: Block sizes (elements per absmax) accepted for 4-bit quantization.
BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)

#: Block sizes accepted for 8-bit blockwise quantization (bitsandbytes allows the same set).
BLOCKWISE_BLOCKSIZES: tuple[int, ...] = BLOCKSIZES

#: Floating dtypes that can be quantized (and that dequantization can produce).
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)

#: Input dtypes of a product with a 4-bit weight: the kernels' three, and float64, which is
#: multiplied (as bitsandbytes does) by the weight decoded in its own dtype and then widened.
PRODUCT_DTYPES: tuple[torch.dtype, ...] = (*FLOAT_DTYPES, torch.float64)

#: Dtypes the packed 4-bit bytes may be viewed as (``quant_storage``).
QUANT_STORAGE_DTYPES: tuple[torch.dtype, ...] = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)

#: Blocksize of the 8-bit quantization of absmax in nested statistics ("double quantization").
NESTED_BLOCKSIZE = 256

#: Default 4-bit blocksize.
DEFAULT_BLOCKSIZE = 64


class NestedStatistics(NamedTuple):
    """Nested ("double-quantized") statistics, as the kernels take them: 4-bit block ``i`` has the
    absmax ``code[q_i] * absmax[i // blocksize] + offset``, ``q_i`` its stored 8-bit code.

    The fields are in the order of the ops' four ``nested_*`` arguments, which a schema keeps flat
    (``nested_absmax``, ``nested_code``, ``nested_offset``, ``nested_blocksize``).
    """

    absmax: torch.Tensor
    code: torch.Tensor
    offset: torch.Tensor
    blocksize: int = NESTED_BLOCKSIZE

    @classmethod
    def of(
        cls,
        absmax: torch.Tensor | None,
        code: torch.Tensor | None,
        offset: torch.Tensor | None,
        blocksize: int = NESTED_BLOCKSIZE,
    ) -> NestedStatistics | None:
        """From an op's four flat arguments: None for a weight without nested statistics. The three
        tensors come together or not at all."""
        if absmax is None and code is None and offset is None:
            return None
        tensors = {"nested_absmax": absmax, "nested_code": code, "nested_offset": offset}
        missing = [name for name, value in tensors.items() if value is None]
        if missing:
            raise ValueError(
                f"nested statistics need nested_absmax, nested_code and nested_offset together; {missing} missing"
            )
        return cls(absmax, code, offset, blocksize)


def nested_op_arguments(nested: NestedStatistics | None) -> dict[str, Any]:
    """The ops' four ``nested_*`` keyword arguments describing ``nested`` (or its absence)."""
    values = (None, None, None, NESTED_BLOCKSIZE) if nested is None else tuple(nested)
    return dict(zip(("nested_absmax", "nested_code", "nested_offset", "nested_blocksize"), values, strict=True))


def get_4bit_type(typename: str, device: torch.device | str | None = None, blocksize: int = 64) -> torch.Tensor:
    """Return the 16-entry float32 code table of ``typename`` ("nf4", "fp4", "int4" or "af4").

    The table is indexed by the 4-bit value and spans [-1, 1]. Unlike bitsandbytes, whose
    default device is "cuda", the default ``device`` is the CPU, so this works everywhere.
    """
    if typename == "nf4":
        values = NF4_VALUES
    elif typename == "fp4":
        values = FP4_RAW_VALUES
    elif typename == "int4":
        values = INT4_RAW_VALUES
    elif typename == "af4":
        if blocksize != 64:
            raise ValueError(f"the af4 table exists only for blocksize 64, got blocksize={blocksize}")
        values = AF4_64_VALUES
    else:
        raise ValueError(f"unknown 4-bit type {typename!r}; expected one of 'nf4', 'fp4', 'int4', 'af4'")
    table = torch.tensor(values, dtype=torch.float32, device=device)
    return table.div_(table.abs().max())


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """Build the sorted float32 "dynamic" map (Dettmers 2015) used for 8-bit blockwise quantization.

    For each exponent level ``i`` the map holds the midpoints of ``2**(i + b) + 1`` evenly spaced
    points in [0.1, 1], scaled by ``10**(i - max_exponent_bits + 1)`` (both signs when ``signed``),
    then 0 and 1; it is padded with zeros to ``2**total_bits`` entries and sorted.
    """
    non_sign_bits = total_bits - 1
    if not 0 < max_exponent_bits <= non_sign_bits:
        raise ValueError(
            f"max_exponent_bits must be between 1 and total_bits - 1 = {non_sign_bits}, got {max_exponent_bits}"
        )
    values: list[float] = []

    def add_level(level: int, points: int) -> None:
        edges = torch.linspace(0.1, 1.0, points, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (level - max_exponent_bits + 1)
        values.extend((scale * means).tolist())
        if signed:
            values.extend((-scale * means).tolist())

    for level in range(max_exponent_bits):
        extra_bit = 0 if signed else 1
        add_level(level, 2 ** (level + non_sign_bits - max_exponent_bits + extra_bit) + 1)
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    if additional_items > 0:
        add_level(max_exponent_bits - 1, additional_items + 1)
    values.extend((0.0, 1.0))
    size = 2**total_bits
    values.extend([0.0] * (size - len(values)))
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def create_fp8_map(
    signed: bool = True, exponent_bits: int = 5, precision_bits: int = 2, total_bits: int = 8
) -> torch.Tensor:
    """The sorted float32 map of a small float format, for ``quantize_blockwise(code=...)``.

    Every exponent field ``e`` and mantissa ``m`` gives ``(1 + m / 2**p) * 2**(bias + 1 - e)`` for
    ``e > 0`` and ``(m / 2**p) * 2**-bias`` for ``e = 0`` (bias ``2**(exponent_bits - 1)``), with
    both signs when ``signed``; formats of fewer than 8 bits are padded with zeros to 256 entries.
    The map is sorted and divided by its largest value, as bitsandbytes builds it.
    """
    sign_bits = 1 if signed else 0
    if exponent_bits < 1 or precision_bits < 0 or exponent_bits + precision_bits + sign_bits != total_bits:
        raise ValueError(
            f"exponent_bits ({exponent_bits}) + precision_bits ({precision_bits}) + a sign bit ({sign_bits}) "
            f"must make total_bits ({total_bits})"
        )
    if total_bits > 8:
        raise ValueError(f"total_bits must be at most 8, got {total_bits}")
    bias = 2 ** (exponent_bits - 1)
    values: list[float] = []
    for exponent in range(2**exponent_bits):
        for mantissa in range(2**precision_bits):
            # the mantissa bits read most significant first, as a binary fraction
            fraction = sum(
                ((mantissa >> (precision_bits - 1 - i)) & 1) * 2.0 ** -(i + 1) for i in range(precision_bits)
            )
            # exponent field 0 holds the subnormals
            value = fraction * 2.0**-bias if exponent == 0 else (1.0 + fraction) * 2.0 ** -(exponent - bias - 1)
            values.append(value)
            if signed:
                values.append(-value)
    values.extend([0.0] * (256 - len(values)))
    values.sort()
    code = torch.tensor(values, dtype=torch.float32)
    return code / code.max()


def create_normal_map(offset: float = 0.9677083, use_extra_value: bool = True) -> torch.Tensor:
    """The 256-entry float32 map of normal quantiles NF4 is built from (QLoRA's construction):
    quantiles of the standard normal at ``offset`` down to 0.5, eight positive (seven without
    ``use_extra_value``) and seven negative, zero in every other entry, sorted and divided by the
    largest. The quantiles are taken in float64 from float32 probabilities, as bitsandbytes'
    ``create_normal_map`` takes them through scipy (which fourbit does not need)."""
    if not 0.5 < offset < 1:
        raise ValueError(f"offset must lie between 0.5 and 1 (a probability above the median), got {offset!r}")

    def quantiles(count: int) -> torch.Tensor:
        probabilities = torch.linspace(offset, 0.5, count + 1)[:-1]  # float32, as the reference map's
        return torch.special.ndtri(probabilities.double()).float()

    positive = quantiles(8 if use_extra_value else 7)
    negative = -quantiles(7)
    zeros = torch.zeros(256 - positive.numel() - negative.numel())
    values = torch.cat([positive, zeros, negative]).sort().values
    return values / values.max()


def create_linear_map(signed: bool = True, total_bits: int = 8, add_zero: bool = True) -> torch.Tensor:
    """An evenly spaced float32 map from -1 (0 unsigned) to 1 for ``quantize_blockwise(code=...)``:
    ``2**total_bits`` values, one fewer when signed and ``add_zero`` or fewer than 8 bits (so that
    zero lies on the grid), padded with zeros in the middle to 256 entries."""
    if isinstance(total_bits, bool) or not isinstance(total_bits, int) or not 1 <= total_bits <= 8:
        raise ValueError(f"total_bits must be a whole number from 1 to 8, got {total_bits!r}")
    count = 2**total_bits
    if signed and (add_zero or total_bits < 8):
        count -= 1
    values = torch.linspace(-1.0 if signed else 0.0, 1.0, count)
    half = values.numel() // 2
    return torch.cat([values[:half], torch.zeros(256 - values.numel()), values[half:]])


def packed_nbytes(numel: int) -> int:
    """Bytes needed to pack ``numel`` 4-bit values, two per byte (an odd count is padded)."""
    return (numel + 1) // 2


def num_blocks(numel: int, blocksize: int) -> int:
    """Number of absmax blocks for ``numel`` elements (the last block may be short)."""
    return -(-numel // blocksize)
