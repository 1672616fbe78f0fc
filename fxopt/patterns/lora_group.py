"""After the patterns: fxopt::lora / fxopt::lora_nf4 calls that read the same input become one fxopt::lora_group /
fxopt::lora_nf4_group call (kernels/lora_group.py: x read once for the rank-r products, one dx).

Members of a group: calls of the same op on the same x node, each with an adapter, with the same dtypes (adapters,
dense weights, NF4 compute and output), all with a bias or none, all double-quantized or none (NF4), the sum of
ranks at most lora_group.MAX_RANK, their xa output unused, and every argument computed before the first member (the
group call takes its place). q/k/v and gate/up in a transformer layer; no names are looked at.
Each member stays counted as a `lora` / `lora_nf4` match; the report's `ops_in_compiled` shows the group ops.
FXOPT_LORA_GROUP=0 leaves the calls apart.
"""
from __future__ import annotations

import operator
import os

import torch
import torch.fx as fx

from fxopt.kernels import lora_group as _ops
from fxopt.normalize import meta
from fxopt.patterns.match import insert_op, replace_uses
from fxopt.recompute.ops import op_arg

# single op -> (pattern name, group op); a group op's list arguments gather its members' arguments of the same name
_SINGLE = {torch.ops.fxopt.lora.default: ("lora", torch.ops.fxopt.lora_group.default),
           torch.ops.fxopt.lora_nf4.default: ("lora_nf4", torch.ops.fxopt.lora_nf4_group.default)}


def enabled() -> bool:
    return os.environ.get("FXOPT_LORA_GROUP", "1") != "0"


def _dtype(n):
    v = meta(n) if isinstance(n, fx.Node) else None
    return getattr(v, "dtype", None)


def _key(node):
    """What members must share, or None when this call cannot join a group."""
    arg = lambda name: op_arg(node, name)   # noqa: E731
    if arg("lora_a") is None or arg("lora_b") is None:
        return None   # a frozen NF4 linear
    users = list(node.users)
    if not all(u.op == "call_function" and u.target is operator.getitem and u.args[1] in (0, 1) for u in users) or \
            any(u.args[1] == 1 and u.users for u in users):
        return None   # xa used in the graph, or the output used whole
    shared = (node.target, arg("x"), arg("bias") is None, _dtype(arg("lora_a")), arg("out_dtype"))
    if node.target is torch.ops.fxopt.lora.default:
        return shared + (_dtype(arg("weight")),)
    return shared + (arg("absmax2") is None, arg("in_features"), arg("compute_dtype"))


def _rank(node) -> int:
    return int(meta(op_arg(node, "lora_a")).shape[0])


def _groups(graph: fx.Graph) -> list[list[fx.Node]]:
    order = {n: i for i, n in enumerate(graph.nodes)}
    by_key: dict = {}
    for n in graph.nodes:
        if n.op == "call_function" and n.target in _SINGLE:
            k = _key(n)
            if k is not None:
                by_key.setdefault(k, []).append(n)
    groups = []
    for members in by_key.values():
        cur, rank = [], 0
        for n in members:   # graph order; a member whose inputs come after the group's place starts a new group
            args_ready = cur and all(order[i] < order[cur[0]] for i in n.all_input_nodes)
            if cur and args_ready and rank + _rank(n) <= _ops.MAX_RANK:
                cur.append(n)
                rank += _rank(n)
                continue
            if len(cur) > 1:
                groups.append(cur)
            cur, rank = [n], _rank(n)
        if len(cur) > 1:
            groups.append(cur)
    return groups


def _replace(graph: fx.Graph, members) -> None:
    group = _SINGLE[members[0].target][1]
    args = tuple([op_arg(m, a.name) for m in members] if isinstance(a.type, torch.ListType)
                 else op_arg(members[0], a.name) for a in group._schema.arguments)
    ys = insert_op(graph, members[0], group, args, n_outputs=len(members))   # outputs y_1..y_n (XA: autograd's)
    for y, m in zip(ys, members):
        for u in list(m.users):   # getitem 0 (y) and an unused getitem 1 (xa)
            if u.args[1] == 0:
                replace_uses(u, y)
            graph.erase_node(u)
        graph.erase_node(m)


def group_lora(gm: fx.GraphModule) -> dict[str, int]:
    """Rewrite every group; returns {pattern name: calls grouped}."""
    grouped: dict[str, int] = {}
    for members in _groups(gm.graph):
        _replace(gm.graph, members)
        name = _SINGLE[members[0].target][0]
        grouped[name] = grouped.get(name, 0) + len(members)
    return grouped
