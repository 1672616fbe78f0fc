"""Fused lm_head + cross-entropy: loss, dx and dW in one streaming pass, never holding the [N, V] logits.

Math, per row r of x [N, H] with label t_r (ignored when t_r == ignore_index), W [V, H]:
  z = x W^T (rounded to x.dtype, as the linear does),  y = post * tanh(pre * z) if TANH else pre * z   (fp32)
  lse_r = log sum_j exp(y_rj),  loss = sum_{valid r} (lse_r - y_{r,t_r}) / D
  D = number of valid rows (reduction "mean"), or the divisor (tensor or constant; reduction "sum").
  dL/dy_rj = (softmax(y_r)_j - [j == t_r]) / D for valid rows, 0 for ignored rows;
  dL/dz = dL/dy * dy/dz,   dy/dz = pre, or post * pre * (1 - tanh(pre z)^2);
  dx = dL/dz W,   dW = (dL/dz)^T x.
The rows are processed in chunks: z_c = x_c W^T (cuBLAS, into one reused [rows, V] buffer), a Triton kernel
computes the loss of each row and overwrites z_c with dL/dz_c (rounded to x.dtype, as eager's grad of the fp32
upcast is), then dx_c = dz_c W and dW += dz_c^T x_c (fp32 accumulator unless there is one chunk).
The gradients are produced in the forward and saved; the backward only scales them by the incoming grad.
No host syncs: D is a device scalar the kernel loads (all rows ignored: D = 0, loss = 0/0 = NaN and zero grads, as
eager); the chunk count depends on shapes only. Labels outside [0, V) give a NaN loss (eager raises).
"""
from __future__ import annotations

from typing import Optional

import torch

from fxopt.kernels.launch import fast_launch
from fxopt.kernels.registry import (next_pow2, register_cost, register_workspace, run_kernel, triton_available,
                                    use_triton)

# fp32 dW accumulator (eager rounds dW once; a bf16 accumulator rounds once per chunk). H200, 1B shape (N 8192,
# H 2048, V 128256, 4 chunks), fwd+bwd vs eager: fp32 dW rel err 1.9e-4, 21.4 ms; bf16 2.1e-3 (Liger: 2.3e-3),
# 21.8 ms, 0.5 GiB lower peak.
ACC_FP32 = True

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _logits(z, pre, post, TANH: tl.constexpr):
        """(y, dy/dz) of y = post * tanh(pre z) or pre z; tanh(u) = 1 - 2 / (exp(2u) + 1) (saturates, no NaN)."""
        if TANH:
            t = 1.0 - 2.0 / (tl.exp(2.0 * pre * z) + 1.0)
            return post * t, (post * pre) * (1.0 - t * t)
        else:
            return pre * z, tl.zeros_like(z) + pre

    @triton.jit
    def _lce_chunk(Z, LABELS, LOSS, INV_D, n_rows, n_cols, stride_z, ignore_index, pre, post,
                   TANH: tl.constexpr, GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        label = tl.load(LABELS + rows, mask=row_ok, other=ignore_index)
        valid = row_ok & (label != ignore_index)
        in_range = (label >= 0) & (label < n_cols)
        out_range = (label < 0) | (label >= n_cols)
        zrow = Z + rows64 * stride_z
        # pass 1: online max / sum of exp over the vocab
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_M], tl.float32)
        for v0 in range(0, n_cols, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < n_cols
            z = tl.load(zrow[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            y, _d = _logits(z.to(tl.float32), pre, post, TANH)
            y = tl.where(col_ok[None, :], y, float("-inf"))
            m_new = tl.maximum(m, tl.max(y, axis=1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(y - m_new[:, None]), axis=1)
            m = m_new
        lse = m + tl.log(s)
        zt = tl.load(zrow + label, mask=valid & in_range, other=0.0).to(tl.float32)
        yt, _dt = _logits(zt, pre, post, TANH)
        loss = tl.where(valid, lse - yt, 0.0)
        loss = tl.where(valid & out_range, float("nan"), loss)
        tl.store(LOSS + rows, loss, mask=row_ok)
        if GRAD:
            inv_d = tl.load(INV_D)
            # pass 2: dL/dz written over z
            for v0 in range(0, n_cols, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                mask = row_ok[:, None] & (cols < n_cols)[None, :]
                ptr = zrow[:, None] + cols[None, :]
                z = tl.load(ptr, mask=mask, other=0.0)
                y, dydz = _logits(z.to(tl.float32), pre, post, TANH)
                g = tl.exp(y - lse[:, None]) - tl.where(cols[None, :] == label[:, None], 1.0, 0.0)
                dz = tl.where(valid[:, None], g * inv_d * dydz, 0.0)
                tl.store(ptr, dz.to(Z.dtype.element_ty), mask=mask)


    @triton.jit
    def _scale(OUT, IN, G, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G).to(tl.float32)
        v = tl.load(IN + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + offs, (v * g).to(OUT.dtype.element_ty), mask=mask)


# H200, [2048, 128256] bf16 chunk: 0.427 ms = 3.69 TB/s for 3 passes (86% of copy); 8192 cols 0.51 ms, 2048 cols /
# 8 warps 0.50 ms, 2 rows per program 0.47 ms; num_stages 1-4 no change.
GPU_TILE = dict(block_m=1, block_v=4096, warps=8)


def _chunk_triton(z, labels, loss, inv_d, ignore_index, pre, post, tanh, grad):
    rows, v = z.shape
    if z.device.type == "cuda":   # one row per program, 4K-column tiles
        t = GPU_TILE
        block_m, block_v, warps = t["block_m"], min(t["block_v"], next_pow2(v)), t["warps"]

    else:                         # the interpreter pays per program: many rows per program
        block_v = min(1024, next_pow2(v))
        block_m, warps = max(1, min(16, 8192 // block_v)), 4
    fast_launch(_lce_chunk, (triton.cdiv(rows, block_m),), z, labels, loss, inv_d, rows, v, z.stride(0), ignore_index,
                pre, post, TANH=tanh, GRAD=grad, BLOCK_M=block_m, BLOCK_V=block_v, num_warps=warps)


def _chunk_torch(z, labels, loss, inv_d, ignore_index, pre, post, tanh, grad):
    """The kernel's math in PyTorch, on one chunk (reference and fallback; memory stays O(chunk))."""
    zf = z.float()
    t = torch.tanh(pre * zf) if tanh else None
    y = post * t if tanh else pre * zf
    lse = torch.logsumexp(y, dim=-1)
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < z.shape[1])
    safe = torch.where(valid & in_range, labels, 0)
    yt = y.gather(1, safe[:, None]).squeeze(1)
    row = torch.where(valid, lse - yt, 0.0)
    loss.copy_(torch.where(valid & ~in_range, float("nan"), row))
    if grad:
        g = torch.exp(y - lse[:, None])
        g.scatter_add_(1, safe[:, None], -(valid & in_range).float()[:, None])
        dydz = post * pre * (1 - t * t) if tanh else pre
        z.copy_(torch.where(valid[:, None], g * inv_d * dydz, 0.0))


# ---- the memory-aware chunk rule (the recompute cost model calls these) ----

def chunk_rows(n_rows: int, hidden: int, vocab: int, itemsize: int, budget_bytes: Optional[int] = None) -> int:
    """Rows per chunk. Default: the chunk's logits [rows, V] are about the lm_head weight's size (rows = H rounded
    down to a power of two), so the dW accumulation GEMM has K = rows >= H: compute-bound. Measured on the H200,
    1B shape (N 8192, H 2048, V 128256, bf16, GEMMs only): rows 256 -> 38.9 ms, 512 -> 26.4, 1024 -> 22.3,
    2048 -> 20.2, 8192 (unchunked) -> 19.6 (Inductor's whole linear+CE fwd+bwd: 21.3 ms, peak 2.48 GiB).
    `budget_bytes` caps the chunk's logits bytes instead (at least 16 rows)."""
    if budget_bytes is None:
        rows = 1 << max(4, int(hidden).bit_length() - 1)
    else:
        fit = max(16, int(budget_bytes) // max(1, vocab * itemsize))
        rows = 1 << (fit.bit_length() - 1)
    return max(1, min(rows, n_rows))


def workspace_bytes(n_rows: int, hidden: int, vocab: int, itemsize: int, need_dw: bool = True,
                    rows: Optional[int] = None) -> int:
    """Peak temporary bytes of the op beyond its outputs: the chunk buffer (+ the fp32 dW accumulator)."""
    rows = rows or chunk_rows(n_rows, hidden, vocab, itemsize)
    acc = 4 * vocab * hidden if (need_dw and ACC_FP32 and itemsize < 4 and rows < n_rows) else 0
    return rows * vocab * itemsize + acc + 8 * n_rows


def _has_out_dtype() -> bool:
    return hasattr(torch.ops.aten.mm, "dtype_out") and hasattr(torch.ops.aten.addmm, "dtype_out")


def _accumulate(acc, dz, xc, first):
    """acc (+)= dz^T xc, fp32 accumulation (bf16/fp16 inputs: cuBLAS out_dtype on CUDA, upcast on CPU)."""
    a, b = dz.t(), xc
    if acc.dtype != dz.dtype:
        if acc.device.type == "cuda" and _has_out_dtype():
            if first:
                return torch.mm(a, b, out_dtype=torch.float32, out=acc)
            return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        a, b = a.float(), b.float()
    if first:
        return torch.mm(a, b, out=acc)
    return acc.addmm_(a, b)


def _forward(x, weight, labels, divisor, ignore_index, reduction, divisor_value, pre, post, tanh,
             need_dx, need_dw, rows, chunk_fn):
    h, v = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, h)
    n = x2.shape[0]
    lab = labels.reshape(-1)
    lab = lab if lab.stride(0) == 1 else lab.contiguous()
    w = weight
    grad = need_dx or need_dw
    if reduction == "mean":
        d = (lab != ignore_index).sum().to(torch.float32)
    elif divisor is not None:
        d = divisor.to(device=x.device, dtype=torch.float32).reshape(())
    else:
        d = torch.full((), float(divisor_value), dtype=torch.float32, device=x.device)
    inv_d = (1.0 / d).reshape(1)
    loss_rows = torch.empty(n, dtype=torch.float32, device=x.device)
    dx = torch.empty((n, h), dtype=x.dtype, device=x.device) if need_dx else x.new_empty(0)
    rows = max(1, min(rows or chunk_rows(n, h, v, x.element_size()), max(n, 1)))
    n_chunks = -(-n // rows)
    acc = None
    if need_dw:
        acc_dtype = torch.float32 if (ACC_FP32 and n_chunks > 1) else weight.dtype
        acc = torch.empty((v, h), dtype=acc_dtype, device=x.device) if n else \
            torch.zeros((v, h), dtype=acc_dtype, device=x.device)
    zbuf = torch.empty((min(rows, n), v), dtype=x.dtype, device=x.device) if n else None
    z = None
    for i in range(n_chunks):
        s, e = i * rows, min(n, (i + 1) * rows)
        xc = x2[s:e]
        z = zbuf[: e - s]
        torch.mm(xc, w.t(), out=z)
        chunk_fn(z, lab[s:e], loss_rows[s:e], inv_d, ignore_index, pre, post, tanh, grad)
        if need_dx:
            torch.mm(z, w, out=dx[s:e])
        if need_dw:
            _accumulate(acc, z, xc, first=(i == 0))
    del zbuf, z   # the chunk buffer goes before the fp32 -> dW dtype conversion: peak acc + dW, not + chunk
    loss = loss_rows.sum() / d
    dw = acc.to(weight.dtype) if need_dw else x.new_empty(0)
    return loss, (dx.view(x.shape) if need_dx else dx), dw


# ---- PyTorch reference of the matched subgraph (full logits; tests only) ----

def linear_cross_entropy_reference(x, weight, labels, divisor=None, ignore_index=-100, reduction="mean",
                                   divisor_value=1.0, pre=1.0, post=1.0, tanh=False):
    """The eager math (autograd through it gives the reference grads): linear -> scale/softcap -> fp32 -> CE."""
    z = torch.nn.functional.linear(x, weight).float()
    y = post * torch.tanh(pre * z) if tanh else pre * z
    ce = torch.nn.functional.cross_entropy(y.reshape(-1, y.shape[-1]), labels.reshape(-1), ignore_index=ignore_index,
                                           reduction=reduction)
    if reduction == "sum":
        ce = ce / (divisor if divisor is not None else divisor_value)
    return ce


# ---- ops ----

@torch.library.custom_op("fxopt::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, divisor: Optional[torch.Tensor],
                         ignore_index: int, reduction: str, divisor_value: float, pre: float, post: float,
                         tanh: bool, need_dx: bool, need_dw: bool,
                         chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss fp32 [], dx like x (empty unless need_dx), dW like weight (empty unless need_dw)).

    reduction "mean": loss sum / valid rows; "sum": loss sum / (divisor tensor if given, else divisor_value).
    chunk: rows per chunk, 0 = `chunk_rows` default."""
    args = (x, weight, labels, divisor, ignore_index, reduction, divisor_value, pre, post, tanh, need_dx, need_dw,
            chunk)
    ref = lambda: _forward(*args, _chunk_torch)
    if use_triton(x, weight, labels):
        return run_kernel("linear_cross_entropy", lambda: _forward(*args, _chunk_triton), ref)
    return ref()


@linear_cross_entropy.register_fake
def _(x, weight, labels, divisor, ignore_index, reduction, divisor_value, pre, post, tanh, need_dx, need_dw, chunk):
    return (x.new_empty((), dtype=torch.float32), x.new_empty(x.shape) if need_dx else x.new_empty(0),
            weight.new_empty(weight.shape) if need_dw else weight.new_empty(0))


def _scale_triton(t, g):
    t = t.contiguous()
    out = torch.empty_like(t)
    block = 4096 if t.device.type == "cuda" else 1 << 14
    if t.numel():
        fast_launch(_scale, (triton.cdiv(t.numel(), block),), out, t, g.reshape(1), t.numel(), BLOCK=block, num_warps=8)
    return out


@torch.library.custom_op("fxopt::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(grad: torch.Tensor, dx: torch.Tensor,
                                  dw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad * dx, grad * dw) in fp32, rounded to their dtypes (ATen's mixed-dtype mul of a [V, H] bf16 tensor by
    a 0-dim fp32 CUDA tensor takes a non-vectorized path: 1.1 ms vs 0.25 ms at 128256 x 2048 on the H200)."""
    ref = lambda: tuple((t.float() * grad.float()).to(t.dtype).contiguous() for t in (dx, dw))
    if use_triton(grad, dx, dw):
        return run_kernel("linear_cross_entropy_backward", lambda: (_scale_triton(dx, grad), _scale_triton(dw, grad)),
                          ref)
    return ref()


@linear_cross_entropy_backward.register_fake
def _(grad, dx, dw):
    return torch.empty_like(dx, memory_format=torch.contiguous_format), \
        torch.empty_like(dw, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    ctx.need_dx, ctx.need_dw = inputs[10], inputs[11]
    ctx.set_materialize_grads(False)   # no zero [V, H] / [N, H] grads for the unused dx, dW outputs
    ctx.save_for_backward(output[1], output[2])


def _backward(ctx, g, _gdx, _gdw):
    dx, dw = ctx.saved_tensors
    for i, have, what in ((0, ctx.need_dx, "x"), (1, ctx.need_dw, "weight")):
        if ctx.needs_input_grad[i] and not have:
            raise RuntimeError(f"fxopt::linear_cross_entropy was compiled without the gradient of {what} "
                               "(requires_grad changed after compilation?)")
    if g is None:   # only dx / dW were differentiated (they are constants of the loss)
        return (None,) * 13
    gx, gw = torch.ops.fxopt.linear_cross_entropy_backward(g, dx, dw)
    return (gx if ctx.need_dx else None, gw if ctx.need_dw else None) + (None,) * 11


linear_cross_entropy.register_autograd(_backward, setup_context=_setup)


@register_workspace("linear_cross_entropy")
def linear_cross_entropy_workspace(x_shape, vocab, dtype_bytes, need_dw=True, chunk=0):
    """The [rows, V] chunk buffer (+ the fp32 dW accumulator): 0.49 GiB at the 1B shape (N 8192, H 2048, V 128256,
    bf16, frozen lm_head), held during the op, which runs in the forward."""
    n = 1
    for s in x_shape[:-1]:
        n *= s
    return workspace_bytes(n, x_shape[-1], vocab, dtype_bytes, need_dw, rows=chunk or None)


@register_cost("linear_cross_entropy")
def linear_cross_entropy_cost(x_shape, vocab, dtype_bytes, need_dx=True, need_dw=True, chunk=0):
    """(flops, bytes) of the op (it includes its backward) at `chunk` rows per chunk (0: chunk_rows' default):
    GEMMs 2NHV each (logits, dx, dW); per chunk element: ~12 flops, 3 passes (read, read, write); W read by each
    GEMM once per chunk; the fp32 dW accumulator read+written per chunk. (The planner prices smaller chunks with
    this; the 1B measurements in chunk_rows' comment: 8192 -> 256 rows 19.6 -> 38.9 ms, trainable lm_head.)"""
    h = x_shape[-1]
    n = 1
    for s in x_shape[:-1]:
        n *= s
    gemms = 1 + int(need_dx) + int(need_dw)
    rows = min(chunk or chunk_rows(n, h, vocab, dtype_bytes), max(n, 1))
    chunks = -(-n // max(rows, 1))
    acc = 8 * vocab * h * chunks if (need_dw and ACC_FP32 and dtype_bytes < 4 and chunks > 1) else 0
    flops = 2 * n * h * vocab * gemms + 12 * n * vocab
    nbytes = (gemms * chunks * vocab * h * dtype_bytes + (2 + gemms) * n * h * dtype_bytes
              + 4 * n * vocab * dtype_bytes + acc)
    return flops, nbytes
