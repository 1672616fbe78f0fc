"""linear_cross_entropy: lm_head linear -> [scale | softcap] -> fp32 -> [row slice] -> view(-1, V) -> cross_entropy
[-> / num_items]  ->  fxopt::linear_cross_entropy (loss, with dx and dW computed in the forward; see the kernel).

Anchored at `cross_entropy`. Walked backwards from its input, the logits path may hold, in any order:
  view/reshape that only flattens the leading dims, `contiguous`, a row slice `[..., a:b, :]` (moved onto the
  linear's input: the linear is row-wise), casts to fp32 (upcasts only), `* s` / `/ s` with constant s and one
  `tanh` (so y = post * tanh(pre * z) or y = pre * z), ending at `linear(x, W)` without bias.
The target is taken as it is (HF pads and shifts the labels; any int64 [N] target works). `reduction="sum"`
followed by a division by a 0-dim tensor or a constant (HF `num_items_in_batch`) absorbs the division.
Rejected with a reason: any node of the logits path used outside it (e.g. the logits are a graph output, which they
are when an HF model's output with `.logits` leaves the compiled region: compile a function that returns only the
loss), class weights, label smoothing, a biased linear, a downcast, a non-fp32 cross-entropy.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxopt.kernels import linear_cross_entropy as _ops  # noqa: F401  (registers the op)
from fxopt.normalize import meta
from fxopt.patterns.match import (Match, NoMatch, Pattern, arg, call, cast_dtype, fake_call, insert_op, number,
                                  replace_output, require, split_scalar)

_CE = (torch.nn.functional.cross_entropy,)
_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _candidates(graph):
    return [n for n in graph.nodes if call(n, *_CE)]


def _name(n):
    return getattr(n.target, "__name__", str(n.target))


def _user_reason(node, inside):
    outside = [u for u in node.users if u not in inside]
    if not outside:
        return None
    if any(u.op == "output" for u in outside):
        return (f"logits ({node.name}) are a graph output (e.g. the model returns `.logits`), so they must be "
                "materialized; compile a function that returns only the loss to fuse lm_head + loss")
    return f"logits ({node.name}) are also used by {[u.name for u in outside][:3]}, fusing would compute them twice"


def _row_index(idx, ndim):
    """True if getitem index `idx` only slices dims before the last one (so it can be applied to x instead)."""
    items = idx if isinstance(idx, tuple) else (idx,)
    if not all(it is Ellipsis or isinstance(it, slice) for it in items):
        return False
    if sum(it is Ellipsis for it in items) > 1:
        return False
    if Ellipsis in items:
        k = items.index(Ellipsis)
        last = items[-1] if k < len(items) - 1 else None
    else:
        if len(items) > ndim:
            return False
        last = items[-1] if len(items) == ndim else None
    return last is None or last == slice(None, None, None)


def _walk_logits(start):
    """From the cross_entropy input back to the linear: (linear node, chain nodes, row index, pre, post, tanh)."""
    chain, index, index_shape, tanh, scale_after, scale_before = [], None, None, False, 1.0, 1.0
    cur = start
    while True:
        v = meta(cur)
        require(isinstance(v, torch.Tensor), f"logits path node {cur} has no tensor metadata")
        if call(cur, *_LINEAR):
            require(arg(cur, 2, "bias") is None, "the lm_head linear has a bias")
            break
        chain.append(cur)
        dt = cast_dtype(cur)
        if dt is not None:
            require(dt == torch.float32, f"logits cast to {dt} on the way to the loss (a downcast changes numerics)")
            cur = cur.args[0]
        elif cur.op == "call_method" and cur.target in ("view", "reshape", "contiguous") or call(cur, torch.reshape):
            src = cur.args[0]
            if cur.target != "contiguous":
                sv = meta(src)
                require(sv.shape[-1] == v.shape[-1] and sv.numel() == v.numel(),
                        f"{cur.name} reshapes the vocab dim ({tuple(sv.shape)} -> {tuple(v.shape)})")
            cur = src
        elif call(cur, operator.getitem):
            require(index is None, "two slices on the logits path")
            require(_row_index(cur.args[1], meta(cur.args[0]).dim()), f"logits indexed by {cur.args[1]} "
                    "(only slices of the leading dims are supported)")
            index, index_shape = cur.args[1], tuple(meta(cur.args[0]).shape[:-1])
            cur = cur.args[0]
        elif call(cur, torch.mul, torch.div):
            t, c = split_scalar(cur)
            require(t is not None and (call(cur, torch.mul) or cur.args[0] is t) and c != 0,
                    f"{cur.name}: logits scaled by a non-constant")
            f = float(c) if call(cur, torch.mul) else 1.0 / float(c)
            if tanh:
                scale_before *= f
            else:
                scale_after *= f
            cur = t
        elif call(cur, torch.tanh):
            require(not tanh, "two tanh on the logits path")
            tanh = True
            cur = cur.args[0]
        else:
            raise NoMatch(f"logits path reaches {_name(cur)} ({cur.name}), not an lm_head linear")
    # walked backwards: y = scale_after * tanh(scale_before * z)  (or (scale_after * scale_before) * z)
    require(index is None or index_shape == tuple(meta(cur).shape[:-1]),
            "logits sliced after a reshape of the leading dims")
    if tanh:
        return cur, chain, index, scale_before, scale_after, True
    return cur, chain, index, scale_before * scale_after, 1.0, False


def _divisor(ce):
    """(output node, divisor node or None, divisor constant) for `ce / d` with d a 0-dim tensor or a constant."""
    users = list(ce.users)
    if len(users) != 1 or not call(users[0], torch.div) or users[0].args[0] is not ce:
        return ce, None, 1.0
    div = users[0]
    d = div.args[1] if len(div.args) > 1 else div.kwargs.get("other")
    out = meta(div)
    if not (isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.dim() == 0) or div.kwargs:
        return ce, None, 1.0
    if number(d) and d != 0:
        return div, None, float(d)
    dv = meta(d)
    if isinstance(d, fx.Node) and isinstance(dv, torch.Tensor) and dv.dim() == 0 and not dv.requires_grad:
        return div, d, 1.0
    return ce, None, 1.0


def match_linear_cross_entropy(ce):
    logits, target = arg(ce, 0, "input"), arg(ce, 1, "target")
    require(arg(ce, 2, "weight") is None, "cross_entropy with class weights")
    require(arg(ce, 3, "size_average") is None and arg(ce, 5, "reduce") is None, "legacy size_average/reduce args")
    ignore_index = arg(ce, 4, "ignore_index", -100)
    reduction = arg(ce, 6, "reduction", "mean")
    require(isinstance(ignore_index, int), "ignore_index is not a constant int")
    require(reduction in ("mean", "sum"), f"reduction={reduction!r} (mean and sum are fused)")
    require(arg(ce, 7, "label_smoothing", 0.0) == 0.0, "label_smoothing")
    lv, tv = meta(logits), meta(target)
    require(isinstance(lv, torch.Tensor) and lv.dim() == 2, "cross_entropy input is not [N, V]")
    require(lv.dtype == torch.float32, f"cross_entropy on {lv.dtype} logits (no fp32 upcast)")
    require(isinstance(tv, torch.Tensor) and tv.dtype == torch.int64 and tv.dim() == 1,
            "target is not int64 class indices [N]")
    lin, chain, index, pre, post, tanh = _walk_logits(logits)
    x, w = lin.args[0], arg(lin, 1, "weight")
    xv, wv, zv = meta(x), meta(w), meta(lin)
    require(isinstance(wv, torch.Tensor) and wv.dim() == 2 and wv.shape[0] == lv.shape[1],
            "linear weight is not [V, H] with the loss's V")
    require(xv.dtype in _FLOATS, f"lm_head input dtype {xv.dtype} not supported (fp16/bf16/fp32)")
    require(xv.dtype == wv.dtype == zv.dtype,
            f"linear dtypes x {xv.dtype}, W {wv.dtype}, out {zv.dtype} differ (autocast?)")
    require(xv.device == wv.device == tv.device, "x, weight and target on different devices")
    inside = set(chain) | {lin, ce}
    for n in [lin] + chain:
        reason = _user_reason(n, inside)
        require(reason is None, reason or "")
    out, divisor, divisor_value = _divisor(ce) if reduction == "sum" else (ce, None, 1.0)
    grad = bool(getattr(meta(ce), "requires_grad", True))
    need_dx = grad and bool(xv.requires_grad)
    need_dw = grad and bool(wv.requires_grad)
    nodes = [lin] + chain + [ce] + ([out] if out is not ce else [])
    return Match(anchor=ce, output=out, nodes=nodes,
                 params=dict(x=x, weight=w, target=target, index=index, divisor=divisor, divisor_value=divisor_value,
                             ignore_index=ignore_index, reduction=reduction, pre=pre, post=post, tanh=tanh,
                             need_dx=need_dx, need_dw=need_dw))


def replace_linear_cross_entropy(graph, m):
    q = m.params
    x = q["x"]
    if q["index"] is not None:   # logits[idx] == linear(x[idx]) for an index over the leading dims
        with graph.inserting_before(m.output):
            sliced = graph.call_function(operator.getitem, (x, q["index"]))
        sliced.meta["example_value"] = fake_call(operator.getitem, x, q["index"])
        x = sliced
    loss, _dx, _dw = insert_op(graph, m.output, torch.ops.fxopt.linear_cross_entropy.default,
                               (x, q["weight"], q["target"], q["divisor"], q["ignore_index"], q["reduction"],
                                q["divisor_value"], q["pre"], q["post"], q["tanh"], q["need_dx"], q["need_dw"], 0),
                               n_outputs=3)
    replace_output(graph, m, loss)
    return loss


LINEAR_CROSS_ENTROPY = Pattern("linear_cross_entropy", _candidates, match_linear_cross_entropy,
                               replace_linear_cross_entropy)
