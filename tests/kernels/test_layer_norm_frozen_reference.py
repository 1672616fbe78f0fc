"""Found by the coverage matrix (gpt2 / falcon + LoRA under check_models.py): with a frozen weight and bias, the
PyTorch reference of fxopt::layer_norm_backward returned one empty tensor as both dw and db, and a custom op's outputs
may not alias each other (RuntimeError at the first backward)."""
import torch
import torch.nn.functional as F

import fxopt  # noqa: F401  (registers torch.ops.fxopt.*)


def test_layer_norm_frozen_affine_on_the_reference_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")        # fxopt reads it per call: the PyTorch reference runs
    x = torch.randn(3, 5, 24, requires_grad=True)
    w, b = torch.randn(24), torch.randn(24)             # frozen (LoRA): no dw, no db
    y, _, _ = torch.ops.fxopt.layer_norm(x, w, b, 1e-5, None, torch.float32)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    x2 = x.detach().requires_grad_()
    (ref,) = torch.autograd.grad(F.layer_norm(x2, (24,), w, b, 1e-5), x2, dy)
    torch.testing.assert_close(dx, ref, rtol=1e-5, atol=1e-5)
    _, mean, rstd = torch.ops.fxopt.layer_norm(x.detach(), w, b, 1e-5, None, torch.float32)
    dx2, dw, db = torch.ops.fxopt.layer_norm_backward(dy, x.detach(), w, mean, rstd, None, False, None)
    assert dw.numel() == 0 and db.numel() == 0
    torch.testing.assert_close(dx2, ref, rtol=1e-5, atol=1e-5)
