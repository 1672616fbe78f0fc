"""RMSNorm: y = cast_out( round_mid(x * rstd) * (w + offset) ),  rstd = 1 / sqrt(mean(x^2, -1) + eps).

All math in fp32 (inputs are upcast right after `tl.load`). The two HF spellings are one op:
  - weight after the cast back (Llama): mid_dtype = x.dtype, the normalized value is rounded to it before `w *`;
  - weight before the cast (Gemma, `(1 + w)`): mid_dtype = None, offset = 1.
Backward (n = x * rstd, g = dy * (w + offset)):
  dx = rstd * (g - n * mean(g * n, -1)),   dw = sum_rows(dy * round_mid(n))
dw is summed in fp32 per program (each program loops over row blocks) into a [programs, H] buffer, then reduced
once; with a frozen weight (LoRA) no dw work is done at all.

The residual add around a norm (s = a + b; y = norm(s), s also read later) is one op after the partition,
fxopt::add_rms_norm -> (y, s, rstd): a and b read, s and y written, s rounded to its dtype before the norm (eager's
bits). In the backward, fxopt::rms_norm_backward_add adds the gradient reaching s from its other readers to dx in
fp32 and rounds once (eager rounds dx first). Each saves one pass over s or dx and a launch; the pass that makes
them is fxopt/patterns/rms_norm_add.py (opt-in: FXOPT_NORM_ADD=1).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from fxopt.kernels.rounding import round_to, rounding_code
from fxopt.kernels.launch import fast_launch
from fxopt.kernels.registry import next_pow2, num_sms, register_cost, run_kernel, triton_available, use_triton


def _mid_code(mid_dtype) -> int:
    return rounding_code(mid_dtype) if mid_dtype is not None else 0

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_fwd(X, W, Y, RSTD, B, S, n_rows, n_cols, stride_x, stride_y, stride_b, stride_s, eps, offset,
                      HAS_W: tl.constexpr, MID: tl.constexpr, HAS_RES: tl.constexpr, RES: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:   # x = a + b, rounded to s's dtype as eager's add, stored, then normalized
            x = round_to(x + tl.load(B + rows64[:, None] * stride_b + cols[None, :], mask=mask, other=0.0)
                         .to(tl.float32), RES)
            tl.store(S + rows64[:, None] * stride_s + cols[None, :], x.to(S.dtype.element_ty), mask=mask)
        # eps/offset arrive as Python floats -> fp32 scalars in Triton.
        ms = tl.sum(x * x, axis=1) / n_cols
        rstd = 1.0 / tl.sqrt(ms + eps)
        n = round_to(x * rstd[:, None], MID)
        if HAS_W:
            w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32) + offset
            n = n * w[None, :]
        tl.store(Y + rows64[:, None] * stride_y + cols[None, :], n.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=row_ok)

    @triton.jit
    def _rms_norm_bwd(DY, X, W, RSTD, DX, DW_PART, DRES, n_rows, n_cols, stride_dy, stride_x, stride_dx, stride_dres,
                      offset, HAS_W: tl.constexpr, MID: tl.constexpr, COMPUTE_DW: tl.constexpr, HAS_DRES: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        if HAS_W:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32) + offset
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        n_blocks = tl.cdiv(n_rows, BLOCK_M)
        for blk in range(pid, n_blocks, nprog):
            rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < n_rows
            mask = row_ok[:, None] & col_ok[None, :]
            rows64 = rows.to(tl.int64)
            x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            n = x * rstd[:, None]
            if HAS_W:
                g = dy * w[None, :]
                if COMPUTE_DW:
                    dw += tl.sum(dy * round_to(n, MID), axis=0)
            else:
                g = dy
            dot = tl.sum(g * n, axis=1) / n_cols
            dx = rstd[:, None] * (g - n * dot[:, None])
            if HAS_DRES:   # + the gradient reaching x from its other readers, in fp32, rounded once
                dx += tl.load(DRES + rows64[:, None] * stride_dres + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            tl.store(DW_PART + pid * n_cols + cols, dw, mask=col_ok)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """2-D [rows, H] view with unit column stride (a copy only when the input cannot be viewed so)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


# Launch configs from a sweep on the H200 at 16384 x 4096 bf16 (benchmarks/kernel_bench/rms_norm.py:sweep):
#   fwd: 1 row x 8 warps per program, 0.071 ms (3.78 TB/s, 89% of copy); all configs within 10%.
#   bwd: 4 rows x 8 warps per iteration, 1 persistent program per SM, 0.121 ms (3.34 TB/s); 1 row and 4 programs
#   per SM took 0.145 ms, 1 row and 1 program per SM 0.190 ms.
def _block_m(n_cols_pow2: int, device: torch.device, target: int = 4096) -> int:
    # the interpreter pays per program, not per element: many rows per program there
    target = target if device.type == "cuda" else 1 << 15
    return max(1, min(64, target // n_cols_pow2))


def _num_warps(block_elems: int) -> int:
    return 4 if block_elems <= 2048 else 8


def _bwd_programs(n_blocks: int, warps: int, device: torch.device) -> int:
    # persistent grid: one resident 8-warp program per SM (two at 4 warps)
    return max(1, min(n_blocks, num_sms(device) * max(1, 8 // warps)))


def _fwd_triton(x, weight, eps, offset, mid_dtype, out_dtype, b=None):
    """(y, rstd), or with b: (y, s = x + b, rstd)."""
    x2 = _rows(x)
    n_rows, n_cols = x2.shape
    b2 = _rows(b) if b is not None else x2
    res = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device) if b is not None else x2
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block_n = next_pow2(n_cols)
    block_m = _block_m(block_n, x.device)
    w = weight.contiguous() if weight is not None else x2
    grid = (triton.cdiv(n_rows, block_m),)
    fast_launch(_rms_norm_fwd, grid, x2, w, y, rstd, b2, res, n_rows, n_cols, x2.stride(0), y.stride(0),
                b2.stride(0), res.stride(0), eps, offset, HAS_W=weight is not None, MID=_mid_code(mid_dtype),
                HAS_RES=b is not None, RES=rounding_code(x.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
                num_warps=_num_warps(block_m * block_n))
    if b is not None:
        return y.view(x.shape), res.view(x.shape), rstd.view(x.shape[:-1])
    return y.view(x.shape), rstd.view(x.shape[:-1])


def _bwd_triton(dy, x, weight, rstd, offset, mid_dtype, need_dw, dres=None):
    x2, dy2 = _rows(x), _rows(dy)
    dres2 = _rows(dres) if dres is not None else dy2
    n_rows, n_cols = x2.shape
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    block_n = next_pow2(n_cols)
    compute_dw = weight is not None and need_dw
    # without dW (a frozen weight: LoRA) nothing is reduced across rows: the forward's one-row programs, one per
    # block (H200, 16384 x 4096 bf16 fwd+bwd: the persistent 4-row grid took 0.1956 ms vs Inductor's 0.1784)
    block_m = _block_m(block_n, x.device, target=16384 if compute_dw else 4096)
    warps = _num_warps(block_m * block_n)
    n_blocks = triton.cdiv(n_rows, block_m)
    nprog = _bwd_programs(n_blocks, warps, x.device) if compute_dw else n_blocks
    part = torch.empty((nprog, n_cols), dtype=torch.float32, device=x.device) if compute_dw else dx
    w = weight.contiguous() if weight is not None else x2
    fast_launch(_rms_norm_bwd, (nprog,), dy2, x2, w, rstd.reshape(-1), dx, part, dres2, n_rows, n_cols,
                dy2.stride(0), x2.stride(0), dx.stride(0), dres2.stride(0), offset, HAS_W=weight is not None,
                MID=_mid_code(mid_dtype), COMPUTE_DW=compute_dw, HAS_DRES=dres is not None, BLOCK_M=block_m,
                BLOCK_N=block_n, num_warps=warps)
    dw = part.sum(0).to(weight.dtype) if compute_dw else x.new_empty(0)
    return dx.view(x.shape), dw


# ---- PyTorch reference (the math of the matched subgraph, fp32) ----

def rms_norm_reference(x, weight, eps, offset=0.0, mid_dtype=None, out_dtype=None):
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    n = xf * rstd
    if mid_dtype is not None:
        n = n.to(mid_dtype).float()
    if weight is not None:
        n = n * (weight.float() + offset)
    return n.to(out_dtype or x.dtype), rstd.squeeze(-1)


def rms_norm_backward_reference(dy, x, weight, rstd, offset=0.0, mid_dtype=None, need_dw=True, dres=None):
    """(dx, dw); with dres, dx + dres summed in fp32 and rounded once."""
    xf, dyf, r = x.float(), dy.float(), rstd.float().unsqueeze(-1)
    n = xf * r
    g = dyf * (weight.float() + offset) if weight is not None else dyf
    dx = r * (g - n * (g * n).mean(-1, keepdim=True))
    if dres is not None:
        dx = dx + dres.float()
    dw = x.new_empty(0)
    if weight is not None and need_dw:
        nm = n.to(mid_dtype).float() if mid_dtype is not None else n
        dw = (dyf * nm).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    return dx.to(x.dtype), dw


# ---- ops ----

@torch.library.custom_op("fxopt::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, offset: float,
             mid_dtype: Optional[torch.dtype], out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y, rstd); rstd (fp32, x.shape[:-1]) is saved for backward."""
    ref = lambda: tuple(t.contiguous() for t in rms_norm_reference(x, weight, eps, offset, mid_dtype, out_dtype))
    if use_triton(x, weight):
        return run_kernel("rms_norm", lambda: _fwd_triton(x, weight, eps, offset, mid_dtype, out_dtype), ref)
    return ref()


@rms_norm.register_fake
def _(x, weight, eps, offset, mid_dtype, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("fxopt::rms_norm_backward", mutates_args=())
def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], rstd: torch.Tensor,
                      offset: float, mid_dtype: Optional[torch.dtype],
                      need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dx, dw); dw is empty when there is no weight or it needs no grad."""
    ref = lambda: rms_norm_backward_reference(dy, x, weight, rstd, offset, mid_dtype, need_dw)
    if use_triton(dy, x, weight):
        return run_kernel("rms_norm_backward", lambda: _bwd_triton(dy, x, weight, rstd, offset, mid_dtype, need_dw),
                          ref)
    return ref()


@rms_norm_backward.register_fake
def _(dy, x, weight, rstd, offset, mid_dtype, need_dw):
    dw = weight.new_empty(weight.shape) if (weight is not None and need_dw) else x.new_empty(0)
    return x.new_empty(x.shape), dw


def _setup(ctx, inputs, output):
    x, weight, eps, offset, mid_dtype, out_dtype = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.offset, ctx.mid_dtype = offset, mid_dtype


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    need_dw = weight is not None and ctx.needs_input_grad[1]
    dx, dw = torch.ops.fxopt.rms_norm_backward(dy, x, weight, rstd, ctx.offset, ctx.mid_dtype, need_dw)
    return dx, (dw.view(weight.shape) if need_dw else None), None, None, None, None


rms_norm.register_autograd(_backward, setup_context=_setup)


# ---- the residual add fused in (only in partitioned graphs: fxopt/patterns/rms_norm_add.py; no autograd) ----

@torch.library.custom_op("fxopt::add_rms_norm", mutates_args=())
def add_rms_norm(a: torch.Tensor, b: torch.Tensor, weight: Optional[torch.Tensor], eps: float, offset: float,
                 mid_dtype: Optional[torch.dtype],
                 out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y, s, rstd) with s = a + b (a's dtype, as eager's add) and (y, rstd) = rms_norm(s)."""
    def ref():
        sum_ = (a + b).contiguous()
        y, rstd = rms_norm_reference(sum_, weight, eps, offset, mid_dtype, out_dtype)
        return y.contiguous(), sum_, rstd.contiguous()
    if use_triton(a, b, weight):
        return run_kernel("add_rms_norm", lambda: _fwd_triton(a, weight, eps, offset, mid_dtype, out_dtype, b=b), ref)
    return ref()


@add_rms_norm.register_fake
def _(a, b, weight, eps, offset, mid_dtype, out_dtype):
    return (a.new_empty(a.shape, dtype=out_dtype), a.new_empty(a.shape),
            a.new_empty(a.shape[:-1], dtype=torch.float32))


@torch.library.custom_op("fxopt::rms_norm_backward_add", mutates_args=())
def rms_norm_backward_add(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], rstd: torch.Tensor,
                          dres: torch.Tensor, offset: float, mid_dtype: Optional[torch.dtype],
                          need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """rms_norm_backward's (dx + dres, dw): dres (x's dtype and shape) added in fp32 before dx is rounded."""
    ref = lambda: rms_norm_backward_reference(dy, x, weight, rstd, offset, mid_dtype, need_dw, dres)  # noqa: E731
    if use_triton(dy, x, weight, dres):
        return run_kernel("rms_norm_backward_add",
                          lambda: _bwd_triton(dy, x, weight, rstd, offset, mid_dtype, need_dw, dres), ref)
    return ref()


@rms_norm_backward_add.register_fake
def _(dy, x, weight, rstd, dres, offset, mid_dtype, need_dw):
    dw = weight.new_empty(weight.shape) if (weight is not None and need_dw) else x.new_empty(0)
    return x.new_empty(x.shape), dw


@register_cost("rms_norm")
def rms_norm_cost(x_shape, dtype_bytes, has_weight=True):
    """(flops, bytes) of the forward: read x, write y (+ w, rstd); ~4 flops per element."""
    numel, h = 1, x_shape[-1]
    for s in x_shape:
        numel *= s
    return 4 * numel, 2 * numel * dtype_bytes + (h * dtype_bytes if has_weight else 0) + 4 * numel // h


@register_cost("add_rms_norm")
def add_rms_norm_cost(a_shape, dtype_bytes, has_weight=True):
    """(flops, bytes): rms_norm's, plus b read and s written."""
    flops, nbytes = rms_norm_cost(a_shape, dtype_bytes, has_weight)
    numel = math.prod(a_shape)
    return flops + numel, nbytes + 2 * numel * dtype_bytes
