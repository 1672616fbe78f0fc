"""fxopt::layer_norm kernels vs eager (Triton interpreter on CPU, natively with -m gpu)."""
import pytest
import torch
import torch.nn.functional as F

import fxopt  # noqa: F401
from fxopt.kernels import layer_norm as K
from tests.helpers import rel

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _eager(x, w, b, eps, mid, out_dtype):
    """F.layer_norm, or the hand-written form that rounds the normalized value to `mid` before `* w + b`."""
    if mid is None and any(p is not None and p.dtype != x.dtype for p in (w, b)):   # mixed: CUDA eager refuses
        return F.layer_norm(x.float(), x.shape[-1:], w.float(), b.float(), eps).to(out_dtype)
    if mid is None:
        return F.layer_norm(x, x.shape[-1:], w, b, eps).to(out_dtype)
    h = x.float()
    m = h.mean(-1, keepdim=True)
    h = ((h - m) * torch.rsqrt((h - m).pow(2).mean(-1, keepdim=True) + eps)).to(mid)
    if w is not None:
        h = h * w
    if b is not None:
        h = h + b
    return h.to(out_dtype)


def _params(h, dtype, has_w, has_b, grad=True):
    w = (torch.randn(h, dtype=dtype, device=DEV) * 0.5 + 1).requires_grad_(grad) if has_w else None
    b = (torch.randn(h, dtype=dtype, device=DEV) * 0.5).requires_grad_(grad) if has_b else None
    return w, b


CASES = [  # (shape, x dtype, param dtype, weight?, bias?, mid)
    ((1, 64), torch.float32, torch.float32, True, True, None),
    ((7, 100), torch.float32, torch.float32, True, False, None),
    ((3, 5, 37), torch.float32, torch.float32, False, False, None),
    ((11, 37), torch.float32, torch.float32, False, True, None),
    ((300, 37), torch.float32, torch.float32, True, True, None),        # several row blocks per backward program
    ((33, 256), torch.bfloat16, torch.bfloat16, True, True, None),
    ((9, 96), torch.bfloat16, torch.bfloat16, True, True, torch.bfloat16),
    ((5, 3, 100), torch.bfloat16, torch.float32, True, True, None),     # mixed: fp32 params, bf16 output
    ((17, 80), torch.float16, torch.float16, True, True, None),
]


@pytest.mark.parametrize("shape,dtype,pdtype,has_w,has_b,mid", CASES)
def test_forward_backward_vs_eager(shape, dtype, pdtype, has_w, has_b, mid, no_fallback):
    x = (torch.randn(shape, dtype=dtype, device=DEV) * 2 + 0.5).requires_grad_()
    w, b = _params(shape[-1], pdtype, has_w, has_b)
    eps = 1e-5
    y, mean, rstd = torch.ops.fxopt.layer_norm(x, w, b, eps, mid, dtype)
    y_ref = _eager(x, w, b, eps, mid, dtype)
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape
    assert mean.shape == rstd.shape == shape[:-1] and mean.dtype == rstd.dtype == torch.float32
    assert rel(y, y_ref) <= TOL[dtype]
    xf = x.detach().float()
    torch.testing.assert_close(mean, xf.mean(-1), rtol=1e-5, atol=1e-6)   # a row mean can be ~0: not rel
    assert rel(rstd, torch.rsqrt(xf.var(-1, unbiased=False) + eps)) <= 1e-5
    dy = torch.randn_like(y)
    inputs = tuple(t for t in (x, w, b) if t is not None)
    got = torch.autograd.grad(y, inputs, dy)
    exp = torch.autograd.grad(y_ref, inputs, dy)
    for g, e in zip(got, exp):
        assert g.dtype == e.dtype and g.shape == e.shape
        assert rel(g, e) <= 2 * TOL[dtype] + 1e-6


@pytest.mark.parametrize("grad_x,grad_w,grad_b", [(False, True, True), (True, False, True), (True, True, False),
                                                  (True, False, False)])
def test_grads_for_some_inputs(grad_x, grad_w, grad_b, no_fallback):
    x = torch.randn(6, 50, device=DEV, requires_grad=grad_x)
    w, b = torch.randn(50, device=DEV, requires_grad=grad_w), torch.randn(50, device=DEV, requires_grad=grad_b)
    y = torch.ops.fxopt.layer_norm(x, w, b, 1e-5, None, torch.float32)[0]
    y_ref = F.layer_norm(x, (50,), w, b, 1e-5)
    dy = torch.randn_like(y)
    inputs = [t for t, g in ((x, grad_x), (w, grad_w), (b, grad_b)) if g]
    for g, e in zip(torch.autograd.grad(y, inputs, dy), torch.autograd.grad(y_ref, inputs, dy)):
        assert rel(g, e) <= 2e-6


def test_backward_op_skips_frozen_params(no_fallback):
    x, dy = torch.randn(5, 48, device=DEV), torch.randn(5, 48, device=DEV)
    w = torch.randn(48, device=DEV)
    _, mean, rstd = K.layer_norm_reference(x, w, None, 1e-5)
    dx, dw, db = torch.ops.fxopt.layer_norm_backward(dy, x, w, mean, rstd, None, False, None)
    assert dw.numel() == 0 and db.numel() == 0
    dx_ref, dw_ref, db_ref = K.layer_norm_backward_reference(dy, x, w, mean, rstd, None, True, torch.float32)
    assert rel(dx, dx_ref) <= 2e-6
    _, dw, db = torch.ops.fxopt.layer_norm_backward(dy, x, w, mean, rstd, None, True, torch.bfloat16)
    assert rel(dw, dw_ref) <= 2e-6 and db.dtype == torch.bfloat16 and rel(db, db_ref) <= 1e-2


def test_strided_input(no_fallback):
    w, b = torch.randn(72, device=DEV), torch.randn(72, device=DEV)
    cols = torch.randn(6, 2 * 72, device=DEV)[:, ::2]          # non-unit column stride: copied to rows
    xt = torch.randn(72, 6, device=DEV).t()                     # transposed
    rows = torch.randn(5, 3, 72, device=DEV)[:, 1]              # row stride 216, column stride 1: no copy
    for x in (cols, xt, rows):
        y = torch.ops.fxopt.layer_norm(x, w, b, 1e-5, None, torch.float32)[0]
        assert rel(y, F.layer_norm(x, (72,), w, b, 1e-5)) <= 2e-6
    # strided upstream gradient (an expanded dy has column stride 0)
    x = torch.randn(4, 72, device=DEV, requires_grad=True)
    y = torch.ops.fxopt.layer_norm(x, w, b, 1e-5, None, torch.float32)[0]
    dy = torch.randn(1, 72, device=DEV).expand(4, 72)
    (g,) = torch.autograd.grad(y, x, dy)
    (e,) = torch.autograd.grad(F.layer_norm(x, (72,), w, b, 1e-5), x, dy)
    assert rel(g, e) <= 2e-6


def test_every_output_written(no_fallback):
    junk = torch.full((1 << 14,), float("nan"), device=DEV)   # freed memory the outputs may reuse holds NaN
    del junk
    x = torch.randn(13, 50, device=DEV)
    w, b = torch.randn(50, device=DEV), torch.randn(50, device=DEV)
    y, mean, rstd = torch.ops.fxopt.layer_norm(x, w, b, 1e-5, None, torch.float32)
    dx, dw, db = torch.ops.fxopt.layer_norm_backward(torch.randn_like(y), x, w, mean, rstd, None, True, torch.float32)
    for t in (y, mean, rstd, dx, dw, db):
        assert torch.isfinite(t).all()


def test_constant_rows(no_fallback):
    x = torch.full((3, 37), 2.5, device=DEV, requires_grad=True)   # var = 0: rstd = 1/sqrt(eps), y = b
    w, b = torch.randn(37, device=DEV), torch.randn(37, device=DEV)
    y = torch.ops.fxopt.layer_norm(x, w, b, 1e-5, None, torch.float32)[0]
    assert torch.allclose(y, b.expand(3, 37))
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("has_w,has_b", [(True, True), (False, True), (False, False)])
def test_opcheck(has_w, has_b):
    x = torch.randn(4, 3, 24, requires_grad=True, device=DEV)
    w, b = _params(24, torch.float32, has_w, has_b)
    torch.library.opcheck(torch.ops.fxopt.layer_norm.default, (x, w, b, 1e-5, None, torch.float32))
    _, mean, rstd = K.layer_norm_reference(x.detach(), None, None, 1e-5)
    torch.library.opcheck(torch.ops.fxopt.layer_norm_backward.default,
                          (torch.randn(4, 3, 24, device=DEV), x.detach(), w.detach() if has_w else None, mean, rstd,
                           None, has_w, torch.float32 if has_b else None))


def test_cost_declared():
    from fxopt.kernels.registry import COSTS
    flops, nbytes = COSTS["layer_norm"]((16384, 4096), 2)
    assert flops == 7 * 16384 * 4096 and nbytes > 2 * 16384 * 4096 * 2


@pytest.mark.gpu
def test_gpu_large_bf16(no_fallback):
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w, b = _params(4096, torch.bfloat16, True, True)
    y = torch.ops.fxopt.layer_norm(x, w, b, 1e-5, None, torch.bfloat16)[0]
    y_ref = F.layer_norm(x.float(), (4096,), w.float(), b.float(), 1e-5)
    assert rel(y, y_ref) <= 1e-2
    dy = torch.randn_like(y)
    for g, e in zip(torch.autograd.grad(y, (x, w, b), dy), torch.autograd.grad(y_ref, (x, w, b), dy)):
        assert rel(g, e) <= 1e-2
