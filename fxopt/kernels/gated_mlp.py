"""Gated MLP activation: y = cast_out( act(g) * u ),  act in {silu, gelu (erf), gelu_tanh}.

All math in fp32 (inputs upcast right after `tl.load`), one rounding to the output dtype (eager rounds act(g) first).
  silu:       a = g * s,            a' = s * (1 + g * (1 - s)),                          s = sigmoid(g)
  gelu:       a = g * P,            a' = P + g * exp(-g^2 / 2) / sqrt(2 pi),              P = (1 + erf(g / sqrt 2)) / 2
  gelu_tanh:  a = g * q,            a' = q + g * q * (1 - q) * 2k * (1 + 3c g^2),         q = sigmoid(2k (g + c g^3))
              (0.5 (1 + tanh(z)) = sigmoid(2z): no tanh needed, no cancellation near 0; k = sqrt(2/pi), c = 0.044715)
Backward: dg = dy * u * a'(g),  du = dy * a(g). Only g and u are saved; a is recomputed (elementwise, free next to
the memory traffic: fwd reads g, u, writes y; bwd reads dy, g, u, writes dg, du).

Two ops of one kernel pair: `gated_mlp(gate, up)` and `gated_mlp_packed(gu)` for a fused gate_up projection whose
halves are `gu[..., :C]` / `gu[..., C:]` (`gate_first`): the kernels read the halves in place (row stride 2C) and the
backward writes both halves of one [.., 2C] gradient, so no cat/copy appears in the backward graph.
Every tensor is seen as [R, C] with unit column stride and its own row stride; a tile is [BLOCK_R, BLOCK_C].

Grads go to fresh buffers, not into dy's: under AOTAutograd dy is a graph input of the backward graph, and mutating
it would be functionalized into a copy (more traffic than a fresh buffer, which the allocator recycles from dy's
freed block anyway).
"""
from __future__ import annotations

import torch

from fxopt.kernels.launch import fast_launch
from fxopt.kernels.registry import next_pow2, register_cost, run_kernel, triton_available, use_triton

ACTS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_I64_FROM = 2**31 - 1            # element offsets from here on need int64 (tests lower it to cover that path)
_empty = torch.empty             # kernel outputs (tests swap in NaN-filled buffers)
_K = 0.7978845608028654          # sqrt(2 / pi)
_C = 0.044715

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _act(g, ACT: tl.constexpr):
        """(a(g), a'(g)) in fp32."""
        if ACT == 0:
            s = tl.sigmoid(g)
            a = g * s
            da = s * (1.0 + g * (1.0 - s))
        elif ACT == 1:
            p = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
            a = g * p
            da = p + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
        else:
            g2 = g * g
            q = tl.sigmoid(1.5957691216057308 * g * (1.0 + 0.044715 * g2))
            a = g * q
            da = q + g * q * (1.0 - q) * 1.5957691216057308 * (1.0 + 0.134145 * g2)
        return a, da

    @triton.jit
    def _tile(pid, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, I64: tl.constexpr):
        """Row/column indices ([BLOCK_R, 1], [1, BLOCK_C]) of program `pid`'s tile and its bounds mask."""
        n_cb = tl.cdiv(C, BLOCK_C)
        pr = pid // n_cb
        pc = pid - pr * n_cb
        rows = pr * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = pc * BLOCK_C + tl.arange(0, BLOCK_C)
        if I64:
            rows = rows.to(tl.int64)
        mask = (rows < R)[:, None] & (cols < C)[None, :]
        return rows[:, None], cols[None, :], mask

    @triton.jit
    def _load(ptr, mask, EVEN: tl.constexpr):
        if EVEN:   # tiles divide [R, C]: no masks
            v = tl.load(ptr)
        else:
            v = tl.load(ptr, mask=mask, other=0.0)
        return v.to(tl.float32)

    @triton.jit
    def _store(ptr, v, mask, EVEN: tl.constexpr):
        if EVEN:
            tl.store(ptr, v.to(ptr.dtype.element_ty))
        else:
            tl.store(ptr, v.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _gated_fwd(G, U, Y, R, C, stride_g, stride_u, stride_y, ACT: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, EVEN: tl.constexpr, I64: tl.constexpr):
        r, c, mask = _tile(tl.program_id(0), R, C, BLOCK_R, BLOCK_C, I64)
        g = _load(G + r * stride_g + c, mask, EVEN)
        u = _load(U + r * stride_u + c, mask, EVEN)
        a, _ = _act(g, ACT)
        _store(Y + r * stride_y + c, a * u, mask, EVEN)

    @triton.jit
    def _gated_bwd(DY, G, U, DG, DU, R, C, stride_dy, stride_g, stride_u, stride_dg, stride_du, ACT: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, EVEN: tl.constexpr, I64: tl.constexpr):
        r, c, mask = _tile(tl.program_id(0), R, C, BLOCK_R, BLOCK_C, I64)
        dy = _load(DY + r * stride_dy + c, mask, EVEN)
        g = _load(G + r * stride_g + c, mask, EVEN)
        u = _load(U + r * stride_u + c, mask, EVEN)
        a, da = _act(g, ACT)
        _store(DG + r * stride_dg + c, dy * u * da, mask, EVEN)
        _store(DU + r * stride_du + c, dy * a, mask, EVEN)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[R, C] view with unit column stride (a copy only when the input cannot be viewed so)."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def _kernel_ok(*ts: torch.Tensor) -> bool:
    """Triton for fp16/bf16/fp32 tensors of rank >= 1 on CUDA (or CPU under the interpreter)."""
    return all(t.dim() >= 1 and t.dtype in _KERNEL_DTYPES for t in ts) and use_triton(*ts)


def _config(R: int, C: int, device: torch.device):
    """(BLOCK_R, BLOCK_C, num_warps). GPU: 1024-element tiles, 4 warps (8 elements = one 16 B vector per thread in
    bf16). H200 sweep at [16384, 14336] bf16, fwd + bwd kernels (gated_mlp_sweep_h200.json): (1, 1024, 4) 0.873 ms
    silu / 0.871 gelu_tanh, vs 0.876 / 0.885 for the 4096-element 8-warp tiles used before; Inductor's whole fwd+bwd
    0.873 / 0.871. Interpreter: large tiles (it pays per program, not per element)."""
    target = 1024 if device.type == "cuda" else 1 << 14
    block_c = min(next_pow2(C), 1024 if device.type == "cuda" else target)
    block_r = max(1, min(next_pow2(R), target // block_c))
    return block_r, block_c, (8 if block_r * block_c >= 4096 else 4)


def _launch(kernel, tensors, strides, R, C, act, device):
    block_r, block_c, warps = _config(R, C, device)
    even = R % block_r == 0 and C % block_c == 0
    # largest element offset any pointer reaches must fit int32
    i64 = max((R - 1) * abs(s) + C for s in strides) >= _I64_FROM
    grid = (triton.cdiv(R, block_r) * triton.cdiv(C, block_c),)
    fast_launch(kernel, grid, *tensors, R, C, *strides, ACT=ACTS[act], BLOCK_R=block_r, BLOCK_C=block_c, EVEN=even,
                I64=i64, num_warps=warps)


def _fwd_triton(g, u, act, out_dtype):
    """g, u: [R, C] with unit column stride -> y [R, C] contiguous."""
    R, C = g.shape
    y = _empty((R, C), dtype=out_dtype, device=g.device)
    if y.numel():
        _launch(_gated_fwd, (g, u, y), (g.stride(0), u.stride(0), y.stride(0)), R, C, act, g.device)
    return y


def _bwd_triton(dy, g, u, dg, du, act):
    """Writes dg, du ([R, C] views, unit column stride)."""
    R, C = g.shape
    if dg.numel():
        _launch(_gated_bwd, (dy, g, u, dg, du),
                (dy.stride(0), g.stride(0), u.stride(0), dg.stride(0), du.stride(0)), R, C, act, g.device)


# ---- PyTorch reference (fp32 math) ----

def act_reference(g: torch.Tensor, act: str):
    """(a, a') of fp32 g."""
    if act == "silu":
        s = torch.sigmoid(g)
        return g * s, s * (1 + g * (1 - s))
    if act == "gelu":
        p = 0.5 * (1 + torch.erf(g * 0.7071067811865476))
        return g * p, p + g * torch.exp(-0.5 * g * g) * 0.3989422804014327
    if act == "gelu_tanh":
        q = torch.sigmoid(2 * _K * g * (1 + _C * g * g))
        return g * q, q + g * q * (1 - q) * 2 * _K * (1 + 3 * _C * g * g)
    raise ValueError(f"unknown activation {act!r}; valid: {list(ACTS)}")


def gated_mlp_reference(gate, up, act, out_dtype=None):
    a, _ = act_reference(gate.float(), act)
    return (a * up.float()).to(out_dtype or torch.promote_types(gate.dtype, up.dtype))


def gated_mlp_backward_reference(dy, gate, up, act):
    a, da = act_reference(gate.float(), act)
    dyf = dy.float()
    return (dyf * up.float() * da).to(gate.dtype), (dyf * a).to(up.dtype)


def _halves(gu: torch.Tensor, gate_first: bool):
    c = gu.shape[-1] // 2
    lo, hi = gu[..., :c], gu[..., c:]
    return (lo, hi) if gate_first else (hi, lo)


def _check(act, gate, up=None):
    if act not in ACTS:
        raise ValueError(f"fxopt.gated_mlp: unknown activation {act!r}; valid: {list(ACTS)}")
    if up is not None and gate.shape != up.shape:
        raise ValueError(f"fxopt.gated_mlp: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")


# ---- ops ----

@torch.library.custom_op("fxopt::gated_mlp", mutates_args=())
def gated_mlp(gate: torch.Tensor, up: torch.Tensor, act: str, out_dtype: torch.dtype) -> torch.Tensor:
    """act(gate) * up, same shape as gate; only gate and up are saved for backward."""
    _check(act, gate, up)
    ref = lambda: gated_mlp_reference(gate, up, act, out_dtype).contiguous()
    if _kernel_ok(gate, up) and out_dtype in _KERNEL_DTYPES:
        return run_kernel("gated_mlp", lambda: _fwd_triton(_rows(gate), _rows(up), act, out_dtype).view(gate.shape),
                          ref)
    return ref()


@gated_mlp.register_fake
def _(gate, up, act, out_dtype):
    _check(act, gate, up)
    return gate.new_empty(gate.shape, dtype=out_dtype)


@torch.library.custom_op("fxopt::gated_mlp_backward", mutates_args=())
def gated_mlp_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                       act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up), contiguous, in the dtypes of gate and up."""
    ref = lambda: tuple(t.contiguous() for t in gated_mlp_backward_reference(dy, gate, up, act))

    def kernel():
        g2 = _rows(gate)
        dg = _empty(g2.shape, dtype=gate.dtype, device=gate.device)
        du = _empty(g2.shape, dtype=up.dtype, device=up.device)
        _bwd_triton(_rows(dy), g2, _rows(up), dg, du, act)
        return dg.view(gate.shape), du.view(up.shape)
    if _kernel_ok(dy, gate, up):
        return run_kernel("gated_mlp_backward", kernel, ref)
    return ref()


@gated_mlp_backward.register_fake
def _(dy, gate, up, act):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup(ctx, inputs, output):
    gate, up, act, _ = inputs
    ctx.save_for_backward(gate, up)
    ctx.act = act


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dg, du = torch.ops.fxopt.gated_mlp_backward(dy, gate, up, ctx.act)
    return (dg if ctx.needs_input_grad[0] else None), (du if ctx.needs_input_grad[1] else None), None, None


gated_mlp.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("fxopt::gated_mlp_packed", mutates_args=())
def gated_mlp_packed(gu: torch.Tensor, act: str, gate_first: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """act(gate) * up of the halves of gu [.., 2C] (gate = first half if gate_first) -> [.., C]."""
    _check(act, gu)
    gate, up = _halves(gu, gate_first)
    ref = lambda: gated_mlp_reference(gate, up, act, out_dtype).contiguous()
    if _kernel_ok(gu) and out_dtype in _KERNEL_DTYPES:
        return run_kernel("gated_mlp_packed",
                          lambda: _fwd_triton(*_halves(_rows(gu), gate_first), act, out_dtype).view(gate.shape), ref)
    return ref()


@gated_mlp_packed.register_fake
def _(gu, act, gate_first, out_dtype):
    _check(act, gu)
    torch._check(gu.shape[-1] % 2 == 0, lambda: f"fxopt.gated_mlp_packed: last dim {gu.shape[-1]} is odd")
    return gu.new_empty((*gu.shape[:-1], gu.shape[-1] // 2), dtype=out_dtype)


@torch.library.custom_op("fxopt::gated_mlp_packed_backward", mutates_args=())
def gated_mlp_packed_backward(dy: torch.Tensor, gu: torch.Tensor, act: str, gate_first: bool) -> torch.Tensor:
    """d gu [.., 2C] (contiguous): both halves written by one kernel."""
    def ref():
        dg, du = gated_mlp_backward_reference(dy, *_halves(gu, gate_first), act)
        return torch.cat((dg, du) if gate_first else (du, dg), -1)

    def kernel():
        gu2 = _rows(gu)
        dgu = _empty(gu2.shape, dtype=gu.dtype, device=gu.device)
        g2, u2 = _halves(gu2, gate_first)
        dg, du = _halves(dgu, gate_first)
        _bwd_triton(_rows(dy), g2, u2, dg, du, act)
        return dgu.view(gu.shape)
    if _kernel_ok(dy, gu):
        return run_kernel("gated_mlp_packed_backward", kernel, ref)
    return ref()


@gated_mlp_packed_backward.register_fake
def _(dy, gu, act, gate_first):
    return gu.new_empty(gu.shape)


def _setup_packed(ctx, inputs, output):
    gu, act, gate_first, _ = inputs
    ctx.save_for_backward(gu)
    ctx.act, ctx.gate_first = act, gate_first


def _backward_packed(ctx, dy):
    (gu,) = ctx.saved_tensors
    return torch.ops.fxopt.gated_mlp_packed_backward(dy, gu, ctx.act, ctx.gate_first), None, None, None


gated_mlp_packed.register_autograd(_backward_packed, setup_context=_setup_packed)


_FLOPS = {"silu": 6, "gelu": 10, "gelu_tanh": 10}   # per element, fwd (exp/erf counted as one)


@register_cost("gated_mlp")
def gated_mlp_cost(out_shape, dtype_bytes, act="silu"):
    """(flops, bytes) of the forward: read gate, up; write y."""
    numel = 1
    for s in out_shape:
        numel *= s
    return _FLOPS.get(act, 8) * numel, 3 * numel * dtype_bytes
