"""The rank-r LoRA term written as a GEMM's C operand, in one pass over C:

  C[m, p] = round(bias[p] + s * sum_j L[m, j] R[j, p])       L [M, r], R [r, P] (any strides and float dtypes)

with fp32 accuracy in the rank-r product (tf32x3 dots: ~2^-20 relative on the GPU; IEEE in the interpreter) and one
rounding to C's dtype. nf4_chunked.chunked_matmul then adds X @ op(W_c) into C (cuBLAS, beta = 1).

It replaces torch.mm(L.to(c), (R * s).to(c), out=C) (+ a bias add): in the profiled 8B QLoRA step (H200, 0.7
budget, CUDA graphs; tag `cg-prof07`) that was 890 dtype-conversion kernels (1.4 ms) around the cuBLAS K=16 GEMMs
(~10 ms), and L, R rounded to bf16 before the product. A program writes one [BM, BN] tile of C; the bytes are C's
(L and R stay in L2). Two ways to form the tile: MODE 0, one tl.dot (tf32x3); MODE 1, r fp32 FMAs per element
(C's natural layout, no MMA). H200, 4096 rows, rank 16 (lora_term_sweep_h200.json): the dot at (64, 128, 4) matched
cuBLAS at 4096 columns (0.0154 vs 0.0157 ms), was faster at 1024 (0.0048 vs 0.0075) and slower at 14336 (0.0504 vs
0.0436); other dot tiles were up to 2.5x slower. The config is timed once per shape on CUDA (CONFIGS).
"""
from __future__ import annotations

from typing import Optional

import torch

from fxopt.kernels.registry import (bench_ms, capturing, interpreting, log_choice, next_pow2, register_cost,
                                    triton_available, tuning)
from fxopt.kernels.rounding import rounding_code

# (rows, columns, warps, MODE) per program on CUDA, timed once per shape; the first is the untimed default
CONFIGS = ((64, 128, 4, 0), (64, 128, 4, 1), (32, 256, 4, 1), (128, 128, 8, 1))
INTERPRET_CONFIG = (32, 32, 4, 0)
TUNED: dict = {}     # (rows bucket, P, rank, dtypes, bias) -> config
MAX_RANK = 128

if triton_available():
    import triton
    import triton.language as tl

    from fxopt.kernels.rounding import round_to

    @triton.jit
    def _lora_term_kernel(L, R, BIAS, C, M, P, RANK, scale, s_lm, s_lr, s_rr, s_rp, s_cm, s_cp,
                          HAS_BIAS: tl.constexpr, RND: tl.constexpr, IEEE: tl.constexpr, MODE: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, RB: tl.constexpr):
        m = tl.program_id(0) * BM + tl.arange(0, BM)
        p = tl.program_id(1) * BN + tl.arange(0, BN)
        m_ok, p_ok = m < M, p < P
        m64, p64 = m.to(tl.int64), p.to(tl.int64)
        if MODE == 0:
            j = tl.arange(0, RB)
            j_ok = j < RANK
            left = tl.load(L + m64[:, None] * s_lm + j[None, :] * s_lr, mask=m_ok[:, None] & j_ok[None, :],
                           other=0.0).to(tl.float32)
            right = tl.load(R + j[:, None] * s_rr + p64[None, :] * s_rp, mask=j_ok[:, None] & p_ok[None, :],
                            other=0.0).to(tl.float32)
            if IEEE:
                acc = tl.dot(left, right, input_precision="ieee")
            else:
                acc = tl.dot(left, right, input_precision="tf32x3")
        else:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for jj in range(0, RANK):
                lc = tl.load(L + m64 * s_lm + jj * s_lr, mask=m_ok, other=0.0).to(tl.float32)
                rr = tl.load(R + jj * s_rr + p64 * s_rp, mask=p_ok, other=0.0).to(tl.float32)
                acc += lc[:, None] * rr[None, :]
        acc = acc * scale
        if HAS_BIAS:
            acc += tl.load(BIAS + p64, mask=p_ok, other=0.0).to(tl.float32)[None, :]
        acc = round_to(acc, RND)
        tl.store(C + m64[:, None] * s_cm + p64[None, :] * s_cp, acc.to(C.dtype.element_ty),
                 mask=m_ok[:, None] & p_ok[None, :])


def lora_term_reference(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scale: float,
                        bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    acc = scale * (left.float() @ right.float())
    if bias is not None:
        acc = acc + bias.float()
    return out.copy_(acc)


def lora_term_ok(out: torch.Tensor, left: torch.Tensor) -> bool:
    """The kernel runs on CUDA and in the interpreter, for ranks up to MAX_RANK."""
    return triton_available() and (out.device.type == "cuda" or interpreting()) and 0 < left.shape[1] <= MAX_RANK


def lora_term(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scale: float,
              bias: Optional[torch.Tensor] = None, config: Optional[tuple] = None) -> torch.Tensor:
    """out [M, P] (a view: any strides) := bias + scale * left [M, r] @ right [r, P], rounded once to out's dtype.
    `config` forces one of CONFIGS (benchmarks, tests; the interpreter keeps its small tiles and takes the MODE)."""
    M, P = out.shape
    rank = left.shape[1]
    assert left.shape[0] == M and tuple(right.shape) == (rank, P), (tuple(left.shape), tuple(right.shape), (M, P))
    if M == 0 or P == 0:
        return out
    if not lora_term_ok(out, left):
        return lora_term_reference(out, left, right, scale, bias)
    interp = out.device.type != "cuda"

    def launch(cfg):
        bm, bn, warps, way = cfg
        _lora_term_kernel[(triton.cdiv(M, bm), triton.cdiv(P, bn))](
            left, right, bias if bias is not None else out, out, M, P, rank, float(scale), left.stride(0),
            left.stride(1), right.stride(0), right.stride(1), out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None, RND=rounding_code(out.dtype) if interp else 0, IEEE=interp, MODE=way,
            BM=bm, BN=bn, RB=max(16, next_pow2(rank)), num_warps=warps)
        return out

    if interp:
        return launch(INTERPRET_CONFIG if config is None else INTERPRET_CONFIG[:3] + config[3:])
    key = (next_pow2(M), P, rank, out.dtype, left.dtype, right.dtype, bias is not None)
    cfg = config or TUNED.get(key)
    if cfg is None:
        if capturing() or not tuning():   # no timing while a CUDA graph records; the choice comes on a later call
            return launch(CONFIGS[0])
        times = {c: bench_ms(lambda c=c: launch(c)) for c in CONFIGS}
        cfg = TUNED[key] = min(times, key=times.get)
        log_choice("lora_term", key, cfg, times)
    return launch(cfg)


@register_cost("lora_term")
def lora_term_cost(m, n, rank, dtype_bytes=2):
    """(flops, bytes): C written once; L and R read once (fp32)."""
    return 2 * m * n * rank, m * n * dtype_bytes + 4 * rank * (m + n)
