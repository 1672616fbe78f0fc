"""LayerNorm over the last dim: y = cast_out( round_mid((x - mean) * rstd) [* w] [+ b] ).

  mean = sum(x, -1) / H,   var = sum((x - mean)^2, -1) / H (biased),   rstd = 1 / sqrt(var + eps).
All math in fp32 (inputs are upcast right after `tl.load`). `F.layer_norm` keeps x's dtype with one rounding at the
end (mid_dtype None, out_dtype = x.dtype); hand-written forms may round the normalized value before the affine part
(`((x32 - m) * r).to(x.dtype) * w + b`: mid_dtype = x.dtype) and may end in fp32 or a cast (out_dtype). A product
`h_bf16 * w_bf16` that eager rounds to bf16 before `+ b` is rounded once here, at the end (within 1 ulp).
Backward (xhat = (x - mean) * rstd, g = dy * w):
  dx = rstd * (g - mean(g, -1) - xhat * mean(g * xhat, -1)),  dw = sum_rows(dy * round_mid(xhat)),  db = sum_rows(dy)
dw and db are summed in fp32 per program (a persistent grid, each program loops over row blocks) into [programs, H]
buffers, then reduced once; a frozen weight or bias gets no work at all.
Measured on the H200, 16384 x 4096 bf16 fwd+bwd, GPU kernel time: 0.190 ms (0.83 of the copy ceiling; frozen w/b
0.177 ms, 0.89) vs Inductor 0.260, Liger 0.271, eager 0.332; errors vs fp32 math equal eager bf16's (1.7e-3).
"""
from __future__ import annotations

from typing import Optional

import torch

from fxopt.kernels.launch import fast_launch
from fxopt.kernels.registry import (interpreting, next_pow2, num_sms, register_cost, run_kernel, triton_available,
                                    use_triton)
from fxopt.kernels.rms_norm import _rows
from fxopt.kernels.rounding import rounding_code


def _mid_code(mid_dtype) -> int:
    return rounding_code(mid_dtype) if mid_dtype is not None else 0


def _store_code(dtype) -> int:
    """Rounding before a store to `dtype`: the interpreter's fp32->bf16 store truncates, the GPU's rounds to nearest
    even (as eager does), so only the interpreter needs it."""
    return rounding_code(dtype) if interpreting() and dtype == torch.bfloat16 else 0


if triton_available():
    import triton
    import triton.language as tl

    from fxopt.kernels.rounding import round_to

    @triton.jit
    def _layer_norm_fwd(X, W, B, Y, MEAN, RSTD, n_rows, n_cols, stride_x, stride_y, eps,
                        HAS_W: tl.constexpr, HAS_B: tl.constexpr, MID: tl.constexpr, OUT_RND: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        col_ok = cols < n_cols
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / n_cols
        xc = tl.where(mask, x - mean[:, None], 0.0)   # two-pass variance: no cancellation of E[x^2] - E[x]^2
        var = tl.sum(xc * xc, axis=1) / n_cols
        rstd = 1.0 / tl.sqrt(var + eps)               # eps arrives as a Python float -> fp32 scalar
        n = round_to(xc * rstd[:, None], MID)
        if HAS_W:
            n = n * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            n = n + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        n = round_to(n, OUT_RND)
        tl.store(Y + rows64[:, None] * stride_y + cols[None, :], n.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + rows, mean, mask=row_ok)
        tl.store(RSTD + rows, rstd, mask=row_ok)

    @triton.jit
    def _layer_norm_bwd(DY, X, W, MEAN, RSTD, DX, DW_PART, DB_PART, n_rows, n_cols, stride_dy, stride_x, stride_dx,
                        HAS_W: tl.constexpr, MID: tl.constexpr, DX_RND: tl.constexpr, COMPUTE_DW: tl.constexpr,
                        COMPUTE_DB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        STAGES: tl.constexpr):
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        if HAS_W:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        n_blocks = tl.cdiv(n_rows, BLOCK_M)
        for blk in tl.range(pid, n_blocks, nprog, num_stages=STAGES):   # STAGES > 1: loads of the next blocks
            # issued ahead (software pipelining); swept in benchmarks/kernel_bench/layer_norm.py
            rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < n_rows
            mask = row_ok[:, None] & col_ok[None, :]
            rows64 = rows.to(tl.int64)
            x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            if HAS_W:
                g = dy * w[None, :]
            else:
                g = dy
            if COMPUTE_DW:
                dw += tl.sum(dy * round_to(xhat, MID), axis=0)
            if COMPUTE_DB:
                db += tl.sum(dy, axis=0)
            c_xhat = tl.sum(g * xhat, axis=1) / n_cols
            c_one = tl.sum(g, axis=1) / n_cols
            dx = round_to(rstd[:, None] * (g - c_one[:, None] - xhat * c_xhat[:, None]), DX_RND)
            tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            tl.store(DW_PART + pid * n_cols + cols, dw, mask=col_ok)
        if COMPUTE_DB:
            tl.store(DB_PART + pid * n_cols + cols, db, mask=col_ok)


def _config(n_cols_pow2: int, device: torch.device, backward: bool):
    """(BLOCK_M, num_warps, programs per SM of the persistent backward grid).

    Measured on the H200 over [16384 * 4096 / H, H] bf16, H = 768 .. 8192 (benchmarks/kernel_bench/layer_norm.py):
    forward: ~4096-element blocks with 4 warps run at 70-74 us (3.7 TB/s) at every H; 8 warps cost 10-20 % at
    H <= 1024. Backward: ~16K elements in flight per SM: 2048-element blocks x 4 programs/SM up to H = 1024,
    8192 x 2 up to 4096, one row x 8 warps above: 139-169 us, where RMSNorm's blocks take 170-417 us.
    The interpreter pays per program, not per element: many rows per program there.
    """
    if device.type != "cuda":
        return max(1, min(64, (1 << 15) // n_cols_pow2)), 4, 1
    if not backward:
        if n_cols_pow2 == 4096:  # sweep: 0.0708 ms vs 0.0726 for (1, 4)
            return 2, 8, 1
        bm = max(1, 4096 // n_cols_pow2)
        elems = bm * n_cols_pow2
        return bm, (4 if elems <= 4096 else 8 if elems <= 8192 else 16), 1
    if n_cols_pow2 <= 1024:
        return 2048 // n_cols_pow2, 4, 4
    if n_cols_pow2 == 2048:      # sweep (layer_norm_sweep_h200.json): 0.138 ms vs 0.144 for (4, 4, 2)
        return 2, 4, 8
    if n_cols_pow2 == 4096:      # sweep: 0.132 ms vs 0.138 for (2, 4, 2)
        return 4, 16, 1
    return 1, (8 if n_cols_pow2 <= 8192 else 16), 1


def _fwd_triton(x, weight, bias, eps, mid_dtype, out_dtype):
    x2 = _rows(x)
    n_rows, n_cols = x2.shape
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block_n = next_pow2(n_cols)
    block_m, warps, _ = _config(block_n, x.device, backward=False)
    w = weight.contiguous() if weight is not None else x2
    b = bias.contiguous() if bias is not None else x2
    grid = (triton.cdiv(n_rows, block_m),)
    if n_rows > 0:
        fast_launch(_layer_norm_fwd, grid, x2, w, b, y, mean, rstd, n_rows, n_cols, x2.stride(0), y.stride(0), eps,
                    HAS_W=weight is not None, HAS_B=bias is not None, MID=_mid_code(mid_dtype),
                    OUT_RND=_store_code(out_dtype), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return y.view(x.shape), mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])


def _bwd_triton(dy, x, weight, mean, rstd, mid_dtype, need_dw, db_dtype):
    x2, dy2 = _rows(x), _rows(dy)
    n_rows, n_cols = x2.shape
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    block_n = next_pow2(n_cols)
    cfg = _config(block_n, x.device, backward=True)
    block_m, warps, per_sm = cfg[:3]
    stages = cfg[3] if len(cfg) > 3 else 1
    n_blocks = triton.cdiv(n_rows, block_m)
    nprog = max(1, min(n_blocks, num_sms(x.device) * per_sm))
    compute_dw = weight is not None and need_dw
    compute_db = db_dtype is not None
    # dW and dB partials in one buffer, summed by one reduction kernel
    n_part = int(compute_dw) + int(compute_db)
    part = torch.empty((n_part, nprog, n_cols), dtype=torch.float32, device=x.device) if n_part else dx
    dw_part = part[0] if compute_dw else dx
    db_part = part[n_part - 1] if compute_db else dx
    w = weight.contiguous() if weight is not None else x2
    fast_launch(_layer_norm_bwd, (nprog,), dy2, x2, w, mean.reshape(-1), rstd.reshape(-1), dx, dw_part, db_part, n_rows,
                n_cols, dy2.stride(0), x2.stride(0), dx.stride(0), HAS_W=weight is not None, MID=_mid_code(mid_dtype),
                DX_RND=_store_code(x.dtype), COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db, BLOCK_M=block_m,
                BLOCK_N=block_n, STAGES=stages, num_warps=warps)
    sums = part.sum(1) if n_part else None
    # copy=True: rows of one `sums` must not be returned as aliases of each other
    dw = sums[0].to(weight.dtype, copy=True).view(weight.shape) if compute_dw else x.new_empty(0)
    db = sums[n_part - 1].to(db_dtype, copy=True) if compute_db else x.new_empty(0)
    return dx.view(x.shape), dw, db


# ---- PyTorch reference (the math of the matched subgraph, fp32) ----

def layer_norm_reference(x, weight, bias, eps, mid_dtype=None, out_dtype=None):
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    xc = xf - mean
    rstd = torch.rsqrt((xc * xc).mean(-1, keepdim=True) + eps)
    n = xc * rstd
    if mid_dtype is not None:
        n = n.to(mid_dtype).float()
    if weight is not None:
        n = n * weight.float()
    if bias is not None:
        n = n + bias.float()
    return n.to(out_dtype or x.dtype), mean.squeeze(-1), rstd.squeeze(-1)


def layer_norm_backward_reference(dy, x, weight, mean, rstd, mid_dtype=None, need_dw=True, db_dtype=None):
    dyf, r = dy.float(), rstd.float().unsqueeze(-1)
    xhat = (x.float() - mean.float().unsqueeze(-1)) * r
    g = dyf * weight.float() if weight is not None else dyf
    dx = r * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    h = x.shape[-1]
    dw, db = x.new_empty(0), x.new_empty(0)   # two tensors: a custom op's outputs may not alias each other
    if weight is not None and need_dw:
        xm = xhat.to(mid_dtype).float() if mid_dtype is not None else xhat
        dw = (dyf * xm).reshape(-1, h).sum(0).to(weight.dtype).view(weight.shape)
    if db_dtype is not None:
        db = dyf.reshape(-1, h).sum(0).to(db_dtype)
    return dx.to(x.dtype), dw, db


# ---- ops ----

@torch.library.custom_op("fxopt::layer_norm", mutates_args=())
def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
               mid_dtype: Optional[torch.dtype],
               out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y, mean, rstd); mean and rstd (fp32, x.shape[:-1]) are saved for backward."""
    ref = lambda: tuple(t.contiguous() for t in layer_norm_reference(x, weight, bias, eps, mid_dtype, out_dtype))
    if use_triton(x, weight, bias):
        return run_kernel("layer_norm", lambda: _fwd_triton(x, weight, bias, eps, mid_dtype, out_dtype), ref)
    return ref()


@layer_norm.register_fake
def _(x, weight, bias, eps, mid_dtype, out_dtype):
    stat = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype), stat, stat.new_empty(stat.shape)


@torch.library.custom_op("fxopt::layer_norm_backward", mutates_args=())
def layer_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], mean: torch.Tensor,
                        rstd: torch.Tensor, mid_dtype: Optional[torch.dtype], need_dw: bool,
                        db_dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, dw, db): dw (weight.shape) empty when there is no weight or it needs no grad; db ([H], db_dtype)
    empty when db_dtype is None (no bias, or it needs no grad)."""
    ref = lambda: layer_norm_backward_reference(dy, x, weight, mean, rstd, mid_dtype, need_dw, db_dtype)
    if use_triton(dy, x, weight):
        return run_kernel("layer_norm_backward",
                          lambda: _bwd_triton(dy, x, weight, mean, rstd, mid_dtype, need_dw, db_dtype), ref)
    return ref()


@layer_norm_backward.register_fake
def _(dy, x, weight, mean, rstd, mid_dtype, need_dw, db_dtype):
    dw = weight.new_empty(weight.shape) if (weight is not None and need_dw) else x.new_empty(0)
    db = x.new_empty(x.shape[-1:], dtype=db_dtype) if db_dtype is not None else x.new_empty(0)
    return x.new_empty(x.shape), dw, db


def _setup(ctx, inputs, output):
    x, weight, bias, eps, mid_dtype, out_dtype = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)   # no zeros for the mean/rstd grads (measured ~0.7 ms CPU per eager step)
    ctx.mid_dtype = mid_dtype
    ctx.bias_meta = (bias.dtype, bias.shape) if bias is not None else None


def _backward(ctx, dy, _dmean, _drstd):
    if dy is None:
        return None, None, None, None, None, None
    x, weight, mean, rstd = ctx.saved_tensors
    need_dw = weight is not None and ctx.needs_input_grad[1]
    need_db = ctx.bias_meta is not None and ctx.needs_input_grad[2]
    dx, dw, db = torch.ops.fxopt.layer_norm_backward(dy, x, weight, mean, rstd, ctx.mid_dtype, need_dw,
                                                     ctx.bias_meta[0] if need_db else None)
    return (dx if ctx.needs_input_grad[0] else None, dw if need_dw else None,
            db.view(ctx.bias_meta[1]) if need_db else None, None, None, None)


layer_norm.register_autograd(_backward, setup_context=_setup)


@register_cost("layer_norm")
def layer_norm_cost(x_shape, dtype_bytes, has_weight=True, has_bias=True):
    """(flops, bytes) of the forward: read x, write y (+ w, b, mean, rstd); ~7 flops per element
    (sum, subtract, square, sum, scale, * w, + b)."""
    numel, h = 1, x_shape[-1]
    for s in x_shape:
        numel *= s
    params = (int(has_weight) + int(has_bias)) * h * dtype_bytes
    return 7 * numel, 2 * numel * dtype_bytes + params + 8 * numel // h
