"""rope: x * cos + rotate(x) * sin on q and k sharing cos/sin  ->  one fxopt::rope call (one match per pair).

Anchored at the rotation, which has two spellings in transformers:
  rotate-half   cat((-x[..., d/2:], x[..., :d/2]), -1)              (llama, mistral, qwen2, gemma, phi3, neox, ...)
  interleaved   stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2) (cohere, glm, gptj's rotate_every_two, ...)
  either with the negation on the other half, (x2, -x1): the rotation by -theta (nanochat), the op gets -sin;
then `add(mul(x, cos), mul(rot, sin))` (operands in either order); or at the output of the half-width spelling
  cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)   x1, x2 = chunk(x, 2, -1) or the two slices, c/s d/2 wide (gpt_oss)
  or x1, x2 = x[..., 0::2], x[..., 1::2] (deepseek_v3's rope_interleave): the interleaved op, its output then
  de-interleaved by a permuting copy (cos/sin each repeated twice);
which is rotate-half with cos = cat((c, c), -1), sin = cat((s, s), -1) (the op gets those; same roundings: x1*c,
x2*s and their difference are each rounded, as x*cos, rot*sin and their sum are); or at the complex multiply
  view_as_real(view_as_complex(x.reshape(..., d/2, 2)) * f).flatten(-2)     f complex, d/2 wide (llama4)
which is the interleaved rotation with cos/sin = f's real/imaginary parts, each repeated twice along the last dim
((a + ib)(c + is) = (ac - bs) + i(as + bc)); in fp32, as the complex product is.
Absorbed around it (see fxopt/kernels/rope.py):
  an fp32 upcast of x (`q.float()`, cohere), used only by the rope;
  partial rotary: x = y[..., :r], output cat([out, y[..., r:]], -1) -> the op takes y and passes the rest through;
  a downcast of an fp32 result to fp16/bf16 (`q_embed.to(dtype)`).
Rounding is eager's: products and sum in the dtype of `x * cos` (mid_dtype), gradients in x's dtype (grad_dtype).
Two units (q and k) that use the same cos and sin nodes with the same dtypes/layout become one op; a unit without a
partner (only q or only k roped, or cos/sin recomputed per tensor as in gptj) becomes one op of its own.
Not matched (reason in the report): cos/sin that require grad (no cos/sin gradients are computed), cos/sin that
vary along every leading dim of a 4-D q, other slicings, intermediates used outside the rope.
Complex forms whose pairs are not adjacent elements of x's last dim are not matched (no complex multiply of another
layout is known in transformers; deepseek_v2 spells llama4's).
"""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from fxopt.kernels import rope as _ops
from fxopt.normalize import meta
from fxopt.patterns.match import (Match, NoMatch, Pattern, arg, call, cast_dtype, insert_op, only_user,
                                  other_operand, replace_output, require, single_use)

_LOW = (torch.float16, torch.bfloat16)
_FLOATS = _LOW + (torch.float32,)


@dataclasses.dataclass
class _Unit:
    anchor: fx.Node
    x: fx.Node            # the op's input (q or k, or y of the partial rotary y[..., :r])
    cos: fx.Node
    sin: fx.Node
    interleaved: bool
    mid: torch.dtype      # dtype of x * cos in the graph
    grad_dtype: torch.dtype   # dtype of the tensor multiplied by cos (its gradients are rounded to it)
    out: fx.Node          # the node whose value the op produces
    nodes: list           # matched nodes, erased once `out` is replaced
    half: bool = False    # cos/sin are d/2 wide (the half-width spelling): the op gets cat((c, c), -1)
    cplx: bool = False    # cos is sin is a complex f (the complex multiply): the op gets f's parts, each repeated
    src: tuple | None = None   # (base, index) when cos is base[index]: units with the same one share cos/sin
    flip: bool = False    # the rotation by -theta (x2, -x1): the op gets -sin


def _has_neg_operand(n) -> bool:
    """cat/stack((-x2, x1)), or the rotation by -theta, cat/stack((x2, -x1)) (nanochat): a negated operand."""
    seq = n.args[0] if n.args else n.kwargs.get("tensors")
    return isinstance(seq, (list, tuple)) and len(seq) == 2 and (call(seq[0], torch.neg) or call(seq[1], torch.neg))


def _is_half_form(n) -> bool:
    seq = n.args[0] if n.args else n.kwargs.get("tensors")
    return call(n, torch.cat) and isinstance(seq, (list, tuple)) and len(seq) == 2 and call(seq[0], torch.sub) \
        and call(seq[1], torch.add)


def _is_complex_form(n) -> bool:
    return call(n, torch.view_as_real) and call(n.args[0], torch.mul) and \
        any(call(a, torch.view_as_complex) for a in n.args[0].args)


def _rotations(graph):
    return [n for n in graph.nodes if (call(n, torch.cat, torch.stack) and (_has_neg_operand(n) or _is_half_form(n)))
            or _is_complex_form(n)]


def _candidates(graph):
    """Rotation nodes, less those that will be matched as the partner of an earlier one (a replacement erases the
    partner's nodes, and the driver must not be handed an erased anchor)."""
    out, claimed = [], set()
    for n in _rotations(graph):
        if n in claimed:
            continue
        out.append(n)
        try:
            m = match_rope(n)
        except NoMatch:
            continue
        claimed.update(u.anchor for u in m.params["units"][1:])
    return out


def _last_dim_slice(n):
    """(base, start, stop, step) if n = base[..., start:stop:step] slices only the last dim, else None."""
    if not call(n, operator.getitem) or not isinstance(meta(n.args[0]), torch.Tensor):
        return None
    base, idx = n.args
    nd = meta(base).dim()
    idx = idx if isinstance(idx, tuple) else (idx,)
    if len(idx) == 2 and idx[0] is Ellipsis and isinstance(idx[1], slice):
        s = idx[1]
    elif nd >= 1 and len(idx) == nd and all(i == slice(None) for i in idx[:-1]) and isinstance(idx[-1], slice):
        s = idx[-1]
    else:
        return None
    try:
        start, stop, step = s.indices(int(meta(base).shape[-1]))
    except TypeError:   # symbolic bounds
        return None
    return (base, start, stop, step)


def _first_second_half(s1, s2, d) -> bool:
    """s1, s2 (from _last_dim_slice) are x[..., :d/2] and x[..., d/2:] of a d-wide x."""
    return d % 2 == 0 and s1[1:] == (0, d // 2, 1) and s2[1:] == (d // 2, d, 1)


def _even_odd_pair(s1, s2, d) -> bool:
    """s1, s2 (from _last_dim_slice) are x[..., 0::2] and x[..., 1::2] of a d-wide x."""
    return d % 2 == 0 and s1[1:] == (0, d, 2) and s2[1:] == (1, d, 2)


def _flattens_last_two(flat, src) -> bool:
    """flat is src.flatten(-2): a flatten of src over its last two dims."""
    nd = meta(src).dim()
    return flat is not None and ((flat.op == "call_method" and flat.target == "flatten") or call(flat, torch.flatten)) \
        and flat.args[0] is src and arg(flat, 1, "start_dim", 0) in (-2, nd - 2) \
        and arg(flat, 2, "end_dim", -1) in (-1, nd - 1)


def _finish(nodes, out, x, cos_shape, sin_shape):
    """The end of every spelling's unit: a downcast of an fp32 result is absorbed (one more rounding, done by the
    kernel's store), the matched nodes must be used only inside, and the kernel must plan the shapes. Returns out."""
    c = only_user(out)
    if c is not None and meta(out).dtype == torch.float32 and cast_dtype(c) in _LOW:
        nodes.append(c)            # q_embed.to(bf16), .type_as(xq)
        out = c
    reason = single_use([n for n in nodes if n is not out], set(nodes))
    require(reason is None, reason or "")
    try:
        _ops.plan_dims(meta(x).shape, None, cos_shape, sin_shape)
    except ValueError as e:
        raise NoMatch(str(e)) from None
    return out


def _rotation(anchor):
    """(rotated node, r, interleaved, nodes, flip) for cat((-x2, x1), -1) or stack((-x2, x1), -1).flatten(-2) of r;
    flip: the operands are (x2, -x1), the rotation by -theta, which is the same rotation with sin negated."""
    seq = anchor.args[0] if anchor.args else anchor.kwargs.get("tensors")
    dim = arg(anchor, 1, "dim", 0)
    require(isinstance(meta(anchor), torch.Tensor), "no tensor metadata on the rotation")
    require(len(seq) == 2, f"{anchor.target.__name__} of {len(seq)} tensors, not (-x2, x1)")
    nd = meta(anchor).dim()
    require(dim in (-1, nd - 1), f"{anchor.target.__name__} over dim {dim}, not the last dim")
    flip = not call(seq[0], torch.neg)
    if flip:
        x2, neg = seq
        x1 = neg.args[0]
    else:
        neg, x1 = seq
        x2 = neg.args[0]
    sl = _slices_of_one(x1, x2)
    require(sl is not None, "rotation halves are not constant last-dim slices of one tensor")
    s1, s2, d = sl
    r = s1[0]
    if call(anchor, torch.cat):
        require(_first_second_half(s1, s2, d),
                f"cat((-x[{s2[1]}:{s2[2]}], x[{s1[1]}:{s1[2]}])) is not rotate-half of a {d}-wide tensor")
        return anchor, r, False, [x1, x2, neg, anchor], flip
    flat = only_user(anchor)
    require(_flattens_last_two(flat, anchor), "stack((-x2, x1), -1) is not flattened over its last two dims")
    require(_even_odd_pair(s1, s2, d),
            f"stack((-x[{s2[1]}::{s2[3]}], x[{s1[1]}::{s1[3]}])) is not the interleaved rotation")
    return flat, r, True, [x1, x2, neg, anchor, flat], flip


def _upcast_source(n, allowed_users):
    """n's input when n is an fp32 upcast of an fp16/bf16 tensor used only by `allowed_users`, else None."""
    if cast_dtype(n) == torch.float32 and meta(n.args[0]).dtype in _LOW and set(n.users) <= set(allowed_users):
        return n.args[0]
    return None


def _partial(x, x_users, out):
    """(y, pass slice, cat) if x = y[..., :r] and out is only used by cat([out, y[..., r:]], -1), else None."""
    s = _last_dim_slice(x)
    cat = only_user(out)
    if s is None or cat is None or not call(cat, torch.cat) or set(x.users) != set(x_users):
        return None
    y, start, stop, step = s
    d = int(meta(y).shape[-1])
    seq, dim = cat.args[0] if cat.args else cat.kwargs.get("tensors"), arg(cat, 1, "dim", 0)
    if not (start == 0 and step == 1 and stop < d and dim in (-1, meta(cat).dim() - 1)
            and isinstance(seq, (list, tuple)) and len(seq) == 2 and seq[0] is out):
        return None
    p = _last_dim_slice(seq[1])
    if p is None or p != (y, stop, d, 1) or len(seq[1].users) != 1:
        return None
    return y, seq[1], cat


def _halves(a, b):
    """(x, nodes) when a, b are the first and second half of x's last dim: chunk(x, 2, -1)[0], [1] or
    x[..., :d/2], x[..., d/2:]; else None."""
    if call(a, operator.getitem) and call(b, operator.getitem) and a.args[0] is b.args[0] \
            and call(a.args[0], torch.chunk) and (a.args[1], b.args[1]) == (0, 1):
        ch = a.args[0]
        x = ch.args[0]
        if isinstance(meta(x), torch.Tensor) and arg(ch, 1, "chunks") == 2 \
                and arg(ch, 2, "dim", 0) in (-1, meta(x).dim() - 1) and int(meta(x).shape[-1]) % 2 == 0 \
                and len(ch.users) == 2:
            return x, [ch, a, b]
        return None
    sl = _slices_of_one(a, b)
    return (sl[0][0], [a, b]) if sl is not None and _first_second_half(*sl) else None


def _slices_of_one(a, b):
    """(slice a, slice b, d) when a, b are constant last-dim slices of one d-wide tensor (see _last_dim_slice)."""
    s1, s2 = _last_dim_slice(a), _last_dim_slice(b)
    if s1 is None or s2 is None or s1[0] is not s2[0]:
        return None
    return s1, s2, int(meta(s1[0]).shape[-1])


def _even_odd(a, b):
    """(x, nodes) when a, b are x[..., 0::2] and x[..., 1::2] (deepseek's interleaved pairs), else None."""
    sl = _slices_of_one(a, b)
    if sl is None:
        return None
    s1, s2, d = sl
    return (s1[0], [a, b]) if _even_odd_pair(s1, s2, d) else None


def _mul_of(n, a, b) -> bool:
    return call(n, torch.mul) and len(n.args) == 2 and not n.kwargs and \
        ((n.args[0] is a and n.args[1] is b) or (n.args[0] is b and n.args[1] is a))


def _half_unit(anchor) -> _Unit:
    """cat((x1 c - x2 s, x2 c + x1 s), -1) of the halves x1, x2 of x, with d/2-wide c, s; or of x's even and odd
    features (deepseek's rope_interleave): the interleaved rotation, its output de-interleaved."""
    first, second = anchor.args[0] if anchor.args else anchor.kwargs.get("tensors")
    dim = arg(anchor, 1, "dim", 0)
    require(isinstance(meta(anchor), torch.Tensor) and dim in (-1, meta(anchor).dim() - 1),
            "cat of the two halves is not over the last dim")
    require(len(first.args) == 2 and len(second.args) == 2 and not first.kwargs and not second.kwargs,
            "not cat(a - b, c + d)")
    m1, m2 = first.args
    require(call(m1, torch.mul) and call(m2, torch.mul) and len(m1.args) == 2 and len(m2.args) == 2,
            "cat(a - b, ...): a, b are not products")
    found = None
    for x1, c in (m1.args, m1.args[::-1]):
        for x2, s_ in (m2.args, m2.args[::-1]):
            if not (isinstance(x1, fx.Node) and isinstance(x2, fx.Node)) or found is not None:
                continue
            h, pairs = _halves(x1, x2), False
            if h is None:
                h, pairs = _even_odd(x1, x2), True
            if h is not None:
                found = (x1, x2, c, s_, h, pairs)
    require(found is not None, "x1 * c - x2 * s: x1, x2 are not the two halves (nor the even and odd features) "
                               "of one tensor")
    x1, x2, cos, sin, (x, half_nodes), pairs = found
    p, q = second.args
    mc, ms = (p, q) if _mul_of(p, x2, cos) else (q, p)
    require(_mul_of(mc, x2, cos) and _mul_of(ms, x1, sin), "second half is not x2 * c + x1 * s")
    require(isinstance(cos, fx.Node) and isinstance(sin, fx.Node) and cos is not sin, "cos/sin are not tensors")
    mcos, msin, mx = meta(cos), meta(sin), meta(x)
    require(isinstance(mcos, torch.Tensor) and isinstance(msin, torch.Tensor), "cos/sin are not tensors")
    require(not mcos.requires_grad and not msin.requires_grad,
            "cos/sin require grad (fxopt::rope computes no cos/sin gradients)")
    d = int(mx.shape[-1])
    require(mcos.shape[-1] == d // 2 and msin.shape[-1] == d // 2, "cos/sin are not d/2 wide")
    mid = meta(m1).dtype
    require(all(meta(n).dtype == mid for n in (m2, first, mc, ms, second, anchor)) and mid in _FLOATS,
            "the products, difference and sum are not in one fp16/bf16/fp32 dtype")
    require(mx.dtype in _FLOATS and mcos.dtype in _FLOATS and msin.dtype in _FLOATS,
            f"x/cos/sin dtypes {mx.dtype}/{mcos.dtype}/{msin.dtype} not supported")
    require(meta(anchor).shape == mx.shape, f"cos/sin broadcast x {tuple(mx.shape)} to {tuple(meta(anchor).shape)}")
    nodes = half_nodes + [m1, m2, first, mc, ms, second, anchor]
    full = lambda t: t.shape[:-1] + (d,)
    out = _finish(nodes, anchor, x, full(mcos), full(msin))
    return _Unit(anchor, x, cos, sin, pairs, mid, mx.dtype, out, nodes, half=True)


def _complex_unit(anchor) -> _Unit:
    """view_as_real(view_as_complex(x.reshape(..., d/2, 2)) * f).flatten(-2), f complex (not requiring grad)."""
    mul = anchor.args[0]
    require(len(mul.args) == 2 and not mul.kwargs, "complex product is not of two tensors")
    vc, f = mul.args if call(mul.args[0], torch.view_as_complex) else mul.args[::-1]
    mf, rs = meta(f), vc.args[0]
    require(isinstance(f, fx.Node) and isinstance(mf, torch.Tensor) and mf.dtype == torch.complex64,
            "the multiplier is not a complex64 tensor")
    require(not mf.requires_grad, "the complex multiplier requires grad (fxopt::rope computes no cos/sin gradients)")
    require(isinstance(rs, fx.Node) and rs.op == "call_method" and rs.target in ("reshape", "view"),
            "view_as_complex of something other than a reshape of x")
    x = rs.args[0]
    mx, mrs = meta(x), meta(rs)
    require(isinstance(mx, torch.Tensor) and mx.dtype == torch.float32, "x of the complex product is not fp32")
    d = int(mx.shape[-1])
    require(d % 2 == 0 and tuple(mrs.shape) == tuple(mx.shape[:-1]) + (d // 2, 2),
            "x is not reshaped to (..., d/2, 2) pairs")
    flat = only_user(anchor)
    require(_flattens_last_two(flat, anchor), "view_as_real(...) is not flattened over its last two dims")
    require(meta(flat).shape == mx.shape, f"the multiplier broadcasts x {tuple(mx.shape)} to {tuple(meta(flat).shape)}")
    nodes = [rs, vc, mul, anchor, flat]
    src = _upcast_source(x, [rs])
    if src is not None:           # xq.float(): the kernel upcasts itself
        nodes.append(x)
        x = src
    full = tuple(mf.shape[:-1]) + (d,)
    out = _finish(nodes, flat, x, full, full)
    key = (f.args[0], repr(f.args[1])) if call(f, operator.getitem) and isinstance(f.args[0], fx.Node) else None
    return _Unit(anchor, x, f, f, True, torch.float32, torch.float32, out, nodes, cplx=True, src=key)


def _unit(anchor) -> _Unit:
    if _is_half_form(anchor):
        return _half_unit(anchor)
    if _is_complex_form(anchor):
        return _complex_unit(anchor)
    rot, r, interleaved, nodes, flip = _rotation(anchor)
    mul_s = only_user(rot)
    require(mul_s is not None and call(mul_s, torch.mul), "rotated tensor is not only multiplied by sin")
    sin = other_operand(mul_s, rot)
    add = only_user(mul_s)
    require(add is not None and call(add, torch.add) and len(add.args) == 2 and not add.kwargs,
            "rotate(x) * sin is not only added to x * cos")
    mul_c = other_operand(add, mul_s)
    require(call(mul_c, torch.mul) and other_operand(mul_c, r) is not None,
            "rotate(x) * sin is not added to (x * cos) of the same x")
    cos = other_operand(mul_c, r)
    require(isinstance(cos, fx.Node) and isinstance(sin, fx.Node) and cos is not r,
            "cos/sin are not tensors")
    mc, ms = meta(cos), meta(sin)
    require(isinstance(mc, torch.Tensor) and isinstance(ms, torch.Tensor), "cos/sin are not tensors")
    require(not mc.requires_grad and not ms.requires_grad,
            "cos/sin require grad (fxopt::rope computes no cos/sin gradients; HF derives them from a buffer)")
    mid, mr = meta(mul_c).dtype, meta(r)
    require(meta(mul_s).dtype == mid and meta(add).dtype == mid and mid in _FLOATS,
            f"x*cos, rot*sin, sum in dtypes {mid}/{meta(mul_s).dtype}/{meta(add).dtype} (need one of fp16/bf16/fp32)")
    require(mr.dtype in _FLOATS and mc.dtype in _FLOATS and ms.dtype in _FLOATS,
            f"x/cos/sin dtypes {mr.dtype}/{mc.dtype}/{ms.dtype} not supported")
    require(meta(add).shape == mr.shape, f"cos/sin broadcast x {tuple(mr.shape)} to {tuple(meta(add).shape)}")
    nodes += [mul_s, mul_c, add]
    x, users, out = r, [mul_c, nodes[0], nodes[1]], add
    src = _upcast_source(x, users)
    if src is not None:            # q.float() * cos ...: the kernel upcasts itself
        nodes.append(x)
        x, users = src, [x]
    fold = _partial(x, users, out)
    if fold is not None:           # partial rotary: cat([rope(y[..., :r]), y[..., r:]], -1)
        y, pass_node, cat = fold
        nodes += [x, pass_node, cat]
        x, out = y, cat
        src = _upcast_source(x, [nodes[-3], pass_node])
        if src is not None:
            nodes.append(x)
            x = src
    out = _finish(nodes, out, x, mc.shape, ms.shape)
    return _Unit(anchor, x, cos, sin, interleaved, mid, mr.dtype, out, nodes, flip=flip)


def _key(u: _Unit):
    return (u.src or u.sin, u.interleaved, u.half, u.cplx, u.flip, u.mid, u.grad_dtype, meta(u.out).dtype,
            meta(u.x).dtype)


def _complex_partners(u: _Unit):
    """Complex-multiply anchors whose multiplier is the same view of u's (base[index]) or u's itself."""
    base = u.src[0] if u.src else None
    views = [g for g in base.users if call(g, operator.getitem) and repr(g.args[1]) == u.src[1]] if base else [u.cos]
    for g in views:
        for m in list(g.users):
            if m in u.nodes or not call(m, torch.mul):
                continue
            for r in m.users:
                if _is_complex_form(r):
                    yield r


def _partner_anchors(u: _Unit):
    """Rotation anchors of other `x * cos` products with u's cos."""
    if u.cplx:
        yield from _complex_partners(u)
        return
    for m in list(u.cos.users):
        if m in u.nodes or not call(m, torch.mul):
            continue
        sub = only_user(m)            # the half-width spelling: x1 * c - x2 * s, then the cat
        cat = only_user(sub) if sub is not None and call(sub, torch.sub) else None
        if cat is not None and _is_half_form(cat):
            yield cat
            continue
        add = only_user(m)
        mul_s = other_operand(add, m) if add is not None and call(add, torch.add) else None
        if not call(mul_s, torch.mul):
            continue
        for rot in mul_s.args:
            if isinstance(rot, fx.Node) and (rot.op == "call_method" and rot.target == "flatten"
                                             or call(rot, torch.flatten)):
                rot = rot.args[0]
            if call(rot, torch.cat, torch.stack) and _has_neg_operand(rot):
                yield rot


def _pair(u: _Unit, positions):
    """(partner unit, insertion node) for u, or (None, u.out)."""
    for anchor in _partner_anchors(u):
        try:
            v = _unit(anchor)
        except NoMatch:
            continue
        if (v.cos is not u.cos and (u.src is None or v.src != u.src)) or _key(v) != _key(u):
            continue
        try:
            _ops.plan_dims(meta(u.x).shape, meta(v.x).shape, meta(u.cos).shape, meta(u.sin).shape)
        except ValueError:
            continue
        before = min((u.out, v.out), key=positions.__getitem__)
        if all(positions[n] < positions[before] for n in (u.x, v.x, u.cos, u.sin)):
            return v, before
    return None, u.out


def match_rope(anchor):
    u = _unit(anchor)
    positions = {n: i for i, n in enumerate(anchor.graph.nodes)}
    v, before = _pair(u, positions)
    return Match(anchor=anchor, output=u.out, nodes=u.nodes + (v.nodes if v else []),
                 params=dict(units=[u] + ([v] if v else []), before=before))


def _deinterleave(graph, before, y):
    """y[..., 0::2] then y[..., 1::2] along the last dim: y.unflatten(-1, (d/2, 2)).transpose(-1, -2).flatten(-2)."""
    d = int(meta(y).shape[-1])
    t = insert_op(graph, before, torch.unflatten, (y, -1, (d // 2, 2)))
    t = insert_op(graph, before, torch.transpose, (t, -1, -2))
    return insert_op(graph, before, torch.flatten, (t, -2))


def replace_rope(graph, m):
    units, before = m.params["units"], m.params["before"]
    u, v = units[0], (units[1] if len(units) > 1 else None)
    cos, sin = u.cos, u.sin
    if u.half and u.interleaved:   # even/odd pairs: each angle twice in a row, c0 c0 c1 c1 ...
        cos, sin = (insert_op(graph, before, torch.repeat_interleave, (t, 2, -1)) for t in (u.cos, u.sin))
    elif u.half:   # the op's cos/sin are d wide: (c, c) and (s, s)
        cos, sin = (insert_op(graph, before, torch.cat, ([t, t], -1)) for t in (u.cos, u.sin))
    elif u.cplx:   # f = c + i s: the interleaved op's cos/sin are c and s, each repeated twice
        parts = insert_op(graph, before, torch.view_as_real, (u.cos,))
        cos, sin = (insert_op(graph, before, torch.repeat_interleave,
                              (insert_op(graph, before, operator.getitem, (parts, (Ellipsis, i))), 2, -1))
                    for i in (0, 1))
    if u.flip:   # x * cos + (x2, -x1) * sin == x * cos + (-x2, x1) * (-sin), negation exact
        sin = insert_op(graph, before, torch.neg, (sin,))
    args = (u.x, v.x if v else None, cos, sin, u.interleaved, u.mid, u.grad_dtype, meta(u.out).dtype)
    yq, yk = insert_op(graph, before, torch.ops.fxopt.rope.default, args, n_outputs=2)
    if u.half and u.interleaved:   # cat(evens', odds'): the op's interleaved output, de-interleaved (a copy)
        yq = _deinterleave(graph, before, yq)
        yk = _deinterleave(graph, before, yk) if v is not None else yk
    replace_output(graph, Match(u.anchor, u.out, u.nodes, {}), yq)
    if v is not None:
        replace_output(graph, Match(v.anchor, v.out, v.nodes, {}), yk)
    else:
        graph.erase_node(yk)
    return yq


ROPE = Pattern("rope", _candidates, match_rope, replace_rope)
