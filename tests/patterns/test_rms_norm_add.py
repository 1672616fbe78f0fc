"""The adds next to RMSNorm go into its kernels after the partition (patterns/rms_norm_add.py): which adds, the
report, loss and grads as eager, the switch, and the fallback."""
import pytest
import torch

import fxopt
from fxopt.errors import FxoptError
from tests.helpers import rel


@pytest.fixture(autouse=True)
def _on(monkeypatch):
    monkeypatch.setenv("FXOPT_NORM_ADD", "1")   # opt-in until measured on the GPU (see the pass's docstring)


def _norm(x, w):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


class Residual(torch.nn.Module):
    """Two pre-norm residual blocks and a final norm: each norm but the first reads `h + f(...)`."""

    def __init__(self, h=48, dtype=torch.float32, frozen_norms=False):
        super().__init__()
        self.w = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(h, dtype=dtype) * 0.1 + 1,
                                                           requires_grad=not frozen_norms) for _ in range(5))
        self.f = torch.nn.ModuleList(torch.nn.Linear(h, h, dtype=dtype) for _ in range(4))

    def forward(self, x):
        h = x
        for i, f in enumerate(self.f):
            h = h + f(_norm(h, self.w[i]))
        return _norm(h, self.w[4])


def _run(mod, x, opts):
    inputs = [x] + [p for p in mod.parameters() if p.requires_grad]
    ref = mod(x)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, inputs, g)
    torch._dynamo.reset()
    out = torch.compile(mod, backend="fxopt", options=opts)(x)
    tol = 1e-5 if x.dtype == torch.float32 else 2e-2
    assert rel(out, ref) <= tol
    for a, b in zip(torch.autograd.grad(out, inputs, g), ref_grads):
        assert rel(a, b) <= tol
    return fxopt.last_report()


@pytest.mark.parametrize("opts", [{"inductor": False}, {}], ids=["aot_eager", "inductor"])
def test_residual_adds_go_into_the_norms(opts):
    torch.manual_seed(0)
    rep = _run(Residual(), torch.randn(2, 5, 48, requires_grad=True), opts)
    assert rep.matched["rms_norm"] == 5
    assert rep.fused == {"rms_norm": 8}, rep.fused      # 4 forward adds, 4 gradient adds
    ops = rep.ops_in_compiled()
    assert ops.get("add_rms_norm") == 4 and ops.get("rms_norm") == 1, ops
    assert ops.get("rms_norm_backward_add") == 4 and ops.get("rms_norm_backward") == 1, ops
    assert "8 rms_norm calls in the compiled graphs also do the add next to them" in str(rep)
    assert rep.to_dict()["fused"] == {"rms_norm": 8}


def test_bf16_frozen_norms_as_in_lora():
    torch.manual_seed(1)
    mod = Residual(dtype=torch.bfloat16, frozen_norms=True)
    rep = _run(mod, torch.randn(3, 7, 48, dtype=torch.bfloat16, requires_grad=True), {"inductor": False})
    assert rep.fused == {"rms_norm": 8}


def test_inference_graph_fuses_the_forward_adds():
    torch.manual_seed(2)
    mod = Residual()
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        ref = mod(x)
        torch._dynamo.reset()
        out = torch.compile(mod, backend="fxopt", options={"inductor": False})(x)
    assert rel(out, ref) <= 1e-6
    rep = fxopt.last_report()
    assert rep.fused == {"rms_norm": 4} and rep.ops_in_compiled().get("add_rms_norm") == 4


class Odd(torch.nn.Module):
    """Adds that must stay apart: a broadcast add (bias-like) and an add with alpha."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.rand(32) + 0.5)
        self.bias = torch.nn.Parameter(torch.randn(32))

    def forward(self, x, r):
        a = _norm(x + self.bias, self.w)              # [.., 32] + [32]: broadcast
        return _norm(torch.add(a, r, alpha=2.0), self.w)


def test_broadcast_and_alpha_adds_stay_apart():
    torch.manual_seed(3)
    x, r = torch.randn(4, 32, requires_grad=True), torch.randn(4, 32)
    mod = Odd()
    ref = mod(x, r)
    torch._dynamo.reset()
    out = torch.compile(mod, backend="fxopt", options={"inductor": False})(x, r)
    assert rel(out, ref) <= 1e-6
    rep = fxopt.last_report()
    assert rep.matched["rms_norm"] == 2 and rep.fused == {}, rep.fused


@pytest.mark.parametrize("value", [None, "0"])
def test_off_by_default_and_by_switch(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("FXOPT_NORM_ADD")
    else:
        monkeypatch.setenv("FXOPT_NORM_ADD", value)
    torch.manual_seed(4)
    rep = _run(Residual(), torch.randn(2, 5, 48, requires_grad=True), {"inductor": False})
    assert rep.fused == {} and "add_rms_norm" not in rep.ops_in_compiled()


def test_a_failing_rewrite_falls_back(monkeypatch):
    from fxopt.patterns import rms_norm_add

    def broken(gm):
        for n in list(gm.graph.nodes):
            if n.op == "call_function" and n.target is torch.ops.fxopt.rms_norm.default:
                n.args = (n.args[0],)   # leave the graph broken, then fail
        raise RuntimeError("boom")
    monkeypatch.setattr(rms_norm_add, "fuse_norm_adds", broken)
    torch.manual_seed(5)
    with pytest.warns(RuntimeWarning, match="rms_norm_add"):
        rep = _run(Residual(), torch.randn(2, 5, 48, requires_grad=True), {"inductor": False})
    assert rep.fused == {} and any(f.what == "rms_norm_add" for f in rep.fallbacks)
    torch._dynamo.reset()
    with pytest.raises(Exception) as err:
        torch.compile(Residual(), backend="fxopt", options={"inductor": False, "strict": True})(
            torch.randn(2, 5, 48, requires_grad=True))
    assert isinstance(err.value, FxoptError) or "rms_norm_add" in str(err.value)


def test_with_a_memory_budget_the_plan_still_sees_norms_apart():
    """A tight plan recomputes norms in the backward from a saved s; the fusion comes after and changes no plan."""
    torch.manual_seed(6)
    rep = _run(Residual(h=64), torch.randn(4, 16, 64, requires_grad=True), {"inductor": False, "memory_budget": 0.8})
    assert rep.memory is not None and rep.fused.get("rms_norm", 0) >= 4


@pytest.mark.parametrize("opts", [{"inductor": False}, {}], ids=["aot_eager", "inductor"])
def test_steps_after_the_first_do_not_recompile(opts):
    """The 8B GPU step with this pass never finished its warm-up (see the pass's docstring); one suspect is a
    recompile per step. On CPU: one graph, compiled once, over several training steps."""
    from torch._dynamo.utils import counters
    torch.manual_seed(7)
    mod = Residual()
    opt = torch.optim.SGD(mod.parameters(), lr=1e-2)
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(lambda x: mod(x).float().pow(2).mean(), backend="fxopt", options=opts)
    for _ in range(4):
        step(torch.randn(2, 5, 48)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    # 4 forward adds; 3 gradient adds (x needs no grad here, so the first norm's dx meets no add)
    assert fxopt.last_report().fused == {"rms_norm": 7}
