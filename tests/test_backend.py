"""The backend contract: entry point, report, fallback and strict, graph breaks and recompiles."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import fxopt
from fxopt.errors import FxoptError
from fxopt.patterns.rms_norm import RMS_NORM
from tests.helpers import rel


def rms(x, w):
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def test_entry_point_without_importing_fxopt():
    code = r"""
import sys, torch
def rms(x, w):
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
x, w = torch.randn(4, 32, requires_grad=True), torch.randn(32, requires_grad=True)
y = torch.compile(rms, backend="fxopt", options={"inductor": False})(x, w)
y.sum().backward()
assert "fxopt" in sys.modules   # loaded by dynamo through the entry point, not by us
import fxopt
assert torch._dynamo.lookup_backend("fxopt") is fxopt.backend
print("MATCHED", fxopt.last_report().matched["rms_norm"])
"""
    env = dict(os.environ, TORCH_LOGS="+fxopt")
    env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/",
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "MATCHED 1" in out.stdout
    assert "rms_norm matched 1" in out.stderr      # TORCH_LOGS="+fxopt" shows the passes


def test_backend_signature_and_options_error():
    x, w = torch.randn(2, 8), torch.randn(8)
    torch._dynamo.reset()
    with pytest.raises(Exception) as e:
        torch.compile(rms, backend="fxopt", options={"nope": 1})(x, w)
    assert "valid keys" in str(e.value)


def test_report_table_and_json():
    torch._dynamo.reset()
    x, w = torch.randn(2, 8, requires_grad=True), torch.randn(8, requires_grad=True)
    torch.compile(rms, backend="fxopt", options={"inductor": False})(x, w).sum().backward()
    rep = fxopt.last_report()
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["matched"]["rms_norm"] == 1 and d["graphs"] == 1 and d["fallbacks"] == []
    assert d["compiled"] == {"forward": 1, "backward": 1}
    assert set(fxopt.PATTERNS) <= set(d["matched"])
    assert "rms_norm" in str(rep) and "matched" in str(rep)
    assert rep.memory is None


def _boom(*a, **k):
    raise RuntimeError("injected failure")


def test_rewrite_failure_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(RMS_NORM, "replace", _boom)
    torch._dynamo.reset()
    x, w = torch.randn(3, 16, requires_grad=True), torch.randn(16, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = torch.compile(rms, backend="fxopt", options={"inductor": False})(x, w)
    y.sum().backward()
    rep = fxopt.last_report()
    assert rep.matched["rms_norm"] == 0
    assert [f.what for f in rep.fallbacks] == ["rms_norm"] and "injected failure" in rep.fallbacks[0].error
    assert sum("injected failure" in str(c.message) for c in caught) == 1
    assert rel(y, rms(x, w)) == 0.0


def test_rewrite_failure_strict_raises(monkeypatch):
    monkeypatch.setattr(RMS_NORM, "replace", _boom)
    torch._dynamo.reset()
    with pytest.raises(Exception) as e:
        torch.compile(rms, backend="fxopt", options={"inductor": False, "strict": True})(torch.randn(2, 8),
                                                                                       torch.randn(8))
    assert "rms_norm" in str(e.value) and "injected failure" in str(e.value)


def test_kernel_failure_at_run_time_falls_back(monkeypatch):
    import fxopt.kernels.rms_norm as K
    monkeypatch.setattr(K, "use_triton", lambda *t: True)
    monkeypatch.setattr(K, "_fwd_triton", _boom)
    torch._dynamo.reset()
    x, w = torch.randn(3, 16), torch.randn(16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = torch.compile(rms, backend="fxopt", options={"inductor": False})(x, w)
    assert rel(y, rms(x, w)) <= 1e-6
    assert any("kernel rms_norm" in f.what for f in fxopt.last_report().fallbacks)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="kernel rms_norm failed"):
        torch.compile(rms, backend="fxopt", options={"inductor": False, "strict": True})(x, w)


def test_compile_failure_compiles_the_original(monkeypatch):
    import fxopt.dynamo_backend as B
    real = B._compile
    calls = []

    def flaky(gm, ex, config, gr):
        calls.append(any("fxopt" in str(n.target) for n in gm.graph.nodes))
        if calls[-1]:
            raise RuntimeError("inductor exploded")
        return real(gm, ex, config, gr)
    monkeypatch.setattr(B, "_compile", flaky)
    torch._dynamo.reset()
    x, w = torch.randn(3, 16), torch.randn(16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = torch.compile(rms, backend="fxopt", options={"inductor": False})(x, w)
    assert calls == [True, False]
    rep = fxopt.last_report()
    assert rep.matched["rms_norm"] == 0 and rep.fallbacks[0].what == "compile"
    assert rel(y, rms(x, w)) <= 1e-6


def test_dynamic_shapes_restart_is_not_a_failure():
    """dynamo's RestartAnalysis (e.g. tensorified scalars with dynamic=True) must pass through, counted once."""
    def f(x, w, s: float):
        return rms(x, w) * s
    torch._dynamo.reset()
    cf = torch.compile(f, backend="fxopt", options={"inductor": False, "strict": True}, dynamic=True)
    x, w = torch.randn(3, 16, requires_grad=True), torch.randn(16, requires_grad=True)
    for n in (3, 5, 7):
        x = torch.randn(n, 16, requires_grad=True)
        y = cf(x, w, 0.5)
        assert rel(y, f(x, w, 0.5)) <= 1e-6
    rep = fxopt.last_report()
    assert rep.fallbacks == [] and rep.matched["rms_norm"] == rep.graphs


def test_graph_breaks_and_recompiles_in_one_report():
    def f(x, w):
        a = rms(x, w)
        torch._dynamo.graph_break()
        return rms(a, w)
    torch._dynamo.reset()
    cf = torch.compile(f, backend="fxopt", options={"inductor": False})
    x, w = torch.randn(3, 16), torch.randn(16)
    cf(x, w)
    rep = fxopt.last_report()
    assert rep.dynamo_graphs == 2 and rep.matched["rms_norm"] == 2
    cf(torch.randn(3, 16, dtype=torch.float64), w.double())   # guard failure: recompile of both frames
    rep2 = fxopt.last_report()
    assert rep2 is rep and rep.dynamo_graphs == 2   # the latest compile of each frame replaces the earlier one
    assert rel(cf(x, w), f(x, w)) <= 1e-6
    torch.compile(rms, backend="fxopt", options={"inductor": False})(x, w)   # a new torch.compile call
    assert fxopt.last_report() is not rep and fxopt.last_report().dynamo_graphs == 1


def test_inductor_cache_is_keyed_by_fxopt_sources(monkeypatch):
    """A cached compile from another fxopt version must not be replayed (the ops' code is not in the graph)."""
    import uuid

    import fxopt.inductor_passes as P

    def f(x, w):
        h = x.float()
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
    x, w = torch.randn(4, 32, requires_grad=True), torch.randn(32, requires_grad=True)

    from torch._dynamo.utils import counters

    def cache_hits():
        """Inductor FX graph cache (hits, misses) of one compile. fxopt turns AOTAutograd's own cache off, so every
        graph reaches Inductor's compiler (and the report sees it) and Inductor's cache decides."""
        torch._dynamo.reset()
        counters.clear()
        torch.compile(f, backend="fxopt")(x, w).sum().backward()
        assert fxopt.last_report().compiled() == {"forward": 1, "backward": 1}
        return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
    run = uuid.uuid4().hex                 # a source hash no earlier run has cached
    monkeypatch.setattr(P, "source_hash", lambda: f"fxopt-version-{run}")
    assert cache_hits() == (0, 2)
    assert cache_hits() == (2, 0)                        # same sources: served from the cache
    monkeypatch.setattr(P, "source_hash", lambda: f"fxopt-version-{run}-next")
    assert cache_hits() == (0, 2)


def _rms(x, w):
    v = x.float().pow(2).mean(-1, keepdim=True)
    return w * (x.float() * torch.rsqrt(v + 1e-6)).to(x.dtype)


def test_report_of_a_user_backend_is_not_merged_across_dynamo_resets(monkeypatch):
    """A user's backend that calls fxopt.backend: torch._dynamo.reset() resets the backend torch.compile got, not
    fxopt, and restarts dynamo's frame ids, so the next compile's id (frame 0, compile 0) equals the last one's. The
    report key was the id of torch.compile's wrapper object, which repeats once an old wrapper is freed: CI's
    tests/patterns/test_rope.py saw rope matched 3 times in a graph holding 2 ops. Here both compiles have one owner,
    the case a reused id made; the report must still start again."""
    from fxopt import dynamo_backend
    owner = type("Owner", (), {})()
    monkeypatch.setattr(dynamo_backend, "_compile_key", lambda: owner)

    def be(gm, example_inputs):
        return fxopt.backend(gm, example_inputs, options={"inductor": False})
    x, w = torch.randn(4, 16), torch.randn(16)
    torch._dynamo.reset()
    torch.compile(lambda x, w: _rms(x, w) + _rms(x * 2, w), backend=be)(x, w)
    assert fxopt.last_report().matched["rms_norm"] == 2
    torch._dynamo.reset()
    torch.compile(_rms, backend=be)(x, w)
    assert fxopt.last_report().matched["rms_norm"] == 1
    assert fxopt.last_report().graphs == 1
