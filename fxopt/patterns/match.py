"""Shared matching helpers: node predicates, argument access, the pattern driver and the replacement helper.

A pattern is `Pattern(name, candidates, match, replace)`:
  candidates(graph) -> anchor nodes;  match(anchor) -> Match, or a str saying why the candidate does not qualify;
  replace(graph, match) -> the new output node.  `apply_pattern` runs it over a graph and fills the report.
"""
from __future__ import annotations

import dataclasses
import numbers
import operator
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx

from fxopt.normalize import is_tensor, meta


class NoMatch(Exception):
    """Raised inside matchers to reject a candidate with a reason."""


def call(node, *fns) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in fns


def arg(node: fx.Node, i: int, name: str, default=None):
    """Positional argument i or keyword `name` of a call node."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def cast_dtype(node):
    """The target dtype if `node` is a (normalized) dtype cast `x.to(dtype)`, else None."""
    if isinstance(node, fx.Node) and node.op == "call_method" and node.target == "to" and len(node.args) == 2 \
            and isinstance(node.args[1], torch.dtype):
        return node.args[1]
    return None


def only_user(node: fx.Node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def number(x) -> bool:
    return isinstance(x, numbers.Number) and not isinstance(x, bool)


def split_scalar(node: fx.Node):
    """(tensor operand, python number) of a binary call with one number operand, else (None, None)."""
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    if isinstance(a, fx.Node) and number(b):
        return a, b
    if isinstance(b, fx.Node) and number(a):
        return b, a
    return None, None


def other_operand(node: fx.Node, known: fx.Node):
    """For a binary call with `known` as one operand, the other one (None if `known` is not an operand)."""
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else None
    if a is known:
        return b
    if b is known:
        return a
    return None


def require(cond, reason: str) -> None:
    if not cond:
        raise NoMatch(reason)


def single_use(nodes: Iterable[fx.Node], inside: set) -> str | None:
    """Reason if an intermediate node has users outside the matched subgraph, else None."""
    for n in nodes:
        outside = [u.name for u in n.users if u not in inside]
        if outside:
            return f"intermediate {n.name} is also used by {outside[:3]}, replacing would compute it twice"
    return None


@dataclasses.dataclass
class Match:
    anchor: fx.Node
    output: fx.Node              # the node whose value the replacement produces
    nodes: list                  # matched nodes to erase once the output is replaced (inputs excluded)
    params: dict                 # pattern-specific captured values


@dataclasses.dataclass
class Pattern:
    name: str
    candidates: Callable[[fx.Graph], Iterable[fx.Node]]
    match: Callable[[fx.Node], Any]            # -> Match | str
    replace: Callable[[fx.Graph, Match], fx.Node]


def fake_call(fn, *args, **kwargs):
    """Run `fn` on the fake tensors of node args, also inside list/tuple args (for the new nodes' metadata)."""
    nodes = []
    fx.node.map_arg((args, kwargs), nodes.append)
    fakes = [meta(a) for a in nodes]
    mode = next((f.fake_mode for f in fakes if hasattr(f, "fake_mode")), None)

    def conv(a):
        if isinstance(a, fx.Node):
            return meta(a)
        if isinstance(a, (list, tuple)):   # FX's immutable_list is not a Tensor[] for the dispatcher
            return (list if isinstance(a, list) else tuple)(conv(b) for b in a)
        return a
    cargs = tuple(conv(a) for a in args)
    if mode is None:
        return None
    with mode:
        return fn(*cargs, **{k: conv(v) for k, v in kwargs.items()})


def insert_op(graph: fx.Graph, before: fx.Node, op, args: tuple, n_outputs: int | None = None,
              meta_key: str = "example_value"):
    """Insert `op(*args)` before `before`; returns the node (or its getitem nodes) with fake metadata set under
    `meta_key` (dynamo's graphs: "example_value"; AOT's partitioned graphs: "val").

    Checks the new value has the shape and dtype of the value it replaces (raises ValueError otherwise).
    """
    with graph.inserting_before(before):
        node = graph.call_function(op, args)
        val = fake_call(op, *args)
        node.meta[meta_key] = val
        if n_outputs is None:
            return node
        outs = []
        for i in range(n_outputs):
            g = graph.call_function(operator.getitem, (node, i))
            g.meta[meta_key] = val[i] if val is not None else None
            outs.append(g)
        return outs


def replace_uses(old_node: fx.Node, new: fx.Node) -> None:
    """Point every use of old_node at new; raises ValueError if that would change the value's shape or dtype."""
    old, new_val = meta(old_node), meta(new)
    if isinstance(old, torch.Tensor) and isinstance(new_val, torch.Tensor):
        if old.shape != new_val.shape or old.dtype != new_val.dtype:
            raise ValueError(f"replacement of {old_node.name} changes {tuple(old.shape)}/{old.dtype} "
                             f"to {tuple(new_val.shape)}/{new_val.dtype}")
    old_node.replace_all_uses_with(new)


def replace_output(graph: fx.Graph, m: Match, new: fx.Node) -> None:
    replace_uses(m.output, new)
    dead = [n for n in m.nodes]
    while True:   # erase matched nodes that became unused (in any order)
        gone = [n for n in dead if not n.users]
        for n in gone:
            graph.erase_node(n)
        dead = [n for n in dead if n not in gone]
        if not gone:
            break


def apply_pattern(gm: fx.GraphModule, pattern: Pattern, graph_report, where: str) -> int:
    """Match and replace every candidate of `pattern`; rejected candidates go to the report with their reason."""
    from fxopt.report import Rejected
    count = 0
    for anchor in list(pattern.candidates(gm.graph)):
        if getattr(anchor, "_erased", False) or anchor.graph is not gm.graph:   # erased by an earlier replacement
            continue
        try:
            m = pattern.match(anchor)
        except NoMatch as e:
            m = str(e)
        if isinstance(m, str):
            graph_report.rejected.append(Rejected(pattern.name, f"{where}: {anchor.name}", m))
            continue
        pattern.replace(gm.graph, m)
        count += 1
    return count
