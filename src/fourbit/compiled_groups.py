"""Grouped 4-bit products under ``torch.compile``: a graph pass that runs the projections that
take one input (q, k and v; gate and up) as one ``fourbit::linear_4bit_group`` call.

At decode sizes a product costs a launch and a ramp whatever its weight's size (docs/performance.md),
so fewer launches a layer is what the products need. The pass runs after autograd has been traced
(inductor's post-grad custom pass), so layers, state dicts and checkpoints stay as they are:

    model = torch.compile(model, options=fourbit.compile_options("reduce-overhead"))

It groups ``fourbit::linear_4bit`` calls on the same input tensor whose weights agree in
blocksize, layout and statistics kind, at most ``MAX_WEIGHTS`` a group, on ``devices`` (by default
those with a grouped kernel, ``ops_grouped.GROUPED_DEVICES``: CUDA where Triton runs; elsewhere a
group would run its members one by one and add a concatenation), for inputs
of at most ``max_rows`` rows known when compiling (decode steps; a prefill keeps its products).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from . import ops_grouped
from .formats import NESTED_BLOCKSIZE

try:
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
except ImportError:  # torch before 2.6: compile_options says so
    CustomGraphPass, get_hash_for_files = object, None

__all__ = ["MAX_WEIGHTS", "GroupedProducts", "compile_options", "group_products"]

#: Products one group takes (``kernels.triton.fragment_groups.MAX_WEIGHTS``: q, k and v).
MAX_WEIGHTS = 3
#: Input rows up to which products are grouped (the fragment kernel's).
MAX_ROWS = 16

_LINEAR = torch.ops.fourbit.linear_4bit.default
_GROUP = torch.ops.fourbit.linear_4bit_group.default


def group_products(
    graph: fx.Graph, devices: Sequence[str] = ops_grouped.GROUPED_DEVICES, max_rows: int = MAX_ROWS
) -> int:
    """Replace sibling ``fourbit::linear_4bit`` calls of ``graph`` by grouped calls and slices of
    their output, in place; returns the number of groups made."""
    order = {node: index for index, node in enumerate(graph.nodes)}
    candidates: dict[tuple, list[tuple[fx.Node, dict[str, Any]]]] = {}
    for node in graph.nodes:
        arguments = _arguments(node, devices, max_rows)
        if arguments is not None:
            candidates.setdefault(_group_key(arguments), []).append((node, arguments))
    made = 0
    for members in candidates.values():
        for start in range(0, len(members), MAX_WEIGHTS):
            group = members[start : start + MAX_WEIGHTS]
            if len(group) > 1 and _inputs_ready(group, order):
                _replace(graph, group, order)
                made += 1
    if made:
        graph.lint()
    return made


def _arguments(node: fx.Node, devices: Sequence[str], max_rows: int) -> dict[str, Any] | None:
    """The call's arguments by name, where ``node`` is a product the pass may group."""
    if node.op != "call_function" or node.target is not _LINEAR:
        return None
    arguments = fx.operator_schemas.normalize_function(
        node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True
    ).kwargs  # fmt: skip
    inputs = arguments["A"]
    value = inputs.meta.get("val") if isinstance(inputs, fx.Node) else None
    if not isinstance(value, torch.Tensor) or value.device.type not in devices:
        return None
    rows = 1
    for size in value.shape[:-1]:
        rows *= size
    if not isinstance(rows, int) or rows > max_rows:  # symbolic or a prefill's
        return None
    return arguments


def _group_key(arguments: dict[str, Any]) -> tuple:
    """What the members of one group share: the input node, blocksize, K, layout, and which
    optional tensors they have (bias, nested statistics)."""
    shape = arguments["shape"]
    return (
        arguments["A"],
        arguments["blocksize"],
        shape[1],
        arguments.get("tiled", False),
        arguments.get("nested_blocksize", NESTED_BLOCKSIZE),
        arguments.get("bias") is None,
        arguments.get("nested_absmax") is None,
    )


def _inputs_ready(group: list[tuple[fx.Node, dict[str, Any]]], order: dict[fx.Node, int]) -> bool:
    """Whether every member's tensors can exist where the group's call goes (before the first
    member): made before it, or made from graph inputs and constants alone by pure ops (the views
    of a layer's statistics buffer), which ``_replace`` moves there."""
    first = order[group[0][0]]
    nodes = [value for _, arguments in group for value in arguments.values() if isinstance(value, fx.Node)]
    # the group's value is made from its members' (torch 2.5's traces leave constants without one)
    known = all("val" in node.meta for node in nodes)
    return (
        known
        and all(_movable(node, first, order) for node in nodes)
        and all(isinstance(size, int) for _, arguments in group for size in arguments["shape"])
    )


def _movable(node: fx.Node, first: int, order: dict[fx.Node, int], depth: int = 0) -> bool:
    """Whether ``node`` is made before position ``first`` or can be: a constant, or a pure op of
    such nodes (a few levels deep)."""
    if order[node] < first or node.op == "get_attr":
        return True
    if node.op != "call_function" or depth > 8 or not isinstance(node.target, torch._ops.OpOverload):
        return False
    schema = node.target._schema
    if schema.is_mutable or torch.Tag.nondeterministic_seeded in node.target.tags:
        return False
    return all(_movable(value, first, order, depth + 1) for value in node.all_input_nodes)


def _move_before(node: fx.Node, first_node: fx.Node, order: dict[fx.Node, int]) -> None:
    """Put ``node`` (``_movable``) and what it needs before ``first_node``, in their order."""
    if order[node] < order[first_node]:
        return
    for value in node.all_input_nodes:
        _move_before(value, first_node, order)
    first_node.prepend(node)
    order[node] = order[first_node] - 0.5  # before the first member from now on


def _replace(graph: fx.Graph, group: list[tuple[fx.Node, dict[str, Any]]], order: dict[fx.Node, int]) -> None:
    """One grouped call before the first member; each member's uses take its slice."""
    first_node, first = group[0]
    column = 0
    for _, arguments in group[1:]:
        for value in arguments.values():
            if isinstance(value, fx.Node):
                _move_before(value, first_node, order)
    with graph.inserting_before(first_node):
        names = ("packed", "absmax", "code", "bias", "nested_absmax", "nested_code", "nested_offset")
        listed = {name: [arguments.get(name) for _, arguments in group] for name in names}
        n_outs = [arguments["shape"][0] for _, arguments in group]
        grouped = graph.call_function(
            _GROUP,
            (first["A"], listed["packed"], listed["absmax"], listed["code"], first["blocksize"], n_outs,
             listed["bias"], listed["nested_absmax"], listed["nested_code"], listed["nested_offset"],
             first.get("nested_blocksize", NESTED_BLOCKSIZE), first.get("tiled", False)),
        )  # fmt: skip
        grouped.meta["val"] = ops_grouped.linear_4bit_group(
            first["A"].meta["val"], *(_values(listed[name]) for name in ("packed", "absmax", "code")),
            first["blocksize"], n_outs, *(_values(listed[name]) for name in ("bias", "nested_absmax", "nested_code",
            "nested_offset")), first.get("nested_blocksize", NESTED_BLOCKSIZE), first.get("tiled", False),
        )  # fmt: skip
        parts = []
        for _, arguments in group:
            width = arguments["shape"][0]
            part = graph.call_function(torch.ops.aten.slice.Tensor, (grouped, -1, column, column + width))
            part.meta["val"] = torch.ops.aten.slice.Tensor(grouped.meta["val"], -1, column, column + width)
            parts.append(part)
            column += width
    for (node, _), part in zip(group, parts, strict=True):
        node.replace_all_uses_with(part)
        graph.erase_node(node)


def _values(nodes: list) -> list:
    """The fake tensors of graph nodes (None stays None)."""
    return [None if node is None else node.meta["val"] for node in nodes]


class GroupedProducts(CustomGraphPass):
    """The pass as inductor's ``post_grad_custom_post_pass``; ``uuid`` keys inductor's cache on
    this module's and the op's code and on the arguments."""

    def __init__(self, devices: Sequence[str] = ops_grouped.GROUPED_DEVICES, max_rows: int = MAX_ROWS) -> None:
        if isinstance(devices, str):  # one device type, not its letters
            devices = (devices,)
        if not all(isinstance(device, str) for device in devices):
            raise TypeError(f"devices must be device type names such as 'cuda', got {devices!r}")
        self.devices = tuple(devices)
        self.max_rows = max_rows

    def __call__(self, graph: fx.Graph) -> None:
        group_products(graph, self.devices, self.max_rows)

    def uuid(self) -> Any:
        return (get_hash_for_files((__file__, ops_grouped.__file__)), self.devices, self.max_rows)


def compile_options(mode: str | None = None, devices: Sequence[str] = ops_grouped.GROUPED_DEVICES) -> dict[str, Any]:
    """``torch.compile`` options (``options=``; torch takes them or a ``mode``, not both) that
    group sibling 4-bit products on ``devices`` (by default those with a grouped kernel), with
    ``mode``'s own options (``"reduce-overhead"``: CUDA graphs)."""
    if get_hash_for_files is None:
        raise RuntimeError(
            f"grouped products need inductor's custom graph passes (torch 2.6 or newer), not torch {torch.__version__}"
        )
    from torch._inductor import list_mode_options

    options = dict(list_mode_options(mode)) if mode else {}
    options["post_grad_custom_post_pass"] = GroupedProducts(devices)
    return options
