"""The CPU op path's kept weights (``fourbit.kernels.cpu._op_prepared``): calls on the same tensors,
or on new aliases of them as torch.compile passes, gather the weight's pointers once, and never
read anything stale: in-place changes, replaced tensors and converted copies all give what a
fresh weight gives."""

from __future__ import annotations

import pytest
import torch
from helpers import needs_fullgraph

import fourbit.functional as F4
from fourbit.formats import get_4bit_type
from fourbit.kernels import cpu, reference
from fourbit.kernels.cpu import native

pytestmark = pytest.mark.skipif(not native.available(), reason="no working C++ compiler here")

SHAPE = (64, 256)


def _arguments(nested: bool, seed: int = 0) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(seed)
    packed, state = F4.quantize_4bit(torch.randn(SHAPE), blocksize=64, compress_statistics=nested)
    # copies: code tables may be shared with every other weight, and the tests change them in place
    arguments = {name: value.clone() if isinstance(value, torch.Tensor) else value
                 for name, value in F4.op_arguments(state, packed.device).items()}  # fmt: skip
    return packed, dict(arguments, blocksize=64, shape=SHAPE)


def _aliases(packed: torch.Tensor, arguments: dict) -> tuple[torch.Tensor, dict]:
    """New tensor objects over the same memory, as a compiled graph passes its inputs each call."""
    alias = {name: value.view(value.shape) if isinstance(value, torch.Tensor) else value
             for name, value in arguments.items()}  # fmt: skip
    return packed.view(packed.shape), alias


def _truth(x: torch.Tensor, packed: torch.Tensor, arguments: dict) -> torch.Tensor:
    """The reference's product of copies of the tensors (nothing shared with any kept weight)."""
    copies = {name: value.clone() if isinstance(value, torch.Tensor) else value for name, value in arguments.items()}
    return reference.linear_4bit(x, packed.clone(), **copies)


@pytest.fixture(autouse=True)
def _empty_cache():
    cpu._op_weights.clear()
    yield
    cpu._op_weights.clear()


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_aliases_of_the_same_tensors_share_one_kept_weight(nested):
    packed, arguments = _arguments(nested)
    x = torch.randn(3, SHAPE[1])
    first = cpu.linear_4bit(x, packed, **arguments)
    for _ in range(3):
        alias, alias_arguments = _aliases(packed, arguments)
        assert torch.equal(cpu.linear_4bit(x, alias, **alias_arguments), first)
    assert torch.equal(cpu.dequantize_4bit(packed, dtype=torch.float32, **arguments),
                       reference.dequantize_4bit(packed, dtype=torch.float32, **arguments))  # fmt: skip
    assert len(cpu._op_weights) == 1
    torch.testing.assert_close(first, _truth(x, packed, arguments), rtol=1e-4, atol=4e-4)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_in_place_changes_are_read_by_the_next_call(nested):
    """Every tensor the kept weight points at is changed in place in turn; each call after a
    change gives what the reference gives for the changed tensors."""
    packed, arguments = _arguments(nested)
    other, other_arguments = _arguments(nested, seed=1)
    x = torch.randn(2, SHAPE[1])
    cpu.linear_4bit(x, packed, **arguments)
    changes = [
        lambda: packed.copy_(other),
        lambda: arguments["absmax"].copy_(other_arguments["absmax"]),
        lambda: arguments["code"].copy_(get_4bit_type("fp4")),
    ]
    if nested:
        changes += [
            lambda: arguments["nested_absmax"].mul_(2),
            lambda: arguments["nested_offset"].add_(0.5),
            lambda: arguments["nested_code"].mul_(-1),
        ]
    for change in changes:
        change()
        alias, alias_arguments = _aliases(packed, arguments)
        out = cpu.linear_4bit(x, alias, **alias_arguments)
        torch.testing.assert_close(out, _truth(x, packed, arguments), rtol=1e-4, atol=4e-4)
    assert len(cpu._op_weights) == 1


def test_replaced_tensors_get_a_weight_of_their_own():
    packed, arguments = _arguments(True)
    x = torch.randn(2, SHAPE[1])
    cpu.linear_4bit(x, packed, **arguments)
    replaced = dict(arguments, absmax=arguments["absmax"].clone())
    out = cpu.linear_4bit(x, packed, **replaced)
    assert len(cpu._op_weights) == 2
    torch.testing.assert_close(out, _truth(x, packed, replaced), rtol=1e-4, atol=4e-4)


@pytest.mark.parametrize(
    "convert",
    [
        lambda arguments: dict(arguments, code=arguments["code"].double()),
        lambda arguments: dict(arguments, absmax=arguments["absmax"].half()),
        lambda arguments: dict(arguments, absmax=torch.stack([arguments["absmax"]] * 2, 1)[:, 0]),
    ],
    ids=["float64 code", "float16 absmax", "strided absmax"],
)
def test_statistics_the_library_must_convert_are_not_kept(convert):
    """A weight that reads converted copies would read stale ones after an in-place change: it
    is built for each call instead, and gives the reference's product."""
    packed, arguments = _arguments(False)
    converted = convert(arguments)
    x = torch.randn(2, SHAPE[1])
    for _ in range(2):
        out = cpu.linear_4bit(x, packed, **converted)
        torch.testing.assert_close(out, _truth(x, packed, converted), rtol=1e-3, atol=4e-3)
    assert len(cpu._op_weights) == 0


def test_the_code_table_is_read_as_it_is_with_its_negative_zero_decoded_as_positive():
    """A code table with -0.0 (FP4's "-0" bit pattern as a checkpoint may store it): the library
    reads the code tensor itself and decodes that entry as +0.0, as the reference does."""
    code = get_4bit_type("fp4").clone()
    code[8] = -0.0
    packed = torch.full((SHAPE[0] * SHAPE[1] // 2, 1), 0x88, dtype=torch.uint8)
    absmax = torch.ones(SHAPE[0] * SHAPE[1] // 64)
    for dtype in (torch.float32, torch.bfloat16):
        out = cpu.dequantize_4bit(packed, absmax, code, 64, SHAPE, dtype)
        assert torch.equal(out, torch.zeros(SHAPE, dtype=dtype)) and not torch.signbit(out).any()
        assert not torch.signbit(reference.dequantize_4bit(packed, absmax, code, 64, SHAPE, dtype)).any()
    assert torch.signbit(code[8]) and len(cpu._op_weights) == 1


def test_a_full_cache_starts_over(monkeypatch):
    monkeypatch.setattr(cpu, "OP_WEIGHTS_LIMIT", 2)
    x = torch.randn(1, SHAPE[1])
    weights = [_arguments(False, seed) for seed in range(3)]
    for packed, arguments in weights:
        cpu.linear_4bit(x, packed, **arguments)
    assert len(cpu._op_weights) == 1
    for packed, arguments in weights:
        torch.testing.assert_close(cpu.linear_4bit(x, packed, **arguments), _truth(x, packed, arguments),
                                   rtol=1e-4, atol=4e-4)  # fmt: skip


@needs_fullgraph  # older dynamo runs each 4-bit layer eagerly, past the op
def test_a_compiled_layer_keeps_one_weight_and_follows_in_place_changes():
    from fourbit.nn import Linear4bit

    torch.manual_seed(0)
    layer = Linear4bit(
        SHAPE[1], SHAPE[0], bias=False, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=False
    )
    layer.load_state_dict(torch.nn.Linear(SHAPE[1], SHAPE[0], bias=False).state_dict())
    layer = layer.to("cpu").eval()
    compiled = torch.compile(layer)
    x = torch.randn(2, SHAPE[1])
    with torch.no_grad():
        eager = layer(x)
        torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)
        kept = len(cpu._op_weights)
        layer.weight.quant_state.absmax.mul_(2)  # the statistics change in place: the graph still reads them
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled(x), 2 * eager, rtol=1e-5, atol=1e-5)
    assert kept == 1 and len(cpu._op_weights) == 1
