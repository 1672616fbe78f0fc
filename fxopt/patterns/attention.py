"""attention: scaled_dot_product_attention or the eager chain -> fxopt::attention (see docs/attention.md).

SDPA (anchor): F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=0, is_causal, scale, enable_gqa).
Eager (anchor = softmax):
  matmul(q [*s], K^T [*s]) [*s | /s]* [c * tanh(. / c)] [mask step [mask step]]
  -> softmax(-1 [, fp32]) [.to(dtype)] [dropout(p=0 | eval)] -> matmul(., V)
  mask step: + mask | masked_fill(cond, -big) | where(cond, ., -big) (-big a number or a constant scalar tensor).
  Two steps (a mask and an additive bias, e.g. ALiBi; or two masks) are one mask when at most one of them has to be
  read as a tensor: the other is then exactly causal / sliding window (kernel flags). q and k upcast to fp32 before
  the first matmul (v not) are taken before the cast: the kernel's dots accumulate in fp32.
K, V: the un-repeated kv heads when they went through repeat_kv (x[:, :, None].expand(..).reshape(..)) or
repeat_interleave(n, dim=1): the kernel maps q head h to kv head h // n. Dtype casts inside the chain are absorbed
(the kernel keeps scores in fp32, as SDPA does). The mask is classified by fxopt/patterns/attention_mask.py.
Dropout with p > 0 in training is not fused: rejected with a reason.
"""
from __future__ import annotations

import logging
import math
import operator

import torch
import torch.fx as fx

from fxopt.kernels import attention as _ops  # noqa: F401  (registers the op)
from fxopt.normalize import meta
from fxopt.patterns.attention_dispatch import GQA_NOTE, keep_sdpa
from fxopt.patterns.attention_mask import bias_row_problem, classify, scalar_value, tighter_window
from fxopt.patterns.match import (Match, NoMatch, Pattern, arg, call, cast_dtype, insert_op, number, only_user,
                                  replace_output, require, split_scalar)

log = logging.getLogger("fxopt.patterns.attention")

_SDPA = (torch._C._nn.scaled_dot_product_attention,)
_SOFTMAX = (torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax)
_DROPOUT = (torch.nn.functional.dropout, torch.dropout)
_MATMUL = (torch.matmul, operator.matmul, torch.bmm)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _method(node, *names) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def _candidates(graph):
    return [n for n in graph.nodes if call(n, *_SDPA, *_SOFTMAX)]


def _shape(node):
    v = meta(node)
    require(isinstance(v, torch.Tensor), f"{getattr(node, 'name', node)} has no tensor metadata")
    return tuple(v.shape)


def _ints(shape) -> bool:
    return all(isinstance(d, int) for d in shape)


# ---- k / v: look through repeat_kv ----

def _unrepeat(node: fx.Node):
    """(un-repeated kv node, repeat nodes) for repeat_kv / repeat_interleave(dim=1); (node, []) otherwise."""
    if call(node, torch.repeat_interleave) and number(arg(node, 1, "repeats")) and \
            arg(node, 2, "dim") in (1, -3) and len(_shape(node)) == 4:
        return node.args[0], [node]
    if not _is_reshape(node):
        return node, []
    e = node.args[0]
    if not (_method(e, "expand") and isinstance(e.args[0], fx.Node)):
        return node, []
    u = e.args[0]
    if call(u, operator.getitem) and isinstance(u.args[1], tuple) and len(u.args[1]) >= 3 and \
            u.args[1][2] is None and all(s == slice(None) for s in u.args[1][:2]) and \
            all(s == slice(None) for s in u.args[1][3:]):
        base = u.args[0]
    elif call(u, torch.unsqueeze) and arg(u, 1, "dim") in (2, -3):
        base = u.args[0]
    else:
        return node, []
    bs, es, rs = _shape(base), _shape(e), _shape(node)
    if len(bs) == 4 and len(es) == 5 and es[:2] == bs[:2] and es[3:] == bs[2:] and \
            rs == (bs[0], bs[1] * es[2], bs[2], bs[3]):
        return base, [node, e, u]
    return node, []


def _check_qkv(q, k, v):
    qs, ks, vs = _shape(q), _shape(k), _shape(v)
    require(len(qs) == 4 and len(ks) == 4 and len(vs) == 4, f"q/k/v are not 4-D [B, H, S, D] ({qs}, {ks}, {vs})")
    require(ks == vs, f"k {ks} and v {vs} shapes differ")
    if _ints((qs[1], ks[1], qs[3], ks[3])):   # symbolic (dynamic=True): checked at run
        require(qs[3] == ks[3], f"q {qs} and k {ks} differ in head dim")
        require(qs[1] % ks[1] == 0, f"{qs[1]} q heads are not a multiple of {ks[1]} kv heads")
        require(qs[3] <= MAX_HEAD_DIM, f"head dim {qs[3]} > {MAX_HEAD_DIM}")
    dts = {meta(q).dtype, meta(k).dtype, meta(v).dtype}
    require(len(dts) == 1 and next(iter(dts)) in _FLOATS, f"q/k/v dtypes {sorted(map(str, dts))} not one float type")
    return qs, ks


def _mask_params(mask, qs, ks, allowed_is_not=False):
    """(mask node or None, causal, window, why) for a mask operand."""
    mv = meta(mask)
    require(isinstance(mv, torch.Tensor), "mask is not a tensor")
    require(not mv.requires_grad, "attention mask requires grad (its gradient is not computed)")
    require(mv.dtype == torch.bool or mv.is_floating_point(), f"mask dtype {mv.dtype}")
    # the original add / SDPA accepted it, so it broadcasts to the 4-D scores
    require(mv.dim() <= 4, f"{mv.dim()}-D mask")
    info = classify(mask, qs[2], ks[2], allowed_is_not)
    if info.docs is not None and meta(info.docs).shape[0] in (1, qs[0]):
        return info.docs, info.causal, info.window, info.why
    return (mask if info.tensor else None), info.causal, info.window, info.why


# ---- SDPA ----

def _dropout_p(p):
    require(number(p), f"dropout_p is not a constant ({p})")
    require(p == 0, f"dropout p={p} in training is not fused (fxopt attention has no dropout; docs/attention.md)")


def _causal_flag(n):
    """SDPA node: attn_mask=None, is_causal=True (its mask was evaluated equal to the causal mask)."""
    args, kw = list(n.args), dict(n.kwargs)
    for i, name, value in ((3, "attn_mask", None), (5, "is_causal", True)):
        if len(args) > i:
            args[i] = value
        else:
            kw[name] = value
    n.args, n.kwargs = tuple(args), kw


def _drop_repeat(n, k0, v0):
    """SDPA node: k/v replaced by their un-repeated sources, enable_gqa=True (the repeats become dead code)."""
    n.args = (n.args[0], k0, v0, *n.args[3:])
    n.kwargs = {**n.kwargs, "enable_gqa": True}


def match_sdpa(n):
    q, k, v = n.args[:3]
    mask = arg(n, 3, "attn_mask")
    _dropout_p(arg(n, 4, "dropout_p", 0.0))
    is_causal = arg(n, 5, "is_causal", False)
    scale = arg(n, 6, "scale", None)
    require(isinstance(is_causal, bool), "is_causal is not a constant")
    require(scale is None or number(scale), "scale is not a constant")
    k0, krep = _unrepeat(k)
    v0, vrep = _unrepeat(v)
    if _shape(k0)[1] != _shape(v0)[1]:
        k0, krep, v0, vrep = k, [], v, []
    qs, ks = _check_qkv(q, k0, v0)
    tmask, causal, window, why = None, bool(is_causal), 0, "is_causal" if is_causal else "no mask"
    if isinstance(mask, fx.Node):
        tmask, causal, window, why = _mask_params(mask, qs, ks)
    require(scale is not None or isinstance(qs[3], int), "default scale with a symbolic head dim")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(qs[3])
    # SDPA runs this form itself (no mask, or a constant mask proven == causal): keep it where it is measured faster
    flag_only = isinstance(mask, fx.Node) and tmask is None and causal and not window and qs[2] == ks[2]
    if mask is None or flag_only:
        why_sdpa = keep_sdpa(qs, ks, meta(q).dtype, meta(q).device, causal, scale, bool(krep))
        if why_sdpa is not None and flag_only:   # SDPA's flash backend needs is_causal, not a dense mask
            _causal_flag(n)
            why_sdpa += "; its constant causal mask became is_causal=True"
        if why_sdpa is not None and GQA_NOTE in why_sdpa and krep:
            _drop_repeat(n, k0, v0)
        require(why_sdpa is None, why_sdpa)
    return Match(anchor=n, output=n, nodes=[n, *krep, *vrep],
                 params=dict(q=q, k=k0, v=v0, mask=tmask, invert=False, scale=scale, causal=causal, window=window,
                             softcap=0.0, why=why, out_shape=None, mask4=None))


# ---- eager ----

def _skip_casts(node):
    while cast_dtype(node) in _FLOATS:
        node = node.args[0]
    return node


def _is_reshape(node) -> bool:
    return _method(node, "reshape", "view") or call(node, torch.reshape)


def _fold_source(node):
    """x when node is a view / reshape of x between [B * H, S, T] and [B, H, S, T] (leading dims merged or split),
    else None: 3-D bmm attention (xglm) views its scores 4-D around the mask only."""
    if not (_is_reshape(node) and isinstance(node.args[0], fx.Node)):
        return None
    a, b = _shape(node.args[0]), _shape(node)
    ok = {len(a), len(b)} == {3, 4} and _ints(a) and _ints(b) and a[-2:] == b[-2:] and math.prod(a) == math.prod(b)
    return node.args[0] if ok else None


def _clamp_source(node):
    """x of max(x, c) / maximum(x, c) / clamp(x, min=c) with a constant c <= -1e4 (finite masked scores: the kernel's
    masked scores are -inf, and rows with nothing allowed are handled as eager's)."""
    if call(node, torch.max, torch.maximum) and len(node.args) == 2 and _big_negative(node.args[1]):
        return node.args[0]
    if call(node, torch.clamp) and arg(node, 2, "max") is None and _big_negative(arg(node, 1, "min")):
        return node.args[0]
    return None


def _skip_layout(node):
    """Past casts, leading-dim folds and clamps at a big negative value (the scores path)."""
    while True:
        nxt = _skip_casts(node)
        nxt = _fold_source(nxt) or _clamp_source(nxt) or nxt
        if nxt is node:
            return node
        node = nxt


def _lift4(node):
    """The [B, H, S, D] tensor a 3-D bmm operand [B * H, S, D] was reshaped from; a 4-D node itself."""
    if len(_shape(node)) == 4:
        return node
    src = _fold_source(node)
    require(src is not None and len(_shape(src)) == 4, f"3-D attention operand {node.name} is not a [B, H, S, D] "
                                                       "tensor with its batch and head dims merged")
    return src


def _scalar_factor(node):
    """(input, factor) if node is x * c or x / c with a constant c, else (None, None)."""
    if call(node, torch.mul, torch.div):
        t, c = split_scalar(node)
        if t is not None and (call(node, torch.mul) or node.args[0] is t):
            if call(node, torch.div):
                return (t, 1.0 / c) if c != 0 else (None, None)
            return t, float(c)
    return None, None


def _softcap(node):
    """(input, c, nodes) of c * tanh(x / c) (also x * (1/c)), else (node, 0.0, [])."""
    t, c_out = _scalar_factor(node)
    if t is None or not call(t, torch.tanh):
        return node, 0.0, []
    inner, f = _scalar_factor(t.args[0])
    if inner is None or f <= 0 or not math.isclose(c_out * f, 1.0, rel_tol=1e-6):
        return node, 0.0, []
    return inner, c_out, [node, t, t.args[0]]


def _key_transposed(kt):
    """k from k^T (transpose of the last two dims or permute(0, 1, 3, 2)), else None."""
    if call(kt, torch.transpose):
        dims = kt.args[1:3]
    elif _method(kt, "permute"):
        dims = kt.args[1:] if len(kt.args) > 2 else kt.args[1]
    else:
        return None
    if not _ints(dims):
        return None
    n = len(_shape(kt))
    dims = tuple(d % n for d in dims)
    last = ((n - 2, n - 1), (n - 1, n - 2), (*range(n - 2), n - 1, n - 2))
    return kt.args[0] if dims in last else None


def _big_negative(v) -> bool:
    """v <= -1e4: a number, or a constant one-element tensor (torch.tensor(finfo.min) in the graph)."""
    x = scalar_value(v)
    return x is not None and x <= -1.0e4


def _mask_step(node):
    """(scores input, mask node, allowed_is_not) of the mask application at `node`, else None."""
    if call(node, torch.add) and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args):
        a, b = node.args
        sa = _reaches_matmul(a)
        require(sa or _reaches_matmul(b), "softmax input is not (scores + mask)")
        return (a, b, False) if sa else (b, a, False)
    if call(node, torch.masked_fill):
        val = arg(node, 2, "value")
        require(_big_negative(val), f"masked_fill value {val} is not a large negative number")
        return node.args[0], node.args[1], True
    if call(node, torch.where) and len(node.args) == 3:
        c, a, b = node.args
        if _big_negative(b) and isinstance(a, fx.Node) and a is not b:
            return a, c, False
        if _big_negative(a) and isinstance(b, fx.Node):
            return b, c, True
    return None


def _walk_scores(x):
    """From the softmax input back to matmul(q, k^T) or baddbmm(bias, q, k^T): (that node, q, k^T, scale, softcap,
    [(mask, invert, added to 3-D scores)], nodes)."""
    nodes, masks = [], []
    x0 = _skip_layout(x)
    nodes += _between(x, x0)
    while len(masks) < 2:
        step = _mask_step(x0)
        if step is None:
            break
        require(len(_shape(x0)) == 4, "mask applied to 3-D scores [B * H, S, S]")
        x1, mask, invert = step
        masks.append((mask, invert, False))
        nodes.append(x0)
        x0 = _skip_layout(x1)
        nodes += _between(x1, x0)
    x2 = x0
    x3, cap, capnodes = _softcap(x2)
    nodes += capnodes
    scale = 1.0
    while True:
        x4 = _skip_casts(x3)
        nodes += _between(x3, x4)
        inner, f = _scalar_factor(x4)
        if inner is None:
            break
        scale *= f
        nodes.append(x4)
        x3 = inner
    if _method(x3, "baddbmm") or call(x3, torch.baddbmm):   # bias + alpha * q k^T (ALiBi, bloom)
        beta, alpha = x3.kwargs.get("beta", 1), x3.kwargs.get("alpha", 1)
        q_in, kt = arg(x3, 1, "batch1"), arg(x3, 2, "batch2")
        require(number(beta) and beta == 1 and number(alpha) and len(x3.args) <= 3,
                f"baddbmm with beta={beta} alpha={alpha} (constant alpha and beta = 1 only)")
        masks.append((x3.args[0], False, True))   # added to [B * H, S, S] scores: its dim 0 is B * H
        return x3, q_in, kt, scale * float(alpha), cap, masks, nodes
    require(call(x3, *_MATMUL), f"softmax input does not come from matmul(q, k^T) ({x3.target})")
    return x3, x3.args[0], x3.args[1], scale, cap, masks, nodes


def _one_mask(masks, qs, ks):
    """(tensor mask or None, invert, its [B, H, ., Sk] view or None, causal, window, why) of the walk's mask steps:
    their conjunction, with at most one tensor for the kernel to read (the other steps exact causal / window
    flags). A bias added to 3-D [B * H, S, S] scores is viewed 4-D (`_mask4`)."""
    tmask, invert, view4, causal, window, whys = None, False, None, False, 0, []
    for mask, inv, merged in masks:
        t, c, w, why = _mask_params(mask, qs, ks, inv)
        require(t is None or tmask is None, "two mask steps that both have to be read as tensors (the kernel reads "
                                            "one)")
        if t is not None:
            tmask, invert, view4 = t, inv, (_mask4(t, qs) if merged else None)
        causal = causal or c
        window = tighter_window(window, w)
        whys.append(why)
    if tmask is not None:
        problem = bias_row_problem(tmask, causal, window, qs[2], ks[2])
        require(problem is None, problem)
    return tmask, invert, view4, causal, window, "; ".join(whys) or "no mask"


def _mask4(tmask, qs):
    """The [B, H, ., Sk] shape a [B * H, ., Sk] bias of 3-D scores (baddbmm's) is viewed as, None for [1, ., Sk]."""
    m = _shape(tmask)
    if len(m) == 3 and m[0] == 1:
        return None
    require(len(m) == 3, f"bias {m} of 3-D scores is not 3-D")
    require(_ints(m) and _ints(qs[:2]) and m[0] == qs[0] * qs[1], f"3-D mask {m} is not [B * H, ., S] for q {qs}")
    return (qs[0], qs[1], m[1], m[2])


def _unupcast(q, k, v):
    """q, k before a cast to fp32 that only they went through (fp32 scores, e.g. gpt_neo), when v has their dtype."""
    qi, ki = _skip_casts(q), _skip_casts(k)
    if meta(q).dtype == meta(k).dtype == torch.float32 and meta(qi).dtype == meta(ki).dtype == meta(v).dtype:
        return qi, ki
    return q, k


def _between(a, b):
    out = []
    while a is not b:
        out.append(a)
        a = a.args[0]
    return out


def _reaches_matmul(x, depth=12):
    """Whether x comes from a matmul through first operands (through where(c, a, b): a or b)."""
    if depth == 0 or not isinstance(x, fx.Node):
        return False
    if call(x, *_MATMUL, torch.baddbmm) or _method(x, "baddbmm"):
        return True
    if call(x, torch.where) and len(x.args) == 3:
        return any(_reaches_matmul(a, depth - 1) for a in x.args[1:])
    return bool(x.args) and _reaches_matmul(x.args[0], depth - 1)


def _scaled(node):
    """(x, factor) of x [* s | / s]*."""
    f = 1.0
    while True:
        inner, g = _scalar_factor(node)
        if inner is None:
            return node, f
        f *= g
        node = inner


def match_eager(sm):
    dim = arg(sm, 1, "dim")
    x = sm.args[0]
    require(isinstance(x, fx.Node) and len(_shape(x)) in (3, 4), "softmax input is not 3-D or 4-D scores")
    require(dim in (-1, len(_shape(x)) - 1), f"softmax over dim {dim}, not the key dim")
    mm1, q_in, kt, scale, cap, masks, chain = _walk_scores(x)
    q, sq = _scaled(q_in)
    k_in = _key_transposed(_skip_casts(kt))
    require(k_in is not None, "first matmul's rhs is not k^T")
    k, sk = _scaled(k_in)
    q, k = _lift4(q), _lift4(k)
    k0, krep = _unrepeat(k)
    # forward: softmax [-> cast] [-> dropout] -> matmul(., v)
    cur, tail = sm, []
    while True:
        nxt = only_user(cur)
        require(nxt is not None, f"attention probabilities {cur.name} have several users (output_attentions?)")
        if cast_dtype(nxt) in _FLOATS or _fold_source(nxt) is cur:
            pass
        elif call(nxt, *_DROPOUT):
            training = arg(nxt, 2, "training", True)
            require(isinstance(training, bool), "dropout training flag is not a constant")
            if training:
                _dropout_p(arg(nxt, 1, "p", 0.5))
        else:
            break
        tail.append(nxt)
        cur = nxt
    require(call(nxt, *_MATMUL) and nxt.args[0] is cur, "softmax result is not multiplied by v")
    v4 = _lift4(nxt.args[1])
    v0, vrep = _unrepeat(v4)
    if _shape(k0)[1] != _shape(v0)[1]:
        k0, krep, v0, vrep = k, [], v4, []
    q, k0 = _unupcast(q, k0, v0)
    qs, ks = _check_qkv(q, k0, v0)
    require(meta(nxt).dtype == meta(q).dtype, f"output dtype {meta(nxt).dtype} differs from q's {meta(q).dtype}")
    for n in (mm1, *chain):
        require(len(n.users) == 1, f"intermediate {n.name} is also used outside the attention")
    tmask, invert, view4, causal, window, why = _one_mask(masks, qs, ks)
    nodes = [nxt, *tail, sm, *chain, mm1, *krep, *vrep]
    return Match(anchor=sm, output=nxt, nodes=nodes,
                 params=dict(q=q, k=k0, v=v0, mask=tmask, invert=invert and tmask is not None,
                             scale=scale * sq * sk, causal=causal, window=window, softcap=cap, why=why,
                             out_shape=_shape(nxt) if len(_shape(nxt)) == 3 else None, mask4=view4))


def match_attention(n):
    try:
        return match_sdpa(n) if call(n, *_SDPA) else match_eager(n)
    except NoMatch:
        raise
    except Exception as e:  # noqa: BLE001 - an unexpected graph shape rejects this candidate, not the whole pass
        return f"unexpected graph ({type(e).__name__}: {e})"


def replace_attention(graph, m):
    p = m.params
    mask = p["mask"]
    if mask is not None and p["invert"]:
        mask = insert_op(graph, m.output, torch.logical_not, (mask,))
    if mask is not None and p["mask4"] is not None:
        mask = insert_op(graph, m.output, torch.reshape, (mask, p["mask4"]))
    out, _lse = insert_op(graph, m.output, torch.ops.fxopt.attention.default,
                          (p["q"], p["k"], p["v"], mask, p["scale"], p["causal"], int(p["window"]),
                           float(p["softcap"])), n_outputs=2)
    if p["out_shape"] is not None:   # a 3-D bmm form: its [B * H, S, D] output
        out = insert_op(graph, m.output, torch.reshape, (out, p["out_shape"]))
    replace_output(graph, m, out)
    log.info("attention %s -> fxopt::attention (triton flash): causal=%s window=%s softcap=%s mask=%s (%s)",
             m.anchor.name, p["causal"], p["window"], p["softcap"], "tensor" if mask is not None else "none",
             p["why"])
    return out


ATTENTION = Pattern("attention", _candidates, match_attention, replace_attention)
