"""NF4 GEMM for many rows: dequantize the weight one bounded chunk at a time, cuBLAS on each chunk.

Why: the fused kernel (nf4.py) dequantizes every weight element once per BM-row tile, M / BM times per call, on the
CUDA cores next to the tensor-core loop. H200, 4096 tokens, 8B shapes, fwd+bwd: 5.9-21 ms, ~46 TFLOP/s, against
1.7-2.7 ms for bitsandbytes' dequantize + cuBLAS (benchmarks/results/kernels_lora_h200.json). Here each element is
dequantized once per call (N*K elements; at copy bandwidth ~0.1 ms for 4096 x 14336), the GEMM is cuBLAS, and the
dequantized weight exists only as one chunk of at most `chunk_bytes` (default 128 MiB: an 8B model's weights fit in
one, so there the whole dequantized weight does exist transiently, as in bitsandbytes) at a time, never saved for
backward. Which path runs is measured per shape (fxopt/kernels/lora.py, `_gemm`).

  C = X @ op(W) + scale * L @ R + bias            (op(W) = W^T forward, W for the input gradient; W [N, K])
  forward, chunk = rows n0:n1 of W:  C[:, n0:n1] = scale * L @ R[:, n0:n1] + bias[n0:n1];  C[:, n0:n1] += X @ W_c^T
  input gradient, chunk = columns k0:k1 of W:  C[:, k0:k1] = scale * L @ R[:, k0:k1];  C[:, k0:k1] += dY @ W_c
Each `+=` is cuBLAS with beta = 1 (C read once inside the GEMM). The rank-r term and bias are rounded to the compute
dtype before that add (peft rounds the base output instead; both stay within bf16 rounding of the fp32 result).
The rank-r term is a cuBLAS K=r GEMM. A Triton kernel writing it in one pass (fp32 L and R, no conversion kernels)
was tried on the H200 (2026-12-01, 670c1c0): at its best tile it matched cuBLAS in isolation at 4096 columns and
lost at 14336 (0.050 vs 0.044 ms), and in the 8B step it took 16.3 ms against ~8 ms for cuBLAS's K=16 GEMMs, so it
was removed (benchmarks/results/lora_term_sweep_h200*.json, train_step rows cg-loraterm-*).
W_c is bit-exact with bitsandbytes' dequantize_4bit (the same tile code as the fused kernel, rounded to nearest even).
"""
from __future__ import annotations

from typing import Optional

import torch

from fxopt.kernels.nf4 import NF4Weight, fused_matmul_reference, kernel_operands, nf4_code
from fxopt.kernels.launch import fast_launch
from fxopt.kernels.registry import register_cost, triton_available
from fxopt.kernels.rounding import rounding_code

# Chunk bound. 32 MiB cut 8B's 14336-wide weights into 4 chunks, and each chunk costs CPU time (a dequant launch, a
# rank-r GEMM, a GEMM; H200, 4096 tokens, 4096 -> 14336: 0.98 ms of CPU per forward call vs 0.23 ms for a bf16 base,
# benchmarks/results/kernels_lora_parts_h200.json) while the 8B QLoRA step waited on the CPU (GPU busy 249 of
# 462 ms). 128 MiB holds every 8B weight (<= 117 MB in bf16) in one chunk: one launch per call, at most 128 MiB
# transient (bitsandbytes' own path holds the whole dequantized weight too). Re-measured on the H200 (2026-12-01): the
# layer's fwd+bwd wall time without CUDA graphs went from 3.0-4.1 ms to 2.6-2.9 ms at the three 8B shapes.
CHUNK_BYTES = 128 * 2**20
_ALIGN = 256          # chunk boundaries: a multiple of every tile width and of bitsandbytes' block sizes <= 256
# (rows, columns, warps) per program of the dequantization kernel on CUDA; benchmarks/kernel_bench/nf4_dequant.py
# sweeps it. In the 8B QLoRA step profile it took 20.5 of 249 ms GPU time (~1.7 TB/s at (64, 128, 4)).
DEQUANT_CONFIG = (64, 128, 4)
# Whole-row chunks with 16-bit outputs take the flat kernel: (packed bytes per program, warps); None: never.
# H200, double-quantized NF4 -> bf16 (benchmarks/results/nf4_dequant_flat_h200.json): 4096 x 14336 in 0.044 ms
# (3.3 TB/s on minimal bytes, 79% of copy; writing the output alone with fill_ takes 0.038 ms) vs 0.076 ms for the
# tile kernel above and 0.076 for bitsandbytes' own; 4096 x 4096 0.017 vs 0.027 ms. Looking the code book up once
# per byte (a 256-entry table of fp32 pairs) or by a select tree instead of two gathers was 1.1-3x slower.
FLAT_CONFIG = (2048, 8)

if triton_available():
    import triton
    import triton.language as tl

    from fxopt.kernels.nf4 import _block_scale, _nf4_tile
    from fxopt.kernels.rounding import round_to

    @triton.jit
    def _dequant_kernel(WQ, ABS, ABS2, CODE2, OFF, CODE, D, r0, c0, R, C, N, K, s_dr,
                        BS: tl.constexpr, BS2: tl.constexpr, NESTED: tl.constexpr, FAST: tl.constexpr,
                        RND: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """D[i, j] = W[r0 + i, c0 + j] for i < R, j < C (c0 a multiple of BK when FAST)."""
        i = tl.program_id(0) * BN + tl.arange(0, BN)
        j0 = tl.program_id(1) * BK
        v = _nf4_tile(WQ, ABS, ABS2, CODE2, OFF, CODE, r0 + i, c0 + j0, N, K, BS, BS2, NESTED, FAST, BN, BK)
        j = j0 + tl.arange(0, BK)
        v = round_to(v, RND)
        tl.store(D + i.to(tl.int64)[:, None] * s_dr + j[None, :], v.to(D.dtype.element_ty),
                 mask=(i < R)[:, None] & (j < C)[None, :])

    @triton.jit
    def _bits16(v, DT: tl.constexpr, RND: tl.constexpr):
        """uint32 holding the 16-bit pattern of fp32 v rounded to fp16 (DT 1) / bf16 (DT 2), nearest even."""
        if DT == 1:
            return v.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
        if RND != 0:
            return round_to(v, RND).to(tl.uint32, bitcast=True) >> 16
        return v.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)

    @triton.jit
    def _dequant_flat_kernel(WQ, ABS, ABS2, CODE2, OFF, CODE, D32, b0, nbytes,
                             BS: tl.constexpr, BS2: tl.constexpr, NESTED: tl.constexpr, DT: tl.constexpr,
                             RND: tl.constexpr, BLOCK: tl.constexpr):
        """Packed bytes b0 + [0, nbytes) of a weight whose flat element count is even, to 16-bit outputs: one
        int32 word per byte, W[2f] in its low half and W[2f + 1] in its high half (little-endian pairs), so loads
        and stores are contiguous and no interleave is needed. b0 and BLOCK are multiples of BS // 2 bytes."""
        HB: tl.constexpr = BS // 2
        G: tl.constexpr = BLOCK // HB
        start = tl.program_id(0).to(tl.int64) * BLOCK
        i = start + tl.arange(0, BLOCK)
        ok = i < nbytes
        b = tl.load(WQ + b0 + i, mask=ok, other=0).to(tl.int32)
        ev = tl.load(CODE + (b >> 4))
        od = tl.load(CODE + (b & 15))
        blk = (b0 + start) // HB + tl.arange(0, G)
        scale = _block_scale(ABS, ABS2, CODE2, OFF, blk, blk < (b0 + nbytes + HB - 1) // HB, NESTED, BS2)
        ev = tl.reshape(tl.reshape(ev, (G, HB)) * scale[:, None], (BLOCK,))
        od = tl.reshape(tl.reshape(od, (G, HB)) * scale[:, None], (BLOCK,))
        word = _bits16(ev, DT, RND) | (_bits16(od, DT, RND) << 16)
        tl.store(D32 + i, word.to(tl.int32, bitcast=True), mask=ok)


def _flat_ok(w: NF4Weight, r0: int, r1: int, c0: int, c1: int, dtype, d: torch.Tensor) -> bool:
    """Whole rows of a 16-bit output, an even element count, chunk start on a block boundary."""
    return (FLAT_CONFIG is not None and dtype in (torch.float16, torch.bfloat16) and c0 == 0 and c1 == w.k
            and d.is_contiguous() and (r0 * w.k) % w.blocksize == 0 and ((r1 - r0) * w.k) % 2 == 0
            and d.data_ptr() % 4 == 0)


def _dequantize_flat(w: NF4Weight, r0: int, r1: int, dtype, d: torch.Tensor) -> torch.Tensor:
    wq, absm, abs2, code2, off = kernel_operands(w)
    dev = d.device
    block, warps = FLAT_CONFIG if dev.type == "cuda" else (256, 4)
    block = max(block, w.blocksize // 2)
    nbytes = (r1 - r0) * w.k // 2
    fast_launch(_dequant_flat_kernel, (triton.cdiv(nbytes, block),), wq, absm, abs2, code2, off, nf4_code(dev),
                d.view(-1).view(torch.int32), r0 * w.k // 2, nbytes, BS=w.blocksize, BS2=w.blocksize2, NESTED=w.nested,
                DT=1 if dtype == torch.float16 else 2, RND=rounding_code(dtype) if dev.type != "cuda" else 0,
                BLOCK=block, num_warps=warps)
    return d


def dequantize_chunk(w: NF4Weight, r0: int, r1: int, c0: int, c1: int, dtype: torch.dtype,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W[r0:r1, c0:c1] in `dtype` (Triton; bit-exact with the reference). c0 % 256 == 0 unless K % blocksize != 0."""
    R, C = r1 - r0, c1 - c0
    dev = w.packed.device
    d = out if out is not None else torch.empty((R, C), dtype=dtype, device=dev)
    if R == 0 or C == 0:
        return d
    if _flat_ok(w, r0, r1, c0, c1, dtype, d):
        return _dequantize_flat(w, r0, r1, dtype, d)
    wq, absm, abs2, code2, off = kernel_operands(w)
    fast = w.k % w.blocksize == 0 and c0 % _ALIGN == 0
    interp = dev.type != "cuda"
    bn, bk, warps = (32, 64, 4) if interp else DEQUANT_CONFIG
    if fast and bk > w.blocksize and bk % w.blocksize:
        bk = w.blocksize
    grid = (triton.cdiv(R, bn), triton.cdiv(C, bk))
    fast_launch(_dequant_kernel, grid, wq, absm, abs2, code2, off, nf4_code(dev), d, r0, c0, R, C, w.n, w.k,
                d.stride(0), BS=w.blocksize, BS2=w.blocksize2, NESTED=w.nested, FAST=fast,
                RND=rounding_code(dtype) if interp else 0, BN=bn, BK=bk, num_warps=warps)
    return d


def as_dtype(t: torch.Tensor, rounded: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`: `rounded` when it is that copy already (the skinny product's sum kernel writes one), else a
    conversion."""
    return rounded if rounded is not None and rounded.dtype == dtype else t.to(dtype)


def chunk_size(other: int, total: int, dtype_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows (or columns) per chunk: the largest multiple of 256 with chunk * other * dtype_bytes <= chunk_bytes
    (at least 256), capped at total."""
    n = max(_ALIGN, chunk_bytes // max(1, other * dtype_bytes) // _ALIGN * _ALIGN)
    return min(total, n)


def chunked_matmul(x2: torch.Tensor, weight: NF4Weight, trans: bool, lora_left: Optional[torch.Tensor] = None,
                   lora_right: Optional[torch.Tensor] = None, scale: float = 1.0, bias: Optional[torch.Tensor] = None,
                   out_dtype: Optional[torch.dtype] = None, compute_dtype: Optional[torch.dtype] = None,
                   chunk_bytes: int = CHUNK_BYTES, lora_left_low: Optional[torch.Tensor] = None,
                   acc: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Same contract as nf4.fused_matmul (NF4 weight only): x2 [M, Q], lora_left [M, r], lora_right [r, P];
    lora_left_low: lora_left already in the compute dtype (saves a conversion). acc: an [M, P] compute-dtype tensor
    the product is added to in place (cuBLAS beta = 1) and returned; no LoRA term or bias with it."""
    cdt = compute_dtype or x2.dtype
    M, Q = x2.shape
    P = weight.n if trans else weight.k
    assert Q == (weight.k if trans else weight.n), f"inner dims {Q} vs weight {weight.n}x{weight.k} (trans={trans})"
    odt = out_dtype or x2.dtype
    if acc is not None:
        assert lora_left is None and bias is None and acc.shape == (M, P) and acc.dtype == cdt, "acc: product only"
    if M == 0 or P == 0 or Q == 0:
        ref = fused_matmul_reference(x2, weight, trans, lora_left, lora_right, scale, bias, odt, cdt)
        return ref if acc is None else acc.add_(ref)
    xc = x2.to(cdt)
    out = torch.empty((M, P), dtype=cdt, device=x2.device) if acc is None else acc
    has_lora = lora_left is not None and lora_left.shape[1] > 0
    left = as_dtype(lora_left, lora_left_low, cdt) if has_lora else None
    step = chunk_size(Q, P, out.element_size(), chunk_bytes)
    scratch = torch.empty((step, Q) if trans else (Q, step), dtype=cdt, device=x2.device)
    whole = step >= P   # one chunk (every 8B weight): no slices (each is a torch call of host time)
    for p0 in range(0, P, step):
        p1 = min(P, p0 + step)
        cols = (lambda t: t) if whole else (lambda t: t[..., p0:p1])
        oc = cols(out)
        if has_lora:   # beta 0: oc's uninitialized values are not read; the scale is cuBLAS's alpha (no multiply)
            oc.addmm_(left, cols(lora_right).to(cdt), beta=0, alpha=scale)
            if bias is not None:
                oc.add_(cols(bias).to(cdt))
        elif bias is not None:
            oc.copy_(cols(bias).to(cdt).expand_as(oc))
        if trans:
            wc = dequantize_chunk(weight, p0, p1, 0, Q, cdt, out=scratch if whole else scratch[: p1 - p0])
            wc = wc.t()
        else:
            wc = dequantize_chunk(weight, 0, Q, p0, p1, cdt, out=scratch if whole else scratch[:, : p1 - p0])
        if has_lora or bias is not None or acc is not None:
            oc.addmm_(xc, wc)
        else:
            torch.mm(xc, wc, out=oc)
    return out if odt == cdt or acc is not None else out.to(odt)


@register_cost("nf4_chunked_matmul")
def nf4_chunked_matmul_cost(m, n, k, rank=0, dtype_bytes=2, blocksize=64):
    """(flops, bytes): the GEMM plus one dequantization pass (0.5 B read, dtype_bytes written and read per element)."""
    flops = 2 * m * n * k + 2 * m * rank * (n + k)
    return flops, (m * k + 2 * m * n) * dtype_bytes + n * k // 2 + 2 * n * k * dtype_bytes + 4 * (n * k // blocksize)
