"""Rounding fp32 values to fp16/bf16 inside kernels, to nearest even, exactly as eager's casts do.

On the GPU a `.to(bf16).to(fp32)` pair can be folded away by the compiler (measured on the H200 with Triton 3.6:
not eager's bits), and the interpreter's fp32->bf16 cast truncates; so bf16 uses PTX cvt.rn on NVIDIA GPUs and bit
arithmetic in the interpreter. H200, rope q [8,32,2048,128] + k [8,8,2048,128] bf16, fwd/bwd kernel ms:
cvt.rn .097/.097 (bit-exact), bit arithmetic .113/.114 (bit-exact), cast pair .089/.090 (not eager's bits).
"""
from __future__ import annotations

import torch

from fxopt.kernels.registry import interpreting, triton_available

_BF16_ROUNDING = 3 if torch.version.hip else 4


def rounding_code(dtype) -> int:
    """Code for `round_to` (0: nothing to do, fp32 or no rounding)."""
    if dtype == torch.bfloat16:
        return 3 if interpreting() else _BF16_ROUNDING
    return 1 if dtype == torch.float16 else 0


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def round_to(v, RND: tl.constexpr):
        """fp32 v rounded to fp16 (RND 1) / bf16 (RND 2-4), kept in fp32.
        bf16: 2 = cast there and back (may be folded), 3 = bit arithmetic, 4 = PTX cvt.rn.bf16.f32."""
        if RND == 1:
            v = v.to(tl.float16).to(tl.float32)
        elif RND == 2:
            v = v.to(tl.bfloat16).to(tl.float32)
        elif RND == 3:
            b = v.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            v = tl.where(v == v, b.to(tl.float32, bitcast=True), v)
        elif RND == 4:
            v = tl.inline_asm_elementwise(
                "{ .reg .b16 t; .reg .b32 u; cvt.rn.bf16.f32 t, $1; cvt.u32.u16 u, t; shl.b32 $0, u, 16; }",
                "=r,f", [v], dtype=tl.uint32, is_pure=True, pack=1).to(tl.float32, bitcast=True)
        return v

    # PTX on NVIDIA GPUs; the interpreter computes in numpy, which never fuses
    _PTX = tl.constexpr(torch.version.hip is None and not interpreting())

    @triton.jit
    def mul_rn(a, b):
        """fp32 a * b rounded on its own: PTX mul.rn is never contracted into an fma with an add that follows."""
        if _PTX:
            return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32,
                                             is_pure=True, pack=1)
        return a * b
