"""layer_norm pattern: F.layer_norm and the hand-written forms that must match (and stay exact), near-misses rejected
with their reason."""
import pytest
import torch
import torch.nn.functional as F

import fxopt
from fxopt.normalize import meta, normalize
from fxopt.patterns.layer_norm import LAYER_NORM
from fxopt.patterns.match import apply_pattern
from fxopt.report import GraphReport
from tests.helpers import rel

H = 40
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


class HandWritten(torch.nn.Module):
    """The hand-written spellings: variance by (x - m)^2 or var(unbiased=False), rsqrt or sqrt, casts, w/b."""

    def __init__(self, var="pow", root="rsqrt", upcast=True, mid=False, weight=True, bias=True, dtype=torch.float32,
                 shared_centered=False, w_first=False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(H, dtype=dtype) * 0.3 + 1) if weight else None
        self.bias = torch.nn.Parameter(torch.randn(H, dtype=dtype) * 0.3) if bias else None
        self.var, self.root, self.upcast, self.mid = var, root, upcast, mid
        self.shared, self.w_first = shared_centered, w_first

    def forward(self, x):
        dt = x.dtype
        h = x.to(torch.float32) if self.upcast else x
        m = h.mean(-1, keepdim=True)
        xc = h - m
        if self.var == "pow":
            v = (xc if self.shared else h - m).pow(2).mean(-1, keepdim=True)
        elif self.var == "square":
            v = torch.mean(torch.square(h - m), dim=-1, keepdim=True)
        elif self.var == "mul":
            v = ((h - m) * (h - m)).mean(-1, keepdim=True)
        elif self.var == "var":
            v = h.var(-1, keepdim=True, unbiased=False)
        else:
            v = torch.var(h, dim=-1, keepdim=True, correction=0)
        y = xc * torch.rsqrt(v + 1e-5) if self.root == "rsqrt" else xc / torch.sqrt(1e-5 + v)
        if self.mid:
            y = y.to(dt)
        if self.weight is not None:
            w = self.weight if self.mid else self.weight.float()
            y = w * y if self.w_first else y * w
        if self.bias is not None:
            y = (self.bias if self.mid else self.bias.float()) + y
        return y.to(dt)


def _compile(mod, *xs, **opts):
    torch._dynamo.reset()
    cm = torch.compile(mod, backend="fxopt", options={"inductor": False, **opts})
    return cm(*xs), fxopt.last_report()


def _check_exact(mod, x, out, dtype, out_tol=2e-3):
    """bf16 outputs: one rounding of fp32 math each side, so at most rare 1-ulp flips (2e-3; a truncating cast
    gives 4e-3); `(h.to(bf16) * w) + b` rounds twice in eager and once here: out_tol 1e-2."""
    ref = mod(x)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert rel(out, ref) <= (2e-6 if dtype == torch.float32 else out_tol)
    g = torch.randn_like(ref)
    leaves = [x] + [p for p in mod.parameters()]
    for a, b in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)):
        assert a.dtype == b.dtype and rel(a, b) <= TOL[dtype]


def _rewritten(fn, *xs):
    """Dynamo's graph of fn after normalize + the layer_norm pattern (to look at the op's arguments)."""
    graphs = []
    torch._dynamo.reset()
    torch.compile(fn, backend=lambda gm, ex: graphs.append(gm) or gm.forward)(*xs)
    gm = graphs[0]
    normalize(gm)
    rep = GraphReport("test")
    apply_pattern(gm, LAYER_NORM, rep, "test")
    ops = [n for n in gm.graph.nodes if n.target is torch.ops.fxopt.layer_norm.default]
    return ops, rep


@pytest.mark.parametrize("affine", [dict(), dict(bias=False), dict(elementwise_affine=False)])
def test_nn_layer_norm(affine):
    m = torch.nn.LayerNorm(H, eps=1e-6, **affine)
    if m.weight is not None:
        torch.nn.init.normal_(m.weight, 1.0, 0.3)
    if m.bias is not None:
        torch.nn.init.normal_(m.bias, 0.0, 0.3)
    x = torch.randn(3, 7, H, requires_grad=True)
    out, rep = _compile(m, x)
    assert rep.matched["layer_norm"] == 1
    _check_exact(m, x, out, torch.float32)


def test_functional_spellings():
    w, b = torch.randn(H, requires_grad=True), torch.randn(H, requires_grad=True)

    def f(x):
        return (F.layer_norm(x, (H,), eps=1e-6) + torch.layer_norm(x, [H], w, b, 1e-5)
                + F.layer_norm(x, normalized_shape=[H], weight=None, bias=b))
    x = torch.randn(5, H, requires_grad=True)
    out, rep = _compile(f, x)
    assert rep.matched["layer_norm"] == 3
    assert rel(out, f(x)) <= 2e-6
    for a, e in zip(torch.autograd.grad(out.sum(), (x, w, b)), torch.autograd.grad(f(x).sum(), (x, w, b))):
        assert rel(a, e) <= 1e-5


@pytest.mark.parametrize("pdtype", [torch.bfloat16, torch.float32])
def test_functional_bf16_keeps_x_dtype(pdtype):
    m = torch.nn.LayerNorm(H).to(pdtype)
    x = torch.randn(4, H, dtype=torch.bfloat16, requires_grad=True)
    out, rep = _compile(m, x)
    assert rep.matched["layer_norm"] == 1 and out.dtype == torch.bfloat16
    _check_exact(m, x, out, torch.bfloat16)


def test_functional_upcast_and_cast_back_absorbed():
    w, b = torch.randn(H), torch.randn(H)
    f = lambda x: F.layer_norm(x.float(), (H,), w, b, 1e-5).to(torch.bfloat16)
    x = torch.randn(6, H, dtype=torch.bfloat16)
    ops, rep = _rewritten(f, x)
    assert len(ops) == 1 and rep.rejected == []
    assert meta(ops[0].args[0]).dtype == torch.bfloat16 and ops[0].args[-1] == torch.bfloat16   # reads x as is
    out, rep = _compile(f, x)
    assert rep.matched["layer_norm"] == 1 and out.dtype == torch.bfloat16 and rel(out, f(x)) <= 1e-2


@pytest.mark.parametrize("form", [
    dict(),                                           # Cohere: (x32 - m) twice, pow, rsqrt, w.float() * h, cast back
    dict(var="var", root="sqrt", w_first=True),
    dict(var="correction", bias=False),
    dict(var="square", weight=False),
    dict(var="mul", weight=False, bias=False),
    dict(mid=True),                                   # ((x32 - m) * r).to(dt) * w + b
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hand_written_forms(form, dtype):
    m = HandWritten(dtype=dtype, **form)
    x = (torch.randn(3, 5, H, dtype=dtype) * 2 + 1).requires_grad_()
    out, rep = _compile(m, x)
    assert rep.matched["layer_norm"] == 1, rep.rejected
    _check_exact(m, x, out, dtype, out_tol=1e-2 if form.get("mid") else 2e-3)


def test_hand_written_fp32_without_upcast():
    m = HandWritten(upcast=False, var="var", root="sqrt")
    x = torch.randn(4, H, requires_grad=True)
    out, rep = _compile(m, x)
    assert rep.matched["layer_norm"] == 1
    _check_exact(m, x, out, torch.float32)


def test_hand_written_shared_centered_value():
    # xc = x - m used by both the variance and the numerator: rms_norm (earlier in PATTERNS) sees rms_norm(xc)
    m = HandWritten(shared_centered=True)
    x = torch.randn(4, H, requires_grad=True)
    out, rep = _compile(m, x, patterns=["layer_norm"])
    assert rep.matched["layer_norm"] == 1
    _check_exact(m, x, out, torch.float32)


def test_hand_written_upcast_absorbed():
    m = HandWritten(dtype=torch.bfloat16)
    x = torch.randn(3, H, dtype=torch.bfloat16)
    ops, _ = _rewritten(m, x)
    assert len(ops) == 1
    x_arg, w_arg, b_arg = ops[0].args[:3]
    assert meta(x_arg).dtype == meta(w_arg).dtype == meta(b_arg).dtype == torch.bfloat16   # casts absorbed
    assert ops[0].args[4:] == (None, torch.bfloat16)


def _reasons(rep):
    return [r.reason for r in rep.rejected if r.pattern == "layer_norm"]


def _rejected(fn, x, words, **opts):
    out, rep = _compile(fn, x, **opts)
    assert rep.matched["layer_norm"] == 0 and any(words in r for r in _reasons(rep)), _reasons(rep)
    assert rel(out, fn(x)) <= 1e-6


def test_near_miss_unbiased_variance():
    _rejected(lambda x: (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + 1e-5),
              torch.randn(3, H), "unbiased variance")


def test_near_miss_several_normalized_dims():
    _rejected(lambda x: F.layer_norm(x, (3, H)), torch.randn(2, 3, H), "only the last dim")


def test_near_miss_other_dim():
    def f(x):
        m = x.mean(1, keepdim=True)
        return (x - m) * torch.rsqrt(((x - m) ** 2).mean(1, keepdim=True) + 1e-5)
    _rejected(f, torch.randn(3, 6, H), "not the last dim")


def test_near_miss_variance_in_bf16():
    _rejected(HandWritten(upcast=False, weight=False, bias=False, dtype=torch.bfloat16),
              torch.randn(3, H, dtype=torch.bfloat16), "not fp32")


def test_near_miss_mean_reused():
    def f(x):
        m = x.mean(-1, keepdim=True)
        return (x - m) * torch.rsqrt(((x - m) ** 2).mean(-1, keepdim=True) + 1e-5) + m
    _rejected(f, torch.randn(3, H), "also used by")


def test_near_miss_rms_norm_form():
    _rejected(lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), torch.randn(3, H),
              "is not x - mean", patterns=["layer_norm"])


def test_near_miss_other_numerator():
    def f(x):
        m = x.mean(-1, keepdim=True)
        y = x.flip(-1)
        return (y - y.mean(-1, keepdim=True)) * torch.rsqrt(((x - m) ** 2).mean(-1, keepdim=True) + 1e-5)
    _rejected(f, torch.randn(3, H), "variance's x")


def test_near_miss_eps_tensor():
    eps = torch.tensor(1e-5)

    def f(x):
        m = x.mean(-1, keepdim=True)
        return (x - m) * torch.rsqrt(((x - m) ** 2).mean(-1, keepdim=True) + eps)
    _rejected(f, torch.randn(3, H), "eps is not a constant")


def test_tail_stops_at_non_parameter_operands():
    """`* t` with a full-size tensor is not a weight: normalization matched, the product stays in the graph."""
    t = torch.randn(3, H)
    m = torch.nn.LayerNorm(H, elementwise_affine=False)
    f = lambda x: m(x) * t + 1.0
    out, rep = _compile(f, torch.randn(3, H))
    assert rep.matched["layer_norm"] == 1
    x = torch.randn(3, H)
    ops, _ = _rewritten(f, x)
    assert ops[0].args[1] is None and ops[0].args[2] is None
