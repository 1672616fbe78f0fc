"""lora_dy.dy_pass (dxa = s dy B and dB = s dy^T xa from one pass over dy) vs fp32 torch, the rounded copy of dxa,
and fxopt::lora / fxopt::lora_nf4 backward through it vs the separate products (Triton interpreter on CPU, natively
on GPU)."""
import pytest
import torch

import fxopt  # noqa: F401
from tests.helpers import rel

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(m, n, r, half, seed=None):
    g = torch.Generator(device=DEV)
    g.manual_seed(torch.seed() if seed is None else seed)   # fresh each run
    dy = torch.randn(m, n, device=DEV, generator=g).to(half)
    b = torch.randn(n, r, device=DEV, generator=g)
    xa = torch.randn(m, r, device=DEV, generator=g) * 10
    return dy, b, xa


@pytest.mark.parametrize("split", [0, 1, 3])
@pytest.mark.parametrize("m,n,r", [(70, 150, 5), (16, 16, 1), (33, 200, 16), (129, 37, 20)])
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_dy_pass_vs_fp32(m, n, r, half, split):
    """Both products at fp32 accuracy from half dy (hi/lo split dots), odd sizes, several row blocks and column
    shares; every element of dxa and dB written (compared in full)."""
    from fxopt.kernels.lora_dy import dy_pass, dy_pass_reference
    dy, b, xa = inputs(m, n, r, half)
    cfg = None if DEV == "cpu" else (128, 64, 4, 3, 1024)   # on CUDA a second config beside the default's
    dxa, low, db = dy_pass(dy, b, xa, 0.7, split=split, config=cfg)
    want_dxa, want_db = dy_pass_reference(dy, b, xa, 0.7)
    assert low is None
    assert dxa.shape == (m, r) and db.shape == (n, r) and dxa.dtype == db.dtype == torch.float32
    assert rel(dxa, want_dxa) <= 1e-5 and rel(db, want_db) <= 1e-5
    assert torch.isfinite(dxa).all() and torch.isfinite(db).all()


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_dy_pass_strided_dy_and_rounded_copy(half):
    """dy as a transposed view; low=half: the split sum writes dxa rounded to half, equal to torch's rounding."""
    from fxopt.kernels.lora_dy import dy_pass, dy_pass_reference
    dy, b, xa = inputs(48, 90, 8, half)
    dy_t = dy.t().contiguous().t()
    dxa, low, db = dy_pass(dy_t, b * 100, xa, 0.3, low=half)
    want_dxa, want_db = dy_pass_reference(dy, b * 100, xa, 0.3)
    assert low.dtype == half and torch.equal(low, dxa.to(half))
    assert rel(dxa, want_dxa) <= 1e-5 and rel(db, want_db) <= 1e-5


def test_dy_pass_same_result_every_split():
    """The partial sums are added in a fixed order: a given split gives the same bits on every call."""
    from fxopt.kernels.lora_dy import dy_pass
    dy, b, xa = inputs(64, 128, 4, torch.bfloat16)
    first = dy_pass(dy, b, xa, 1.0, split=2)
    again = dy_pass(dy, b, xa, 1.0, split=2)
    assert torch.equal(first[0], again[0]) and torch.equal(first[2], again[2])


@pytest.mark.parametrize("choice", ["fused", "separate"])
def test_lora_backward_either_dy_path(choice, monkeypatch, no_fallback):
    """fxopt::lora with fp32 adapters over a bf16 base and a bf16 output (dy bf16: the fused pass applies), each
    path forced (on CUDA the faster is measured): gradients of x, A, B vs fp32 math on the same dy; the fused
    pass really runs when chosen."""
    from fxopt.kernels import lora_dy
    monkeypatch.setenv("FXOPT_LORA_DYPASS", choice)
    calls = []
    real = lora_dy.dy_pass
    monkeypatch.setattr(lora_dy, "dy_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    m, k, n, r, s = 37, 48, 80, 8, 2.0
    x = torch.randn(m, k, device=DEV).bfloat16().requires_grad_()
    w = (torch.randn(n, k, device=DEV) / k ** 0.5).bfloat16()
    a = (torch.randn(r, k, device=DEV) / k ** 0.5).requires_grad_()
    b = (torch.randn(n, r, device=DEV) * 0.3).requires_grad_()
    y, _ = torch.ops.fxopt.lora(x, w, None, a, b, s, torch.bfloat16)
    dy = torch.randn_like(y)
    dx, da, db = torch.autograd.grad(y, (x, a, b), dy)
    d, xf = dy.float(), x.detach().float()
    dxa = s * d @ b.detach()
    assert rel(db, s * d.t() @ (xf @ a.detach().t())) <= 1e-5
    assert rel(da, dxa.t() @ xf) <= 1e-5
    assert rel(dx, d @ w.float() + dxa @ a.detach()) <= 1e-2
    assert bool(calls) == (choice == "fused")


def test_lora_nf4_backward_fused_dy_pass(monkeypatch, no_fallback):
    """QLoRA (NF4 base, bf16 compute, fp32 adapters): the fused pass gives the same gradients as the separate
    products, within fp32 rounding of the different summation order."""
    pytest.importorskip("bitsandbytes")
    from fxopt.kernels import lora_dy
    from tests.kernels.test_lora import adapter, nf4_args, nf4_linear
    calls = []
    real = lora_dy.dy_pass
    monkeypatch.setattr(lora_dy, "dy_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    q = nf4_linear(64, 96, False, True, torch.bfloat16)
    (w, absmax, absmax2, code2, offset), state = nf4_args(q)
    a, b = adapter(64, 96, 8, torch.float32)
    x = torch.randn(3, 11, 64, device=DEV).bfloat16().requires_grad_()
    grads = {}
    for choice in ("separate", "fused"):
        monkeypatch.setenv("FXOPT_LORA_DYPASS", choice)
        y, _ = torch.ops.fxopt.lora_nf4(x, w, absmax, absmax2, code2, offset, None, a, b, 2.0, *state, torch.bfloat16,
                                        torch.bfloat16)
        dy = torch.randn_like(y) if choice == "separate" else dy
        grads[choice] = torch.autograd.grad(y, (x, a, b), dy)
    assert len(calls) == 1
    for g_sep, g_fused in zip(grads["separate"], grads["fused"]):
        assert rel(g_fused, g_sep) <= 1e-5 if g_sep.dtype == torch.float32 else rel(g_fused, g_sep) <= 1e-2


def test_bad_dy_pass_choice_is_a_clear_error(monkeypatch, no_fallback):
    from fxopt.kernels import lora
    monkeypatch.setenv("FXOPT_LORA_DYPASS", "fast")
    dy, b, xa = inputs(8, 16, 2, torch.bfloat16, seed=0)
    with pytest.raises(ValueError, match="FXOPT_LORA_DYPASS must be"):
        lora._backward(dy, dy.new_zeros(8, 4), torch.zeros(16, 4, dtype=torch.bfloat16, device=DEV),
                       torch.zeros(2, 4, device=DEV), b, xa, 1.0, torch.bfloat16, True, True, True, False, False, True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA allocator's peak")
def test_dy_pass_workspace_is_what_it_allocates():
    """lora_dy.dy_pass_workspace (the planner's bytes for the one pass) equals the allocator's peak during dy_pass
    beyond its inputs and returned tensors, at an 8B shape and an odd one (to 512-byte allocator rounding)."""
    from fxopt.kernels.lora_dy import dy_pass, dy_pass_workspace
    for m, n, r in ((4096, 14336, 16), (1000, 333, 5)):
        dy, b, xa = inputs(m, n, r, torch.bfloat16, seed=0)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = dy_pass(dy, b, xa, 1.0, low=torch.bfloat16)
        torch.cuda.synchronize()
        kept = torch.cuda.memory_allocated() - base
        extra = torch.cuda.max_memory_allocated() - base - kept
        assert kept == sum(-(-t.numel() * t.element_size() // 512) * 512 for t in out if t is not None)
        assert abs(extra - dy_pass_workspace(m, n, r)) <= 2 * 512, (extra, dy_pass_workspace(m, n, r))
        del out   # else the next shape's `out = ...` frees it inside that shape's measurement



def test_one_pass_only_where_its_partials_are_small():
    """The partials grow with the rows: at the 8B step's 4096 x 14336 the one pass applies (19 MB of partials); at
    65,536 tokens (235 MB) the separate products run, and the memory model counts no partials there."""
    from fxopt.kernels import lora_dy
    b = torch.empty(14336, 16, device="meta")
    for rows, ok in ((4096, True), (65536, False)):
        dy = torch.empty(rows, 14336, dtype=torch.bfloat16, device="meta")
        xa = torch.empty(rows, 16, device="meta")
        assert lora_dy.applies(True, dy, b, xa) == ok
        part = lora_dy.dy_pass_workspace(rows, 14336, 16, sms=132)
        assert (part <= lora_dy.MAX_WORKSPACE) == ok
        assert lora_dy.rank_scratch(rows, 14336, 16) == 6 * rows * 16 + (part if ok else 0)
    assert not lora_dy.applies(True, torch.empty(64, 64, device="meta"), b[:64], torch.empty(64, 16, device="meta"))
