"""rms_norm: x32 * rsqrt(mean(x32^2, -1, keepdim) + eps) [-> cast] [* weight-expr] [-> cast]  ->  fxopt::rms_norm.

Anchored at `rsqrt`. x32 is x upcast to fp32 (or x itself when already fp32). The tail after the normalization is
walked node by node and captured exactly (see fxopt/kernels/rms_norm.py for the op's semantics):
  cast before the weight -> mid_dtype (Llama: `w * h.to(input_dtype)`),
  `w`, `w.float()`, `1.0 + w.float()` (fp32 offset absorbed into the op), or any other [H] tensor expression,
  cast after the weight -> the op's out_dtype (Gemma: `(h * (1 + w.float())).type_as(x)`).
"""
from __future__ import annotations

import torch
import torch.fx

from fxopt.kernels import rms_norm as _ops  # noqa: F401  (registers the op)
from fxopt.normalize import meta
from fxopt.patterns.match import (Match, NoMatch, Pattern, arg, call, cast_dtype, insert_op, number,
                                  only_user, other_operand, replace_output, require, single_use, split_scalar)

_LOW = (torch.float16, torch.bfloat16)


def _candidates(graph):
    return [n for n in graph.nodes if call(n, torch.rsqrt)]


def _variance_input(v):
    """x32 from mean(x32^2 | x32*x32 | square(x32), dim=-1, keepdim=True)."""
    require(call(v, torch.mean), f"rsqrt input is not mean(...) + eps ({v.target})")
    p = v.args[0]
    dim, keepdim = arg(v, 1, "dim"), arg(v, 2, "keepdim", False)
    ndim = meta(p).dim()
    dims = list(dim) if isinstance(dim, (list, tuple)) else [dim]
    require(len(dims) == 1 and dims[0] in (-1, ndim - 1), f"mean over dim {dim}, not the last dim")
    require(keepdim is True, "mean without keepdim=True")
    if call(p, torch.pow) and p.args[1] == 2:
        return p, p.args[0]
    if call(p, torch.square):
        return p, p.args[0]
    if call(p, torch.mul) and p.args[0] is p.args[1]:
        return p, p.args[0]
    raise NoMatch(f"mean input is not x^2 ({getattr(p.target, '__name__', p.target)})")


def _weight(w_expr, h):
    """(weight node or expression, offset, absorbed nodes) of the tensor multiplied into the normalized value."""
    mw = meta(w_expr)
    require(isinstance(mw, torch.Tensor) and mw.numel() == h and mw.shape[-1] == h,
            "multiplier is not a [hidden] weight vector")
    absorbed = []
    base, offset = w_expr, 0.0
    if call(w_expr, torch.add):
        t, c = split_scalar(w_expr)
        if t is not None and meta(t).dtype == torch.float32:   # fp32 add: absorbing it is exact
            base, offset, absorbed = t, float(c), [w_expr]
    if cast_dtype(base) == torch.float32 and meta(base.args[0]).dtype in _LOW + (torch.float32,) \
            and (base is w_expr or len(base.users) == 1):
        absorbed.append(base)
        base = base.args[0]   # the kernel upcasts the weight to fp32 itself
    return base, offset, absorbed


def match_rms_norm(r):
    add = r.args[0]
    require(call(add, torch.add), "rsqrt input is not (variance + eps)")
    v, eps = split_scalar(add)
    require(v is not None, "eps is not a constant")
    p, x32 = _variance_input(v)
    mx = meta(x32)
    require(mx.dtype == torch.float32, f"variance computed in {mx.dtype}, not fp32 "
            "(kernels compute in fp32; matching would change the numerics)")
    x = x32.args[0] if cast_dtype(x32) == torch.float32 else x32
    for t in {x, x32}:
        require(not (call(t, torch.sub) and call(t.args[1], torch.mean) and t.args[1].args[0] is t.args[0]),
                "input is x - mean(x): a LayerNorm (left to layer_norm)")
    require(meta(x).dtype in _LOW + (torch.float32,), f"input dtype {meta(x).dtype} not supported")
    mul = only_user(r)
    require(mul is not None and call(mul, torch.mul) and other_operand(mul, r) is x32,
            "rsqrt result is not only multiplied by the same x")
    h = mx.shape[-1]
    cur, mid, weight, offset, tail = mul, None, None, 0.0, []
    while (nxt := only_user(cur)) is not None:
        dt = cast_dtype(nxt)
        if dt is not None and weight is None and mid is None and dt in _LOW:
            mid = dt
        elif dt is not None and weight is not None:
            cur = nxt
            tail.append(nxt)
            break
        elif call(nxt, torch.mul) and weight is None and meta(nxt).shape == mx.shape:
            w_expr = other_operand(nxt, cur)
            if not isinstance(w_expr, torch.fx.Node):
                break
            try:
                weight, offset, absorbed = _weight(w_expr, h)
            except NoMatch:
                break
            tail.extend(absorbed)
        else:
            break
        cur = nxt
        tail.append(nxt)
    inside = {p, v, add, r, mul, *tail}
    reason = single_use([p, v, add, r], inside)
    require(reason is None, reason or "")
    out_dtype = meta(cur).dtype
    return Match(anchor=r, output=cur, nodes=[p, v, add, r, mul, *tail],
                 params=dict(x=x, weight=weight, eps=float(eps), offset=offset, mid=mid, out_dtype=out_dtype))


def replace_rms_norm(graph, m):
    q = m.params
    y, _rstd = insert_op(graph, m.output, torch.ops.fxopt.rms_norm.default,
                         (q["x"], q["weight"], q["eps"], q["offset"], q["mid"], q["out_dtype"]), n_outputs=2)
    replace_output(graph, m, y)
    return y


RMS_NORM = Pattern("rms_norm", _candidates, match_rms_norm, replace_rms_norm)
