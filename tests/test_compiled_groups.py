"""Grouped 4-bit products under torch.compile (``fourbit.compiled_groups``, ``fourbit::linear_4bit_group``).

The pass groups by the input's device; the tests let it group CPU products, whose grouped op
runs its members one by one, so that what it does to a graph is checked without a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fourbit
from fourbit import ops_grouped
from fourbit.compiled_groups import MAX_WEIGHTS, GroupedProducts, compile_options, group_products
from fourbit.nn import Linear4bit

LINEAR = torch.ops.fourbit.linear_4bit.default
GROUP = torch.ops.fourbit.linear_4bit_group.default
#: What grouping rests on: inductor's custom graph passes, and traces whose every node carries
#: its value (torch 2.6 and newer; ``compile_options`` refuses older torch).
needs_graph_passes = pytest.mark.skipif(
    torch.__version__ < (2, 6), reason=f"grouped products need torch 2.6 or newer, not {torch.__version__}"
)


def _layer(n: int, k: int, blocksize: int = 64, bias: bool = False, compress: bool = True) -> Linear4bit:
    layer = Linear4bit(k, n, bias=bias, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=compress,
                       blocksize=blocksize)  # fmt: skip
    state = {"weight": torch.randn(n, k) * k**-0.5}
    if bias:
        state["bias"] = torch.randn(n)
    layer.load_state_dict(state)
    return layer.to("cpu").eval()


class Block(nn.Module):
    """q, k and v of one input; gate and up of another (the attention output's stand-in)."""

    def __init__(self, hidden: int = 128, kv: int = 32, intermediate: int = 192, **options) -> None:
        super().__init__()
        self.q, self.k, self.v = (_layer(n, hidden, **options) for n in (hidden, kv, kv))
        self.gate, self.up = _layer(intermediate, hidden, **options), _layer(intermediate, hidden, **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        z = q * 0.5 + torch.cat([k, v], -1).sum(-1, keepdim=True)
        return self.gate(z) * self.up(z)


def _op_arguments(layer: Linear4bit) -> dict:
    """The layer's arguments of ``fourbit::linear_4bit`` but the input, as plain tensors."""
    state = layer.weight.quant_state
    arguments = dict(packed=layer.weight.data.as_subclass(torch.Tensor), absmax=state.absmax, code=state.code,
                     blocksize=state.blocksize, shape=list(state.shape), bias=layer.bias)  # fmt: skip
    if state.nested:
        arguments.update(nested_absmax=state.state2.absmax, nested_code=state.state2.code, nested_offset=state.offset,
                         nested_blocksize=state.state2.blocksize)  # fmt: skip
    return arguments


def _traced(module: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    """``module``'s graph of aten and fourbit ops (the 4-bit layers calling ``fourbit::linear_4bit``
    on plain tensors, as a compiled forward does)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    originals = {}
    for layer in module.modules():
        if isinstance(layer, Linear4bit):
            originals[layer] = layer.forward
            arguments = _op_arguments(layer)
            layer.forward = lambda x, arguments=arguments: LINEAR(x, **arguments)
    try:
        with torch.no_grad():
            return make_fx(module, tracing_mode="fake", _allow_non_fake_inputs=True)(x)
    finally:
        for layer, forward in originals.items():
            layer.forward = forward


def _count(graph: torch.fx.Graph, target) -> int:
    return sum(1 for node in graph.nodes if node.op == "call_function" and node.target is target)


@needs_graph_passes
def test_the_pass_groups_products_of_one_input_and_keeps_their_values():
    torch.manual_seed(0)
    block = Block()
    x = torch.randn(3, 128)
    traced = _traced(block, x)
    assert _count(traced.graph, LINEAR) == 5
    assert group_products(traced.graph, devices=("cpu",)) == 2
    traced.recompile()
    assert _count(traced.graph, LINEAR) == 0 and _count(traced.graph, GROUP) == 2
    with torch.no_grad():
        assert torch.equal(traced(x), block(x))


@needs_graph_passes
def test_the_pass_leaves_a_product_whose_tensors_carry_no_value():
    """The group's value is built from its members' tensors' values: a group with a member without
    one (as torch 2.5's traces leave constants) is left as its products, and the graph still runs."""
    torch.manual_seed(0)
    block = Block()
    x = torch.randn(3, 128)
    traced = _traced(block, x)
    products = [node for node in traced.graph.nodes if node.op == "call_function" and node.target is LINEAR]
    packed = torch.fx.operator_schemas.normalize_function(
        LINEAR, products[0].args, products[0].kwargs, normalize_to_only_use_kwargs=True
    ).kwargs["packed"]
    del packed.meta["val"]  # q's packed bytes
    assert group_products(traced.graph, devices=("cpu",)) == 1  # gate with up; q, k and v left
    traced.recompile()
    assert _count(traced.graph, LINEAR) == 3 and _count(traced.graph, GROUP) == 1
    with torch.no_grad():
        assert torch.equal(traced(x), block(x))


@needs_graph_passes
def test_the_pass_leaves_products_it_may_not_group():
    """Inputs of more rows than it groups (or of unknown rows), another device, weights of other
    blocksizes or statistics kinds, one with a bias and one without, and no more than
    ``MAX_WEIGHTS`` a group."""
    torch.manual_seed(0)
    block = Block()
    assert group_products(_traced(block, torch.randn(17, 128)).graph, devices=("cpu",)) == 0
    assert group_products(_traced(block, torch.randn(1, 128)).graph, devices=("cuda",)) == 0

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = _layer(64, 128), _layer(64, 128, blocksize=128)
            self.c, self.d = _layer(64, 128, compress=False), _layer(64, 128, bias=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(x) + self.c(x) + self.d(x)

    assert group_products(_traced(Mixed(), torch.randn(2, 128)).graph, devices=("cpu",)) == 0

    class Many(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(_layer(32, 64) for _ in range(MAX_WEIGHTS + 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([layer(x) for layer in self.layers], -1)

    many = Many()
    x = torch.randn(2, 64)
    traced = _traced(many, x)
    assert group_products(traced.graph, devices=("cpu",)) == 2  # 3 + 2
    traced.recompile()
    with torch.no_grad():
        assert torch.equal(traced(x), many(x))


def test_the_group_op_is_its_members_products_side_by_side():
    torch.manual_seed(1)
    layers = [_layer(n, 64, bias=True) for n in (48, 16, 16)]
    x = torch.randn(2, 5, 64)
    states = [layer.weight.quant_state for layer in layers]
    nested = [state.state2 for state in states]
    packed = [layer.weight.data for layer in layers]
    out = ops_grouped.linear_4bit_group(
        x, packed, [state.absmax for state in states], [state.code for state in states], 64, [48, 16, 16],
        [layer.bias for layer in layers], [n.absmax for n in nested], [n.code for n in nested],
        [state.offset for state in states], nested[0].blocksize,
    )  # fmt: skip
    with torch.no_grad():
        expected = torch.cat([layer(x) for layer in layers], -1)
    assert out.shape == (2, 5, 80)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


class _Counting(GroupedProducts):
    """The pass, counting the groups it makes."""

    made = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        type(self).made += group_products(graph, self.devices, self.max_rows)


@pytest.mark.cpu_only  # inductor's C++ code: a minute and more on a GPU machine's shared cores, no CUDA in it
@needs_graph_passes
def test_a_compiled_model_with_the_options_groups_and_gives_the_same_outputs():
    torch.manual_seed(2)
    block = Block()
    x = torch.randn(4, 128)
    options = compile_options(devices=("cpu",))
    assert isinstance(options["post_grad_custom_post_pass"], GroupedProducts)
    options["post_grad_custom_post_pass"] = _Counting(("cpu",))
    options["fx_graph_cache"] = False  # a cached graph would skip the pass, which the test counts
    _Counting.made = 0
    torch._dynamo.reset()
    compiled = torch.compile(block, options=options, fullgraph=True)
    with torch.no_grad():
        out, expected = compiled(x), block(x)
    assert _Counting.made == 2
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@needs_graph_passes
def test_a_compiled_training_step_with_grouped_products_gives_the_eager_gradients():
    """The pass runs on the forward graph after autograd was traced: a step with a gradient (and
    a trainable layer on one member's output, as LoRA adds) keeps eager's loss and gradients."""
    torch.manual_seed(3)
    block, adapter = Block(), nn.Linear(128, 128)
    x = torch.randn(4, 128, requires_grad=True)
    options = compile_options(devices=("cpu",))
    options["post_grad_custom_post_pass"] = _Counting(("cpu",))
    options["fx_graph_cache"] = False
    _Counting.made = 0

    def step(x: torch.Tensor) -> torch.Tensor:
        return block(x).sum() + adapter(block.q(x)).sum()

    torch._dynamo.reset()
    results = []
    for run in (torch.compile(step, options=options, fullgraph=True), step):
        x.grad = adapter.weight.grad = None
        loss = run(x)
        loss.backward()
        results.append((loss.detach(), x.grad.clone(), adapter.weight.grad.clone()))
    assert _Counting.made == 2
    for compiled, eager in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-3)


@needs_graph_passes
def test_compile_options_carry_the_modes_options_and_a_pass_keyed_on_its_arguments():
    options = fourbit.compile_options("reduce-overhead")
    assert options["triton.cudagraphs"] is True
    grouped = options["post_grad_custom_post_pass"]
    # by default, the devices whose grouped op is one launch: CUDA where Triton runs, else none
    with_kernel = fourbit.ops.triton_enabled() and torch.cuda.is_available()
    assert grouped.devices == ops_grouped.GROUPED_DEVICES == (("cuda",) if with_kernel else ())
    assert grouped.uuid() == GroupedProducts().uuid() != GroupedProducts(("cpu",)).uuid()
    assert set(compile_options()) == {"post_grad_custom_post_pass"}
    assert compile_options(devices="cuda")["post_grad_custom_post_pass"].devices == ("cuda",)
    with pytest.raises(TypeError, match="device type names"):
        compile_options(devices=[torch.device("cuda")])
    with pytest.raises(AttributeError, match="no attribute"):
        fourbit.no_such_thing  # noqa: B018
