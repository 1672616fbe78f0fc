"""Dynamic shapes: ten sequence lengths cause at most one recompile after the first compile, with dynamic=True and
with automatic dynamic (dynamic=None), and the pattern still matches in the symbolic graph; every fxopt op's fake
implementation (forward and, through autograd, backward) runs under a ShapeEnv with all sizes symbolic without
pinning a size to a constant and without data-dependent shapes."""
from __future__ import annotations

import functools

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from torch.utils._python_dispatch import TorchDispatchMode

import fxopt
from tests.helpers import batch, tiny_model
from tests.reliability.examples import (EXAMPLES, TOL, _NF4Lora, _t, clone_args, lora, needs, pattern_params,
                                        reasons, run_and_grads, worst_diff)

SEQ_LENS = (5, 7, 9, 12, 16, 23, 31, 40, 57, 64)    # >= 2 (dynamo specializes 0 and 1), none a block multiple


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _counting_backend(opts, graphs):
    def be(gm, example_inputs, **kw):
        graphs.append(gm)
        return fxopt.backend(gm, example_inputs, options=opts)
    return be


_ROPE_SYMBOLIC_HEAD_DIM = ("dynamic=True makes the head dim symbolic, so rotate_half's x[..., :d // 2] slices have "
                           "SymInt bounds and rope rejects them ('rotation halves are not constant last-dim slices')")


def _params():
    out = []
    for p in pattern_params():
        for dyn, tag in ((True, "dynamic"), (None, "automatic")):
            marks = list(p.marks)
            if p.values[0] == "rope" and dyn is True:
                marks.append(pytest.mark.xfail(strict=True, reason=_ROPE_SYMBOLIC_HEAD_DIM))
            out.append(pytest.param(p.values[0], dyn, marks=marks, id=f"{p.id}-{tag}"))
    return out


@pytest.mark.parametrize("name,dynamic", _params())
def test_ten_sequence_lengths_one_recompile(name, dynamic):
    opts = {"inductor": False, "patterns": [name]}
    graphs, matched = [], []
    fn0, _ = EXAMPLES[name](s=SEQ_LENS[0])
    cfn, _ = clone_args(fn0, ())
    compiled = torch.compile(cfn, backend=_counting_backend(opts, graphs), dynamic=dynamic)
    worst = 0.0
    for s in SEQ_LENS:
        fn, args = EXAMPLES[name](s=s, seed=s)
        if isinstance(fn, torch.nn.Module):   # same module (weights) for every length
            fn = cfn
        n = len(graphs)
        out, grads = run_and_grads(compiled, args)
        if len(graphs) > n:
            matched.append(fxopt.last_report().matched[name])
        _, ref_args = clone_args(fn, args)
        ref, ref_grads = run_and_grads(fn, ref_args)
        worst = max(worst, worst_diff(out, grads, ref, ref_grads))
    assert len(graphs) <= (1 if dynamic else 2), f"{len(graphs)} compiles for {len(SEQ_LENS)} lengths"
    # the last (symbolic) graph still has the pattern: dynamic shapes must not silently turn fxopt off
    assert matched[-1] == 1, (matched, reasons(fxopt.last_report(), name))
    assert worst <= TOL[torch.float32], worst


def test_model_automatic_dynamic():
    """A tiny llama with every pattern: ten lengths, at most 2 compiles, patterns matched in the dynamic graph."""
    m = tiny_model("llama", hidden_size=40, head_dim=10, intermediate_size=72, num_hidden_layers=1)
    graphs = []
    compiled = torch.compile(m, backend=_counting_backend({"inductor": False}, graphs))
    for s in SEQ_LENS:
        ids, labels = batch(s=s, seed=s)
        compiled(input_ids=ids, labels=labels).loss.backward()
    assert len(graphs) <= 2, len(graphs)
    rep = fxopt.last_report()
    for name in ("attention", "rope", "rms_norm", "swiglu"):
        assert rep.matched[name] >= 1, (name, reasons(rep, name))
    assert not rep.fallbacks


# ---- fake implementations under symbolic sizes ----

class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fxopt":
            self.ops.add(func.name().split("::")[-1].split(".")[0])
        return func(*args, **(kwargs or {}))


@functools.lru_cache(None)
def _op_calls(name):
    """(op, args with real tensors shaped like the fake ones) of every fxopt op in the rewritten graph of `name`."""
    graphs = []
    fn, args = EXTRA[name][0]() if name in EXTRA else EXAMPLES[name]()
    pattern = EXTRA[name][1] if name in EXTRA else name
    torch.compile(fn, backend=_counting_backend({"inductor": False, "patterns": [pattern]}, graphs))(*args)
    calls = []
    for node in graphs[0].graph.nodes:
        if node.op == "call_function" and str(getattr(node.target, "namespace", "")) == "fxopt":
            calls.append((node.target, torch.fx.node.map_arg(node.args, _real)))
    assert calls, f"{name}: nothing rewritten"
    return calls


def _real(node):
    v = node.meta.get("example_value", node.meta.get("val"))
    if not isinstance(v, torch.Tensor):
        return v
    t = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype)
    if v.dtype.is_floating_point:
        t.normal_()
        return t.requires_grad_(v.requires_grad)
    return t.zero_()


def _packed_example():
    def fn(gu):
        gate, up = gu.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up
    return fn, (torch.randn(2, 12, 48, requires_grad=True),)


class _TwoNF4(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.one, self.two = _NF4Lora(64, 24, 4, torch.float32), _NF4Lora(64, 16, 4, torch.float32)

    def forward(self, x):
        return torch.cat([self.one(x), self.two(x)], -1)


def _grouped_example(nf4):
    """Two LoRA linears reading one x: one group call (fxopt/patterns/lora_group.py)."""
    torch.manual_seed(0)
    if nf4:
        return _TwoNF4(), (_t(2, 12, 64),)

    def fn(x, w1, b1, a1, bb1, w2, b2, a2, bb2):
        return torch.cat([lora(x, w1, b1, a1, bb1), lora(x, w2, b2, a2, bb2)], -1)
    one = lambda n: (_t(n, 40, grad=False, scale=0.2), _t(n, grad=False), _t(4, 40, scale=0.2),   # noqa: E731
                     _t(n, 4, scale=0.2))
    return fn, (_t(2, 12, 40), *one(24), *one(16))


# examples beyond EXAMPLES' one instance per pattern: name -> (example, pattern)
EXTRA = {"swiglu_packed": (_packed_example, "swiglu"), "lora_grouped": (lambda: _grouped_example(False), "lora"),
         "lora_nf4_grouped": (lambda: _grouped_example(True), "lora_nf4")}


def _symbolic(mode, t):
    if not isinstance(t, torch.Tensor):
        return t
    ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * t.dim())
    return mode.from_tensor(t, symbolic_context=ctx)


def _pinned(env: ShapeEnv):
    """Symbols the run pinned to a constant (replacements s -> n, or guards Eq(s, n)); a divisibility guard such as
    Eq(Mod(s, 2), 0) (the two equal halves of a packed gate_up) is a property, not a specialization."""
    import sympy
    out = [f"{s} -> {v}" for s, v in env.replacements.items() if getattr(v, "is_number", False)]
    for g in env.guards:
        e = g.expr
        if isinstance(e, sympy.Eq) and {type(e.lhs).__name__, type(e.rhs).__name__} & {"Symbol"} and \
                (e.lhs.is_number or e.rhs.is_number):
            out.append(str(e))
    return out


@pytest.mark.parametrize("name", [*pattern_params(), "swiglu_packed", "lora_grouped",
                                  pytest.param("lora_nf4_grouped", marks=needs("lora_nf4"))])
def test_fake_impls_are_symint_safe(name):
    calls = _op_calls(name)
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=False)
    log = _OpLog()
    for op, args in calls:
        with mode:
            fargs = torch.utils._pytree.tree_map(lambda t: _symbolic(mode, t), args)
        with mode, log:
            outs = op(*fargs)
            outs = [o for o in torch.utils._pytree.tree_leaves(outs) if isinstance(o, torch.Tensor)]
            shapes = [o.shape for o in outs if o.dim()]
            assert not shapes or any(isinstance(d, torch.SymInt) and not d.node.expr.is_number
                                     for sh in shapes for d in sh), f"{op}: output shapes {shapes} not symbolic"
            need = [a for a in torch.utils._pytree.tree_leaves(fargs) if isinstance(a, torch.Tensor) and
                    a.requires_grad]
            if need and outs[0].requires_grad:
                grads = torch.autograd.grad(outs[0], need, torch.ones_like(outs[0]), allow_unused=True)
                for g, a in zip(grads, need):
                    assert g is None or g.shape == a.shape
    assert not _pinned(env), f"sizes pinned to constants: {_pinned(env)}"
    forward = {str(op.name()).split("::")[-1].split(".")[0] for op, _ in calls}
    assert {f"{f}_backward" for f in forward} <= log.ops, (forward, log.ops)


def _norm_add_calls():
    """The ops made after the partition (patterns/rms_norm_add.py), with real tensors of a [2, 12, 40] norm."""
    a, b, w = torch.randn(2, 12, 40), torch.randn(2, 12, 40), torch.randn(40)
    y, s, rstd = torch.ops.fxopt.add_rms_norm(a, b, w, 1e-6, 0.0, None, torch.float32)
    return [(torch.ops.fxopt.add_rms_norm.default, (a, b, w, 1e-6, 0.0, None, torch.float32)),
            (torch.ops.fxopt.rms_norm_backward_add.default,
             (torch.randn_like(y), s, w, rstd, torch.randn_like(s), 0.0, None, True))]


POST_PARTITION = {"add_rms_norm", "rms_norm_backward_add"}


def test_post_partition_fake_impls_are_symint_safe():
    """No autograd here: these ops only appear in graphs AOT already split into forward and backward."""
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=False)
    seen = set()
    for op, args in _norm_add_calls():
        with mode:
            fargs = torch.utils._pytree.tree_map(lambda t: _symbolic(mode, t), args)
            outs = [o for o in op(*fargs) if o.dim()]
        assert all(isinstance(d, torch.SymInt) and not d.node.expr.is_number for o in outs for d in o.shape[:-1]), \
            f"{op}: {[o.shape for o in outs]}"
        seen.add(str(op.name()).split("::")[-1].split(".")[0])
    assert not _pinned(env), f"sizes pinned to constants: {_pinned(env)}"
    assert seen == POST_PARTITION


# The memory planner's host-offload ops never see a symbolic shape: fxopt.recompute.offload.candidates takes only
# static shapes (tests/recompute/test_offload.py::test_dynamic_shapes_are_not_offloaded).
STATIC_ONLY = {"offload", "reload"}


def test_every_op_is_covered():
    names = {n for n in dir(torch.ops.fxopt) if not n.startswith("_") and n != "name"} - STATIC_ONLY
    covered = set()
    extra = [n for n in EXTRA if not needs(EXTRA[n][1])]
    for name in [p.values[0] for p in pattern_params() if not p.marks] + extra:
        covered |= {str(op.name()).split("::")[-1].split(".")[0] for op, _ in _op_calls(name)}
        torch._dynamo.reset()
    covered |= {f"{c}_backward" for c in covered}    # run through autograd in test_fake_impls_are_symint_safe
    covered |= POST_PARTITION                         # test_post_partition_fake_impls_are_symint_safe
    assert names - covered == set(), names - covered
