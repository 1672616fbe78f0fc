"""LoRA calls that read one input become one group call (patterns/lora_group.py): which calls join, the report, loss
and grads as eager, and the calls that must stay apart."""
import pytest
import torch

import fxopt
from tests.helpers import rel
from tests.patterns.test_lora import OPTS, Proj

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")


class Heads(torch.nn.Module):
    """q/k/v-like projections of one input, then a fourth of their sum (a separate input: not in the group)."""

    def __init__(self, nf4, bias=True, nested=True, widths=(96, 32, 32)):
        super().__init__()
        self.q, self.k, self.v = [Proj(64, n, bias=bias, nf4=nf4, nested=nested).proj for n in widths]
        self.o = Proj(64, 64, bias=bias, nf4=nf4, nested=nested).proj

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        h = q[..., :64] + k.sum(-1, keepdim=True) * v[..., :1]
        return self.o(h)


def _lora(mod, targets=("q", "k", "v", "o"), **kw):
    from peft import LoraConfig, get_peft_model
    cfg = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets), init_lora_weights=False)
    cfg.update(kw)
    torch.manual_seed(1)
    return get_peft_model(mod, LoraConfig(**cfg)).train()


def _run(mod, x, opts=OPTS):
    params = [p for p in mod.parameters() if p.requires_grad]
    inputs = ([x] if x.requires_grad else []) + params
    ref = mod(x)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, inputs, g)
    torch._dynamo.reset()
    out = torch.compile(mod, backend="fxopt", options=opts)(x)
    assert rel(out, ref) <= 1e-5
    for a, b in zip(torch.autograd.grad(out, inputs, g), ref_grads):
        assert rel(a, b) <= 1e-5
    return fxopt.last_report()


@pytest.mark.parametrize("nf4,bias,nested", [(True, False, True), (True, True, False), (False, True, True)])
def test_projections_of_one_input_run_as_one_call(nf4, bias, nested):
    torch.manual_seed(0)
    rep = _run(_lora(Heads(nf4, bias, nested)), torch.randn(2, 5, 64, requires_grad=True))
    name = "lora_nf4" if nf4 else "lora"
    assert rep.matched[name] == 4
    assert rep.grouped == {name: 3}
    ops = rep.ops_in_compiled()
    assert ops.get(f"{name}_group") == 1 and ops.get(f"{name}_group_backward") == 1, ops
    assert ops.get(name) == 1 and ops.get(f"{name}_backward") == 1, ops   # o reads another input
    assert "3 " + name + " matches run in group calls" in str(rep)


def test_input_without_grad_and_frozen_member():
    """bnb's direct gemm_4bit form (x needs no grad), one member without an adapter (a frozen NF4 linear: apart)."""
    torch.manual_seed(0)
    rep = _run(_lora(Heads(True, bias=False), targets=("q", "k")), torch.randn(2, 5, 64))
    assert rep.matched["lora_nf4"] == 4 and rep.grouped == {"lora_nf4": 2}


@pytest.mark.parametrize("nf4", [True, False])
def test_bias_or_none_in_a_group(nf4):
    """All members with a bias or none: k without one stays apart from q and v."""
    torch.manual_seed(0)
    heads = Heads(nf4, bias=True, nested=False)
    heads.k.bias = None
    rep = _run(_lora(heads), torch.randn(2, 5, 64, requires_grad=True))
    name = "lora_nf4" if nf4 else "lora"
    assert rep.grouped == {name: 2}, rep.grouped


def test_switched_off_by_env(monkeypatch):
    monkeypatch.setenv("FXOPT_LORA_GROUP", "0")
    torch.manual_seed(0)
    rep = _run(_lora(Heads(True)), torch.randn(2, 5, 64, requires_grad=True))
    assert rep.matched["lora_nf4"] == 4 and rep.grouped == {}
    assert "lora_nf4_group" not in rep.ops_in_compiled()


def test_rank_cap_splits_groups(monkeypatch):
    from fxopt.kernels import lora_group
    monkeypatch.setattr(lora_group, "MAX_RANK", 8)   # r 4 each: q+k, then v alone
    torch.manual_seed(0)
    rep = _run(_lora(Heads(True)), torch.randn(2, 5, 64, requires_grad=True))
    assert rep.grouped == {"lora_nf4": 2}


def test_failing_group_falls_back_with_one_report_entry(monkeypatch):
    from fxopt.patterns import lora_group

    def boom(*a):
        raise RuntimeError("injected")
    monkeypatch.setattr(lora_group, "_replace", boom)
    torch.manual_seed(0)
    with pytest.warns(RuntimeWarning, match="injected"):
        rep = _run(_lora(Heads(True)), torch.randn(2, 5, 64, requires_grad=True))
    assert rep.grouped == {} and rep.matched["lora_nf4"] == 4
    assert [f.what for f in rep.fallbacks] == ["lora_group"]
    with pytest.raises(Exception, match="fxopt pattern 'lora_group' failed.*injected"):   # dynamo wraps it
        _run(_lora(Heads(True)), torch.randn(2, 5, 64, requires_grad=True), dict(OPTS, strict=True))
