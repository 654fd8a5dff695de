"""A Linear4bit's statistics in one buffer (``fourbit.state_buffer``): the state's tensors are views
of it, compiled calls read it alone, and every change to the state is still seen."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from helpers import TRUE_FALSE, available_devices, id_formatter, needs_fullgraph, needs_guard_filter

import fourbit as bnb
import fourbit.functional as F4
from fourbit.state_buffer import current_statistics_buffer, traced_arguments

DEVICES = available_devices()


@pytest.fixture(autouse=True)
def _fresh_compiler_caches():
    """Each test compiles layers of its own: without a reset, the compiled ``Linear4bit.forward``
    of one file's tests passes dynamo's recompile limit."""
    torch.compiler.reset()


def _layer(device: str, nested: bool = True, quant_type: str = "nf4", blocksize: int = 64, shape=(48, 96)):
    torch.manual_seed(0)
    out_features, in_features = shape
    layer = bnb.nn.Linear4bit(
        in_features, out_features, bias=False, compute_dtype=torch.float32, compress_statistics=nested,
        quant_type=quant_type, blocksize=blocksize,
    )  # fmt: skip
    return layer.to(device)


def _state_tensors(state):
    tensors = [state.absmax, state.code]
    if state.nested:
        tensors += [state.offset, state.state2.absmax, state.state2.code]
    return tensors


def _compiled(function, device: str):
    return torch.compile(function, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nested", TRUE_FALSE, ids=id_formatter("nested"))
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_the_statistics_become_views_of_one_buffer_with_the_same_values(device, nested, quant_type, blocksize):
    weight = torch.randn(40, 130, device=device)  # 5200 values: a partial last block for most blocksizes
    _, expected = F4.quantize_4bit(weight, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    layer = bnb.nn.Linear4bit(130, 40, bias=False, compress_statistics=nested, quant_type=quant_type,
                              blocksize=blocksize)  # fmt: skip
    layer.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, compress_statistics=nested,
                                     quant_type=quant_type, blocksize=blocksize)  # fmt: skip
    layer.to(device)
    state = layer.weight.quant_state
    buffer = current_statistics_buffer(state)
    assert buffer is not None and buffer.dtype == torch.float32
    for tensor, reference in zip(_state_tensors(state), _state_tensors(expected), strict=True):
        assert tensor.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        assert tensor.data_ptr() % 16 == 0, "every statistic starts 16-byte aligned"
        assert tensor.dtype == reference.dtype and tensor.shape == reference.shape
        assert torch.equal(tensor, reference)
    assert state == expected


@needs_fullgraph
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nested", TRUE_FALSE, ids=id_formatter("nested"))
def test_a_compiled_call_reads_the_buffer_and_the_code_table(device, nested):
    layer = _layer(device, nested)
    inputs: list[int] = []

    def counting_backend(graph_module, example_inputs):
        inputs.append(len(example_inputs))
        return graph_module.forward

    x = torch.randn(3, 96, device=device)
    with torch.no_grad():
        out = torch.compile(layer, fullgraph=True, backend=counting_backend)(x)
        torch.testing.assert_close(out, layer(x), rtol=0, atol=0)
    assert inputs == [3], "the input, the packed weight and the statistics buffer (the code table sliced from it)"

    torch._dynamo.reset()
    inputs.clear()
    x.requires_grad_(True)
    out = torch.compile(layer, fullgraph=True, backend=counting_backend)(x)
    torch.testing.assert_close(out, layer(x), rtol=0, atol=0)
    assert inputs == [4], "a differentiable call reads the state's own code table (a view of the buffer) too"

    torch._dynamo.reset()
    layer.weight.quant_state.absmax = layer.weight.quant_state.absmax.clone()  # no longer a view
    inputs.clear()
    x.requires_grad_(False)
    with torch.no_grad():
        torch.compile(layer, fullgraph=True, backend=counting_backend)(x)
    assert inputs == [7 if nested else 4], "the input, the packed weight and the state's tensors one by one"


@needs_fullgraph
@needs_guard_filter
@pytest.mark.parametrize("nested", TRUE_FALSE, ids=id_formatter("nested"))
def test_a_compiled_call_guards_only_the_traced_arguments_of_the_state(nested):
    """Dynamo checks a guard for every attribute a trace reads before each compiled call; of the
    state, the trace reads its traced arguments (one tuple of plain values and the buffer), not
    its shape, blocksizes, layout or nested state one by one."""
    layer = _layer("cpu", nested)
    names: list[str] = []

    def record(entries):
        names.extend(entry.name for entry in entries)
        return [True] * len(entries)

    compiled = torch.compile(layer, fullgraph=True, backend="eager", options={"guard_filter_fn": record})
    with torch.no_grad():
        compiled(torch.randn(2, 96))
    state_reads = {name.split(".quant_state", 1)[1] for name in names if ".quant_state" in name}
    assert state_reads == {"", "._traced_arguments", "._traced_arguments[0]", "._traced_arguments[2]"}


@needs_fullgraph
@needs_guard_filter
def test_a_compiled_layer_guards_none_of_its_own_methods_or_sizes():
    """Of the module itself, the trace reads only what decides the computation: its type, its
    parameters and its compute dtype settings (state lookups are functions, not methods, whose
    absence from the instance dict dynamo would check per layer; the input's size is checked
    against the state's guarded shape)."""
    layer = _layer("cpu", True)
    guards: list[tuple[str, str]] = []

    def record(entries):
        guards.extend((entry.name, entry.guard_type) for entry in entries)
        return [True] * len(entries)

    compiled = torch.compile(layer, fullgraph=True, backend="eager", options={"guard_filter_fn": record})
    with torch.no_grad():
        compiled(torch.randn(2, 96))
    own = {(name, kind) for name, kind in guards if name == "self" or name.startswith("self.")}
    own = {(name, kind) for name, kind in own if not name.startswith("self._parameters[")}
    assert own == {
        ("self", "TYPE_MATCH"),
        ("self._parameters", "TYPE_MATCH"),
        ("self.compute_dtype", "CONSTANT_MATCH"),
        ("self.compute_type_is_set", "CONSTANT_MATCH"),
    }


@needs_fullgraph
@needs_guard_filter
def test_compiled_layers_guard_no_layer_against_another():
    """Each layer adds its own guards and none that compare it with the other layers: reading a
    layer's class name on the way through (for an error message) made dynamo check the first
    layer's type against every other layer's, in Python, before each call."""
    torch.manual_seed(0)
    layers = [bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4") for _ in range(4)]
    model = torch.nn.Sequential(*layers).to("cpu")
    names: list[str] = []

    def record(entries):
        names.extend(entry.name for entry in entries)
        return [True] * len(entries)

    compiled = torch.compile(model, fullgraph=True, backend="eager", options={"guard_filter_fn": record})
    x = torch.randn(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    assert names, "the guard filter saw the trace's guards"
    assert not [name for name in names if name.startswith("type(")]


@needs_fullgraph
@pytest.mark.parametrize("device", DEVICES)
def test_assigning_an_attribute_of_the_state_drops_its_traced_arguments(device):
    layer, x, compiled, before = _compiled_and_called(device)
    state = layer.weight.quant_state
    assert traced_arguments(state) is not None
    state.blocksize = state.blocksize
    assert traced_arguments(state) is None and current_statistics_buffer(state) is not None
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), before, rtol=0, atol=0)  # traced again, reading the attributes
    layer.weight.share_state_with_module()  # as every load and move does
    assert traced_arguments(state) is not None
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), before, rtol=0, atol=0)


@needs_fullgraph
@pytest.mark.parametrize("device", DEVICES)
def test_a_shallow_copy_of_a_nested_state_sees_its_shared_nested_state_replaced(device):
    layer = _layer(device)
    state = layer.weight.quant_state
    clone = copy.copy(state)
    assert clone.state2 is state.state2 and traced_arguments(clone) is None, "it reads its tensors one by one"
    x = torch.randn(2, 96, device=device)
    compiled = _compiled(lambda inputs: bnb.matmul_4bit(inputs, layer.weight.data.t(), clone), device)
    with torch.no_grad():
        before = compiled(x)
        state.state2.absmax = state.state2.absmax * 2  # shared by both states
        assert current_statistics_buffer(state) is None and traced_arguments(state) is None
        after = compiled(x)
    _assert_changed_to_the_states_product(before, after, x, layer.weight.data, clone)


@pytest.mark.parametrize("device", DEVICES)
def test_a_nested_state_replaced_in_a_deep_copy_drops_the_copys_buffer_only(device):
    layer = _layer(device)
    state = layer.weight.quant_state
    clone = copy.deepcopy(state)
    assert traced_arguments(clone) is not None and traced_arguments(clone)[0] is current_statistics_buffer(clone)
    clone.state2.absmax = clone.state2.absmax * 2
    assert traced_arguments(clone) is None and current_statistics_buffer(clone) is None
    assert traced_arguments(state) is not None and current_statistics_buffer(state) is not None


@pytest.mark.parametrize("device", DEVICES)
def test_a_nested_state_moved_into_another_buffer_drops_the_first_parents(device):
    """Two states sharing one nested state: building the second's buffer makes the nested
    tensors views of it, so the first state's buffer no longer holds them."""
    first = _layer(device).weight.quant_state
    second = copy.deepcopy(first)
    second.state2 = first.state2  # drops the second's buffer
    assert traced_arguments(second) is None
    layer = _layer(device)
    layer.weight.quant_state = second
    layer.weight.share_state_with_module()  # builds the second's buffer around the shared nested state
    assert traced_arguments(second) is not None
    assert traced_arguments(first) is None and current_statistics_buffer(first) is None


def _assert_changed_to_the_states_product(before, after, x, packed, state) -> None:
    """A compiled call after a change gave something new: the product with what ``state`` holds now."""
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, x @ F4.dequantize_4bit(packed, state).T, rtol=1e-5, atol=1e-5)


def _compiled_and_called(device: str):
    """A nested layer, an input, the layer compiled, and its compiled output."""
    layer = _layer(device)
    x = torch.randn(2, 96, device=device)
    compiled = _compiled(layer, device)
    with torch.no_grad():
        return layer, x, compiled, compiled(x)


@needs_fullgraph
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nested", TRUE_FALSE, ids=id_formatter("nested"))
def test_compiled_backward_calls_reuse_the_code_tables_derived_tables(device, nested):
    """A compiled backward receives the code table its forward saved as a new view in each call;
    the tables derived from it are found again, not built (and, under CUDA graph trees, kept in
    the graph's memory pool) once per call."""
    from fourbit.kernels import derived

    layer = _layer(device, nested)
    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    x = torch.randn(3, 96, device=device, requires_grad=True)
    for call in range(3):
        compiled(x).sum().backward()
        if call == 0:
            entries = set(derived._entries)
    assert set(derived._entries) == entries
    expected = torch.ones(3, 48, device=device) @ F4.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    torch.testing.assert_close(x.grad, 3 * expected, rtol=1e-5, atol=1e-5)


@needs_fullgraph
@pytest.mark.parametrize("device", DEVICES)
def test_in_place_changes_reach_compiled_and_eager_calls_alike(device):
    layer, x, compiled, before = _compiled_and_called(device)
    state = layer.weight.quant_state
    with torch.no_grad():
        state.state2.absmax.mul_(2)  # a view: the buffer changes too
        state.code[0] = state.code[0] / 2
        after = compiled(x)
        eager = layer(x)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, x @ F4.dequantize_4bit(layer.weight.data, state).T, rtol=1e-5, atol=1e-5)


@needs_fullgraph
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("replaced", ["absmax", "code", "offset", "state2", "state2.absmax", "state2.code"])
def test_replacing_a_statistic_drops_the_buffer_and_compiled_calls_use_the_new_one(device, replaced):
    layer, x, compiled, before = _compiled_and_called(device)
    state = layer.weight.quant_state
    with torch.no_grad():
        owner, name = (state.state2, replaced.split(".")[1]) if "." in replaced else (state, replaced)
        value = getattr(owner, name)
        if name == "state2":
            value = copy.deepcopy(value)
            value.absmax = value.absmax * 2
        elif name == "absmax" and owner is state:
            value = torch.flip(value, [0])
        else:
            value = value * 2
        setattr(owner, name, value)
        assert current_statistics_buffer(state) is None
        after = compiled(x)
    _assert_changed_to_the_states_product(before, after, x, layer.weight.data, state)


@pytest.mark.parametrize("device", DEVICES)
def test_a_move_to_the_device_the_layer_is_on_keeps_the_buffer(device):
    layer = _layer(device)
    state = layer.weight.quant_state
    buffer = current_statistics_buffer(state)
    tensors = _state_tensors(state)
    layer.to(device)
    state.to(device)
    assert layer.weight.quant_state is state and current_statistics_buffer(state) is buffer
    assert all(a is b for a, b in zip(_state_tensors(state), tensors, strict=True))


@pytest.mark.parametrize("device", DEVICES)
def test_a_move_builds_the_buffer_again(device):
    layer = _layer(device)
    state = layer.weight.quant_state
    state.absmax = state.absmax.clone()
    assert current_statistics_buffer(state) is None
    layer.to(device)
    assert current_statistics_buffer(layer.weight.quant_state) is not None
    assert current_statistics_buffer(layer.to("cpu").weight.quant_state) is not None


@pytest.mark.parametrize("device", DEVICES)
def test_copies_pickles_and_state_dicts_of_a_layer_with_a_buffer(device):
    layer = _layer(device)
    x = torch.randn(2, 96, device=device)
    expected = layer(x)

    clone = copy.deepcopy(layer)
    clone_state = clone.weight.quant_state
    assert current_statistics_buffer(clone_state) is not None
    clone_state.state2.absmax.mul_(2)  # the copy's views share the copy's buffer, not the original's
    assert torch.equal(layer(x), expected) and not torch.equal(clone(x), expected)

    saved = io.BytesIO()
    torch.save(layer, saved)  # refuses views of one storage in two dtypes, unless pickled as copies
    saved.seek(0)
    for restored in (torch.load(saved, weights_only=False), pickle.loads(pickle.dumps(layer))):
        torch.testing.assert_close(restored(x), expected, rtol=0, atol=0)
    assert current_statistics_buffer(layer.weight.quant_state) is not None, "saving changed nothing"

    entries = layer.state_dict()
    pointers = [value.untyped_storage().data_ptr() for value in entries.values()]
    assert len(set(pointers)) == len(pointers), "each entry owns its storage (safetensors refuses shared ones)"
    fresh = bnb.nn.Linear4bit(96, 48, bias=False, compute_dtype=torch.float32, quant_type="nf4", device="meta")
    fresh.load_state_dict(entries, assign=True)
    assert current_statistics_buffer(fresh.weight.quant_state) is not None
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


@needs_fullgraph
def test_states_the_buffer_cannot_hold_keep_their_tensors():
    layer = _layer("cpu", nested=False)
    state = layer.weight.quant_state
    state.absmax = state.absmax.half()
    layer.to("cpu")
    assert current_statistics_buffer(state) is None and state.absmax.dtype == torch.float16
    x = torch.randn(2, 96)
    with torch.no_grad():
        torch.testing.assert_close(_compiled(layer, "cpu")(x), layer(x), rtol=0, atol=0)
