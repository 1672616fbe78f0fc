"""fxopt::rope / rope_backward: Triton kernel (interpreter on CPU) vs the eager HF math, fwd and bwd."""
import pytest
import torch

import fxopt  # noqa: F401  (registers the ops)
from fxopt.kernels import rope as R
from tests.helpers import rel

ROPE = torch.ops.fxopt.rope


def rotate(x, interleaved):
    if interleaved:
        return torch.stack((-x[..., 1::2], x[..., 0::2]), -1).flatten(-2)
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), -1)


def eager(x, cos, sin, interleaved=False):
    """HF apply_rotary_pos_emb on one tensor, partial rotary when cos is narrower than x."""
    r = cos.shape[-1]
    xr, xp = x[..., :r], x[..., r:]
    y = xr * cos + rotate(xr, interleaved) * sin
    return torch.cat((y, xp), -1) if xp.shape[-1] else y


def make(b=2, h=4, hk=2, s=7, d=64, rot=None, dt=torch.float32, layout="bshd", per_batch=True, cos_dt=None):
    """q/k [b, h, s, d] (layout "bshd": transposed views of [b, s, h, d]); cos/sin [b|1, 1, s, rot], random values
    (the kernel must be exact for any cos/sin, not only for rotations)."""
    rot = rot or d
    if layout == "bshd":
        q = torch.randn(b, s, h, d, dtype=dt).transpose(1, 2)
        k = torch.randn(b, s, hk, d, dtype=dt).transpose(1, 2)
    else:
        q, k = torch.randn(b, h, s, d, dtype=dt), torch.randn(b, hk, s, d, dtype=dt)
    nb = b if per_batch else 1
    cos = (2 * torch.rand(nb, s, rot) - 1).to(cos_dt or dt).unsqueeze(1)
    sin = (2 * torch.rand(nb, s, rot) - 1).to(cos_dt or dt).unsqueeze(1)
    return q, k, cos, sin


def fwd_bwd(q, k, cos, sin, interleaved, fused):
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    if fused:
        mid = torch.promote_types(q.dtype, cos.dtype)
        yq, yk = ROPE(q, k, cos, sin, interleaved, mid, q.dtype, mid)
    else:
        yq, yk = eager(q, cos, sin, interleaved), eager(k, cos, sin, interleaved)
    torch.manual_seed(123)
    gq, gk = torch.randn(yq.shape).to(yq.dtype), torch.randn(yk.shape).to(yk.dtype)
    dq, dk = torch.autograd.grad((yq, yk), (q, k), (gq, gk))
    return yq, yk, dq, dk


@pytest.mark.parametrize("d,rot,s,interleaved,layout", [
    (64, None, 7, False, "bshd"),      # HF layout: transposed, non-contiguous
    (80, None, 13, False, "bhsd"),     # half 40: masked pair block
    (96, 48, 1, False, "bshd"),        # partial rotary, one token
    (128, 32, 5, True, "bhsd"),        # interleaved + partial
    (64, None, 9, True, "bshd"),
])
def test_fp32_matches_eager(d, rot, s, interleaved, layout, no_fallback):
    torch.manual_seed(0)
    q, k, cos, sin = make(s=s, d=d, rot=rot, layout=layout)
    got, ref = fwd_bwd(q, k, cos, sin, interleaved, True), fwd_bwd(q, k, cos, sin, interleaved, False)
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert rel(a, b) <= 1e-6
    if rot is None:   # eager's `q * cos` keeps q's layout, so does the op (partial: eager's cat is contiguous)
        assert got[0].stride() == ref[0].stride()


@pytest.fixture
def exact(monkeypatch):
    monkeypatch.setenv("FXOPT_ROPE_EXACT", "1")


@pytest.mark.parametrize("interleaved,rot", [(False, None), (True, 32)])
def test_bf16_bitexact_with_eager(interleaved, rot, exact, no_fallback):
    """FXOPT_ROPE_EXACT=1: products and the sum rounded to bf16 as eager does (fwd), and bwd grads as autograd
    accumulates them."""
    torch.manual_seed(1)
    q, k, cos, sin = make(s=11, d=64, rot=rot, dt=torch.bfloat16)
    got, ref = fwd_bwd(q, k, cos, sin, interleaved, True), fwd_bwd(q, k, cos, sin, interleaved, False)
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype == torch.bfloat16
        assert rel(a, b) <= 1e-2
        assert torch.equal(a, b)


@pytest.mark.parametrize("interleaved,rot", [(False, None), (True, 32)])
def test_bf16_default_rounds_once(interleaved, rot, no_fallback):
    """Default: fp32 math, one rounding: within bf16 rounding of eager, and no farther from the fp64 truth."""
    torch.manual_seed(1)
    q, k, cos, sin = make(s=11, d=64, rot=rot, dt=torch.bfloat16)
    got, ref = fwd_bwd(q, k, cos, sin, interleaved, True), fwd_bwd(q, k, cos, sin, interleaved, False)
    q64, k64, c64, s64 = (t.detach().double() for t in (q, k, cos, sin))
    truth = eager(q64, c64, s64, interleaved) if rot is None else None
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype == torch.bfloat16 and rel(a, b) <= 1e-2
    if truth is not None:
        assert rel(got[0], truth) <= rel(ref[0], truth) + 1e-6


def test_bf16_q_fp32_cos_promotes(exact, no_fallback):
    """bf16 q * fp32 cos: eager computes and returns fp32; grads come back in bf16."""
    torch.manual_seed(2)
    q, k, cos, sin = make(s=6, d=64, dt=torch.bfloat16, cos_dt=torch.float32)
    got, ref = fwd_bwd(q, k, cos, sin, False, True), fwd_bwd(q, k, cos, sin, False, False)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.bfloat16
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_upcast_then_downcast(no_fallback):
    """Cohere: (q.float() * cos + rot(q.float()) * sin).to(bf16): mid fp32, grads rounded once to bf16."""
    torch.manual_seed(3)
    q, k, cos, sin = make(s=6, d=64, dt=torch.bfloat16)
    qg = q.detach().requires_grad_()
    y = ROPE(qg, None, cos, sin, False, torch.float32, torch.float32, torch.bfloat16)[0]
    qr = q.detach().requires_grad_()
    yr = eager(qr.float(), cos, sin).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, yr)
    g = torch.randn(y.shape).to(torch.bfloat16)
    assert torch.equal(torch.autograd.grad(y, qg, g)[0], torch.autograd.grad(yr, qr, g)[0])


@pytest.mark.parametrize("cos_shape", ["sd", "1sd", "b1sd"])
def test_cos_shapes_and_q_only(cos_shape, no_fallback):
    torch.manual_seed(4)
    b, h, s, d = 3, 2, 5, 16
    q = torch.randn(b, s, h, d).transpose(1, 2).requires_grad_()
    base = torch.rand(b if cos_shape == "b1sd" else 1, s, d)
    cos, sin = base.cos(), base.sin()
    cos, sin = {"sd": (cos[0], sin[0]), "1sd": (cos, sin), "b1sd": (cos[:, None], sin[:, None])}[cos_shape]
    y, ky = ROPE(q, None, cos, sin, False, q.dtype, q.dtype, q.dtype)
    assert ky.numel() == 0
    ref = eager(q, cos, sin)
    assert rel(y, ref) <= 1e-6
    g = torch.randn_like(ref)
    assert rel(torch.autograd.grad(y, q, g)[0], torch.autograd.grad(ref, q, g)[0]) <= 1e-6


def test_gptj_layout_and_3d(no_fallback):
    """[B, S, H, D] q with cos [1, S, 1, D] (heads at dim 2); a 3-D [B, S, D] q with per-token cos."""
    torch.manual_seed(5)
    q, k = torch.randn(2, 6, 3, 16), torch.randn(2, 6, 3, 16)
    cos, sin = torch.rand(1, 6, 1, 8) * 2 - 1, torch.rand(1, 6, 1, 8) * 2 - 1
    yq, yk = ROPE(q, k, cos, sin, True, q.dtype, q.dtype, q.dtype)
    assert rel(yq, eager(q, cos, sin, True)) <= 1e-6 and rel(yk, eager(k, cos, sin, True)) <= 1e-6
    x, c, s_ = torch.randn(2, 5, 8), torch.rand(2, 5, 8), torch.rand(2, 5, 8)
    assert rel(ROPE(x, None, c, s_, False, x.dtype, x.dtype, x.dtype)[0], eager(x, c, s_)) <= 1e-6


def test_every_output_written(no_fallback):
    torch.manual_seed(6)
    q, k, cos, sin = make(b=1, h=3, hk=1, s=3, d=80, rot=40)
    yq, yk = torch.full(q.shape, float("nan")), torch.full(k.shape, float("nan"))
    R._launch(q, k, cos, sin, yq, yk, False, torch.float32, False)
    assert not yq.isnan().any() and not yk.isnan().any()
    assert rel(yq, eager(q, cos, sin)) <= 1e-6 and rel(yk, eager(k, cos, sin)) <= 1e-6


def test_cos_grad_is_refused(no_fallback):
    q, k, cos, sin = make(s=3, d=16)
    cos.requires_grad_()
    y = ROPE(q.requires_grad_(), None, cos, sin, False, q.dtype, q.dtype, q.dtype)[0]
    with pytest.raises(RuntimeError, match="no(es not compute)? gradients for cos/sin|cos/sin"):
        y.sum().backward()


def test_plan_dims_reasons():
    with pytest.raises(ValueError, match="every leading dim"):
        R.plan_dims((2, 4, 5, 8), None, (2, 4, 5, 8), (2, 4, 5, 8))
    with pytest.raises(ValueError, match="differ outside one head dim"):
        R.plan_dims((2, 4, 5, 8), (2, 3, 6, 8), (8,), (8,))
    assert R.plan_dims((2, 4, 5, 8), (2, 2, 5, 8), (1, 1, 5, 8), (1, 1, 5, 8)) == (0, 2, 1)


def test_opcheck():
    torch.manual_seed(7)
    q, k, cos, sin = make(b=1, h=2, hk=1, s=3, d=16, rot=8)
    q.requires_grad_(), k.requires_grad_()
    torch.library.opcheck(ROPE, (q, k, cos, sin, False, q.dtype, q.dtype, q.dtype))
    torch.library.opcheck(ROPE, (q, None, cos, sin, True, q.dtype, q.dtype, q.dtype))
    g, gk = torch.randn(1, 2, 3, 16), torch.randn(1, 1, 3, 16)
    bwd = torch.ops.fxopt.rope_backward
    torch.library.opcheck(bwd, (g, None, cos, sin, False, q.dtype, q.dtype, q.dtype, [0, 2, 1, 3], []))
    torch.library.opcheck(bwd, (g, gk, cos, sin, True, q.dtype, q.dtype, q.dtype, [0, 1, 2, 3], [0, 2, 1, 3]))


def test_input_grads_keep_input_layout(no_fallback):
    """dq is laid out like q (HF: a transpose of [B, S, H, D]) whatever the layout of the incoming grad, so the
    view/transpose backward above it needs no copy."""
    q, k, cos, sin = make(s=5, d=16, layout="bshd")
    q.requires_grad_(), k.requires_grad_()
    yq, yk = ROPE(q, k, cos, sin, False, q.dtype, q.dtype, q.dtype)
    dq, dk = torch.autograd.grad((yq, yk), (q, k), (torch.randn(yq.shape), torch.randn(yk.shape)))
    assert dq.stride() == q.stride() and dk.stride() == k.stride()


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_cuda_default_launch_matches_reference(layout, no_fallback):
    """On CUDA, both layouts: bf16 fwd and bwd against the fp32 reference rounded once, odd sizes, every output
    written."""
    torch.manual_seed(9)
    q, k, cos, sin = [t.cuda() for t in make(b=3, h=5, hk=3, s=77, d=128, dt=torch.bfloat16, layout=layout)]
    for bwd in (False, True):
        yq, yk = torch.full_like(q, float("nan")), torch.full_like(k, float("nan"))
        R._launch(q, k, cos, sin, yq, yk, False, torch.float32, bwd)
        for y, x in ((yq, q), (yk, k)):
            ref = R.rope_reference(x, cos, sin, False, torch.float32, torch.bfloat16, bwd)
            assert not y.isnan().any() and rel(y.float(), ref.float()) <= 1e-2
