"""NF4 (bitsandbytes 4-bit NormalFloat) weights: bit-exact reference dequantization and a Triton GEMM that dequantizes
the weight inside its operand load, with an optional rank-r epilogue (LoRA) and bias.

Storage (bitsandbytes `quantize_4bit(..., quant_type="nf4")`, weight W [N, K] row-major, flat index f = n*K + k):
  packed  uint8 [ceil(N*K/2)] (any shape): byte f // 2, high nibble for even f, low nibble for odd f
  absmax  fp32 [ceil(N*K/bs)]: one scale per block of `bs` consecutive flat elements
  W[f] = round_dtype( NF4[nibble(f)] * absmax[f // bs] )            (product in fp32, one rounding to dtype)
Double quantization (`compress_statistics=True`): absmax itself is stored as uint8 codes q with its own fp32 scales
absmax2 [ceil(n_blocks/bs2)] (bs2 = 256), the 256-entry signed dynamic code-book code2 and a scalar fp32 offset:
  absmax[i] = code2[q[i]] * absmax2[i // bs2] + offset              (fp32 multiply, then fp32 add)
Measured on CPU (bitsandbytes 0.50.2): this reference equals `torch.ops.bitsandbytes.dequantize_4bit` bit for bit
(torch.equal) for fp32/fp16/bf16 outputs whenever K % bs == 0 or K is odd; bnb's CPU C kernel indexes absmax per row
(wrong) when K % bs != 0 with K even — there the reference follows the flat layout of its quantizer and its default
(PyTorch) kernel.

GEMM (`fused_matmul`): C[M, P] = X[M, Q] @ op(W) + scale * Lf[M, r] @ Rt[r, P] + bias[P],
  op(W) = W^T (forward: y = x W^T, Q = K, P = N) or W (input gradient: dx = dy W, Q = N, P = K).
The NF4 tile is built in registers from packed bytes (two nibbles per byte, interleaved), a 16-entry code-book
gather and the block scale, rounded to the compute dtype (exactly bnb's dequantized value), and fed to tl.dot with
fp32 accumulation: the dequantized weight never exists in memory. The rank-r term is a second tl.dot in the
epilogue, so the LoRA output costs no extra pass over C.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple, Optional

import torch

from fxopt.kernels.launch import fast_launch
from fxopt.kernels.registry import (bench_ms, capturing, log_choice, next_pow2, register_cost, triton_available,
                                    tuning)

# NF4 code-book (QLoRA paper; bitsandbytes get_4bit_type("nf4")), fp32, index = 4-bit code.
NF4_VALUES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)

_DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@functools.lru_cache(None)
def _nf4_code_cached(device: str) -> torch.Tensor:
    return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)


def nf4_code(device) -> torch.Tensor:
    return _nf4_code_cached(str(torch.device(device)))


class NF4Weight(NamedTuple):
    """A bitsandbytes NF4 weight of logical shape [n, k] (absmax2/code2/offset set only with double quantization)."""
    packed: torch.Tensor
    absmax: torch.Tensor
    absmax2: Optional[torch.Tensor]
    code2: Optional[torch.Tensor]
    offset: Optional[torch.Tensor]
    blocksize: int
    blocksize2: int
    n: int
    k: int

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None


# ---- PyTorch reference ----

def dequantize_absmax_reference(qabsmax, absmax2, code2, offset, blocksize2=256):
    """fp32 block scales from double-quantized ones: code2[q] * absmax2[i // bs2] + offset."""
    idx = torch.arange(qabsmax.numel(), device=qabsmax.device) // blocksize2
    a = code2.float()[qabsmax.reshape(-1).long()] * absmax2.float().reshape(-1)[idx]
    return a + offset.float()


def nf4_dequantize_reference(w: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """W [n, k] in `dtype`, bit-exact with bitsandbytes' dequantize_4bit (see the module docstring)."""
    n = w.n * w.k
    p = w.packed.reshape(-1)
    if p.dtype != torch.uint8:
        p = p.view(torch.uint8)
    nib = torch.stack([p >> 4, p & 15], -1).reshape(-1)[:n].long()
    absmax = dequantize_absmax_reference(w.absmax, w.absmax2, w.code2, w.offset, w.blocksize2) if w.nested \
        else w.absmax.float().reshape(-1)
    blk = torch.arange(n, device=p.device) // w.blocksize
    return (nf4_code(p.device)[nib] * absmax[blk]).to(dtype).reshape(w.n, w.k)


def fused_matmul_reference(x2, weight, trans, lora_left=None, lora_right=None, scale=1.0, bias=None,
                           out_dtype=None, compute_dtype=None):
    """The math of `fused_matmul` in PyTorch (fp32 accumulation of compute-dtype operands)."""
    cdt = compute_dtype or x2.dtype
    w = nf4_dequantize_reference(weight, cdt) if isinstance(weight, NF4Weight) else weight.to(cdt)
    w = w.t() if trans else w
    acc = (x2.to(cdt).float() @ w.float())
    if lora_left is not None:
        ldt = lora_right.dtype
        acc = acc + scale * (lora_left.to(ldt).float() @ lora_right.float())
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype or x2.dtype)


# ---- Triton ----

if triton_available():
    import triton
    import triton.language as tl

    from fxopt.kernels.rounding import mul_rn

    @triton.jit
    def _rne_bf16(v):
        """fp32 -> fp32 value of the nearest-even bf16 (the interpreter's fp32->bf16 cast truncates; GPUs round)."""
        b = v.to(tl.int32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        return (b & -65536).to(tl.float32, bitcast=True)

    @triton.jit
    def _as_dot(v, DT: tl.constexpr, F32DOT: tl.constexpr):
        """Operand for tl.dot: rounded to the compute dtype DT (0 fp32, 1 fp16, 2 bf16); kept in fp32 when F32DOT
        (fp32 math, or the interpreter, where bf16 arithmetic is wrong)."""
        if F32DOT:
            v = v.to(tl.float32)
            if DT == 1:
                v = v.to(tl.float16).to(tl.float32)
            elif DT == 2:
                v = _rne_bf16(v)
        elif DT == 1:
            v = v.to(tl.float16)
        elif DT == 2:
            v = v.to(tl.bfloat16)
        return v

    @triton.jit
    def _dot(a, b, acc, F32DOT: tl.constexpr):
        if F32DOT:
            return tl.dot(a, b, acc, input_precision="ieee")
        return tl.dot(a, b, acc)

    @triton.jit
    def _block_scale(ABS, ABS2, CODE2, OFF, idx, mask, NESTED: tl.constexpr, BS2: tl.constexpr):
        # bitsandbytes rounds code2[q] * absmax2, then adds the offset (two roundings); a fused multiply-add rounds
        # once and differs in the last bit (H200: fp32 outputs of test_nf4_chunked.py, 2 of 12 nested cases)
        if NESTED:
            q = tl.load(ABS + idx, mask=mask, other=0).to(tl.int32)
            a = mul_rn(tl.load(CODE2 + q, mask=mask, other=0.0).to(tl.float32),
                        tl.load(ABS2 + idx // BS2, mask=mask, other=0.0).to(tl.float32))
            a = a + tl.load(OFF).to(tl.float32)
        else:
            a = tl.load(ABS + idx, mask=mask, other=0.0).to(tl.float32)
        return a

    @triton.jit
    def _nf4_tile(WQ, ABS, ABS2, CODE2, OFF, CODE, n, k0, N, K,
                  BS: tl.constexpr, BS2: tl.constexpr, NESTED: tl.constexpr, FAST: tl.constexpr,
                  BN: tl.constexpr, BK: tl.constexpr):
        """fp32 W[n, k0:k0+BK] for row indices n [BN]; zero outside [N, K]. FAST: K % BS == 0 (rows are whole
        bytes and whole blocks; k0 is a multiple of BK, both powers of two, so a tile spans whole blocks or sits in
        one)."""
        n_ok = n < N
        n64 = n.to(tl.int64)
        kk = k0 + tl.arange(0, BK)
        mask = n_ok[:, None] & (kk < K)[None, :]
        if FAST:
            hk = k0 // 2 + tl.arange(0, BK // 2)
            b = tl.load(WQ + n64[:, None] * (K // 2) + hk[None, :], mask=n_ok[:, None] & (hk < K // 2)[None, :],
                        other=0)
            nib = tl.interleave((b >> 4).to(tl.int32), (b & 15).to(tl.int32))   # even k = high nibble
            v = tl.load(CODE + nib)
            if BK <= BS:
                scale = _block_scale(ABS, ABS2, CODE2, OFF, n64 * (K // BS) + k0 // BS, n_ok, NESTED, BS2)
                v = v * scale[:, None]
            else:
                G: tl.constexpr = BK // BS
                g = tl.arange(0, G)
                bidx = n64[:, None] * (K // BS) + (k0 // BS + g)[None, :]
                scale = _block_scale(ABS, ABS2, CODE2, OFF, bidx, n_ok[:, None] & (k0 + g * BS < K)[None, :],
                                     NESTED, BS2)
                v = tl.reshape(tl.reshape(v, (BN, G, BS)) * scale[:, :, None], (BN, BK))
        else:
            f = n64[:, None] * K + kk[None, :]
            b = tl.load(WQ + f // 2, mask=mask, other=0).to(tl.int32)
            nib = tl.where(f % 2 == 0, b >> 4, b & 15)
            v = tl.load(CODE + nib) * _block_scale(ABS, ABS2, CODE2, OFF, f // BS, mask, NESTED, BS2)
        return tl.where(mask, v, 0.0)

    @triton.jit
    def _w_tile(WD, WQ, ABS, ABS2, CODE2, OFF, CODE, p, q, p0, q0, p_ok, q_ok, NW, KW, s_wn, s_wk,
                NF4: tl.constexpr, TRANS: tl.constexpr, NESTED: tl.constexpr, FAST: tl.constexpr,
                BS: tl.constexpr, BS2: tl.constexpr, DT: tl.constexpr, F32DOT: tl.constexpr,
                BP: tl.constexpr, BQ: tl.constexpr):
        """op(W)^T tile [BP, BQ] in the dot dtype: W[p, q] (TRANS, forward) or W[q, p]^T (input gradient)."""
        if TRANS:
            if NF4:
                w = _nf4_tile(WQ, ABS, ABS2, CODE2, OFF, CODE, p, q0, NW, KW, BS, BS2, NESTED, FAST, BP, BQ)
            else:
                w = tl.load(WD + p.to(tl.int64)[:, None] * s_wn + q[None, :] * s_wk,
                            mask=p_ok[:, None] & q_ok[None, :], other=0.0)
        else:
            if NF4:
                w = tl.trans(_nf4_tile(WQ, ABS, ABS2, CODE2, OFF, CODE, q, p0, NW, KW, BS, BS2, NESTED, FAST, BQ, BP))
            else:
                w = tl.load(WD + q.to(tl.int64)[None, :] * s_wn + p[:, None] * s_wk,
                            mask=p_ok[:, None] & q_ok[None, :], other=0.0)
        return _as_dot(w, DT, F32DOT)

    @triton.jit
    def _w_tile_qp(WD, WQ, ABS, ABS2, CODE2, OFF, CODE, p, q, p0, q0, p_ok, q_ok, NW, KW, s_wn, s_wk,
                   NF4: tl.constexpr, TRANS: tl.constexpr, NESTED: tl.constexpr, FAST: tl.constexpr,
                   BS: tl.constexpr, BS2: tl.constexpr, DT: tl.constexpr, F32DOT: tl.constexpr,
                   BP: tl.constexpr, BQ: tl.constexpr):
        """op(W) tile [BQ, BP] (the right operand of X @ op(W))."""
        if TRANS:
            return tl.trans(_w_tile(WD, WQ, ABS, ABS2, CODE2, OFF, CODE, p, q, p0, q0, p_ok, q_ok, NW, KW, s_wn,
                                    s_wk, NF4, TRANS, NESTED, FAST, BS, BS2, DT, F32DOT, BP, BQ))
        if NF4:
            w = _nf4_tile(WQ, ABS, ABS2, CODE2, OFF, CODE, q, p0, NW, KW, BS, BS2, NESTED, FAST, BQ, BP)
        else:
            w = tl.load(WD + q.to(tl.int64)[:, None] * s_wn + p[None, :] * s_wk,
                        mask=q_ok[:, None] & p_ok[None, :], other=0.0)
        return _as_dot(w, DT, F32DOT)

    @triton.jit
    def _fused_matmul_kernel(
            X, WD, WQ, ABS, ABS2, CODE2, OFF, CODE, LF, RT, BIAS, C,
            M, P, Q, NW, KW, RANK,
            s_xm, s_xq, s_wn, s_wk, s_lm, s_lr, s_rr, s_rp, s_cm, s_cp,
            scale,
            NF4: tl.constexpr, TRANS: tl.constexpr, NESTED: tl.constexpr, FAST: tl.constexpr,
            BS: tl.constexpr, BS2: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr,
            DT: tl.constexpr, LDT: tl.constexpr, F32DOT: tl.constexpr, LF32DOT: tl.constexpr, INTERP: tl.constexpr,
            SWAP: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr, RB: tl.constexpr,
            GROUP_M: tl.constexpr):
        """SWAP computes C^T = op(W)^T X^T: the dequantized tile is the left operand (Hopper wgmma can read the left
        operand from registers, so the tile need not go through shared memory)."""
        # grouped program order: GROUP_M row tiles share each weight tile while it is in L2
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BM)
        num_p = tl.cdiv(P, BP)
        per_group = GROUP_M * num_p
        first_m = (pid // per_group) * GROUP_M
        gsz = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % gsz
        pid_p = (pid % per_group) // gsz
        m = pid_m * BM + tl.arange(0, BM)
        p = pid_p * BP + tl.arange(0, BP)
        m_ok = m < M
        p_ok = p < P
        m64 = m.to(tl.int64)
        if SWAP:
            acc = tl.zeros((BP, BM), dtype=tl.float32)
        else:
            acc = tl.zeros((BM, BP), dtype=tl.float32)
        for q0 in range(0, Q, BQ):
            q = q0 + tl.arange(0, BQ)
            q_ok = q < Q
            if SWAP:
                xt = tl.load(X + m64[None, :] * s_xm + q[:, None] * s_xq, mask=q_ok[:, None] & m_ok[None, :],
                             other=0.0)
                w = _w_tile(WD, WQ, ABS, ABS2, CODE2, OFF, CODE, p, q, pid_p * BP, q0, p_ok, q_ok, NW, KW, s_wn,
                            s_wk, NF4, TRANS, NESTED, FAST, BS, BS2, DT, F32DOT, BP, BQ)
                acc = _dot(w, _as_dot(xt, DT, F32DOT), acc, F32DOT)
            else:
                xt = tl.load(X + m64[:, None] * s_xm + q[None, :] * s_xq, mask=m_ok[:, None] & q_ok[None, :],
                             other=0.0)
                w = _w_tile_qp(WD, WQ, ABS, ABS2, CODE2, OFF, CODE, p, q, pid_p * BP, q0, p_ok, q_ok, NW, KW, s_wn,
                               s_wk, NF4, TRANS, NESTED, FAST, BS, BS2, DT, F32DOT, BP, BQ)
                acc = _dot(_as_dot(xt, DT, F32DOT), w, acc, F32DOT)
        r = tl.arange(0, RB)
        r_ok = r < RANK
        if SWAP:
            if HAS_LORA:   # + scale * (Lf[m, :r] @ Rt[:r, p])^T
                rt = tl.load(RT + r[None, :] * s_rr + p[:, None] * s_rp, mask=p_ok[:, None] & r_ok[None, :], other=0.0)
                lf = tl.load(LF + m64[None, :] * s_lm + r[:, None] * s_lr, mask=r_ok[:, None] & m_ok[None, :],
                             other=0.0)
                lora = _dot(_as_dot(rt, LDT, LF32DOT), _as_dot(lf, LDT, LF32DOT), tl.zeros((BP, BM), dtype=tl.float32),
                            LF32DOT)
                acc += lora * scale
            if HAS_BIAS:
                acc += tl.load(BIAS + p, mask=p_ok, other=0.0).to(tl.float32)[:, None]
            c_ptr = C + m64[None, :] * s_cm + p[:, None] * s_cp
            c_mask = p_ok[:, None] & m_ok[None, :]
        else:
            if HAS_LORA:   # + scale * Lf[m, :r] @ Rt[:r, p]
                lf = tl.load(LF + m64[:, None] * s_lm + r[None, :] * s_lr, mask=m_ok[:, None] & r_ok[None, :],
                             other=0.0)
                rt = tl.load(RT + r[:, None] * s_rr + p[None, :] * s_rp, mask=r_ok[:, None] & p_ok[None, :], other=0.0)
                lora = _dot(_as_dot(lf, LDT, LF32DOT), _as_dot(rt, LDT, LF32DOT), tl.zeros((BM, BP), dtype=tl.float32),
                            LF32DOT)
                acc += lora * scale
            if HAS_BIAS:
                acc += tl.load(BIAS + p, mask=p_ok, other=0.0).to(tl.float32)[None, :]
            c_ptr = C + m64[:, None] * s_cm + p[None, :] * s_cp
            c_mask = m_ok[:, None] & p_ok[None, :]
        if INTERP and C.dtype.element_ty == tl.bfloat16:
            acc = _rne_bf16(acc)
        tl.store(c_ptr, acc.to(C.dtype.element_ty), mask=c_mask)


# ---- launcher, block sizes ----

# (BM, BP, BQ, GROUP_M, num_warps, num_stages[, swap]); "fwd" is y = x W^T, "bwd" is dx = dy W. Override with
# set_config("fwd"|"bwd", ...) or env FXOPT_NF4_CONFIG="fwd=128,128,64,8,8,3,1;bwd=..." ; None: tune on CUDA.
_CONFIGS: dict = {"fwd": None, "bwd": None}
_CUDA_CANDIDATES = [(128, 128, 64, 8, 8, 3, 0), (128, 256, 64, 8, 8, 3, 0), (256, 128, 64, 8, 8, 3, 0),
                    (128, 128, 64, 8, 8, 3, 1), (128, 256, 64, 8, 8, 3, 1), (256, 128, 64, 8, 8, 3, 1),
                    (64, 128, 64, 8, 4, 4, 0), (128, 128, 128, 8, 8, 2, 1)]
_TUNED: dict = {}


def set_config(kind: str, config: Optional[tuple]) -> None:
    """Fix the block sizes of `kind` ("fwd"/"bwd"): (BM, BP, BQ, GROUP_M, num_warps, num_stages[, swap]); None: tune."""
    if kind not in _CONFIGS:
        raise ValueError(f"kind must be 'fwd' or 'bwd', not {kind!r}")
    _CONFIGS[kind] = tuple(config) if config is not None else None
    _TUNED.clear()


def _env_config(kind):
    spec = os.environ.get("FXOPT_NF4_CONFIG", "")
    for part in filter(None, spec.split(";")):
        k, _, v = part.partition("=")
        if k.strip() == kind:
            return tuple(int(t) for t in v.split(","))
    return None


def num_stages(stages: int, flags: dict) -> int:
    """A config's pipeline depth for these kernel flags. fp32 dots on a double-quantized weight with K % blocksize != 0
    stage a per-element uint8 code tile and fp32 scale tile next to the fp32 x tile: the sm_90 build of every candidate
    at its own depth needs 288-512 KiB of shared memory, over the 227 KiB limit (the launch raises OutOfResources, no
    candidate runs, the op falls back to the reference; tests/kernels/test_compile_sm90.py); 2 stages of the first
    candidate need 160 KiB."""
    return min(stages, 2) if flags["F32DOT"] and flags["NESTED"] and not flags["FAST"] else stages


def _interp_config(M, P, Q):
    # the interpreter pays per program and per loop step: few, large tiles
    clamp = lambda v, hi: max(16, min(hi, next_pow2(v)))
    return (clamp(M, 64), clamp(P, 64), clamp(Q, 64), 8, 4, 1, 0)


def kernel_operands(w: NF4Weight):
    """(packed uint8, absmax, absmax2, code2, offset) as flat tensors for the Triton kernels; without double
    quantization the last three are absmax again (placeholders the kernel does not read)."""
    wq = (w.packed if w.packed.dtype == torch.uint8 else w.packed.view(torch.uint8)).reshape(-1)
    absm = w.absmax.reshape(-1)
    if not w.nested:
        return wq, absm, absm, absm, absm
    return wq, absm, w.absmax2.reshape(-1), w.code2.reshape(-1), w.offset.reshape(-1)


def fused_matmul(x2: torch.Tensor, weight, trans: bool, lora_left: Optional[torch.Tensor] = None,
                 lora_right: Optional[torch.Tensor] = None, scale: float = 1.0, bias: Optional[torch.Tensor] = None,
                 out_dtype: Optional[torch.dtype] = None, compute_dtype: Optional[torch.dtype] = None,
                 config: Optional[tuple] = None) -> torch.Tensor:
    """C = x2 @ (W^T if trans else W) + scale * lora_left @ lora_right + bias, W dense [N, K] or NF4Weight.

    x2 [M, Q] (any strides); lora_left [M, r]; lora_right [r, P] (a transposed view is fine); bias [P].
    compute_dtype: dtype W is dequantized/rounded to and x2 is rounded to (default x2.dtype).
    """
    nf4 = isinstance(weight, NF4Weight)
    nw, kw = (weight.n, weight.k) if nf4 else tuple(weight.shape)
    M, Q = x2.shape
    P = nw if trans else kw
    assert Q == (kw if trans else nw), f"inner dims {Q} vs weight {nw}x{kw} (trans={trans})"
    cdt = compute_dtype or x2.dtype
    out = torch.empty((M, P), dtype=out_dtype or x2.dtype, device=x2.device)
    if M == 0 or P == 0:
        return out
    if Q == 0:
        return out.copy_(fused_matmul_reference(x2, weight, trans, lora_left, lora_right, scale, bias, out.dtype, cdt))
    kind = "fwd" if trans else "bwd"
    dev = x2.device
    has_lora = lora_left is not None and lora_left.shape[1] > 0
    rank = lora_left.shape[1] if has_lora else 0
    interp = dev.type != "cuda"
    ldt = lora_right.dtype if has_lora else cdt
    dummy = out
    if nf4:
        wq, absm, abs2, code2, off = kernel_operands(weight)
        wd, swn, swk, code = dummy, 0, 0, nf4_code(dev)
    else:
        wq = absm = abs2 = code2 = off = code = dummy
        wd, swn, swk = weight, weight.stride(0), weight.stride(1)
    lf = lora_left if has_lora else dummy
    rt = lora_right if has_lora else dummy
    args = (x2, wd, wq, absm, abs2, code2, off, code, lf, rt, bias if bias is not None else dummy, out,
            M, P, Q, nw, kw, rank,
            x2.stride(0), x2.stride(1), swn, swk,
            lf.stride(0) if has_lora else 0, lf.stride(1) if has_lora else 0,
            rt.stride(0) if has_lora else 0, rt.stride(1) if has_lora else 0,
            out.stride(0), out.stride(1), float(scale))
    flags = dict(NF4=nf4, TRANS=trans, NESTED=nf4 and weight.nested,
                 FAST=nf4 and weight.k % weight.blocksize == 0,
                 BS=weight.blocksize if nf4 else 64, BS2=weight.blocksize2 if nf4 else 256,
                 HAS_LORA=has_lora, HAS_BIAS=bias is not None, DT=_DT[cdt], LDT=_DT[ldt],
                 F32DOT=interp or cdt == torch.float32, LF32DOT=interp or ldt == torch.float32, INTERP=interp,
                 RB=max(16, next_pow2(rank)))

    def launch(cfg):
        bm, bp, bq, gm, warps, stages = cfg[:6]
        grid = (triton.cdiv(M, bm) * triton.cdiv(P, bp),)
        fast_launch(_fused_matmul_kernel, grid, *args, **flags, SWAP=bool(cfg[6]) if len(cfg) > 6 else False, BM=bm,
                    BP=bp, BQ=bq, GROUP_M=gm, num_warps=warps, num_stages=num_stages(stages, flags))

    cfg = config or _CONFIGS[kind] or _env_config(kind)
    if cfg is None and interp:
        cfg = _interp_config(M, P, Q)
    if cfg is None:
        key = (kind, next_pow2(M), P, Q, nf4, flags["NESTED"], flags["FAST"], has_lora, cdt, ldt, dev.index)
        cfg = _TUNED.get(key)
        if cfg is None and capturing():     # recording a CUDA graph: no timing now; tune on a later call
            cfg = _CUDA_CANDIDATES[0]
        elif cfg is None:
            cfg = _TUNED[key] = _tune(launch, key) if tuning() else _CUDA_CANDIDATES[0]
    launch(cfg)
    return out


def _tune(launch, key=()):
    """Pick the fastest candidate (median of a short bench_ms); the kernel only writes C, so reruns are harmless."""
    best, best_ms, times = None, float("inf"), {}
    for cfg in _CUDA_CANDIDATES:
        try:
            ms = times[cfg] = bench_ms(lambda: launch(cfg))
        except Exception:  # noqa: BLE001 - a config that does not fit (shared memory) is skipped
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError("no fused_matmul config could run")
    log_choice("nf4_fused_matmul", key, best, times)
    return best


@register_cost("nf4_matmul")
def nf4_matmul_cost(m, n, k, rank=0, dtype_bytes=2, blocksize=64):
    """(flops, bytes) of y = x W^T (+ LoRA): W read at 0.5 byte per element plus fp32 block scales."""
    flops = 2 * m * n * k + 2 * m * rank * (n + k)
    return flops, (m * k + m * n) * dtype_bytes + n * k // 2 + 4 * (n * k // blocksize)
