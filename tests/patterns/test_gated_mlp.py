"""swiglu / geglu patterns: spellings that must match (and stay exact), near-misses rejected with their reason."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import (ACT2FN, FastGELUActivation, GELUActivation, GELUTanh, NewGELUActivation,
                                      QuickGELUActivation)

import fxopt
from tests.helpers import rel

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")


class MLP(torch.nn.Module):
    """gate/up projections + a gating function `fn(gate, up)` (the spelling under test) + down projection."""

    def __init__(self, fn, h=16, i=24, fused=False):
        super().__init__()
        self.fn, self.fused = fn, fused
        self.gate_up = torch.nn.Linear(h, 2 * i, bias=False)
        self.gate = torch.nn.Linear(h, i, bias=False)
        self.up = torch.nn.Linear(h, i, bias=False)
        self.down = torch.nn.Linear(i, h, bias=False)

    def forward(self, x):
        if self.fused:
            return self.down(self.fn(self.gate_up(x), None))
        return self.down(self.fn(self.gate(x), self.up(x)))


def _run(fn, fused=False, patterns=("swiglu", "geglu"), dtype=torch.float32):
    """Compile MLP(fn) with fxopt (aot_eager), compare output and grads with eager; returns (report, worst rel)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = MLP(fn, fused=fused).to(dtype)
    x = torch.randn(2, 5, 16, dtype=dtype, requires_grad=True)
    out = torch.compile(m, backend="fxopt", options={"inductor": False, "patterns": list(patterns)})(x)
    rep = fxopt.last_report()
    ref = m(x)
    dy = torch.randn_like(ref)
    params = [x] + [p for p in m.parameters()]
    got = torch.autograd.grad(out, params, dy, allow_unused=True)
    exp = torch.autograd.grad(ref, params, dy, allow_unused=True)
    worst = rel(out, ref)
    for a, b in zip(got, exp):
        if b is not None:
            worst = max(worst, rel(a, b))
    return rep, worst


SWIGLU_FORMS = {
    "silu*up": lambda g, u: F.silu(g) * u,
    "up*silu": lambda g, u: u * F.silu(g),
    "g*sigmoid(g)*up": lambda g, u: g * torch.sigmoid(g) * u,
    "up*(sigmoid(g)*g)": lambda g, u: u * (g.sigmoid() * g),
    "nn.SiLU": lambda g, u: torch.nn.SiLU()(g) * u,
    "ACT2FN[silu]": lambda g, u: ACT2FN["silu"](g) * u,
    "lora-like gate": lambda g, u: F.silu(g + 0.5 * g.flip(-1)) * u,   # gate = base + lora: not a leaf
}
GEGLU_FORMS = {   # (spelling, expected activation)
    "F.gelu": (lambda g, u: F.gelu(g) * u, "gelu"),
    "F.gelu tanh": (lambda g, u: u * F.gelu(g, approximate="tanh"), "gelu_tanh"),
    "GELUTanh": (lambda g, u: GELUTanh()(g) * u, "gelu_tanh"),
    "GELUTanh python": (lambda g, u: GELUTanh(use_gelu_tanh_python=True)(g) * u, "gelu_tanh"),
    "NewGELU": (lambda g, u: NewGELUActivation()(g) * u, "gelu_tanh"),
    "FastGELU": (lambda g, u: FastGELUActivation()(g) * u, "gelu_tanh"),
    "gelu erf python": (lambda g, u: GELUActivation(use_gelu_python=True)(g) * u, "gelu"),
    "ACT2FN[gelu_pytorch_tanh]": (lambda g, u: ACT2FN["gelu_pytorch_tanh"](g) * u, "gelu_tanh"),
    "hand-written": (lambda g, u: u * (0.5 * g * (1.0 + torch.tanh(math.sqrt(2 / math.pi) *
                                                                   (g + 0.044715 * g ** 3)))), "gelu_tanh"),
}


@pytest.mark.parametrize("name", list(SWIGLU_FORMS))
def test_swiglu_spellings_match_and_are_exact(name, no_fallback):
    rep, worst = _run(SWIGLU_FORMS[name])
    assert rep.matched == {"swiglu": 1, "geglu": 0}, (rep.matched, [r.reason for r in rep.rejected])
    assert rep.rejected == [], [r.reason for r in rep.rejected]   # one match per MLP, nothing else considered
    assert rep.ops_in_compiled() == {"gated_mlp": 1, "gated_mlp_backward": 1}
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("name", list(GEGLU_FORMS))
def test_geglu_spellings_match_and_are_exact(name, no_fallback):
    fn, _act = GEGLU_FORMS[name]
    rep, worst = _run(fn)
    assert rep.matched == {"swiglu": 0, "geglu": 1}, (rep.matched, [r.reason for r in rep.rejected])
    assert rep.rejected == [], [r.reason for r in rep.rejected]
    # gelu and gelu(tanh) differ by ~1e-3 relative: exactness at 1e-5 shows the right activation was picked
    assert worst <= 1e-5, worst


def test_bf16_output_dtype(no_fallback):
    rep, worst = _run(SWIGLU_FORMS["silu*up"], dtype=torch.bfloat16)
    assert rep.matched["swiglu"] == 1 and worst <= 2e-2


def _chunk(gu, _):
    gate, up = gu.chunk(2, dim=-1)
    return up * F.silu(gate)


def _chunk_up_first(gu, _):
    up, gate = torch.chunk(gu, 2, -1)
    return F.gelu(gate, approximate="tanh") * up


def _split(gu, _):
    gate, up = gu.split(gu.shape[-1] // 2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize("fn,pattern", [(_chunk, "swiglu"), (_chunk_up_first, "geglu"), (_split, "swiglu")])
def test_fused_gate_up_reads_packed_tensor(fn, pattern, no_fallback):
    rep, worst = _run(fn, fused=True)
    assert rep.matched[pattern] == 1 and rep.rejected == []
    assert rep.ops_in_compiled() == {"gated_mlp_packed": 1, "gated_mlp_packed_backward": 1}
    assert worst <= 1e-5, worst


def test_chunk_halves_used_elsewhere_keep_views(no_fallback):
    def fn(gu, _):
        gate, up = gu.chunk(2, dim=-1)
        return F.silu(gate) * up + gate          # gate also feeds the residual: chunk stays, op reads the views
    rep, worst = _run(fn, fused=True)
    assert rep.matched["swiglu"] == 1
    assert rep.ops_in_compiled() == {"gated_mlp": 1, "gated_mlp_backward": 1}
    assert worst <= 1e-5, worst


def _reasons(rep, pattern):
    return [r.reason for r in rep.rejected if r.pattern == pattern]


@pytest.mark.parametrize("fn,pattern,reason", [
    (lambda g, u: F.relu(g) * u, "swiglu", "activation not recognized"),
    (lambda g, u: QuickGELUActivation()(g) * u, "swiglu", "activation not recognized"),    # x * sigmoid(1.702 x)
    (lambda g, u: u * (0.5 * g * (1.0 + torch.tanh(0.8 * (g + 0.044715 * g ** 3)))), "geglu",
     "activation not recognized"),                                                          # wrong constant
    (lambda g, u: F.silu(g) * u[..., :1], "swiglu", "shapes broadcast"),
    (lambda g, u: F.gelu(g[..., :1]) * u, "geglu", "shapes broadcast"),
])
def test_near_misses_rejected_with_reason(fn, pattern, reason):
    rep, worst = _run(fn)
    assert rep.matched == {"swiglu": 0, "geglu": 0}
    assert any(reason in r for r in _reasons(rep, pattern)), rep.rejected
    assert worst <= 1e-5


def test_inplace_activation():
    rep, worst = _run(lambda g, u: torch.nn.SiLU(inplace=True)(g) * u)     # nothing else reads g: a plain silu
    assert rep.matched["swiglu"] == 1 and worst <= 1e-5

    def fn(g, u):
        y = F.silu(g, inplace=True) * u
        return y + g                                # reads the overwritten g
    rep, worst = _run(fn)
    assert rep.matched["swiglu"] == 0 and worst <= 1e-5
    assert any("in-place activation" in r for r in _reasons(rep, "swiglu")), rep.rejected


def test_activation_used_elsewhere_rejected():
    def fn(g, u):
        a = F.silu(g)
        return a * u + a          # replacing would compute silu twice
    rep, worst = _run(fn)
    assert rep.matched["swiglu"] == 0
    assert any("also used" in r for r in _reasons(rep, "swiglu")), rep.rejected
    assert worst <= 1e-5


def test_only_enabled_family_runs(no_fallback):
    rep, _ = _run(SWIGLU_FORMS["silu*up"], patterns=("geglu",))
    assert rep.matched == {"geglu": 0} and rep.rejected == []
    rep, _ = _run(GEGLU_FORMS["F.gelu"][0], patterns=("swiglu",))
    assert rep.matched == {"swiglu": 0} and rep.rejected == []


def test_not_a_gating_multiply_is_ignored():
    def fn(g, u):                 # a function of g alone times g, a scalar gate, and sigmoid-free products
        return F.silu(g) * g + torch.sigmoid(g) * 2.0 + g * u
    rep, worst = _run(fn)
    assert rep.matched == {"swiglu": 0, "geglu": 0} and rep.rejected == []
    assert worst <= 1e-5
