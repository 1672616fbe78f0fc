"""fxopt::rms_norm kernels vs the PyTorch reference (Triton interpreter on CPU, natively with -m gpu)."""
import pytest
import torch

import fxopt  # noqa: F401
from fxopt.kernels import rms_norm as K
from tests.helpers import rel

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-6, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


def _eager(x, w, eps, offset, mid, out_dtype):
    """The HF spellings written out (not the reference under test)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if mid is not None:
        h = h.to(mid)
    if w is None:
        return h.to(out_dtype)
    return ((w.float() + offset) * h.float()).to(out_dtype) if mid is None else (w * h).to(out_dtype)


CASES = [  # (shape, dtype, weight?, offset, mid)
    ((1, 64), torch.float32, True, 0.0, None),
    ((7, 100), torch.float32, True, 0.0, torch.float32),
    ((3, 5, 37), torch.float32, False, 0.0, None),
    ((33, 256), torch.bfloat16, True, 0.0, torch.bfloat16),
    ((9, 96), torch.bfloat16, True, 1.0, None),
    ((17, 80), torch.float16, True, 0.0, torch.float16),
]


@pytest.mark.parametrize("shape,dtype,has_w,offset,mid", CASES)
def test_forward_backward_vs_eager(shape, dtype, has_w, offset, mid, no_fallback):
    x = torch.randn(shape, dtype=dtype, device=DEV, requires_grad=True)
    w = (torch.randn(shape[-1], dtype=dtype, device=DEV) * 0.5 + 1).requires_grad_() if has_w else None
    eps = 1e-6
    y, rstd = torch.ops.fxopt.rms_norm(x, w, eps, offset, mid, dtype)
    y_ref = _eager(x, w, eps, offset, mid, dtype)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    assert rel(y, y_ref) <= TOL[dtype]
    assert torch.isfinite(y).all()
    dy = torch.randn_like(y)
    inputs = (x, w) if has_w else (x,)
    got = torch.autograd.grad(y, inputs, dy)
    exp = torch.autograd.grad(y_ref, inputs, dy)
    for g, e in zip(got, exp):
        assert g.dtype == e.dtype and g.shape == e.shape
        assert rel(g, e) <= 2 * TOL[dtype] + 1e-6


def test_strided_input(no_fallback):
    base = torch.randn(6, 2 * 72, device=DEV)
    x = base[:, ::2]                    # non-unit column stride: copied to rows
    xt = torch.randn(40, 6, device=DEV).t()   # transposed
    w = torch.randn(72, device=DEV)
    for inp, ww in ((x, w), (xt, torch.randn(40, device=DEV))):
        y, _ = torch.ops.fxopt.rms_norm(inp, ww, 1e-5, 0.0, None, torch.float32)
        assert rel(y, _eager(inp, ww, 1e-5, 0.0, None, torch.float32)) <= 2e-6
    rows = torch.randn(5, 3, 64, device=DEV)[:, 1]   # row stride 192, column stride 1: no copy
    y, _ = torch.ops.fxopt.rms_norm(rows, w[:64], 1e-5, 0.0, None, torch.float32)
    assert rel(y, _eager(rows, w[:64], 1e-5, 0.0, None, torch.float32)) <= 2e-6


def test_frozen_weight_returns_no_dw(no_fallback):
    x = torch.randn(5, 48, device=DEV, requires_grad=True)
    w = torch.randn(48, device=DEV)
    y, _ = torch.ops.fxopt.rms_norm(x, w, 1e-6, 0.0, None, torch.float32)
    _, rstd = K.rms_norm_reference(x, w, 1e-6)
    dx, dw = torch.ops.fxopt.rms_norm_backward(torch.ones_like(y), x.detach(), w, rstd, 0.0, None, False)
    assert dw.numel() == 0
    (gx,) = torch.autograd.grad(y, (x,), torch.ones_like(y))
    assert rel(gx, dx) <= 2e-6


def test_every_output_written(no_fallback):
    # outputs come from torch.empty: poison the allocator's reuse by filling freed memory with NaN first
    junk = torch.full((4096,), float("nan"), device=DEV)
    del junk
    x = torch.randn(13, 50, device=DEV)
    w = torch.randn(50, device=DEV)
    y, rstd = torch.ops.fxopt.rms_norm(x, w, 1e-6, 0.0, None, torch.float32)
    dx, dw = torch.ops.fxopt.rms_norm_backward(torch.randn_like(y), x, w, rstd, 0.0, None, True)
    for t in (y, rstd, dx, dw):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("has_w", [True, False])
def test_opcheck(has_w):
    x = torch.randn(4, 3, 24, requires_grad=True, device=DEV)
    w = torch.randn(24, requires_grad=True, device=DEV) if has_w else None
    torch.library.opcheck(torch.ops.fxopt.rms_norm.default, (x, w, 1e-6, 0.0, None, torch.float32))
    _, rstd = K.rms_norm_reference(x.detach(), w.detach() if has_w else None, 1e-6)
    torch.library.opcheck(torch.ops.fxopt.rms_norm_backward.default,
                          (torch.randn(4, 3, 24, device=DEV), x.detach(), w.detach() if has_w else None, rstd, 0.0, None,
                           has_w))


def test_cost_declared():
    from fxopt.kernels.registry import COSTS
    flops, nbytes = COSTS["rms_norm"]((16384, 4096), 2)
    assert flops == 4 * 16384 * 4096 and nbytes > 2 * 16384 * 4096 * 2


@pytest.mark.gpu
def test_gpu_large_bf16(no_fallback):
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y, _ = torch.ops.fxopt.rms_norm(x, w, 1e-6, 0.0, torch.bfloat16, torch.bfloat16)
    y_ref = _eager(x, w, 1e-6, 0.0, torch.bfloat16, torch.bfloat16)
    assert rel(y, y_ref) <= 1e-2
    dy = torch.randn_like(y)
    for g, e in zip(torch.autograd.grad(y, (x, w), dy), torch.autograd.grad(y_ref, (x, w), dy)):
        assert rel(g, e) <= 1e-2


# ---- the residual add fused in (fxopt::add_rms_norm, fxopt::rms_norm_backward_add) ----

@pytest.mark.parametrize("shape,dtype,has_w,offset,mid", CASES)
def test_add_rms_norm_vs_eager(shape, dtype, has_w, offset, mid, no_fallback):
    a, b = (torch.randn(shape, dtype=dtype, device=DEV) for _ in range(2))
    w = (torch.randn(shape[-1], dtype=dtype, device=DEV) * 0.5 + 1) if has_w else None
    y, s, rstd = torch.ops.fxopt.add_rms_norm(a, b, w, 1e-6, offset, mid, dtype)
    assert torch.equal(s, a + b)   # eager's add, bit for bit (rounded to the dtype before the norm reads it)
    y_ref = _eager(a + b, w, 1e-6, offset, mid, dtype)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape and rel(y, y_ref) <= TOL[dtype]
    _, rstd_ref = K.rms_norm_reference(a + b, w, 1e-6, offset, mid, dtype)
    assert rel(rstd, rstd_ref) <= 2e-6


@pytest.mark.parametrize("shape,dtype,has_w,offset,mid", CASES)
def test_backward_add_vs_eager(shape, dtype, has_w, offset, mid, no_fallback):
    x = torch.randn(shape, dtype=dtype, device=DEV, requires_grad=True)
    w = (torch.randn(shape[-1], dtype=dtype, device=DEV) * 0.5 + 1).requires_grad_() if has_w else None
    dy, dres = torch.randn(shape, dtype=dtype, device=DEV), torch.randn(shape, dtype=dtype, device=DEV)
    y_ref = _eager(x, w, 1e-6, offset, mid, dtype)
    exp = torch.autograd.grad(y_ref, (x, w) if has_w else (x,), dy)
    _, rstd = K.rms_norm_reference(x.detach(), w, 1e-6, offset, mid, dtype)
    dx, dw = torch.ops.fxopt.rms_norm_backward_add(dy, x.detach(), w, rstd, dres, offset, mid, has_w)
    assert dx.dtype == dtype and rel(dx, exp[0] + dres) <= 2 * TOL[dtype] + 1e-6
    # the sum is rounded once: against the fp32 reference it is as close as the dtype allows
    ref_dx, ref_dw = K.rms_norm_backward_reference(dy, x.detach(), w, rstd, offset, mid, has_w, dres)
    assert rel(dx, ref_dx) <= TOL[dtype]
    if has_w:
        assert rel(dw, exp[1]) <= 2 * TOL[dtype] + 1e-6 and rel(dw, ref_dw) <= TOL[dtype]
    else:
        assert dw.numel() == 0


def test_norm_add_ops_write_every_output(no_fallback):
    junk = torch.full((4096,), float("nan"), device=DEV)
    del junk
    a, b, w = torch.randn(13, 50, device=DEV), torch.randn(13, 50, device=DEV), torch.randn(50, device=DEV)
    y, s, rstd = torch.ops.fxopt.add_rms_norm(a, b, w, 1e-6, 0.0, None, torch.float32)
    dx, dw = torch.ops.fxopt.rms_norm_backward_add(torch.randn_like(y), s, w, rstd, torch.randn_like(s), 0.0, None,
                                                   True)
    for t in (y, s, rstd, dx, dw):
        assert torch.isfinite(t).all()


def test_norm_add_strided_inputs(no_fallback):
    a = torch.randn(6, 2 * 72, device=DEV)[:, ::2]      # copied to rows
    b = torch.randn(3, 6, 72, device=DEV)[1]            # a view with unit column stride
    w = torch.randn(72, device=DEV)
    y, s, _ = torch.ops.fxopt.add_rms_norm(a, b, w, 1e-5, 0.0, None, torch.float32)
    assert torch.equal(s, a + b) and rel(y, _eager(a + b, w, 1e-5, 0.0, None, torch.float32)) <= 2e-6


@pytest.mark.parametrize("has_w", [True, False])
def test_norm_add_opcheck(has_w):
    a, b = torch.randn(4, 3, 24, device=DEV), torch.randn(4, 3, 24, device=DEV)
    w = torch.randn(24, device=DEV) if has_w else None
    torch.library.opcheck(torch.ops.fxopt.add_rms_norm.default, (a, b, w, 1e-6, 0.0, None, torch.float32))
    _, rstd = K.rms_norm_reference(a + b, w, 1e-6)
    torch.library.opcheck(torch.ops.fxopt.rms_norm_backward_add.default,
                          (torch.randn_like(a), a + b, w, rstd, torch.randn_like(a), 0.0, None, has_w))


def test_add_rms_norm_cost_declared():
    from fxopt.kernels.registry import COSTS
    flops, nbytes = COSTS["add_rms_norm"]((16384, 4096), 2)
    assert nbytes == COSTS["rms_norm"]((16384, 4096), 2)[1] + 2 * 16384 * 4096 * 2 and flops > 4 * 16384 * 4096


@pytest.mark.gpu
def test_gpu_norm_add_large_bf16(no_fallback):
    a, b = (torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    y, s, rstd = torch.ops.fxopt.add_rms_norm(a, b, w, 1e-6, 0.0, torch.bfloat16, torch.bfloat16)
    assert torch.equal(s, a + b)
    assert rel(y, _eager(a + b, w, 1e-6, 0.0, torch.bfloat16, torch.bfloat16)) <= 1e-2
    x = (a + b).requires_grad_()
    dy, dres = torch.randn_like(y), torch.randn_like(y)
    (ex,) = torch.autograd.grad(_eager(x, w, 1e-6, 0.0, torch.bfloat16, torch.bfloat16), (x,), dy)
    dx, _ = torch.ops.fxopt.rms_norm_backward_add(dy, s, w, rstd, dres, 0.0, torch.bfloat16, False)
    assert rel(dx, ex + dres) <= 1e-2
