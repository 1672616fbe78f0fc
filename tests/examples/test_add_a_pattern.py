"""docs/add_a_pattern.md: the toy softcap pattern (examples/softcap_pattern.py) as a kernel, a pattern and a model.

The kernel tests run the Triton kernels (under the interpreter on the CPU; `no_fallback` fails a silent fallback).
The pattern is enabled by adding it to the pass list and its name to fxopt.config.PATTERNS, as the doc says.
"""
import os
import re

import pytest
import torch

import fxopt
from fxopt import config as fx_config
from fxopt import pipeline

from tests.examples.test_examples import EXAMPLES, load
from tests.helpers import rel

sc = load("softcap_pattern")
DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "add_a_pattern.md")


@pytest.fixture
def with_softcap(monkeypatch, fresh_dynamo):
    monkeypatch.setattr(fx_config, "PATTERNS", fx_config.PATTERNS + ("softcap",))
    monkeypatch.setattr(pipeline, "PATTERNS", list(pipeline.PATTERNS) + [sc.SOFTCAP])


@pytest.mark.parametrize("shape,dtype", [((1, 7), torch.float32), ((3, 5, 33), torch.float32),
                                         ((2, 1000), torch.bfloat16), ((17,), torch.float16)])
def test_kernel_matches_reference(shape, dtype, no_fallback):
    x = (torch.randn(shape) * 40).to(dtype)
    cap = 30.0
    y = torch.ops.fxopt_example.softcap(x, cap)
    ref = sc.softcap_reference(x, cap)
    dy = torch.randn(shape).to(dtype)
    dx = torch.ops.fxopt_example.softcap_backward(dy, y, cap)
    dx_ref = sc.softcap_backward_reference(dy, ref, cap)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(y, ref) <= tol and rel(dx, dx_ref) <= tol
    # against autograd of the eager math
    xr = x.float().requires_grad_()
    (30.0 * torch.tanh(xr / 30.0)).backward(dy.float())
    assert rel(dx.float(), xr.grad) <= (1e-5 if dtype == torch.float32 else 2e-2)


def test_kernel_non_contiguous_input(no_fallback):
    x = torch.randn(6, 10).t() * 50          # strided
    y = torch.ops.fxopt_example.softcap(x, 50.0)
    assert rel(y, sc.softcap_reference(x, 50.0)) <= 1e-5
    assert y.abs().max() <= 50.0


def test_opcheck():
    x = torch.randn(4, 9, requires_grad=True)
    torch.library.opcheck(torch.ops.fxopt_example.softcap.default, (x, 20.0))
    torch.library.opcheck(torch.ops.fxopt_example.softcap_backward.default, (torch.randn(4, 9), torch.randn(4, 9), 20.0))


class Scores(torch.nn.Module):
    def __init__(self, inner=30.0, outer=30.0):
        super().__init__()
        self.proj = torch.nn.Linear(24, 24)
        self.inner, self.outer = inner, outer

    def forward(self, x):
        s = self.proj(x)
        return torch.tanh(s / self.inner) * self.outer


def test_pattern_matches_and_trains_like_eager(with_softcap, no_fallback):
    m = Scores()
    x = torch.randn(2, 5, 24) * 10
    ref = m(x)
    ref.square().sum().backward()
    g_ref = m.proj.weight.grad.clone()
    m.zero_grad()
    out = torch.compile(m, backend="fxopt", options={"inductor": False})(x)
    out.square().sum().backward()
    assert fxopt.last_report().matched["softcap"] == 1
    assert rel(out, ref) <= 1e-5 and rel(m.proj.weight.grad, g_ref) <= 1e-5


def test_near_miss_reports_reason(with_softcap):
    m = Scores(inner=30.0, outer=50.0)        # c1 * tanh(x / c2): not a softcap
    torch.compile(m, backend="fxopt", options={"inductor": False})(torch.randn(2, 24))
    rep = fxopt.last_report()
    assert rep.matched["softcap"] == 0
    assert any(r.pattern == "softcap" and "not a softcap" in r.reason for r in rep.rejected), rep.rejected


def test_disable_by_name(with_softcap):
    torch.compile(Scores(), backend="fxopt", options={"inductor": False, "disable": ["softcap"]})(torch.randn(2, 24))
    assert "softcap" not in fxopt.last_report().matched


def test_doc_shows_this_file():
    """The doc quotes examples/softcap_pattern.py in full: they must not drift apart."""
    with open(DOC) as f:
        doc = f.read()
    with open(os.path.join(EXAMPLES, "softcap_pattern.py")) as f:
        src = f.read()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    assert any(b.strip() == src.strip() for b in blocks), "docs/add_a_pattern.md does not quote the current file"
