"""After the partition, on each forward and backward aten graph: the adds next to fxopt's RMSNorm go into its kernels.

  forward:   s = add(a, b); (y, rstd) = fxopt::rms_norm(s, ...)     ->  (y, s, rstd) = fxopt::add_rms_norm(a, b, ...)
  backward:  (dx, dw) = fxopt::rms_norm_backward(dy, x, ...); g = add(dx, dres)   (dx read by that add only)
             ->  (g, dw) = fxopt::rms_norm_backward_add(dy, x, ..., dres, ...)
The residual stream of a pre-norm transformer is such an add at every norm: s is the residual carried on, and in the
backward the gradient reaching s from the next residual add meets the norm's dx. Inductor fuses these adds into its
own norm kernels, but not into an fxopt op: without this pass each costs a separate kernel that reads what the norm
reads (forward: s; backward: dx). 8B QLoRA step on the H200 (cg-21g-s19-group): 63 forward adds 1.89 ms, 63
gradient adds 1.47 ms, 128 launches.

Runs after the partition so the recompute planner still sees the norm apart from the add: a norm recomputed in the
backward from a saved s must not need a and b. Both adds are plain: two tensors of one shape and dtype, no alpha.
The graph looks the same whatever the model. Counted in the report's `fused`.

Opt-in (FXOPT_NORM_ADD=1) until measured on the GPU: on the H200 the 8B QLoRA step with it (CUDA graphs, 15.1GiB)
did not finish its warm-up in 220 s and 280 s on two fresh machines (999acdb, b5c40c3); the same step without it ran
right after on each (warm caches: 120.9-125.4 s of warm-up, 15,558 / 15,564 tok/s). A probe at 163 s found the
first compile still in AOTAutograd's joint-graph capture, before this pass runs; the cause is not known. Its kernels
passed their GPU tests.
"""
from __future__ import annotations

import operator
import os

import torch
import torch.fx as fx

from fxopt.kernels import rms_norm as _ops  # noqa: F401  (registers the ops)
from fxopt.normalize import meta
from fxopt.patterns.match import insert_op, replace_uses

aten = torch.ops.aten
_NORM = torch.ops.fxopt.rms_norm.default
_NORM_BWD = torch.ops.fxopt.rms_norm_backward.default


def enabled() -> bool:
    return os.environ.get("FXOPT_NORM_ADD", "0") == "1"


def _plain_add(n, like) -> bool:
    """n = add(p, q) of two tensors with `like`'s shape and dtype (no broadcast, no promotion, no alpha)."""
    if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target is aten.add.Tensor
            and len(n.args) == 2 and not n.kwargs):
        return False
    vals = [meta(n)] + [meta(a) for a in n.args]
    return all(isinstance(v, torch.Tensor) and v.shape == like.shape and v.dtype == like.dtype
               and v.is_contiguous() for v in vals)   # the fused op writes contiguous tensors


def _outputs(node) -> dict:
    """index -> the getitem node of a multi-output call (None when it is used whole)."""
    outs = {}
    for u in node.users:
        if not (u.op == "call_function" and u.target is operator.getitem):
            return None
        outs[u.args[1]] = u
    return outs


def _fuse_forward(graph, norm, order) -> bool:
    s = norm.args[0]
    outs = _outputs(norm)
    if outs is None or not _plain_add(s, meta(s)):
        return False
    first = min(s.users, key=order.get)   # the fused call takes the place of s's first reader
    if any(isinstance(a, fx.Node) and order[a] >= order[first] for a in norm.args[1:]):
        return False   # the weight is computed after that point
    y, new_s, rstd = insert_op(graph, first, torch.ops.fxopt.add_rms_norm.default, (*s.args, *norm.args[1:]), 3,
                               meta_key="val")
    for i, g in outs.items():
        replace_uses(g, (y, rstd)[i])
        graph.erase_node(g)
    graph.erase_node(norm)
    replace_uses(s, new_s)
    graph.erase_node(s)
    return True


def _fuse_backward(graph, bwd, order) -> bool:
    outs = _outputs(bwd)
    dx = outs.get(0) if outs else None
    if dx is None or len(dx.users) != 1:
        return False
    add = next(iter(dx.users))
    if not _plain_add(add, meta(dx)):
        return False
    dres = add.args[1] if add.args[0] is dx else add.args[0]
    if dres is dx:
        return False
    # the fused call takes the backward's place when dres is ready by then, else the add's (dw not read before)
    at = bwd if order[dres] < order[bwd] else add
    if at is add and any(order[u] < order[add] for i, g in outs.items() if i != 0 for u in g.users):
        return False
    dy, x, weight, rstd, offset, mid, need_dw = bwd.args
    g, dw = insert_op(graph, at, torch.ops.fxopt.rms_norm_backward_add.default,
                      (dy, x, weight, rstd, dres, offset, mid, need_dw), 2, meta_key="val")
    replace_uses(add, g)
    graph.erase_node(add)
    graph.erase_node(dx)
    for i, old in outs.items():
        if i != 0:
            replace_uses(old, dw)
            graph.erase_node(old)
    graph.erase_node(bwd)
    return True


def fuse_norm_adds(gm: fx.GraphModule) -> dict[str, int]:
    """Rewrite every such pair in `gm` (forward or backward graph); returns {"rms_norm": pairs fused} when any."""
    graph = gm.graph
    n = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (_NORM, _NORM_BWD) or node.kwargs:
            continue   # (the calls fxopt makes pass every argument by position)
        order = {x: i for i, x in enumerate(graph.nodes)}
        if node not in order:
            continue
        n += (_fuse_forward if node.target is _NORM else _fuse_backward)(graph, node, order)
    if n:
        graph.lint()
        gm.recompile()
    return {"rms_norm": n} if n else {}
