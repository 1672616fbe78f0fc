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
from fxopt.patterns.match import fake_call

_SINGLE = {torch.ops.fxopt.lora.default: "lora", torch.ops.fxopt.lora_nf4.default: "lora_nf4"}
# argument positions (the ops' schemas in kernels/lora.py)
_DENSE = dict(x=0, weight=1, bias=2, lora_a=3, lora_b=4, scale=5, out_dtype=6)
_NF4 = dict(x=0, packed=1, absmax=2, absmax2=3, code2=4, offset=5, bias=6, lora_a=7, lora_b=8, scale=9, blocksize=10,
            blocksize2=11, out_features=12, in_features=13, compute_dtype=14, out_dtype=15)


def enabled() -> bool:
    return os.environ.get("FXOPT_LORA_GROUP", "1") != "0"


def _dtype(n):
    v = meta(n) if isinstance(n, fx.Node) else None
    return getattr(v, "dtype", None)


def _key(node):
    """What members must share, or None when this call cannot join a group."""
    a = node.args
    pos = _DENSE if node.target is torch.ops.fxopt.lora.default else _NF4
    if a[pos["lora_a"]] is None or a[pos["lora_b"]] is None:
        return None   # a frozen NF4 linear
    users = list(node.users)
    if not all(u.op == "call_function" and u.target is operator.getitem and u.args[1] in (0, 1) for u in users) or \
            any(u.args[1] == 1 and u.users for u in users):
        return None   # xa used in the graph, or the output used whole
    shared = (node.target, a[0], a[pos["bias"]] is None, _dtype(a[pos["lora_a"]]), a[pos["out_dtype"]])
    if node.target is torch.ops.fxopt.lora.default:
        return shared + (_dtype(a[pos["weight"]]),)
    return shared + (a[pos["absmax2"]] is None, a[pos["in_features"]], a[pos["compute_dtype"]])


def _rank(node) -> int:
    pos = _DENSE if node.target is torch.ops.fxopt.lora.default else _NF4
    return int(meta(node.args[pos["lora_a"]]).shape[0])


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


def _group_args(members):
    """The group op and its arguments: each list argument gathers the members' values."""
    dense = members[0].target is torch.ops.fxopt.lora.default
    pos = _DENSE if dense else _NF4
    col = lambda name: [m.args[pos[name]] for m in members]   # noqa: E731
    one = lambda name: members[0].args[pos[name]]             # noqa: E731
    if dense:
        return torch.ops.fxopt.lora_group.default, (one("x"), col("weight"), col("bias"), col("lora_a"),
                                                    col("lora_b"), col("scale"), one("out_dtype"))
    return torch.ops.fxopt.lora_nf4_group.default, (
        one("x"), col("packed"), col("absmax"), col("absmax2"), col("code2"), col("offset"), col("bias"),
        col("lora_a"), col("lora_b"), col("scale"), col("blocksize"), col("blocksize2"), col("out_features"),
        one("in_features"), one("compute_dtype"), one("out_dtype"))


def _replace(graph: fx.Graph, members) -> None:
    op, args = _group_args(members)
    with graph.inserting_before(members[0]):
        g = graph.call_function(op, args)
        val = fake_call(op, *args)
        g.meta["example_value"] = val
        for i, m in enumerate(members):
            for u in list(m.users):
                if u.args[1] == 0:
                    item = graph.call_function(operator.getitem, (g, i))
                    old = meta(u)
                    new = val[i] if val is not None else None
                    if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor) and \
                            (old.shape != new.shape or old.dtype != new.dtype):
                        raise ValueError(f"group output {i} is {tuple(new.shape)}/{new.dtype}, the call it replaces "
                                         f"gave {tuple(old.shape)}/{old.dtype}")
                    item.meta["example_value"] = new
                    u.replace_all_uses_with(item)
                graph.erase_node(u)
    for m in members:
        graph.erase_node(m)


def group_lora(gm: fx.GraphModule) -> dict[str, int]:
    """Rewrite every group; returns {pattern name: calls grouped}."""
    grouped: dict[str, int] = {}
    for members in _groups(gm.graph):
        _replace(gm.graph, members)
        name = _SINGLE[members[0].target]
        grouped[name] = grouped.get(name, 0) + len(members)
    return grouped
