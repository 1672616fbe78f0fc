"""Fault injection for every pattern in fxopt.patterns.PATTERNS (parametrized over the list, so a new pattern is
covered once it has an example in tests/reliability/examples.py):
  - a rewrite that raises at compile time (in `match`, or in `replace` after it has already mutated the graph)
    -> the original subgraph is kept, exactly one warning, fwd+bwd equal eager, `report.fallbacks` names the
    pattern; with `strict` an FxoptError naming the pattern and the cause;
  - the hand-off compiler failing on the rewritten graph -> the original graph is compiled;
  - a kernel that raises on its first run (every op module's `run_kernel` wrapped) -> the reference is used, one
    warning, training continues (3 steps, loss and grads equal eager), `report.fallbacks` lists the kernel;
    a kernel that always raises warns once per kernel, not once per step; with `strict` it raises.
"""
from __future__ import annotations

import itertools
import sys
import warnings

import pytest
import torch

import fxopt
import fxopt.dynamo_backend as B
from fxopt.errors import FxoptError
from fxopt.kernels import registry
from fxopt.patterns import PATTERNS
from tests.reliability.examples import (EXAMPLES, TOL, clone_args, compile_fn, pattern_params, run_and_grads,
                                        worst_diff)

_ids = itertools.count()


def _pattern(name):
    return next(p for p in PATTERNS if p.name == name)


def _opts(name, **kw):
    return {"inductor": False, "patterns": [name], **kw}


@pytest.fixture(autouse=True)
def _reset():
    torch._dynamo.reset()
    yield
    registry.set_strict(False)   # a strict compile leaves the process-wide kernel flag set
    torch._dynamo.reset()


def _fxopt_warnings(caught, token):
    return [str(c.message) for c in caught if "fxopt" in str(c.message) and token in str(c.message)]


def _steps(fn, args, opts, steps=1):
    """Compile, run `steps` fwd+bwd steps on fresh inputs of the same shapes; worst diff against eager."""
    cfn, _ = clone_args(fn, args)
    compiled = compile_fn(cfn, opts)
    worst = 0.0
    for i in range(steps):
        step_args = tuple((a.detach() * (1 + 0.1 * i)).requires_grad_(a.requires_grad)
                          if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        _, ref_args = clone_args(fn, step_args)
        out, grads = run_and_grads(compiled, step_args)
        ref, ref_grads = run_and_grads(cfn, ref_args)   # the same module instance, eager
        worst = max(worst, worst_diff(out, grads, ref, ref_grads))
    return worst


def test_every_pattern_has_an_example():
    assert [p.name for p in PATTERNS if p.name not in EXAMPLES] == []


# ---- rewrite failures at compile time ----

def _boom_in(stage, pattern, token):
    real = pattern.replace

    def boom(*a, **k):
        if stage == "replace":   # the nastier case: the graph is already half rewritten when it raises
            real(*a, **k)
        raise RuntimeError(f"injected {token}")
    return boom


@pytest.mark.parametrize("stage", ["match", "replace"])
@pytest.mark.parametrize("name", pattern_params())
def test_rewrite_failure_keeps_original(name, stage, monkeypatch):
    token = f"rewrite-{name}-{stage}-{next(_ids)}"
    pat = _pattern(name)
    monkeypatch.setattr(pat, stage, _boom_in(stage, pat, token))
    fn, args = EXAMPLES[name]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        worst = _steps(fn, args, _opts(name))
    rep = fxopt.last_report()
    assert rep.matched[name] == 0
    assert [f.what for f in rep.fallbacks] == [name] and token in rep.fallbacks[0].error
    assert len(_fxopt_warnings(caught, token)) == 1
    assert rep.ops_in_compiled() == {}           # nothing of the half-done rewrite survived
    assert worst <= 1e-6, worst


@pytest.mark.parametrize("name", pattern_params())
def test_rewrite_failure_strict_raises(name, monkeypatch):
    token = f"strict-{name}-{next(_ids)}"
    pat = _pattern(name)
    monkeypatch.setattr(pat, "replace", _boom_in("replace", pat, token))
    fn, args = EXAMPLES[name]()
    with pytest.raises(Exception) as e:
        compile_fn(fn, _opts(name, strict=True))(*args)
    chain, err = [], e.value
    while err is not None:   # dynamo wraps backend errors in BackendCompilerFailed(.inner_exception)
        chain.append(err)
        err = err.__cause__ or getattr(err, "inner_exception", None)
    fx_err = [x for x in chain if isinstance(x, FxoptError)]
    assert fx_err, chain
    assert repr(name) in str(fx_err[0]) and token in str(fx_err[0])


@pytest.mark.parametrize("name", pattern_params())
def test_handoff_failure_compiles_the_original(name, monkeypatch):
    real, calls = B._compile, []

    def flaky(gm, ex, config, gr):
        has_op = any(str(getattr(n.target, "namespace", "")) == "fxopt" for n in gm.graph.nodes)
        calls.append(has_op)
        if has_op:
            raise RuntimeError(f"compiler exploded on {name}")
        return real(gm, ex, config, gr)
    monkeypatch.setattr(B, "_compile", flaky)
    fn, args = EXAMPLES[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        worst = _steps(fn, args, _opts(name))
    assert calls == [True, False]
    rep = fxopt.last_report()
    assert rep.matched[name] == 0 and [f.what for f in rep.fallbacks] == ["compile"]
    assert worst <= 1e-6


# ---- kernel failures at run time ----

def _kernel_modules():
    return [m for n, m in sorted(sys.modules.items()) if n.startswith("fxopt.kernels.") and
            m is not registry and getattr(m, "run_kernel", None) is registry.run_kernel]


def _inject_kernel_failure(monkeypatch, token, first_only):
    """Wrap `run_kernel` in every op module: the kernel raises (on the first call overall, or always)."""
    failed, real = [], registry.run_kernel

    def failing_run_kernel(what, kernel, reference):
        if first_only and failed:
            return real(what, kernel, reference)
        failed.append(what)

        def boom():
            raise RuntimeError(f"injected {token}")
        return real(what, boom, reference)
    mods = _kernel_modules()
    assert len(mods) >= 5, mods
    for m in mods:
        monkeypatch.setattr(m, "run_kernel", failing_run_kernel)
    return failed


@pytest.mark.parametrize("name", pattern_params())
def test_kernel_failure_on_first_run_falls_back(name, monkeypatch):
    token = f"kernel-first-{name}-{next(_ids)}"
    failed = _inject_kernel_failure(monkeypatch, token, first_only=True)
    fn, args = EXAMPLES[name]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        worst = _steps(fn, args, _opts(name), steps=3)
    rep = fxopt.last_report()
    assert len(failed) == 1, f"the {name} op never reached a kernel: {failed}"
    assert rep.matched[name] == 1
    assert len(_fxopt_warnings(caught, token)) == 1
    assert [f.what for f in rep.fallbacks if token in f.error] == [f"kernel {failed[0]}"]
    assert worst <= TOL[torch.float32], worst


@pytest.mark.gpu
@pytest.mark.parametrize("name", pattern_params())
def test_kernel_failure_on_first_run_cuda(name, monkeypatch):
    """As above with CUDA tensors: the real Triton kernel is replaced by a failing one once, the reference runs."""
    token = f"kernel-cuda-{name}-{next(_ids)}"
    monkeypatch.setenv("FXOPT_ATTN_SDPA", "never")   # fxopt's kernel, not the per-shape SDPA dispatch
    failed = _inject_kernel_failure(monkeypatch, token, first_only=True)
    fn, args = EXAMPLES[name]()
    if isinstance(fn, torch.nn.Module):
        fn = fn.to("cuda")
    args = tuple(a.detach().cuda().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        worst = _steps(fn, args, _opts(name), steps=2)
    assert len(failed) == 1 and len(_fxopt_warnings(caught, token)) == 1
    assert worst <= TOL[torch.float32], worst


@pytest.mark.parametrize("name", pattern_params())
def test_kernel_always_failing_warns_once_per_kernel(name, monkeypatch):
    token = f"kernel-always-{name}-{next(_ids)}"
    failed = _inject_kernel_failure(monkeypatch, token, first_only=False)
    fn, args = EXAMPLES[name]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        worst = _steps(fn, args, _opts(name), steps=3)
    kernels = sorted(set(failed))
    assert len(failed) >= 3 * len(kernels)          # failed on every step ...
    assert len(_fxopt_warnings(caught, token)) == len(kernels)   # ... but warned once per kernel
    assert worst <= TOL[torch.float32], worst


@pytest.mark.parametrize("name", pattern_params())
def test_kernel_failure_strict_raises(name, monkeypatch):
    token = f"kernel-strict-{name}-{next(_ids)}"
    failed = _inject_kernel_failure(monkeypatch, token, first_only=True)
    fn, args = EXAMPLES[name]()
    with pytest.raises(FxoptError, match=f"fxopt kernel \\S+ failed: RuntimeError: injected {token}") as e:
        compile_fn(fn, _opts(name, strict=True))(*args)
    assert failed and f"kernel {failed[0]} failed" in str(e.value)


def test_kernel_failure_under_inductor(monkeypatch):
    """The one Inductor test of this file: the compiled code calls the op, whose kernel fails once."""
    token = f"kernel-inductor-{next(_ids)}"
    failed = _inject_kernel_failure(monkeypatch, token, first_only=True)
    fn, args = EXAMPLES["rms_norm"]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        worst = _steps(fn, args, {"patterns": ["rms_norm"]}, steps=2)
    assert failed == ["rms_norm"] and len(_fxopt_warnings(caught, token)) == 1
    assert worst <= TOL[torch.float32]


@pytest.mark.filterwarnings("ignore:fxopt")
def test_strict_is_per_compile(monkeypatch):
    from tests.reliability.examples import rms_gemma
    armed, real = [], registry.run_kernel

    def run_kernel(what, kernel, reference):
        def boom():
            raise RuntimeError("injected strict-leak")
        return real(what, boom if armed else kernel, reference)
    for m in _kernel_modules():
        monkeypatch.setattr(m, "run_kernel", run_kernel)
    fn, args = EXAMPLES["rms_norm"]()
    strict_fn = compile_fn(fn, _opts("rms_norm", strict=True))
    strict_fn(*args)
    strict_report = fxopt.last_report()
    loose_fn = compile_fn(rms_gemma, _opts("rms_norm"))   # another model, compiled without strict
    loose_fn(*args)
    loose_report = fxopt.last_report()
    assert loose_report is not strict_report
    armed.append(True)
    with pytest.raises(FxoptError):   # strict holds although a non-strict compile came later
        strict_fn(*args)
    loose_fn(*args)                   # ... and the non-strict model still falls back after the strict one ran
    assert [f.what for f in loose_report.runtime_fallbacks] == ["kernel rms_norm"]
    assert not strict_report.runtime_fallbacks   # the fallback went to the report of the graph that ran
