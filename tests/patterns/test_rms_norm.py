"""rms_norm pattern: the forms that must match (and stay exact), and near-misses rejected with their reason."""
import pytest
import torch

import fxopt
from tests.helpers import rel


class LlamaForm(torch.nn.Module):          # weight after the cast back
    def __init__(self, h, dtype=torch.float32, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(h, dtype=dtype) * 0.3 + 1)
        self.eps = eps

    def forward(self, x):
        dt = x.dtype
        x = x.to(torch.float32)
        v = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(v + self.eps)
        return self.weight * x.to(dt)


class OffsetForm(torch.nn.Module):         # (1 + w) in fp32, cast back last
    def __init__(self, h):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(h) * 0.1)

    def forward(self, x):
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
        return (out * (1.0 + self.weight.float())).type_as(x)


class VariantForms(torch.nn.Module):       # square / x*x spellings, no weight, eps first
    def forward(self, x):
        a = x * torch.rsqrt(torch.mean(torch.square(x), dim=-1, keepdim=True) + 1e-6)
        b = torch.rsqrt(1e-6 + (x * x).mean(-1, keepdim=True)) * x
        return a + b


def _compile(mod, *xs, **opts):
    torch._dynamo.reset()
    cm = torch.compile(mod, backend="fxopt", options={"inductor": False, **opts})
    out = cm(*xs)
    return out, fxopt.last_report()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_form_matches_and_is_exact(dtype):
    m = LlamaForm(40, dtype)
    x = torch.randn(3, 7, 40, dtype=dtype, requires_grad=True)
    out, rep = _compile(m, x)
    assert rep.matched["rms_norm"] == 1
    ref = m(x)
    assert out.dtype == ref.dtype
    assert rel(out, ref) <= (1e-6 if dtype == torch.float32 else 1e-2)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (x, m.weight), g), torch.autograd.grad(ref, (x, m.weight), g)):
        assert rel(a, b) <= (1e-5 if dtype == torch.float32 else 2e-2)


def test_mixed_weight_dtype_promotes_like_eager():
    m = LlamaForm(32, torch.float32)           # fp32 weight * bf16 normalized value -> fp32 output
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    out, rep = _compile(m, x)
    assert rep.matched["rms_norm"] == 1 and out.dtype == torch.float32
    assert rel(out, m(x)) <= 1e-2


def test_offset_form_absorbs_one_plus_w():
    m = OffsetForm(24)
    x = torch.randn(4, 24, requires_grad=True)
    out, rep = _compile(m, x)
    assert rep.matched["rms_norm"] == 1
    assert rel(out, m(x)) <= 1e-6
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (x, m.weight), g), torch.autograd.grad(m(x), (x, m.weight), g)):
        assert rel(a, b) <= 1e-5


def test_spellings_without_weight():
    x = torch.randn(6, 33)
    out, rep = _compile(VariantForms(), x)
    assert rep.matched["rms_norm"] == 2
    assert rel(out, VariantForms()(x)) <= 1e-6


def _reasons(rep):
    return [r.reason for r in rep.rejected if r.pattern == "rms_norm"]


def test_near_miss_mean_without_keepdim():
    f = lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=False)[..., None] + 1e-6)
    out, rep = _compile(f, torch.randn(3, 8))
    assert rep.matched["rms_norm"] == 0 and any("is not mean" in r for r in _reasons(rep))
    g = lambda x: x.pow(2).mean(-1, keepdim=False) * torch.rsqrt(x.pow(2).mean(-1) + 1e-6)
    out, rep = _compile(g, torch.randn(3, 8))
    assert rep.matched["rms_norm"] == 0 and any("keepdim" in r for r in _reasons(rep))


def test_near_miss_mean_over_other_dim():
    f = lambda x: x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + 1e-6)
    out, rep = _compile(f, torch.randn(3, 8))
    assert rep.matched["rms_norm"] == 0 and any("not the last dim" in r for r in _reasons(rep))


def test_near_miss_rstd_reused():
    def f(x):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x * r, r
    (y, r), rep = _compile(f, torch.randn(3, 8))
    assert rep.matched["rms_norm"] == 0 and any("rsqrt result" in s for s in _reasons(rep))


def test_near_miss_variance_in_bf16():
    f = lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    out, rep = _compile(f, torch.randn(3, 8, dtype=torch.bfloat16))
    assert rep.matched["rms_norm"] == 0 and any("not fp32" in r for r in _reasons(rep))


def test_near_miss_eps_is_a_tensor():
    f = lambda x, e: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + e)
    out, rep = _compile(f, torch.randn(3, 8), torch.tensor(1e-6))
    assert rep.matched["rms_norm"] == 0 and any("eps is not a constant" in r for r in _reasons(rep))


def test_disabled_pattern_is_not_matched(monkeypatch):
    monkeypatch.setenv("FXOPT_DISABLE", "rms_norm")
    out, rep = _compile(LlamaForm(16), torch.randn(2, 16))
    assert "rms_norm" not in rep.matched or rep.matched["rms_norm"] == 0
    out, rep = _compile(LlamaForm(16), torch.randn(2, 16), patterns=["rope"])
    assert rep.matched.get("rms_norm", 0) == 0


def test_centered_input_is_left_to_layer_norm():
    def f(x):
        xc = x - x.mean(-1, keepdim=True)
        return xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + 1e-5)
    out, rep = _compile(f, torch.randn(4, 24), patterns=["rms_norm"])
    assert rep.matched["rms_norm"] == 0 and any("LayerNorm" in r for r in _reasons(rep))


class PowForm(torch.nn.Module):            # gemma4: x * pow(mean(x^2) + eps, -0.5), weight optional
    def __init__(self, h, with_scale=True):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(h) * 0.3 + 1) if with_scale else None

    def forward(self, x):
        xf = x.float()
        out = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + 1e-6, -0.5)
        if self.weight is not None:
            out = out * self.weight.float()
        return out.type_as(x)


@pytest.mark.parametrize("with_scale", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pow_minus_half_spelling_matches(with_scale, dtype):
    """pow(v, -0.5) is rsqrt(v) after normalize: matched, fwd and grads as eager."""
    torch.manual_seed(3)
    m = PowForm(24, with_scale)
    x = torch.randn(2, 5, 24, dtype=dtype, requires_grad=True)
    out, rep = _compile(m, x)
    assert rep.matched["rms_norm"] == 1
    ref = m(x)
    assert out.dtype == ref.dtype and rel(out, ref) <= (1e-6 if dtype == torch.float32 else 1e-2)
    leaves = (x, m.weight) if with_scale else (x,)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)):
        assert rel(a, b) <= (1e-5 if dtype == torch.float32 else 2e-2)


def test_other_powers_are_not_rsqrt():
    """pow(v, -1) or pow(v, 0.5) is not a normalization: nothing matched, the graph computes the same."""
    class Other(torch.nn.Module):
        def forward(self, x):
            return x * torch.pow(x.pow(2).mean(-1, keepdim=True) + 1e-6, -1.0)
    x = torch.randn(2, 5, 24)
    out, rep = _compile(Other(), x)
    assert rep.matched["rms_norm"] == 0
    assert rel(out, Other()(x)) <= 1e-6
