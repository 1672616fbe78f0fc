"""RoPE on q and k in one launch: y = x * cos + rotate(x) * sin on the first `rot = cos.shape[-1]` features,
the rest passed through (partial rotary), for q and (optionally) k sharing cos/sin.

Pairs (a, b) of rotated features: rotate-half a = j, b = j + rot/2; interleaved a = 2j, b = 2j + 1.
  rotate(x)_a = -x_b,  rotate(x)_b = x_a        so    y_a = x_a c_a - x_b s_a,   y_b = x_b c_b + x_a s_b
Backward (the transpose of that 2x2 map):          dx_a = g_a c_a + g_b s_b,    dx_b = g_b c_b - g_a s_a
= the forward kernel with s_a' = -s_b, s_b' = -s_a (for HF's cos/sin, s_a == s_b: rotation by -theta). Only cos/sin
are needed for backward: q/k are not saved. Gradients for cos/sin are not computed (HF derives them from the
inv_freq buffer); the pattern does not match when they require grad, the op raises.

Rounding: by default the rotation is computed in fp32 and rounded once to the output dtype, as Inductor does (the
rounding code measured 0.089 vs 0.097 ms per q+k kernel on the H200 against eager-exact rounding). With
FXOPT_ROPE_EXACT=1 it follows eager exactly: each product and the sum are rounded to `mid_dtype` (the dtype of
`q * cos` in the graph; bf16 q with bf16 cos: bf16), then cast to `out_dtype`. Backward rounds each product and the sum to
`grad_dtype` (the dtype of the tensor the graph multiplied by cos: q's, or fp32 after an absorbed `q.float()`), then
casts to q's dtype. On the H200 this is bit-identical to eager in bf16, fwd and bwd, for 9% more kernel time than
rounding once (fxopt/kernels/rounding.py).

Layouts: q/k/cos/sin of any strides (q [B, H, S, D] after a transpose, [B, S, H, D], slices of a fused qkv). Each is
seen as [A, T, H, D]: H is a leading dim along which cos/sin broadcast (the heads), T the other trailing leading dim
(tokens), A the remaining one (batch). One program covers BLOCK_T tokens of one A index and loops over all q heads,
then all k heads, BLOCK_H heads at a time; cos/sin are loaded once per program. Outputs are new tensors (never in
place: q/k may be used elsewhere, and a grad buffer may be shared by autograd): q', k' in q's/k's layout (as eager),
dq, dk in the layout q/k had in the forward. H200, fwd+bwd GPU time 0.194 ms = 3.46 TB/s = 82% of copy (Inductor
0.174-0.179 ms, one rounding instead of eager's three; Liger 0.40-0.87 ms).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from fxopt.kernels.rounding import round_to, rounding_code
from fxopt.kernels.launch import fast_launch
from fxopt.kernels.registry import interpreting, next_pow2, register_cost, run_kernel, triton_available, use_triton

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate_heads(X, Y, a, t, t_ok, n_heads, sxa, sxt, sxh, sxd, sya, syt, syh, syd,
                      ca, cb, sa, sb, oa, ob, j_ok, op, p_ok,
                      RND: tl.constexpr, OUT: tl.constexpr, HAS_PASS: tl.constexpr, BLOCK_H: tl.constexpr):
        """All heads of one tensor for the program's tokens; ca..sb are [BLOCK_T, BLOCK_R] fp32 tiles."""
        for h0 in range(0, n_heads, BLOCK_H):
            h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
            rx = a * sxa + h[:, None, None] * sxh + t[None, :, None] * sxt
            ry = a * sya + h[:, None, None] * syh + t[None, :, None] * syt
            ht = (h < n_heads)[:, None, None] & t_ok[None, :, None]
            m = ht & j_ok[None, None, :]
            xa = tl.load(X + rx + oa[None, None, :] * sxd, mask=m, other=0.0).to(tl.float32)
            xb = tl.load(X + rx + ob[None, None, :] * sxd, mask=m, other=0.0).to(tl.float32)
            ya = round_to(round_to(xa * ca[None, :, :], RND) - round_to(xb * sa[None, :, :], RND), RND)
            yb = round_to(round_to(xb * cb[None, :, :], RND) + round_to(xa * sb[None, :, :], RND), RND)
            tl.store(Y + ry + oa[None, None, :] * syd, round_to(ya, OUT).to(Y.dtype.element_ty), mask=m)
            tl.store(Y + ry + ob[None, None, :] * syd, round_to(yb, OUT).to(Y.dtype.element_ty), mask=m)
            if HAS_PASS:
                mp = ht & p_ok[None, None, :]
                xp = tl.load(X + rx + op[None, None, :] * sxd, mask=mp, other=0.0).to(tl.float32)
                tl.store(Y + ry + op[None, None, :] * syd, round_to(xp, OUT).to(Y.dtype.element_ty), mask=mp)

    @triton.jit
    def _rope_kernel(Q, QO, K, KO, COS, SIN, n_t, n_hq, n_hk, half, rot, n_pass,
                     sqa, sqt, sqh, sqd, soa, sot, soh, sod,
                     ska, skt, skh, skd, sla, slt, slh, sld,
                     sca, sct, scd, ssa, sst, ssd,
                     BWD: tl.constexpr, HAS_K: tl.constexpr, HAS_PASS: tl.constexpr, INTERLEAVED: tl.constexpr,
                     RND: tl.constexpr, OUT_Q: tl.constexpr, OUT_K: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr):
        pid = tl.program_id(0)
        n_tb = tl.cdiv(n_t, BLOCK_T)
        a = (pid // n_tb).to(tl.int64)
        t = (pid % n_tb) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = t < n_t
        t = t.to(tl.int64)
        j = tl.arange(0, BLOCK_R)
        j_ok = j < half
        if INTERLEAVED:
            oa = 2 * j
            ob = oa + 1
        else:
            oa = j
            ob = j + half
        cm = t_ok[:, None] & j_ok[None, :]
        crow = COS + a * sca + t[:, None] * sct
        srow = SIN + a * ssa + t[:, None] * sst
        ca = tl.load(crow + oa[None, :] * scd, mask=cm, other=0.0).to(tl.float32)
        cb = tl.load(crow + ob[None, :] * scd, mask=cm, other=0.0).to(tl.float32)
        sa = tl.load(srow + oa[None, :] * ssd, mask=cm, other=0.0).to(tl.float32)
        sb = tl.load(srow + ob[None, :] * ssd, mask=cm, other=0.0).to(tl.float32)
        if BWD:
            s_tmp = sa
            sa = -sb
            sb = -s_tmp
        p = tl.arange(0, BLOCK_P)
        p_ok = p < n_pass
        op = rot + p
        _rotate_heads(Q, QO, a, t, t_ok, n_hq, sqa, sqt, sqh, sqd, soa, sot, soh, sod,
                      ca, cb, sa, sb, oa, ob, j_ok, op, p_ok,
                      RND=RND, OUT=OUT_Q, HAS_PASS=HAS_PASS, BLOCK_H=BLOCK_H)
        if HAS_K:
            _rotate_heads(K, KO, a, t, t_ok, n_hk, ska, skt, skh, skd, sla, slt, slh, sld,
                          ca, cb, sa, sb, oa, ob, j_ok, op, p_ok,
                          RND=RND, OUT=OUT_K, HAS_PASS=HAS_PASS, BLOCK_H=BLOCK_H)


# ---- layout: every tensor as [A, T, H, D] strides ----

def _padded(shape, stride, nd=4):
    """shape/stride padded at the front to nd dims (size 1, stride 0)."""
    pad = nd - len(shape)
    return [1] * pad + list(shape), [0] * pad + list(stride)


def plan_dims(q_shape, k_shape, cos_shape, sin_shape):
    """(a, t, h) leading-dim indices of the [A, T, H, D] view, in the 4-D front-padded frame; ValueError why not.

    h: a leading dim where cos and sin have size 1 (shared by all heads); where q and k differ it must be that dim.
    """
    nd = len(q_shape)
    if not 1 <= nd <= 4:
        raise ValueError(f"rope on a {nd}-D tensor (1 to 4 dims supported)")
    rot = cos_shape[-1]
    if sin_shape[-1] != rot or rot % 2 or rot == 0 or rot > q_shape[-1]:
        raise ValueError(f"cos/sin last dims {cos_shape[-1]}/{sin_shape[-1]} do not fit head dim {q_shape[-1]} "
                         "(need equal, even, <= head dim)")
    if len(cos_shape) > nd or len(sin_shape) > nd:
        raise ValueError("cos/sin have more dims than q (the result would broadcast to a larger shape)")
    q4 = _padded(q_shape, [0] * nd)[0]
    c4, s4 = _padded(cos_shape, [0] * len(cos_shape))[0], _padded(sin_shape, [0] * len(sin_shape))[0]
    shapes = [q4] + ([_padded(k_shape, [0] * len(k_shape))[0]] if k_shape is not None else [])
    if k_shape is not None and (len(k_shape) != nd or k_shape[-1] != q_shape[-1]):
        raise ValueError(f"q {tuple(q_shape)} and k {tuple(k_shape)} differ in rank or head dim")
    for x4 in shapes:
        for d in range(3):
            if c4[d] not in (1, x4[d]) or s4[d] not in (1, x4[d]):
                raise ValueError(f"cos/sin {tuple(cos_shape)} do not broadcast to {tuple(x4)} without enlarging it")
    cand = [d for d in range(3) if c4[d] == 1 and s4[d] == 1]
    diff = [d for d in range(3) if k_shape is not None and shapes[1][d] != q4[d]]
    if len(diff) > 1 or (diff and diff[0] not in cand):
        raise ValueError(f"q {tuple(q_shape)} and k {tuple(k_shape)} differ outside one head dim shared by cos/sin")
    if not cand:
        raise ValueError("cos/sin vary along every leading dim (no head dim to share them over)")
    h = diff[0] if diff else max(cand, key=lambda d: (q4[d], d))
    a, t = [d for d in range(3) if d != h]
    return a, t, h


def _view(x: torch.Tensor, dims):
    """(sizes, strides) of x as [A, T, H, D]; for cos/sin broadcast dims get stride 0."""
    shape, stride = _padded(x.shape, x.stride())
    stride = [0 if shape[d] == 1 else stride[d] for d in range(4)]
    a, t, h = dims
    return (shape[a], shape[t], shape[h]), (stride[a], stride[t], stride[h], stride[3])


def _blocks(n_t, n_heads, block_r, device):
    if device.type == "cuda":
        # ~512 elements per half-tile. H200, q [8,32,2048,128] + k [8,8,2048,128] bf16, fwd/bwd ms per
        # (BLOCK_T, BLOCK_H, warps): (1,8,4) .089/.090, (4,2,4) .092/.092, (8,4,4) .093/.093, (8,4,8) .093/.093,
        # (4,4,8) .105/.106, (2,4,4) .103/.103 (bf16 rounding mode 2); Inductor's forward .086.
        block_h = min(next_pow2(n_heads), max(1, 512 // block_r))
        return max(1, min(next_pow2(n_t), 512 // (block_h * block_r))), block_h, 4
    # interpreter: few large programs (it pays per program and per loop iteration, not per element)
    return min(next_pow2(n_t), 64), min(next_pow2(n_heads), 16), 4


def _prepare(q, k, cos, sin, yq, yk, interleaved, rnd_dtype, bwd, blocks):
    """(grid, int args, constexpr/launch kwargs) of one launch; a pure function of shapes, strides and flags."""
    dims = plan_dims(q.shape, k.shape if k is not None else None, cos.shape, sin.shape)
    (n_a, n_t, n_hq), sq = _view(q, dims)
    _, so = _view(yq, dims)
    n_hk, sk, sl = 0, sq, so
    if k is not None:
        (_, _, n_hk), sk = _view(k, dims)
        _, sl = _view(yk, dims)
    _, sc = _view(cos, dims)
    _, ss = _view(sin, dims)
    rot, d = cos.shape[-1], q.shape[-1]
    # the rotated values are already rounded to rnd_dtype: the store rounds them again only to another dtype
    # (the pass-through part is rounded once, by the same code)
    out_rnd = lambda y: 0 if y.dtype == rnd_dtype else rounding_code(y.dtype)
    block_r, block_p = next_pow2(rot // 2), next_pow2(max(1, d - rot))
    block_t, block_h, warps = blocks or _blocks(n_t, max(n_hq, n_hk), block_r, q.device)
    grid = (n_a * triton.cdiv(n_t, block_t),)
    ints = (n_t, n_hq, n_hk, rot // 2, rot, d - rot, *sq, *so, *sk, *sl, sc[0], sc[1], sc[3], ss[0], ss[1], ss[3])
    kw = dict(BWD=bwd, HAS_K=n_hk > 0, HAS_PASS=d > rot, INTERLEAVED=interleaved, RND=rounding_code(rnd_dtype),
              OUT_Q=out_rnd(yq), OUT_K=out_rnd(yk if k is not None else yq),
              BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_P=block_p, BLOCK_H=block_h, num_warps=warps)
    return grid, ints, kw


_PLANS: dict = {}   # launch plans by (shapes, strides, dtypes, flags): the Python planning costs ~as much as a launch


def _launch(q, k, cos, sin, yq, yk, interleaved, rnd_dtype, bwd, blocks=None):
    if q.numel() == 0:
        return
    meta = lambda t: None if t is None else (t.shape, t.stride(), t.dtype)
    key = (meta(q), meta(k), meta(cos), meta(sin), meta(yq), meta(yk), interleaved, rnd_dtype, bwd, blocks,
           q.device.type, interpreting())
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 512:
            _PLANS.clear()
        plan = _PLANS[key] = _prepare(q, k, cos, sin, yq, yk, interleaved, rnd_dtype, bwd, blocks)
    grid, ints, kw = plan
    fast_launch(_rope_kernel, grid, q, yq, k if k is not None else q, yk if k is not None else yq, cos, sin, *ints,
                **kw)


def _outputs(q, k, q_dtype, k_dtype):
    """Outputs in q's/k's layout when dense (eager's `q * cos` keeps it), else contiguous (same rule as fake)."""
    yq = torch.empty_like(q, dtype=q_dtype)
    yk = torch.empty_like(k, dtype=k_dtype) if k is not None else q.new_empty(0, dtype=q_dtype)
    return yq, yk


def dim_order(t: torch.Tensor) -> list:
    """t's dims from largest to smallest stride (ties keep dim order): its memory layout as a permutation."""
    return sorted(range(t.dim()), key=lambda d: -t.stride(d))


def _empty_in_order(like, order, dtype):
    y = like.new_empty([like.shape[d] for d in order], dtype=dtype)
    return y.permute([order.index(d) for d in range(len(order))])


def _grad_outputs(dq, dk, q_dtype, k_dtype, q_order, k_order):
    """Input grads laid out like the forward's q/k: what their view/transpose backward wants, without a copy
    (HF: q = linear(x).view(B, S, H, D).transpose(1, 2); a grad laid out like dq', [B, H, S, D], costs a 0.2 ms
    copy at the benchmark's shape)."""
    gq = _empty_in_order(dq, q_order, q_dtype)
    gk = _empty_in_order(dk, k_order, k_dtype) if dk is not None else dq.new_empty(0, dtype=q_dtype)
    return gq, gk


# ---- PyTorch reference (the math of the matched subgraph, with eager's roundings) ----

def rope_reference(x, cos, sin, interleaved, rnd_dtype, out_dtype, bwd=False):
    rot = cos.shape[-1]
    xr, xp = x[..., :rot].float(), x[..., rot:]
    c, s = cos.float(), sin.float()
    pick = (lambda v: (v[..., 0::2], v[..., 1::2])) if interleaved else \
        (lambda v: (v[..., :rot // 2], v[..., rot // 2:]))
    (xa, xb), (ca, cb), (sa, sb) = pick(xr), pick(c), pick(s)
    if bwd:
        sa, sb = -sb, -sa
    r = (lambda v: v.to(rnd_dtype).float()) if rnd_dtype != torch.float32 else (lambda v: v)
    ya, yb = r(r(xa * ca) - r(xb * sa)), r(r(xb * cb) + r(xa * sb))
    y = torch.stack((ya, yb), -1).flatten(-2) if interleaved else torch.cat((ya, yb), -1)
    return torch.cat((y.to(out_dtype), xp.to(out_dtype)), -1)


def _reference_into(yq, yk, q, k, cos, sin, interleaved, rnd_dtype, bwd):
    yq.copy_(rope_reference(q, cos, sin, interleaved, rnd_dtype, yq.dtype, bwd))
    if k is not None:
        yk.copy_(rope_reference(k, cos, sin, interleaved, rnd_dtype, yk.dtype, bwd))
    return yq, yk


def exact_rounding() -> bool:
    """FXOPT_ROPE_EXACT=1: round every product and sum as eager does (bit-identical to eager, ~9% more kernel time).
    Default: fp32 math, one rounding at the store (as Inductor does; closer to the exact result than eager)."""
    return os.environ.get("FXOPT_ROPE_EXACT", "0") == "1"


def _run(what, outputs, q, k, cos, sin, interleaved, rnd_dtype, bwd):
    if not exact_rounding():
        rnd_dtype = torch.float32
    ref = lambda: _reference_into(*outputs(), q, k, cos, sin, interleaved, rnd_dtype, bwd)
    if use_triton(q, k, cos, sin):
        def kernel():
            yq, yk = outputs()
            _launch(q, k, cos, sin, yq, yk if k is not None else None, interleaved, rnd_dtype, bwd)
            return yq, yk
        return run_kernel(what, kernel, ref)
    return ref()


# ---- ops ----

@torch.library.custom_op("fxopt::rope", mutates_args=())
def rope(q: torch.Tensor, k: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
         mid_dtype: torch.dtype, grad_dtype: torch.dtype, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q', k'): RoPE on q and k (k may be None: then k' is empty). rot = cos.shape[-1] <= q.shape[-1]."""
    out = lambda: _outputs(q, k, out_dtype, out_dtype)
    return _run("rope", out, q, k, cos, sin, interleaved, mid_dtype, False)


@rope.register_fake
def _(q, k, cos, sin, interleaved, mid_dtype, grad_dtype, out_dtype):
    return _outputs(q, k, out_dtype, out_dtype)


@torch.library.custom_op("fxopt::rope_backward", mutates_args=())
def rope_backward(dq: torch.Tensor, dk: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                  interleaved: bool, grad_dtype: torch.dtype, q_dtype: torch.dtype, k_dtype: torch.dtype,
                  q_order: list[int], k_order: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(dq_in, dk_in) from the output grads: the forward kernel with sin swapped and negated. q_order/k_order:
    the forward inputs' layouts (`dim_order`), given to the input grads."""
    out = lambda: _grad_outputs(dq, dk, q_dtype, k_dtype, q_order, k_order)
    return _run("rope_backward", out, dq, dk, cos, sin, interleaved, grad_dtype, True)


@rope_backward.register_fake
def _(dq, dk, cos, sin, interleaved, grad_dtype, q_dtype, k_dtype, q_order, k_order):
    return _grad_outputs(dq, dk, q_dtype, k_dtype, q_order, k_order)


def _setup(ctx, inputs, output):
    q, k, cos, sin, interleaved, mid_dtype, grad_dtype, out_dtype = inputs
    ctx.save_for_backward(cos, sin)
    ctx.q_dtype, ctx.k_dtype = q.dtype, (k.dtype if k is not None else q.dtype)
    ctx.has_k, ctx.interleaved, ctx.grad_dtype = k is not None, interleaved, grad_dtype
    ctx.q_order, ctx.k_order = dim_order(q), (dim_order(k) if k is not None else [])


def _backward(ctx, gq, gk):
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        raise RuntimeError("fxopt::rope does not compute gradients for cos/sin; detach them "
                           "(the rope pattern does not match when they require grad)")
    cos, sin = ctx.saved_tensors
    dq, dk = torch.ops.fxopt.rope_backward(gq, gk if ctx.has_k else None, cos, sin, ctx.interleaved,
                                           ctx.grad_dtype, ctx.q_dtype, ctx.k_dtype, ctx.q_order, ctx.k_order)
    return dq, (dk if ctx.has_k else None), None, None, None, None, None, None


rope.register_autograd(_backward, setup_context=_setup)


@register_cost("rope")
def rope_cost(q_shape, k_shape, dtype_bytes, rot):
    """(flops, bytes) of the forward: 3 flops per rotated element; read q, k and write q', k' (cos/sin are small)."""
    numel = lambda s: 0 if s is None else int(torch.Size(s).numel())
    n = numel(q_shape) + numel(k_shape)
    return 3 * n * rot // q_shape[-1], 2 * n * dtype_bytes
