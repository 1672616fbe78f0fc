"""A toy fxopt pattern in one file: softcap  y = c * tanh(x / c)  ->  fxopt_example::softcap (docs/add_a_pattern.md).

Gemma-2 writes it as `x / c`, `tanh`, `* c`. Backward from the saved output: dy/dx = 1 - tanh(x/c)^2 = 1 - (y/c)^2.
This file holds the four parts of every fxopt pattern: the Triton kernels, the PyTorch reference, the op
(torch.library custom op + fake + autograd) and the pattern (candidates, match with reasons, replace).
"""
from __future__ import annotations

import torch

from fxopt.kernels.registry import run_kernel, triton_available, use_triton
from fxopt.normalize import meta
from fxopt.patterns.match import (Match, Pattern, call, insert_op, only_user, replace_output, require, single_use,
                                  split_scalar)

# ---- 1. Triton kernels: elementwise over the flattened tensor, fp32 math right after tl.load ----
if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _softcap_fwd(X, Y, n, inv_cap, cap, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        t = 1.0 - 2.0 / (tl.exp(2.0 * x * inv_cap) + 1.0)   # tanh(z) = 1 - 2 / (e^2z + 1): -1 and 1 at +-inf
        tl.store(Y + offs, (cap * t).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _softcap_bwd(DY, Y, DX, n, inv_cap, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32) * inv_cap
        tl.store(DX + offs, (dy * (1.0 - t * t)).to(DX.dtype.element_ty), mask=mask)


def _block(t: torch.Tensor) -> int:
    return 1024 if t.device.type == "cuda" else 1 << 14   # the interpreter pays per program: big blocks there


def _fwd_triton(x, cap):
    x = x.contiguous()
    y = torch.empty_like(x)
    n, block = x.numel(), _block(x)
    _softcap_fwd[(triton.cdiv(n, block),)](x, y, n, 1.0 / cap, cap, BLOCK=block)
    return y


def _bwd_triton(dy, y, cap):
    dy, y = dy.contiguous(), y.contiguous()
    dx = torch.empty_like(y)
    n, block = y.numel(), _block(y)
    _softcap_bwd[(triton.cdiv(n, block),)](dy, y, dx, n, 1.0 / cap, BLOCK=block)
    return dx


# ---- 2. PyTorch reference: the math of the matched subgraph, in fp32 ----
def softcap_reference(x, cap):
    return (cap * torch.tanh(x.float() / cap)).to(x.dtype)


def softcap_backward_reference(dy, y, cap):
    t = y.float() / cap
    return (dy.float() * (1.0 - t * t)).to(y.dtype)


# ---- 3. The ops: Triton on CUDA (and on CPU under TRITON_INTERPRET=1), else the reference ----
@torch.library.custom_op("fxopt_example::softcap", mutates_args=())
def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    ref = lambda: softcap_reference(x, cap).contiguous()
    if use_triton(x):
        return run_kernel("softcap", lambda: _fwd_triton(x, cap), ref)
    return ref()


@softcap.register_fake
def _(x, cap):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fxopt_example::softcap_backward", mutates_args=())
def softcap_backward(dy: torch.Tensor, y: torch.Tensor, cap: float) -> torch.Tensor:
    ref = lambda: softcap_backward_reference(dy, y, cap).contiguous()
    if use_triton(dy, y):
        return run_kernel("softcap_backward", lambda: _bwd_triton(dy, y, cap), ref)
    return ref()


@softcap_backward.register_fake
def _(dy, y, cap):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output)   # only y is saved (not x)
    ctx.cap = inputs[1]


def _backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return torch.ops.fxopt_example.softcap_backward(dy, y, ctx.cap), None


softcap.register_autograd(_backward, setup_context=_setup)


# ---- 4. The pattern, on dynamo's graph after fxopt.normalize (x / c is torch.div, * c is torch.mul) ----
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _candidates(graph):
    return [n for n in graph.nodes if call(n, torch.tanh)]


def match_softcap(t):
    """tanh(x / c | x * (1/c)) * c  ->  Match, or NoMatch(reason) through `require`."""
    inner = t.args[0]
    require(call(inner, torch.div, torch.mul), "tanh input is not x / c")
    x, k = split_scalar(inner)
    require(x is not None, "tanh input is not scaled by a constant")
    if call(inner, torch.div):
        require(inner.args[0] is x and k != 0, "tanh input is c / x, not x / c")
        k = 1.0 / k
    outer = only_user(t)
    require(outer is not None and call(outer, torch.mul), "tanh result is not only multiplied by a constant")
    _, cap = split_scalar(outer)
    require(cap is not None and cap > 0, "tanh result is not multiplied by a positive constant")
    require(abs(cap * k - 1.0) < 1e-6, f"inner scale {k:g} is not 1/{cap:g}: not a softcap")
    require(meta(x).dtype in _FLOATS, f"input dtype {meta(x).dtype} not supported")
    reason = single_use([inner, t], {inner, t, outer})
    require(reason is None, reason or "")
    return Match(anchor=t, output=outer, nodes=[inner, t, outer], params=dict(x=x, cap=float(cap)))


def replace_softcap(graph, m):
    y = insert_op(graph, m.output, torch.ops.fxopt_example.softcap.default, (m.params["x"], m.params["cap"]))
    replace_output(graph, m, y)
    return y


SOFTCAP = Pattern("softcap", _candidates, match_softcap, replace_softcap)
