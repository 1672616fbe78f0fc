"""LoRA linears that read one input, as one op:  y_i = x W_i^T + bias_i + s_i (x A_i^T) B_i^T,  i = 1..n.

q/k/v read one normalized x, and so do gate/up. As n single ops (lora.py) each reads x for its rank-r product in the
forward and again for dA in the backward, writes its own dx with its own rank-r term, and autograd adds the n dx.
As one op (R = sum of the ranks, A = [A_1; ...; A_n] [R, K]):
  forward:   XA = x A^T                              [M, R]  one skinny product: x read once
             y_i = x W_i^T + bias_i + s_i XA_i B_i^T          each member's GEMM as in lora.py (XA_i: its columns)
  backward:  dxa_i = s_i dy_i B_i,  dB_i = s_i dy_i^T XA_i    per member (one pass over dy_i, or two products)
             dA  = DXA^T x                           [R, K]  one skinny product: x read once (split per member)
             dx  = DXA A + sum_i dy_i W_i                    one rank-R GEMM, then every base GEMM adds onto the same
                                                             dx (cuBLAS beta = 1): no n dx tensors, no sum
8B QLoRA (4096 tokens, r 16), per layer: x is 32 MB; q/k/v and gate/up as two groups skip 3 reads of x in the
forward, 3 in the backward, 3 rank-r dx terms and the adds of 5 dx tensors.
Saved for backward: x and XA ([M, R], fp32 with fp32 adapters), as the single ops save x and their xa.
The grouping pass: fxopt/patterns/lora_group.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from fxopt.kernels import lora as L
from fxopt.kernels import lora_dy
from fxopt.kernels.nf4 import NF4Weight, fused_matmul_reference
from fxopt.kernels.nf4_chunked import chunked_matmul
from fxopt.kernels.registry import register_cost, register_workspace, tuning_key

MAX_RANK = 128   # sum of the members' ranks: the skinny product keeps R (rounded up to a power of 2) in registers


def _cat(ts):
    return ts[0] if len(ts) == 1 else torch.cat(ts)


def _forward(x, weights, biases, lora_a, lora_b, scales, compute_dtype, out_dtype, triton_gemm):
    x2 = L._rows(x)
    xa, xa_low = L._mm(x2, _cat(lora_a).t(), triton_gemm, x2.shape[0], low=compute_dtype)
    ys, off = [], 0
    for w, bias, b, s in zip(weights, biases, lora_b, scales):
        cols = slice(off, off + b.shape[1])
        off = cols.stop
        y = L._gemm(x2, w, True, xa[:, cols], b.t(), s, bias, out_dtype, compute_dtype, triton_gemm,
                    left_low=xa_low[:, cols])
        ys.append(y.view(*x.shape[:-1], y.shape[-1]))
    return ys + [xa]


_DX_CHOICE: dict = {}   # (dy shapes, weights, dtype) -> "accumulate" | "separate"; env FXOPT_LORA_GROUP_DX


def _dx(dy2s, weights, lora_a, dxa, dxa_low, compute_dtype, out_dtype, triton_gemm):
    """dx = dxa A + sum_i dy_i W_i (dy2s: the dy_i as rows), rounded once to out_dtype (reference: fp32 sums)."""
    a_cat = _cat(lora_a)
    if not triton_gemm:
        acc = dxa.float() @ a_cat.float()
        for dy, w in zip(dy2s, weights):
            acc += fused_matmul_reference(dy, w, False, out_dtype=torch.float32, compute_dtype=compute_dtype)
        return acc.to(out_dtype)

    def accumulate():   # the rank-R term, then each base GEMM adds onto it (NF4: chunked dequantization + cuBLAS)
        acc = torch.mm(dxa_low if dxa_low is not None else dxa.to(compute_dtype), a_cat.to(compute_dtype))
        for dy, w in zip(dy2s, weights):
            if isinstance(w, NF4Weight):
                chunked_matmul(dy, w, False, compute_dtype=compute_dtype, acc=acc)
            else:
                acc.addmm_(dy.to(compute_dtype), w.to(compute_dtype))
        return acc if acc.dtype == out_dtype else acc.to(out_dtype)

    def separate():   # each member's own GEMM (lora.py's choice of kernel), then their sum
        out, off = None, 0
        for dy, w, a in zip(dy2s, weights, lora_a):
            cols = slice(off, off + a.shape[0])
            off = cols.stop
            d = L._gemm(dy, w, False, dxa[:, cols], a, 1.0, None, out_dtype, compute_dtype, True,
                        left_low=dxa_low[:, cols] if dxa_low is not None else None)
            out = d if out is None else out.add_(d)
        return out
    dy0 = dy2s[0]
    key = (tuning_key(dy0, dy0.shape[0]), tuple((w.n, w.k) if isinstance(w, NF4Weight) else tuple(w.shape)
                                                 for w in weights), dy0.dtype, compute_dtype)
    return L._run_choice("FXOPT_LORA_GROUP_DX", _DX_CHOICE, key, {"accumulate": accumulate, "separate": separate},
                         default="accumulate", measure=dy0.device.type == "cuda")


def _backward(dys, x, weights, lora_a, lora_b, xa, scales, compute_dtype, need_dx, need_da, need_db, need_dbias,
              need_dw, triton_gemm):
    """[dx, dA (all members' rows), dB_1..n, dbias_1..n (fp32), dW_1..n]; a gradient not asked for is empty."""
    x2, dy2s = L._rows(x), [L._rows(dy) for dy in dys]
    m = x2.shape[0]
    low = compute_dtype if need_dx else None
    dxas, lows, dbs, off = [], [], [], 0
    for dy, b, s in zip(dy2s, lora_b, scales):
        cols = slice(off, off + b.shape[1])
        off = cols.stop
        p, p_low, q = L._dy_products(dy, b, xa[:, cols], s, triton_gemm, m, need_dx or need_da, need_db, low)
        dxas.append(p)
        lows.append(p_low)
        dbs.append(q if need_db else L._empty(x))
    dx = da = None
    if need_dx or need_da:
        dxa = torch.cat(dxas, 1)
        if need_da:
            da = L._mm(x2.t(), dxa, triton_gemm, m, transpose=True).to(lora_a[0].dtype)
        if need_dx:
            dxa_low = torch.cat(lows, 1) if all(t is not None for t in lows) else None
            dx = _dx(dy2s, weights, lora_a, dxa, dxa_low, compute_dtype, x.dtype, triton_gemm).view(x.shape)
    dbias = [dy.float().sum(0) if need_dbias else L._empty(x) for dy in dy2s]
    dw = [dy.to(compute_dtype).t() @ x2.to(compute_dtype) if need_dw else L._empty(x) for dy in dy2s]
    return [L._empty(x) if dx is None else dx, L._empty(x) if da is None else da, *dbs, *dbias, *dw]


def _fake_forward(x, out_features, lora_a, out_dtype):
    m = x.numel() // x.shape[-1]
    rank = sum(a.shape[0] for a in lora_a)
    return [x.new_empty((*x.shape[:-1], n), dtype=out_dtype) for n in out_features] + \
        [x.new_empty((m, rank), dtype=lora_a[0].dtype)]


def _fake_backward(x, out_features, lora_a, lora_b, need_dx, need_da, need_db, need_dbias, dw=None):
    e = lambda: x.new_empty(0)   # noqa: E731 - outputs may not alias: a fresh empty each
    rank = sum(a.shape[0] for a in lora_a)
    return [x.new_empty(x.shape) if need_dx else e(),
            lora_a[0].new_empty((rank, x.shape[-1])) if need_da else e(),
            *[b.new_empty(b.shape) if need_db else e() for b in lora_b],
            *[x.new_empty((n,), dtype=torch.float32) if need_dbias else e() for n in out_features],
            *([x.new_empty(w.shape, dtype=w.dtype) for w in dw] if dw else [e() for _ in out_features])]


def _grads(ctx, got, n, want_db, want_dbias, want_dw):
    """Autograd's per-input gradients from the backward op's flat list (dA split into each member's rows)."""
    dx, da = got[0], got[1]
    dbs, dbias, dws = got[2:2 + n], got[2 + n:2 + 2 * n], got[2 + 2 * n:2 + 3 * n]
    g = ctx.needs_input_grad
    das, off = [], 0
    for r, need in zip(ctx.ranks, g[ctx.a_index]):
        das.append(da[off:off + r] if need else None)
        off += r
    return (dx if g[0] else None, das, [d if w else None for d, w in zip(dbs, want_db)],
            [d.to(ctx.bias_dtype) if w else None for d, w in zip(dbias, want_dbias)] if ctx.has_bias else None,
            [d if w else None for d, w in zip(dws, want_dw)])


def _wants(flags, n):
    return list(flags) if isinstance(flags, (list, tuple)) else [bool(flags)] * n


# ---- dense bases: fxopt::lora_group ----

@torch.library.custom_op("fxopt::lora_group", mutates_args=())
def lora_group(x: torch.Tensor, weight: list[torch.Tensor], bias: list[Optional[torch.Tensor]],
               lora_a: list[torch.Tensor], lora_b: list[torch.Tensor], scale: list[float],
               out_dtype: torch.dtype) -> list[torch.Tensor]:
    """[y_1, ..., y_n, XA]: fxopt::lora of each (weight, bias, lora_a, lora_b, scale) over the same x."""
    return L._run("lora_group", lambda t: _forward(x, weight, bias, lora_a, lora_b, scale, weight[0].dtype,
                                                   out_dtype, t), x, *weight, *lora_a, *lora_b)


@lora_group.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, out_dtype):
    return _fake_forward(x, [w.shape[0] for w in weight], lora_a, out_dtype)


@torch.library.custom_op("fxopt::lora_group_backward", mutates_args=())
def lora_group_backward(dy: list[torch.Tensor], x: torch.Tensor, weight: list[torch.Tensor],
                        lora_a: list[torch.Tensor], lora_b: list[torch.Tensor], xa: torch.Tensor, scale: list[float],
                        need_dx: bool, need_da: bool, need_db: bool, need_dbias: bool,
                        need_dw: bool) -> list[torch.Tensor]:
    """[dx, dA [R, K], dB_1..n, dbias_1..n (fp32), dW_1..n]; a gradient not asked for is an empty tensor."""
    return L._run("lora_group_backward",
                  lambda t: _backward(dy, x, weight, lora_a, lora_b, xa, scale, weight[0].dtype, need_dx, need_da,
                                      need_db, need_dbias, need_dw, t), *dy, x, *weight, *lora_a, *lora_b)


@lora_group_backward.register_fake
def _(dy, x, weight, lora_a, lora_b, xa, scale, need_dx, need_da, need_db, need_dbias, need_dw):
    return _fake_backward(x, [w.shape[0] for w in weight], lora_a, lora_b, need_dx, need_da, need_db, need_dbias,
                          dw=list(weight) if need_dw else None)


def _setup_group(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, out_dtype = inputs
    n = len(weight)
    ctx.save_for_backward(x, output[-1], *weight, *lora_a, *lora_b)
    ctx.n, ctx.scale, ctx.ranks, ctx.a_index = n, list(scale), [a.shape[0] for a in lora_a], 3
    ctx.has_bias = bias[0] is not None
    ctx.bias_dtype = bias[0].dtype if ctx.has_bias else None


def _backward_group(ctx, dys):   # dys: the n outputs' gradients, then XA's (unused)
    x, xa, *rest = ctx.saved_tensors
    n = ctx.n
    weight, lora_a, lora_b = rest[:n], rest[n:2 * n], rest[2 * n:]
    g = ctx.needs_input_grad
    want_dw, want_db = _wants(g[1], n), _wants(g[4], n)
    want_dbias = _wants(g[2], n) if ctx.has_bias else [False] * n
    got = torch.ops.fxopt.lora_group_backward(list(dys[:n]), x, list(weight), list(lora_a), list(lora_b), xa, ctx.scale,
                                              need_dx=g[0], need_da=any(_wants(g[3], n)), need_db=any(want_db),
                                              need_dbias=any(want_dbias), need_dw=any(want_dw))
    dx, das, dbs, dbias, dws = _grads(ctx, got, n, want_db, want_dbias, want_dw)
    return dx, dws, dbias, das, dbs, None, None


lora_group.register_autograd(_backward_group, setup_context=_setup_group)


# ---- NF4 bases: fxopt::lora_nf4_group ----

def _weights(packed, absmax, absmax2, code2, offset, blocksize, blocksize2, out_features, in_features):
    return [L._nf4(packed[i], absmax[i], absmax2[i], code2[i], offset[i], blocksize[i], blocksize2[i],
                   out_features[i], in_features) for i in range(len(packed))]


@torch.library.custom_op("fxopt::lora_nf4_group", mutates_args=())
def lora_nf4_group(x: torch.Tensor, packed: list[torch.Tensor], absmax: list[torch.Tensor],
                   absmax2: list[Optional[torch.Tensor]], code2: list[Optional[torch.Tensor]],
                   offset: list[Optional[torch.Tensor]], bias: list[Optional[torch.Tensor]],
                   lora_a: list[torch.Tensor], lora_b: list[torch.Tensor], scale: list[float], blocksize: list[int],
                   blocksize2: list[int], out_features: list[int], in_features: int, compute_dtype: torch.dtype,
                   out_dtype: torch.dtype) -> list[torch.Tensor]:
    """[y_1, ..., y_n, XA]: fxopt::lora_nf4 of each member over the same x (all double-quantized, or none)."""
    w = _weights(packed, absmax, absmax2, code2, offset, blocksize, blocksize2, out_features, in_features)
    return L._run("lora_nf4_group", lambda t: _forward(x, w, bias, lora_a, lora_b, scale, compute_dtype, out_dtype,
                                                       t), x, *packed, *lora_a, *lora_b)


@lora_nf4_group.register_fake
def _(x, packed, absmax, absmax2, code2, offset, bias, lora_a, lora_b, scale, blocksize, blocksize2, out_features,
      in_features, compute_dtype, out_dtype):
    return _fake_forward(x, out_features, lora_a, out_dtype)


@torch.library.custom_op("fxopt::lora_nf4_group_backward", mutates_args=())
def lora_nf4_group_backward(dy: list[torch.Tensor], x: torch.Tensor, packed: list[torch.Tensor],
                            absmax: list[torch.Tensor], absmax2: list[Optional[torch.Tensor]],
                            code2: list[Optional[torch.Tensor]], offset: list[Optional[torch.Tensor]],
                            lora_a: list[torch.Tensor], lora_b: list[torch.Tensor], xa: torch.Tensor,
                            scale: list[float], blocksize: list[int], blocksize2: list[int], out_features: list[int],
                            in_features: int, compute_dtype: torch.dtype, need_dx: bool, need_da: bool,
                            need_db: bool, need_dbias: bool) -> list[torch.Tensor]:
    """[dx, dA [R, K], dB_1..n, dbias_1..n (fp32)]; a gradient not asked for is an empty tensor."""
    w = _weights(packed, absmax, absmax2, code2, offset, blocksize, blocksize2, out_features, in_features)
    n = len(packed)
    return L._run("lora_nf4_group_backward",
                  lambda t: _backward(dy, x, w, lora_a, lora_b, xa, scale, compute_dtype, need_dx, need_da, need_db,
                                      need_dbias, False, t)[:2 + 2 * n], *dy, x, *packed, *lora_a, *lora_b)


@lora_nf4_group_backward.register_fake
def _(dy, x, packed, absmax, absmax2, code2, offset, lora_a, lora_b, xa, scale, blocksize, blocksize2, out_features,
      in_features, compute_dtype, need_dx, need_da, need_db, need_dbias):
    return _fake_backward(x, out_features, lora_a, lora_b, need_dx, need_da, need_db, need_dbias)[:2 + 2 * len(packed)]



def _setup_nf4_group(ctx, inputs, output):
    (x, packed, absmax, absmax2, code2, offset, bias, lora_a, lora_b, scale, blocksize, blocksize2, out_features,
     in_features, compute_dtype, out_dtype) = inputs
    n = len(packed)
    quant = [packed, absmax] + ([absmax2, code2, offset] if absmax2[0] is not None else [])
    ctx.save_for_backward(x, output[-1], *[t for q in quant for t in q], *lora_a, *lora_b)
    ctx.n, ctx.nested, ctx.scale, ctx.ranks, ctx.a_index = n, absmax2[0] is not None, list(scale), \
        [a.shape[0] for a in lora_a], 7
    ctx.has_bias = bias[0] is not None
    ctx.bias_dtype = bias[0].dtype if ctx.has_bias else None
    ctx.state = (list(blocksize), list(blocksize2), list(out_features), in_features, compute_dtype)


def _backward_nf4_group(ctx, dys):   # dys: the n outputs' gradients, then XA's (unused)
    x, xa, *rest = ctx.saved_tensors
    n = ctx.n
    k = 5 if ctx.nested else 2
    quant = [list(rest[i * n:(i + 1) * n]) for i in range(k)] + [[None] * n] * (5 - k)
    lora_a, lora_b = list(rest[k * n:(k + 1) * n]), list(rest[(k + 1) * n:])
    g = ctx.needs_input_grad
    want_db = _wants(g[8], n)
    want_dbias = _wants(g[6], n) if ctx.has_bias else [False] * n
    got = torch.ops.fxopt.lora_nf4_group_backward(list(dys[:n]), x, *quant, lora_a, lora_b, xa, ctx.scale, *ctx.state,
                                                  need_dx=g[0], need_da=any(_wants(g[7], n)), need_db=any(want_db),
                                                  need_dbias=any(want_dbias))
    dx, das, dbs, dbias, _ = _grads(ctx, list(got) + [L._empty(x)] * n, n, want_db, want_dbias, [False] * n)
    nested = [None] * n if ctx.nested else None   # a list of tensors takes a list of (no) gradients; of Nones, None
    return (dx, [None] * n, [None] * n, nested, nested, nested, dbias, das, dbs) + (None,) * 7


lora_nf4_group.register_autograd(_backward_nf4_group, setup_context=_setup_nf4_group)


# ---- the memory model and the roofline ----

def _ranks(lora_a):
    return [int(a.shape[0]) for a in lora_a]


@register_cost("lora_group")
def lora_group_cost(m, k, weight, lora_a, dtype_bytes=2):
    """(flops, bytes): the members' single-op costs, x read once."""
    costs = [L.lora_cost(m, int(w.shape[0]), k, r, dtype_bytes) for w, r in zip(weight, _ranks(lora_a))]
    return sum(c[0] for c in costs), sum(c[1] for c in costs) - (len(costs) - 1) * m * k * dtype_bytes


@register_cost("lora_nf4_group")
def lora_nf4_group_cost(m, k, out_features, lora_a, blocksize, dtype_bytes=2):
    costs = [L.lora_nf4_cost(m, n, k, r, dtype_bytes, b) for n, r, b in zip(out_features, _ranks(lora_a), blocksize)]
    return sum(c[0] for c in costs), sum(c[1] for c in costs) - (len(costs) - 1) * m * k * dtype_bytes


@register_workspace("lora_nf4_group")
def lora_nf4_group_workspace(m, out_features, in_features, compute_dtype):
    """One member's dequantized chunk at a time."""
    return max(L._nf4_scratch(m, n, in_features, compute_dtype, trans=True) for n in out_features)


def _group_scratch(m, out_features, ranks, dtype_bytes, chunk=0):
    """While the dy products run: the dxa made so far (fp32 + half, 6 m R) beside one member's product scratch; then
    the dxa and their concatenations (12 m R) beside one member's dequantized chunk (NF4)."""
    rank = sum(ranks)
    products = 6 * m * rank + max(lora_dy.rank_scratch(m, n, r, dtype_bytes) for n, r in zip(out_features, ranks))
    return max(products, 12 * m * rank + chunk)


@register_workspace("lora_group_backward")
def lora_group_backward_workspace(m, weight, lora_a, dtype_bytes=2):
    return _group_scratch(m, [int(w.shape[0]) for w in weight], _ranks(lora_a), dtype_bytes)


@register_workspace("lora_nf4_group_backward")
def lora_nf4_group_backward_workspace(m, out_features, in_features, compute_dtype, lora_a, dtype_bytes=2):
    chunk = max(L._nf4_scratch(m, n, in_features, compute_dtype, trans=False) for n in out_features)
    return _group_scratch(m, out_features, _ranks(lora_a), dtype_bytes, chunk)
