"""Pieces shared by the rank-r product kernels (lora.py's skinny kernel, lora_dy.py's one pass over dy): fp32
operands as hi + lo half values for tensor-core dots (~2^-17 relative accuracy), and reductions split over programs
whose fp32 partials one kernel sums in a fixed order (deterministic), optionally writing the sum rounded to half.
"""
from __future__ import annotations

from typing import Optional

import torch

from fxopt.kernels.launch import fast_launch
from fxopt.kernels.registry import next_pow2, triton_available

if triton_available():
    import triton
    import triton.language as tl

    from fxopt.kernels.nf4 import _rne_bf16

    @triton.jit
    def _lowp(v, HALF: tl.constexpr, INTERP: tl.constexpr):
        """fp32 -> nearest bf16 (HALF=0) / fp16 (HALF=1): the low dtype itself, or its fp32 value in the interpreter.
        One return: a compiled Triton function must return one type from every return (fp16 and bf16 returns did
        not compile, found on the H200 by the fp16 finetune test; the interpreter runs either)."""
        if INTERP:
            r = v.to(tl.float16).to(tl.float32) if HALF == 1 else _rne_bf16(v)
        elif HALF == 1:
            r = v.to(tl.float16)
        else:
            r = v.to(tl.bfloat16)
        return r

    @triton.jit
    def _dot_pair(a1, b1, a2, b2, acc, INTERP: tl.constexpr):
        """acc + a1 @ b1 + a2 @ b2, fp32 accumulation (IEEE fp32 dots in the interpreter): a half operand times an
        fp32 one split as hi + lo half values."""
        if INTERP:
            acc = tl.dot(a1, b1, acc, input_precision="ieee")
            acc = tl.dot(a2, b2, acc, input_precision="ieee")
        else:
            acc = tl.dot(a1, b1, acc)
            acc = tl.dot(a2, b2, acc)
        return acc

    @triton.jit
    def _split_sum_kernel(PART, OUT, LOW, n, split, HAS_LOW: tl.constexpr, HALF: tl.constexpr,
                          INTERP: tl.constexpr, BLOCK: tl.constexpr):
        """OUT[i] = sum over s of PART[s, i] (fp32, s in order) and, with HAS_LOW, LOW[i] = OUT[i] rounded to half."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, split):
            acc += tl.load(PART + s * n + i, mask=ok, other=0.0)
        tl.store(OUT + i, acc, mask=ok)
        if HAS_LOW:
            tl.store(LOW + i, _lowp(acc, HALF, INTERP).to(LOW.dtype.element_ty), mask=ok)


def split_grid(rows: int, q: int, block_rows: int, block_q: int, split: int, sms: Optional[int]):
    """(row blocks, shares of the q reduction). split 0: ~2 programs per SM, each with >= 4 q tiles where q allows;
    sms None (the interpreter): 2 shares, so tests cover a split reduction."""
    n_rows = -(-rows // block_rows)
    if split == 0:
        split = 2 if sms is None else max(1, min(-(-q // (4 * block_q)), -(-2 * sms // n_rows)))
    return n_rows, max(1, min(split, -(-q // block_q)))


def sum_splits(part: torch.Tensor, low: Optional[torch.dtype], block: int = 1024):
    """(the fp32 partials part [split, ...] summed in split order, that sum rounded to `low` or None) by one kernel;
    torch's sum and cast are two kernels and ~24 + ~18 us of H200 host time (host_overhead_h200.json)."""
    interp = part.device.type != "cuda"
    out = torch.empty(part.shape[1:], dtype=torch.float32, device=part.device)
    out_low = torch.empty(part.shape[1:], dtype=low, device=part.device) if low is not None else out
    n = out.numel()
    block = block if not interp else max(16, min(1024, next_pow2(n)))
    fast_launch(_split_sum_kernel, (triton.cdiv(n, block),), part, out, out_low, n, part.shape[0],
                HAS_LOW=low is not None, HALF=int(low == torch.float16), INTERP=interp, BLOCK=block, num_warps=4)
    return out, (out_low if low is not None else None)
