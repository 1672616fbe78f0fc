"""LoRA over a dense or an NF4 base weight, one op each:  y = x W^T + bias + s * (x A^T) B^T.

Shapes: x [..., K], W [N, K] (dense, or bitsandbytes NF4 — see nf4.py), A [r, K], B [N, r], bias [N], s a float.
Dtypes: the base product runs in `compute dtype` (dense: W's dtype; NF4: bnb's compute dtype) with x rounded to it;
the rank-r branch runs in A's dtype (peft may keep adapters in fp32 over a bf16 base). Accumulation is fp32 and the
sum is rounded once to out_dtype.

Forward (xa = x A^T [M, r], a skinny GEMM):  y = fused_matmul(x, W^T) + s * xa @ B^T + bias  — the LoRA term is the
epilogue of the base GEMM (no extra pass over y); NF4 is dequantized inside the GEMM's operand load.
Backward (dy [M, N]; only x, A, B — and bias / dense W when they require grad — get gradients):
  dxa = s * dy B            [M, r]
  dB  = s * dy^T xa         [N, r]
  dA  = dxa^T x             [r, K]
  dx  = dy W + dxa A        one fused GEMM (NF4 dequantized in the operand load again), the rank-r term in its epilogue
Saved for backward: x and xa only (the weights are inputs; nothing dequantized is kept).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from fxopt.kernels.nf4 import NF4Weight, fused_matmul, fused_matmul_reference
from fxopt.kernels.nf4_chunked import as_dtype, chunked_matmul
from fxopt.kernels import lora_dy
from fxopt.kernels.launch import fast_launch
from fxopt.kernels.split_reduce import split_grid, sum_splits
from fxopt.kernels.registry import (bench_ms, capturing, log_choice, next_pow2, num_sms, register_cost,
                                    register_workspace, run_kernel, triton_available, tuning, tuning_key, use_triton)

if triton_available():
    import triton
    import triton.language as tl

    from fxopt.kernels.split_reduce import _dot_pair, _lowp

    @triton.jit
    def _skinny_kernel(BIG, SMALL, OUT, P, Q, RANK, scale, s_bp, s_bq, s_sq, s_sr, s_os, s_op, s_or,
                       HALF: tl.constexpr, INTERP: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr,
                       RB: tl.constexpr):
        """OUT[split, p, :r] = scale * sum over this program's share of q of BIG[p, q] * SMALL[q, :r]; BIG half,
        SMALL fp32 split as hi + lo half values (hi = half(s), lo = half(s - hi)): two tensor-core dots with fp32
        accumulation give ~2^-17 relative accuracy without an fp32 copy of BIG."""
        pid_p = tl.program_id(0)
        pid_s = tl.program_id(1)
        per = tl.cdiv(tl.cdiv(Q, tl.num_programs(1)), BQ) * BQ
        p = pid_p * BP + tl.arange(0, BP)
        r = tl.arange(0, RB)
        p_ok = p < P
        r_ok = r < RANK
        p64 = p.to(tl.int64)
        acc = tl.zeros((BP, RB), dtype=tl.float32)
        for q0 in range(pid_s * per, tl.minimum(Q, pid_s * per + per), BQ):
            q = q0 + tl.arange(0, BQ)
            q_ok = q < Q
            b = tl.load(BIG + p64[:, None] * s_bp + q.to(tl.int64)[None, :] * s_bq, mask=p_ok[:, None] & q_ok[None, :],
                        other=0.0)
            sm = tl.load(SMALL + q.to(tl.int64)[:, None] * s_sq + r[None, :] * s_sr, mask=q_ok[:, None] & r_ok[None, :],
                         other=0.0).to(tl.float32)
            hi = _lowp(sm, HALF, INTERP)
            lo = _lowp(sm - hi.to(tl.float32), HALF, INTERP)
            if INTERP:
                b = b.to(tl.float32)
            acc = _dot_pair(b, hi, b, lo, acc, INTERP)
        tl.store(OUT + pid_s * s_os + p64[:, None] * s_op + r[None, :] * s_or, acc * scale,
                 mask=p_ok[:, None] & r_ok[None, :])

def skinny_mm(big: torch.Tensor, small: torch.Tensor, split: int = 0, scale: float = 1.0,
              transpose: bool = False, low: Optional[torch.dtype] = None):
    """fp32 scale * big @ small for a half-precision big [P, Q] (any strides) and an fp32 small [Q, r], r <= 128,
    without materializing big in fp32 (peft's fp32 adapters over a bf16 model: x A^T, dy B, dy^T xa, x^T dxa);
    transpose: the result as a contiguous [r, P] (the kernel stores it so; no copy). low (fp16/bf16): returns
    (result, result rounded to low), both written by the kernel that sums the split partials."""
    P, Q = big.shape
    rank = small.shape[1]
    interp = big.device.type != "cuda"
    bp, bq = (64, 64) if not interp else (max(16, min(64, next_pow2(P))), max(16, min(64, next_pow2(Q))))
    # split 0: the reduction over enough programs for ~2 per SM (partials summed after; [split, P, r] fp32 is small).
    # H200, 8B shapes (benchmarks/results/lora_term_sweep_h200_first.json): 2.4-3.2 TB/s; one program per 16-64 rows
    # with no split and 128-256 wide q tiles ran 1.2-3x slower at every shape, so there is one config.
    n_p, split = split_grid(P, Q, bp, bq, split, None if interp else num_sms(big.device))
    part = torch.empty((split, rank, P) if transpose else (split, P, rank), dtype=torch.float32, device=big.device)
    s_op, s_or = (part.stride(2), part.stride(1)) if transpose else (part.stride(1), part.stride(2))
    fast_launch(_skinny_kernel, (n_p, split), big, small, part, P, Q, rank, float(scale), big.stride(0), big.stride(1),
                small.stride(0), small.stride(1), part.stride(0), s_op, s_or, HALF=int(big.dtype == torch.float16),
                INTERP=interp, BP=bp, BQ=bq, RB=max(16, next_pow2(rank)), num_warps=4)
    if split == 1 and low is None:
        return part[0]
    out, out_low = sum_splits(part, low)
    return (out, out_low) if low is not None else out


_SKINNY_CHOICE: dict = {}  # (shape, strides, dtypes) -> "triton" | "fp32"; env FXOPT_LORA_SKINNY forces one


# The fp32 copy of big is made this many bytes at a time: a whole copy is 2x big (256 MiB for the 1B step's
# [8192, 8192] MLP gradient), held at the backward's peak.
FP32_COPY_BYTES = 64 << 20


def fp32_mm(big: torch.Tensor, small: torch.Tensor, copy_bytes: int = FP32_COPY_BYTES) -> torch.Tensor:
    """big.float() @ small (peft's form for fp32 adapters), the fp32 copy of big made a block of rows at a time."""
    P, Q = big.shape
    step = max(1, copy_bytes // max(1, 4 * Q))
    if P <= step:
        return big.float() @ small
    out = torch.empty((P, small.shape[1]), dtype=torch.float32, device=big.device)
    for s in range(0, P, step):
        torch.mm(big[s:s + step].float(), small, out=out[s:s + step])
    return out


def _mm(big, small, triton_gemm, rows, scale=1.0, transpose=False, low=None):
    """scale * big @ small for the rank-r products (transpose: as a contiguous [r, P]). A half big with an fp32
    small (peft's fp32 adapters): the split fp32 kernel, with the scale and the layout in its store (the 8B step
    ran 449 separate multiplies and 224 transposing copies, ~5% of its ~5,000 kernels), or (on CUDA, when measured
    faster) peft's own form, an fp32 copy of big and an fp32 GEMM; both carry fp32 accuracy. Otherwise torch.mm.
    low (a dtype): returns (product, product in low) — the rank-r term's left operand for cuBLAS."""
    def post(out):
        out = out * scale if scale != 1.0 else out
        out = out.t().contiguous() if transpose else out
        return (out, out.to(low)) if low is not None else out
    if triton_gemm and small.dtype == torch.float32 and big.dtype in (torch.float16, torch.bfloat16) \
            and big.shape[1] > 0:
        half = low if low in (torch.float16, torch.bfloat16) else None
        def skinny():
            r = skinny_mm(big, small, scale=scale, transpose=transpose, low=half)
            return r if half is not None or low is None else (r, r.to(low))
        return _run_choice("FXOPT_LORA_SKINNY", _SKINNY_CHOICE, (tuning_key(big, rows), small.shape[1], big.dtype),
                           {"triton": skinny, "fp32": lambda: post(fp32_mm(big, small))},
                           default="triton", measure=big.device.type == "cuda")
    return post(big.to(small.dtype) @ small)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _empty(x):
    return x.new_empty(0)


# ---- the big GEMM: the reference, or on CUDA the faster (measured once per shape) of the fused Triton GEMM and
# cuBLAS (dense base) / chunked dequantization + cuBLAS (NF4 base, nf4_chunked.py) ----

_DENSE_CHOICE: dict = {}   # (direction, M, P, Q, dtypes) -> "triton" | "cublas"; env FXOPT_LORA_DENSE forces one
_NF4_CHOICE: dict = {}     # (direction, M, Q, N, K, dtypes, lora, bias) -> "fused" | "chunked"; env FXOPT_NF4_GEMM
# From this many rows on, the chunked path without timing: the fused kernel dequantizes W once per row tile, and at
# 4096 rows it ran at ~46 TFLOP/s on the H200, 3-10x slower than dequantize + cuBLAS (kernels_lora_h200.json).
NF4_CHUNKED_ROWS = 2048


def _cublas(x2, weight, trans, left, right, scale, bias, out_dtype, compute_dtype, left_low=None):
    """Dense weight only: cuBLAS GEMM, then the rank-r term as an in-place addmm (one extra pass over C).
    left_low: left already in the compute dtype."""
    w = weight.to(compute_dtype)
    w = w.t() if trans else w
    xc = x2.to(compute_dtype)
    c = torch.addmm(bias.to(compute_dtype), xc, w) if bias is not None else xc @ w
    if left is not None:
        c.addmm_(as_dtype(left, left_low, compute_dtype), right.to(compute_dtype), alpha=scale)
    return c.to(out_dtype)


def _measure_choice(table, key, candidates):
    """The fastest of candidates {name: fn} (median of a short do_bench), measured once per key."""
    choice = table.get(key)
    if choice is None:
        times = {name: bench_ms(fn) for name, fn in candidates.items()}
        choice = table[key] = min(times, key=times.get)
        log_choice("lora", key, choice, times)
    return choice


def _run_choice(env, table, key, candidates, default, measure):
    """Run the candidate {name: fn} that env var `env` names, else the one measured fastest once per key (when
    `measure`), else `default`."""
    name = os.environ.get(env) or None
    if name is not None and name not in candidates:
        raise ValueError(f"{env} must be {' or '.join(map(repr, candidates))}, not {name!r}")
    if name is None:
        name = table.get(key)   # a choice made before: no tuning / capture checks (host time per call)
    if name is None:
        timed = measure and tuning() and not capturing()
        name = _measure_choice(table, key, candidates) if timed else default
    return candidates[name]()


def _gemm(x2, weight, trans, left, right, scale, bias, out_dtype, compute_dtype, triton_gemm, left_low=None):
    """left_low: the rank-r term's left operand already rounded to the compute dtype (for the cuBLAS paths)."""
    if not triton_gemm:
        return fused_matmul_reference(x2, weight, trans, left, right, scale, bias, out_dtype, compute_dtype)
    args = (x2, weight, trans, left, right, scale, bias, out_dtype, compute_dtype)
    cuda = x2.device.type == "cuda"
    if isinstance(weight, NF4Weight):   # fused dequant-in-GEMM vs chunked dequant + cuBLAS (nf4_chunked.py)
        many = cuda and x2.shape[0] >= NF4_CHUNKED_ROWS   # many rows: the fused kernel is not timed (nor tuned)
        key = (trans, many, tuning_key(x2, x2.shape[0]), weight.n, weight.k, x2.dtype, compute_dtype,
               left is not None, bias is not None)
        return _run_choice("FXOPT_NF4_GEMM", _NF4_CHOICE, key, {"fused": lambda: fused_matmul(*args),
                                                                "chunked": lambda: chunked_matmul(
                                                                    *args, lora_left_low=left_low)},
                           default="chunked" if many else "fused", measure=cuda and not many)
    if not cuda:
        return fused_matmul(*args)
    return _run_choice("FXOPT_LORA_DENSE", _DENSE_CHOICE,
                       (trans, tuning_key(x2, x2.shape[0]), *weight.shape, x2.dtype, weight.dtype, left is not None),
                       {"triton": lambda: fused_matmul(*args), "cublas": lambda: _cublas(*args, left_low=left_low)},
                       default="triton", measure=True)


def _forward(x, weight, bias, lora_a, lora_b, scale, compute_dtype, out_dtype, triton_gemm: bool):
    x2 = _rows(x)
    n_out = weight.n if isinstance(weight, NF4Weight) else weight.shape[0]
    has_lora = lora_a is not None
    xa, xa_low = _mm(x2, lora_a.t(), triton_gemm, x2.shape[0], low=compute_dtype) if has_lora else (_empty(x), None)
    y = _gemm(x2, weight, True, xa if has_lora else None, lora_b.t() if has_lora else None, scale, bias, out_dtype,
              compute_dtype, triton_gemm, left_low=xa_low)
    return y.view(*x.shape[:-1], n_out), xa


_DYPASS_CHOICE: dict = {}  # (dy shape/strides, rank, dtype, low) -> "fused" | "separate"; env FXOPT_LORA_DYPASS


def _dy_products(dy2, lora_b, xa, scale, triton_gemm, m, need_dxa, need_db, low):
    """(dxa = s dy B, dxa rounded to `low` or None, dB = s dy^T xa): one pass over dy (lora_dy.py) or the two
    products apart, measured once per shape on CUDA; None for a product not asked for."""
    def separate():
        p = p_low = q = None
        if need_dxa:
            p = _mm(dy2, lora_b, triton_gemm, m, scale, low=low)
            p, p_low = p if low is not None else (p, None)
        if need_db:
            q = _mm(dy2.t(), xa.to(lora_b.dtype), triton_gemm, m, scale).to(lora_b.dtype)
        return p, p_low, q
    if need_db and need_dxa and lora_dy.applies(triton_gemm, dy2, lora_b, xa):
        return _run_choice("FXOPT_LORA_DYPASS", _DYPASS_CHOICE, (tuning_key(dy2, m), lora_b.shape[1], dy2.dtype, low),
                           {"fused": lambda: lora_dy.products(dy2, lora_b, xa, scale, low), "separate": separate},
                           default="fused", measure=dy2.device.type == "cuda")
    return separate()


def _backward(dy, x, weight, lora_a, lora_b, xa, scale, compute_dtype, need_dx, need_da, need_db, need_dbias,
              need_dw, triton_gemm: bool):
    x2, dy2 = _rows(x), _rows(dy)
    m = x2.shape[0]
    has_lora = lora_a is not None
    dx = da = db = dbias = dw = None   # the ones not computed become distinct empty tensors (outputs may not alias)
    dxa = dxa_low = None
    if has_lora:
        dxa, dxa_low, db = _dy_products(dy2, lora_b, xa, scale, triton_gemm, m, need_dx or need_da, need_db,
                                        compute_dtype if need_dx else None)
    if has_lora and need_da:
        da = _mm(x2.t(), dxa, triton_gemm, m, transpose=True).to(lora_a.dtype)
    if need_dx:
        dx = _gemm(dy2, weight, False, dxa, lora_a if has_lora else None, 1.0, None, x.dtype, compute_dtype,
                   triton_gemm, left_low=dxa_low).view(x.shape)
    if need_dbias:
        dbias = dy2.float().sum(0)
    if need_dw:   # dense base weight that requires grad (not LoRA's usual frozen base)
        dw = dy2.to(compute_dtype).t() @ x2.to(compute_dtype)
    return tuple(_empty(x) if t is None else t for t in (dx, da, db, dbias, dw))


def _run(what, fn, *tensors):
    if use_triton(*tensors):
        return run_kernel(what, lambda: fn(True), lambda: fn(False))
    return fn(False)


# ---- dense base: fxopt::lora ----

@torch.library.custom_op("fxopt::lora", mutates_args=())
def lora(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: Optional[torch.Tensor],
         lora_b: Optional[torch.Tensor], scale: float, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y, xa); xa = x A^T [M, r] (empty without an adapter) is saved for backward."""
    return _run("lora", lambda t: _forward(x, weight, bias, lora_a, lora_b, scale, weight.dtype, out_dtype, t),
                x, weight, lora_a, lora_b)


@lora.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, out_dtype):
    m = x.numel() // x.shape[-1]
    xa = x.new_empty((m, lora_a.shape[0]), dtype=lora_a.dtype) if lora_a is not None else x.new_empty(0)
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=out_dtype), xa


@torch.library.custom_op("fxopt::lora_backward", mutates_args=())
def lora_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: Optional[torch.Tensor],
                  lora_b: Optional[torch.Tensor], xa: torch.Tensor, scale: float, need_dx: bool, need_da: bool,
                  need_db: bool, need_dbias: bool, need_dw: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                          torch.Tensor, torch.Tensor]:
    """Returns (dx, dA, dB, dbias (fp32), dW); a gradient not asked for is an empty tensor."""
    return _run("lora_backward", lambda t: _backward(dy, x, weight, lora_a, lora_b, xa, scale, weight.dtype, need_dx,
                                                     need_da, need_db, need_dbias, need_dw, t),
                dy, x, weight, lora_a, lora_b)


def _fake_grads(x, lora_a, lora_b, need_dx, need_da, need_db, dbias_n, dw_shape, dw_dtype):
    e = x.new_empty(0)
    return (x.new_empty(x.shape) if need_dx else e,
            lora_a.new_empty(lora_a.shape) if need_da else e,
            lora_b.new_empty(lora_b.shape) if need_db else e,
            x.new_empty((dbias_n,), dtype=torch.float32) if dbias_n else e,
            x.new_empty(dw_shape, dtype=dw_dtype) if dw_shape else e)


@lora_backward.register_fake
def _(dy, x, weight, lora_a, lora_b, xa, scale, need_dx, need_da, need_db, need_dbias, need_dw):
    return _fake_grads(x, lora_a, lora_b, need_dx, need_da and lora_a is not None, need_db and lora_b is not None,
                       weight.shape[0] if need_dbias else 0, tuple(weight.shape) if need_dw else None, weight.dtype)


def _setup_lora(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, out_dtype = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1])
    ctx.scale, ctx.has_bias = scale, bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward_lora(ctx, dy, _dxa):
    x, weight, lora_a, lora_b, xa = ctx.saved_tensors
    g = ctx.needs_input_grad
    has = lora_a is not None
    need = dict(need_dx=g[0], need_da=has and g[3], need_db=has and g[4], need_dbias=ctx.has_bias and g[2],
                need_dw=g[1])
    dx, da, db, dbias, dw = torch.ops.fxopt.lora_backward(dy, x, weight, lora_a, lora_b, xa, ctx.scale, **need)
    pick = lambda t, flag, dt=None: (t.to(dt) if dt is not None else t) if flag else None
    return (pick(dx, need["need_dx"]), pick(dw, need["need_dw"]), pick(dbias, need["need_dbias"], ctx.bias_dtype),
            pick(da, need["need_da"]), pick(db, need["need_db"]), None, None)


lora.register_autograd(_backward_lora, setup_context=_setup_lora)


# ---- NF4 base: fxopt::lora_nf4 ----

def _nf4(packed, absmax, absmax2, code2, offset, blocksize, blocksize2, out_features, in_features):
    return NF4Weight(packed, absmax, absmax2, code2, offset, blocksize, blocksize2, out_features, in_features)


@torch.library.custom_op("fxopt::lora_nf4", mutates_args=())
def lora_nf4(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, absmax2: Optional[torch.Tensor],
             code2: Optional[torch.Tensor], offset: Optional[torch.Tensor], bias: Optional[torch.Tensor],
             lora_a: Optional[torch.Tensor], lora_b: Optional[torch.Tensor], scale: float, blocksize: int,
             blocksize2: int, out_features: int, in_features: int, compute_dtype: torch.dtype,
             out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x W^T + bias (+ s (x A^T) B^T) with W bitsandbytes NF4 [out_features, in_features]; absmax2/code2/offset
    given with double quantization. Returns (y, xa); without an adapter xa is empty (a frozen NF4 linear)."""
    w = _nf4(packed, absmax, absmax2, code2, offset, blocksize, blocksize2, out_features, in_features)
    return _run("lora_nf4", lambda t: _forward(x, w, bias, lora_a, lora_b, scale, compute_dtype, out_dtype, t),
                x, packed, lora_a, lora_b)


@lora_nf4.register_fake
def _(x, packed, absmax, absmax2, code2, offset, bias, lora_a, lora_b, scale, blocksize, blocksize2, out_features,
      in_features, compute_dtype, out_dtype):
    m = x.numel() // x.shape[-1]
    xa = x.new_empty((m, lora_a.shape[0]), dtype=lora_a.dtype) if lora_a is not None else x.new_empty(0)
    return x.new_empty((*x.shape[:-1], out_features), dtype=out_dtype), xa


@torch.library.custom_op("fxopt::lora_nf4_backward", mutates_args=())
def lora_nf4_backward(dy: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor,
                      absmax2: Optional[torch.Tensor], code2: Optional[torch.Tensor], offset: Optional[torch.Tensor],
                      lora_a: Optional[torch.Tensor], lora_b: Optional[torch.Tensor], xa: torch.Tensor, scale: float,
                      blocksize: int, blocksize2: int, out_features: int, in_features: int,
                      compute_dtype: torch.dtype, need_dx: bool, need_da: bool, need_db: bool,
                      need_dbias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, dA, dB, dbias (fp32)); a gradient not asked for is an empty tensor."""
    w = _nf4(packed, absmax, absmax2, code2, offset, blocksize, blocksize2, out_features, in_features)
    return _run("lora_nf4_backward",
                lambda t: _backward(dy, x, w, lora_a, lora_b, xa, scale, compute_dtype, need_dx, need_da, need_db,
                                    need_dbias, False, t)[:4], dy, x, packed, lora_a, lora_b)


@lora_nf4_backward.register_fake
def _(dy, x, packed, absmax, absmax2, code2, offset, lora_a, lora_b, xa, scale, blocksize, blocksize2, out_features,
      in_features, compute_dtype, need_dx, need_da, need_db, need_dbias):
    return _fake_grads(x, lora_a, lora_b, need_dx, need_da and lora_a is not None, need_db and lora_b is not None,
                       out_features if need_dbias else 0, None, None)[:4]


_NF4_STATE = ("blocksize", "blocksize2", "out_features", "in_features", "compute_dtype")


def _setup_lora_nf4(ctx, inputs, output):
    (x, packed, absmax, absmax2, code2, offset, bias, lora_a, lora_b, scale, blocksize, blocksize2, out_features,
     in_features, compute_dtype, out_dtype) = inputs
    ctx.save_for_backward(x, packed, absmax, absmax2, code2, offset, lora_a, lora_b, output[1])
    ctx.scale, ctx.has_bias = scale, bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.state = (blocksize, blocksize2, out_features, in_features, compute_dtype)


def _backward_lora_nf4(ctx, dy, _dxa):
    x, packed, absmax, absmax2, code2, offset, lora_a, lora_b, xa = ctx.saved_tensors
    g = ctx.needs_input_grad
    has = lora_a is not None
    need = dict(need_dx=g[0], need_da=has and g[7], need_db=has and g[8], need_dbias=ctx.has_bias and g[6])
    dx, da, db, dbias = torch.ops.fxopt.lora_nf4_backward(dy, x, packed, absmax, absmax2, code2, offset, lora_a,
                                                          lora_b, xa, ctx.scale, *ctx.state, **need)
    pick = lambda t, flag: t if flag else None
    return (pick(dx, need["need_dx"]), None, None, None, None, None,
            dbias.to(ctx.bias_dtype) if need["need_dbias"] else None,
            pick(da, need["need_da"]), pick(db, need["need_db"])) + (None,) * 7


lora_nf4.register_autograd(_backward_lora_nf4, setup_context=_setup_lora_nf4)


@register_cost("lora")
def lora_cost(m, n, k, rank, dtype_bytes=2):
    """(flops, bytes) of the forward: read x, W, A, B; write y (+ xa)."""
    return 2 * m * n * k + 2 * m * rank * (n + k), (m * k + n * k + m * n + rank * (n + k) + m * rank) * dtype_bytes


def _nf4_scratch(m, out_features, in_features, compute_dtype, trans):
    """The chunked path's dequantization buffer (taken from NF4_CHUNKED_ROWS rows on): one chunk of W."""
    if m < NF4_CHUNKED_ROWS:
        return 0
    from fxopt.kernels.nf4_chunked import chunk_size
    itemsize = torch.empty((), dtype=compute_dtype).element_size()
    q, p = (in_features, out_features) if trans else (out_features, in_features)
    return chunk_size(q, p, itemsize) * q * itemsize


@register_workspace("lora_nf4")
def lora_nf4_workspace(m, out_features, in_features, compute_dtype):
    return _nf4_scratch(m, out_features, in_features, compute_dtype, trans=True)


@register_workspace("lora_backward")
def lora_backward_workspace(dy_shape, rank=0, dtype_bytes=2):
    return lora_dy.rank_scratch(math.prod(dy_shape[:-1]), dy_shape[-1], rank, dtype_bytes)


@register_workspace("lora_nf4_backward")
def lora_nf4_backward_workspace(m, out_features, in_features, compute_dtype, rank=0, dtype_bytes=2):
    """The larger of the dequantized chunk (with dxa alive beside it) and the dy products' partials."""
    return max(_nf4_scratch(m, out_features, in_features, compute_dtype, trans=False) + 6 * m * rank,
               lora_dy.rank_scratch(m, out_features, rank, dtype_bytes))


@register_cost("lora_nf4")
def lora_nf4_cost(m, n, k, rank, dtype_bytes=2, blocksize=64):
    """(flops, bytes) of the forward: W read at half a byte per element plus fp32 block scales."""
    act = (m * k + m * n + rank * (n + k) + m * rank) * dtype_bytes
    return 2 * m * n * k + 2 * m * rank * (n + k), act + n * k // 2 + 4 * (n * k // blocksize)
