"""lora / lora_nf4 patterns: peft LoRA over nn.Linear and over bitsandbytes NF4 in every graph form bnb produces (and
the older dequantize_4bit + linear form, hand-built), frozen NF4 linears, and near-misses with their reasons."""
import pytest
import torch
import torch.nn.functional as F

import fxopt
from tests.helpers import rel

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

OPTS = {"inductor": False, "patterns": ["lora", "lora_nf4"]}


class Proj(torch.nn.Module):
    def __init__(self, k=64, n=96, bias=True, nf4=False, nested=True, quant_type="nf4"):
        super().__init__()
        lin = torch.nn.Linear(k, n, bias=bias)
        if nf4:
            q = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=torch.float32, compress_statistics=nested,
                                  quant_type=quant_type)
            q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type=quant_type,
                                         compress_statistics=nested)
            if bias:
                q.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
            lin = q.to("cpu")
        self.proj = lin

    def forward(self, x):
        return self.proj(x)


def with_lora(mod, **kw):
    from peft import LoraConfig, get_peft_model
    cfg = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["proj"], init_lora_weights=False)
    cfg.update(kw)
    torch.manual_seed(1)
    return get_peft_model(mod, LoraConfig(**cfg)).train()


def run(mod, x, expect, opts=OPTS):
    """Compiled vs eager on the same module: output, x grad and trainable grads; returns the report."""
    params = [p for p in mod.parameters() if p.requires_grad]
    ref = mod(x)
    inputs = ([x] if x.requires_grad else []) + params
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, inputs, g) if inputs else ()
    torch._dynamo.reset()
    out = torch.compile(mod, backend="fxopt", options=opts)(x)
    rep = fxopt.last_report()
    for name, n in expect.items():
        assert rep.matched[name] == n, (rep.matched, [r.reason for r in rep.rejected])
    assert rel(out, ref) <= 1e-5
    for a, b in zip(torch.autograd.grad(out, inputs, g) if inputs else (), ref_grads):
        assert rel(a, b) <= 1e-5
    return rep


@pytest.mark.parametrize("bias,kw", [(True, {}), (False, {"use_rslora": True}), (True, {"lora_alpha": 4})])
def test_dense_lora(bias, kw):
    torch.manual_seed(0)
    run(with_lora(Proj(bias=bias), **kw), torch.randn(2, 5, 64, requires_grad=True), {"lora": 1, "lora_nf4": 0})


@pytest.mark.parametrize("nested,bias,x_grad", [(True, False, True), (False, True, True), (True, True, False)])
def test_qlora_forms(nested, bias, x_grad):
    """x_grad: bnb's MatMul4Bit autograd function (a higher-order op in the graph); without: direct gemm_4bit."""
    torch.manual_seed(0)
    mod = with_lora(Proj(bias=bias, nf4=True, nested=nested))
    run(mod, torch.randn(2, 5, 64, requires_grad=x_grad), {"lora": 0, "lora_nf4": 1})


def test_frozen_nf4_linear():
    torch.manual_seed(0)
    run(Proj(bias=True, nf4=True), torch.randn(3, 64, requires_grad=True), {"lora_nf4": 1})


def test_nf4_code_book_made_at_compile_time(monkeypatch):
    """The kernels' code-book tensor exists once the graph is rewritten, before the compiled code first runs (made on
    the first run, under `cudagraphs` it would be an untracked allocation in the CUDA graph pool)."""
    from fxopt.kernels import nf4
    made = []
    monkeypatch.setattr(nf4, "_nf4_code_cached", lambda device: made.append(device) or torch.zeros(16))
    mod = with_lora(Proj(bias=False, nf4=True))
    torch._dynamo.reset()

    def backend(gm, example_inputs):
        compiled = fxopt.backend(gm, example_inputs, options=OPTS)
        assert fxopt.last_report().matched["lora_nf4"] == 1
        assert made and set(made) == {"cpu"}, made     # rewritten, not yet run
        return compiled
    torch.compile(mod, backend=backend)(torch.randn(3, 64))


def _older_bnb(nested):
    """bitsandbytes < 0.45 spelling: dequantize_4bit (+ dequantize_blockwise + offset) then linear, hand-built."""
    torch.manual_seed(0)
    q = Proj(bias=True, nf4=True, nested=nested).proj
    st = q.weight.quant_state
    a = (torch.randn(4, 64) * 0.1).requires_grad_()
    b = (torch.randn(96, 4) * 0.1).requires_grad_()

    def fn(x, packed, absmax, absmax2, code2, offset, bias, a, b):
        if absmax2 is not None:
            absmax = torch.ops.bitsandbytes.dequantize_blockwise(absmax, absmax2, code2, 256, torch.float32)
            absmax = absmax + offset
        w = torch.ops.bitsandbytes.dequantize_4bit(packed, absmax, 64, "nf4", [96, 64], torch.float32)
        base = F.linear(x, w.t().t().to(x.dtype), bias).clone()
        return base + F.linear(F.linear(x, a), b) * 2.0

    qs = (st.absmax, st.state2.absmax, st.state2.code, st.offset) if nested else (st.absmax, None, None, None)
    return fn, (q.weight, *qs, q.bias, a, b)


@pytest.mark.parametrize("nested", [True, False])
def test_older_bnb_dequantize_then_linear(nested):
    fn, args = _older_bnb(nested)
    x = torch.randn(2, 7, 64, requires_grad=True)
    ref = fn(x, *args)
    torch._dynamo.reset()
    out = torch.compile(fn, backend="fxopt", options=OPTS)(x, *args)
    assert fxopt.last_report().matched["lora_nf4"] == 1, fxopt.last_report().rejected
    assert rel(out, ref) <= 1e-5
    g = torch.randn_like(ref)
    for u, v in zip(torch.autograd.grad(out, (x, args[-2], args[-1]), g),
                    torch.autograd.grad(ref, (x, args[-2], args[-1]), g)):
        assert rel(u, v) <= 1e-5


def _reasons(rep, name):
    return " | ".join(r.reason for r in rep.rejected if r.pattern == name)


@pytest.mark.parametrize("nf4", [False, True])
def test_dropout_rejected_with_reason(nf4):
    torch.manual_seed(0)
    mod = with_lora(Proj(nf4=nf4), lora_dropout=0.1).eval()   # eval: eager and compiled see the same function
    mod.train()
    torch._dynamo.reset()
    torch.compile(mod, backend="fxopt", options=OPTS)(torch.randn(2, 64, requires_grad=True))
    rep = fxopt.last_report()
    name = "lora_nf4" if nf4 else "lora"
    assert rep.matched[name] == 0
    assert "lora_dropout p=0.1" in _reasons(rep, name)


def test_dropout_in_eval_matches():
    torch.manual_seed(0)
    mod = with_lora(Proj(), lora_dropout=0.1).eval()
    run(mod, torch.randn(2, 64, requires_grad=True), {"lora": 1})


def test_near_misses():
    torch.manual_seed(0)
    w, a, b = torch.randn(96, 64), torch.randn(4, 64, requires_grad=True), torch.randn(96, 4, requires_grad=True)

    def xa_reused(x):
        xa = F.linear(x, a)
        return F.linear(x, w) + F.linear(xa, b) * 2.0, xa.sum()

    def b_bias(x):
        return F.linear(x, w) + F.linear(F.linear(x, a), b, torch.ones(96)) * 2.0

    def tensor_scale(x, s):
        return F.linear(x, w) + F.linear(F.linear(x, a), b) * s

    x = torch.randn(3, 64)
    for fn, args, reason in ((xa_reused, (x,), "also used by"), (b_bias, (x,), "lora_B has a bias"),
                             (tensor_scale, (x, torch.tensor(2.0)), "not a constant")):
        torch._dynamo.reset()
        torch.compile(fn, backend="fxopt", options=OPTS)(*args)
        rep = fxopt.last_report()
        assert rep.matched["lora"] == 0 and reason in _reasons(rep, "lora"), _reasons(rep, "lora")


def test_fp4_rejected():
    torch.manual_seed(0)
    mod = Proj(nf4=True, quant_type="fp4")
    torch._dynamo.reset()
    torch.compile(mod, backend="fxopt", options=OPTS)(torch.randn(2, 64, requires_grad=True))
    rep = fxopt.last_report()
    assert rep.matched["lora_nf4"] == 0 and "only NF4" in _reasons(rep, "lora_nf4")
