"""layer_norm: F.layer_norm over the last dim, or its hand-written forms  ->  fxopt::layer_norm.

Two anchors, one op (semantics in fxopt/kernels/layer_norm.py):
  F.layer_norm / torch.layer_norm(x, (H,), w, b, eps)      normalized_shape must be the last dim only;
  rsqrt / sqrt of (var + eps) in
      m = mean(x32, -1, keepdim=True)
      var = mean((x32 - m)^2, -1, keepdim=True)   |  var(x32, -1, keepdim=True, unbiased=False / correction=0)
      (x32 - m) * rsqrt(var + eps)                 |  (x32 - m) / sqrt(var + eps)
  with x32 = x upcast to fp32 (or x itself when fp32); `x32 - m` may be one node or two (written twice).
  Where one `x32 - m` node feeds both the square and the product, rms_norm (earlier in PATTERNS) currently takes
  it as rms_norm(x32 - m): right, but the mean stays unfused.
After the normalization the tail is walked node by node and captured exactly:
  cast of the fp32 normalized value to fp16/bf16 before any affine op -> mid_dtype (a low-precision F.layer_norm
  without weight/bias is the same rounding), `* w` ([H] tensor, `w.float()` absorbed), `+ b` ([H] tensor),
  cast of an fp32 result to fp16/bf16 -> out_dtype (one rounding either way). An fp32 upcast of x is absorbed (the
  kernel upcasts itself, so the saved activation stays in x's dtype; the cast stays if anything else uses it).
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F

from fxopt.kernels import layer_norm as _ops  # noqa: F401  (registers the op)
from fxopt.normalize import meta
from fxopt.patterns.match import (Match, NoMatch, Pattern, arg, call, cast_dtype, insert_op, number,
                                  only_user, other_operand, replace_output, require, single_use, split_scalar)

_LOW = (torch.float16, torch.bfloat16)
_FLOATS = _LOW + (torch.float32,)
_FUNCTIONAL = (F.layer_norm, torch.layer_norm)


def _candidates(graph):
    return [n for n in graph.nodes if call(n, *_FUNCTIONAL, torch.rsqrt, torch.sqrt)]


def _last_dim(node, dim, keepdim, what):
    ndim = meta(node.args[0]).dim()
    dims = list(dim) if isinstance(dim, (list, tuple)) else [dim]
    require(len(dims) == 1 and dims[0] in (-1, ndim - 1), f"{what} over dim {dim}, not the last dim only")
    require(keepdim is True, f"{what} without keepdim=True")


def _is_mean_of(m, x32) -> bool:
    """m = mean(x32, -1, keepdim=True)."""
    if not (call(m, torch.mean) and m.args[0] is x32 and "dtype" not in m.kwargs):
        return False
    try:
        _last_dim(m, arg(m, 1, "dim"), arg(m, 2, "keepdim", False), "mean")
    except NoMatch:
        return False
    return True


def _centered(d):
    """(x32, mean node) if d = x32 - mean(x32, -1, keepdim=True), else None."""
    if call(d, torch.sub) and len(d.args) == 2 and not d.kwargs and isinstance(d.args[0], torch.fx.Node) \
            and _is_mean_of(d.args[1], d.args[0]):
        return d.args[0], d.args[1]
    return None


def _variance(v):
    """(x32, nodes) of var(x32, unbiased=False) or mean((x32 - mean(x32))^2), both over the last dim, keepdim."""
    if call(v, torch.var):
        unbiased = v.kwargs.get("unbiased", True)
        keepdim = v.kwargs.get("keepdim", False)
        if len(v.args) > 2 and isinstance(v.args[2], bool):   # var(x, dim, unbiased, keepdim)
            unbiased = v.args[2]
            keepdim = v.args[3] if len(v.args) > 3 else keepdim
        correction = v.kwargs.get("correction", None)
        correction = correction if correction is not None else (1 if unbiased else 0)
        require(correction == 0, f"unbiased variance (correction={correction}); layer norm uses the biased one")
        _last_dim(v, arg(v, 1, "dim"), keepdim, "var")
        return v.args[0], [v]
    require(call(v, torch.mean), f"sqrt/rsqrt input is not var + eps ({getattr(v.target, '__name__', v.target)})")
    _last_dim(v, arg(v, 1, "dim"), arg(v, 2, "keepdim", False), "variance mean")
    p = v.args[0]
    if call(p, torch.pow) and p.args[1] == 2 or call(p, torch.square):
        factors = [p.args[0]]
    elif call(p, torch.mul) and len(p.args) == 2:
        factors = list(dict.fromkeys(p.args))   # d * d, or (x - m) * (x - m) written twice
    else:
        raise NoMatch(f"mean input is not a square ({getattr(p.target, '__name__', p.target)})")
    cs = [_centered(d) for d in factors]
    require(all(c is not None for c in cs), "squared value is not x - mean(x, -1, keepdim=True) (an RMS norm, "
            "or other math)")
    require(all(c[0] is cs[0][0] for c in cs), "mean input is not a square")
    return cs[0][0], [v, p, *factors, *(c[1] for c in cs)]


def _param(expr, cur, mx):
    """(tensor, absorbed cast nodes) for a [H] weight/bias operand `expr` of an op on `cur`, or None."""
    if not isinstance(expr, torch.fx.Node) or expr is cur:
        return None
    me = meta(expr)
    h = mx.shape[-1]
    if not (isinstance(me, torch.Tensor) and me.dtype in _FLOATS and me.numel() == h and me.dim() >= 1
            and me.shape[-1] == h and me.dim() <= mx.dim()):
        return None
    if cast_dtype(expr) == torch.float32 and meta(expr.args[0]).dtype in _FLOATS and len(expr.users) == 1:
        return expr.args[0], [expr]    # the kernel upcasts the parameter itself
    return expr, []


def _tail(cur, mx, mid, weight, bias):
    """Walk the single-user chain after the normalization; returns (output node, mid, weight, bias, nodes)."""
    nodes = []
    while (nxt := only_user(cur)) is not None:
        dt, cd = cast_dtype(nxt), meta(cur).dtype
        if dt is not None:
            if cd != torch.float32 or dt not in _LOW:
                break
            nodes.append(nxt)
            cur = nxt
            if weight is None and bias is None and mid is None:
                mid = dt            # rounding of the normalized value, the affine part (if any) follows
                continue
            break                   # final cast of the fp32 result
        if not (call(nxt, torch.mul, torch.add) and len(nxt.args) == 2 and not nxt.kwargs
                and meta(nxt).shape == mx.shape):
            break
        if call(nxt, torch.mul) and (weight is not None or bias is not None):
            break
        if call(nxt, torch.add) and bias is not None:
            break
        p = _param(other_operand(nxt, cur), cur, mx)
        if p is None:
            break
        if call(nxt, torch.mul):
            weight = p[0]
        else:
            bias = p[0]
        nodes += p[1] + [nxt]
        cur = nxt
    return cur, mid, weight, bias, nodes


def _input(x32, nodes):
    """Source x of an fp32 upcast (absorbed: the kernel upcasts itself, the saved input stays small), else x32."""
    if cast_dtype(x32) == torch.float32 and meta(x32.args[0]).dtype in _FLOATS:
        nodes.append(x32)   # erased only if nothing else uses it
        return x32.args[0]
    require(meta(x32).dtype in _FLOATS, f"input dtype {meta(x32).dtype} not supported (kernels compute in fp32)")
    return x32


def _match_functional(node):
    x32 = arg(node, 0, "input")
    shape = arg(node, 1, "normalized_shape")
    weight, bias = arg(node, 2, "weight"), arg(node, 3, "bias")
    eps = arg(node, 4, "eps", 1e-5)
    mx = meta(x32)
    require(isinstance(mx, torch.Tensor), "input is not a tensor")
    require(isinstance(shape, (list, tuple, torch.Size)) and len(shape) == 1,
            f"normalized_shape {shape} spans {len(shape) if isinstance(shape, (list, tuple)) else '?'} dims, "
            "only the last dim is supported")
    require(number(eps), f"eps is not a constant ({eps})")
    for t, what in ((weight, "weight"), (bias, "bias")):
        require(t is None or isinstance(t, torch.fx.Node) and isinstance(meta(t), torch.Tensor),
                f"{what} is not a tensor node")
    nodes = [node]
    x = _input(x32, nodes)
    mid = meta(node).dtype if (weight is None and bias is None and meta(node).dtype in _LOW) else None
    out, mid, weight, bias, tail = _tail(node, mx, mid, weight, bias)
    return Match(anchor=node, output=out, nodes=nodes + tail,
                 params=dict(x=x, weight=weight, bias=bias, eps=float(eps), mid=mid, out_dtype=meta(out).dtype))


def _match_hand_written(r):
    add = r.args[0]
    require(call(add, torch.add) and not add.kwargs, f"{r.target.__name__} input is not (variance + eps)")
    v, eps = split_scalar(add)
    require(v is not None, "eps is not a constant")
    x32, var_nodes = _variance(v)
    y0 = only_user(r)
    if call(r, torch.rsqrt):
        require(call(y0, torch.mul) and not y0.kwargs, "rsqrt result is not only multiplied by x - mean")
        d = other_operand(y0, r)
    else:
        require(call(y0, torch.div) and not y0.kwargs and len(y0.args) == 2 and y0.args[1] is r,
                "sqrt result is not only the divisor of x - mean")
        d = y0.args[0]
    c = _centered(d)
    require(c is not None and c[0] is x32, "normalized value is not (x - mean(x)) of the variance's x")
    mx = meta(x32)
    require(mx.dtype == torch.float32, f"variance computed in {mx.dtype}, not fp32 "
            "(kernels compute in fp32; matching would change the numerics)")
    core = list(dict.fromkeys(var_nodes + [d, c[1], add, r]))
    out, mid, weight, bias, tail = _tail(y0, mx, None, None, None)
    inside = {*core, y0, *tail}
    reason = single_use(core, inside)
    require(reason is None, reason or "")
    nodes = core + [y0] + tail
    x = _input(x32, nodes)
    return Match(anchor=r, output=out, nodes=nodes,
                 params=dict(x=x, weight=weight, bias=bias, eps=float(eps), mid=mid, out_dtype=meta(out).dtype))


def match_layer_norm(node):
    if call(node, *_FUNCTIONAL):
        return _match_functional(node)
    return _match_hand_written(node)


def replace_layer_norm(graph, m):
    q = m.params
    y, _mean, _rstd = insert_op(graph, m.output, torch.ops.fxopt.layer_norm.default,
                                (q["x"], q["weight"], q["bias"], q["eps"], q["mid"], q["out_dtype"]), n_outputs=3)
    replace_output(graph, m, y)
    return y


LAYER_NORM = Pattern("layer_norm", _candidates, match_layer_norm, replace_layer_norm)
