"""The rank-r LoRA term written as a GEMM's C operand, in one pass over C:

  C[m, p] = round(bias[p] + s * sum_j L[m, j] R[j, p])       L [M, r], R [r, P] (any strides and float dtypes)

with fp32 accuracy in the rank-r product (tf32x3 dots: ~2^-20 relative on the GPU; IEEE in the interpreter) and one
rounding to C's dtype. nf4_chunked.chunked_matmul then adds X @ op(W_c) into C (cuBLAS, beta = 1).

Why not torch.mm(L.to(c), R.to(c), out=C): in the profiled 8B QLoRA step (H200, 0.7 budget, CUDA graphs; tag
`cg-prof07`) that was two dtype-conversion kernels per call (890 bf16 copies, 1.4 ms), a cuBLAS K=16 GEMM whose
nvjet 256x128 tiles wrote C at ~1 TB/s (350 calls, ~10 ms) and, with a bias, an add. Here a program writes one
[BM, BN] tile of C: the bytes are C's (plus L and R, which stay in L2).
"""
from __future__ import annotations

from typing import Optional

import torch

from fxopt.kernels.registry import interpreting, next_pow2, register_cost, triton_available
from fxopt.kernels.rounding import rounding_code

# (rows, columns, warps) per program on CUDA; (32, 32, 4) in the interpreter
CONFIG = (64, 256, 8)
MAX_RANK = 128

if triton_available():
    import triton
    import triton.language as tl

    from fxopt.kernels.rounding import round_to

    @triton.jit
    def _lora_term_kernel(L, R, BIAS, C, M, P, RANK, scale, s_lm, s_lr, s_rr, s_rp, s_cm, s_cp,
                          HAS_BIAS: tl.constexpr, RND: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr,
                          BN: tl.constexpr, RB: tl.constexpr):
        m = tl.program_id(0) * BM + tl.arange(0, BM)
        p = tl.program_id(1) * BN + tl.arange(0, BN)
        j = tl.arange(0, RB)
        m_ok, p_ok, j_ok = m < M, p < P, j < RANK
        m64, p64 = m.to(tl.int64), p.to(tl.int64)
        left = tl.load(L + m64[:, None] * s_lm + j[None, :] * s_lr, mask=m_ok[:, None] & j_ok[None, :], other=0.0)
        right = tl.load(R + j[:, None] * s_rr + p64[None, :] * s_rp, mask=j_ok[:, None] & p_ok[None, :], other=0.0)
        left, right = left.to(tl.float32), right.to(tl.float32)
        if IEEE:
            acc = tl.dot(left, right, input_precision="ieee")
        else:
            acc = tl.dot(left, right, input_precision="tf32x3")
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
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out [M, P] (a view: any strides) := bias + scale * left [M, r] @ right [r, P], rounded once to out's dtype."""
    M, P = out.shape
    rank = left.shape[1]
    assert left.shape[0] == M and tuple(right.shape) == (rank, P), (tuple(left.shape), tuple(right.shape), (M, P))
    if M == 0 or P == 0:
        return out
    if not lora_term_ok(out, left):
        return lora_term_reference(out, left, right, scale, bias)
    interp = out.device.type != "cuda"
    bm, bn, warps = (32, 32, 4) if interp else CONFIG
    grid = (triton.cdiv(M, bm), triton.cdiv(P, bn))
    _lora_term_kernel[grid](left, right, bias if bias is not None else out, out, M, P, rank, float(scale),
                            left.stride(0), left.stride(1), right.stride(0), right.stride(1), out.stride(0),
                            out.stride(1), HAS_BIAS=bias is not None,
                            RND=rounding_code(out.dtype) if interp else 0, IEEE=interp, BM=bm, BN=bn,
                            RB=max(16, next_pow2(rank)), num_warps=warps)
    return out


@register_cost("lora_term")
def lora_term_cost(m, n, rank, dtype_bytes=2):
    """(flops, bytes): C written once; L and R read once (fp32)."""
    return 2 * m * n * rank, m * n * dtype_bytes + 4 * rank * (m + n)
