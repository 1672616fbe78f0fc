"""swiglu / geglu: act(gate) * up  ->  fxopt::gated_mlp   (act: silu | gelu | gelu_tanh).

Anchored at the gating multiply `torch.mul(A, up)` (either operand order). A is recognized by what it computes, not
by how it is spelled: A's elementwise slice (elementwise ops and scalar constants between A and one tensor x, the
gate) is evaluated in float64 on sample points and compared with silu, gelu and gelu(tanh). So `F.silu(g)`,
`g * sigmoid(g)`, `F.gelu(g, approximate="tanh")`, `0.5*g*(1+tanh(sqrt(2/pi)*(g+0.044715*g^3)))` and
`g*0.7978845608*(1+0.044715*g*g)` are each one match.
A multiply is a candidate when one operand is an elementwise function of one tensor x (the nearest such node: with
LoRA on the gate projection x = base + lora) containing an activation-like op (silu, gelu, sigmoid, tanh, erf,
relu, ...), while the other operand is not an elementwise function of the same inputs (that excludes the multiplies
inside a hand-written activation). Unrecognized activations are reported under geglu when their slice contains
gelu/tanh/erf, else under swiglu.
Fused gate_up projection: gate, up = torch.chunk(gu, 2, dim=-1) (or torch.split into two equal halves) ->
fxopt::gated_mlp_packed(gu, act, gate_first), which reads both halves of gu in place and returns d gu in one piece.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxopt.kernels import gated_mlp as _ops  # noqa: F401  (registers the ops)
from fxopt.normalize import is_tensor, meta
from fxopt.patterns.match import (Match, NoMatch, Pattern, arg, call, insert_op, number, replace_output, require,
                                  single_use)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_SLICE = 48     # elementwise nodes walked back from an operand (hand-written gelu tanh: 9)

_ACT_FNS = {F.silu: "silu", F.gelu: "gelu", torch.sigmoid: "sigmoid", torch.tanh: "tanh", torch.erf: "erf",
            F.relu: "relu", torch.relu: "relu", F.sigmoid: "sigmoid", F.tanh: "tanh", F.mish: "mish",
            F.softplus: "softplus", F.elu: "elu", F.selu: "selu", F.celu: "celu", F.leaky_relu: "leaky_relu",
            F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", F.relu6: "relu6", torch.special.expit: "sigmoid",
            torch.special.erf: "erf"}
_ACT_METHODS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "erf": "erf"}
_ARITH_FNS = {torch.add, torch.sub, torch.rsub, torch.mul, torch.div, torch.neg, torch.pow, torch.exp, torch.sqrt,
              torch.rsqrt, torch.reciprocal, torch.square, operator.add, operator.sub, operator.mul,
              operator.truediv, operator.neg, operator.pow}
_ARITH_METHODS = {"add", "sub", "mul", "div", "neg", "pow", "exp", "sqrt", "rsqrt", "reciprocal", "square"}
_GELU_OPS = {"gelu", "tanh", "erf"}

_SAMPLES = torch.cat([torch.linspace(-8.0, 8.0, 161, dtype=torch.float64),
                      3 * torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))])


def _reference_acts():
    x = _SAMPLES
    return {"silu": x * torch.sigmoid(x),
            "gelu": 0.5 * x * (1 + torch.erf(x / 2 ** 0.5)),
            "gelu_tanh": 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3)))}


_REFS = _reference_acts()


def _op_name(n: fx.Node):
    """Activation-like name, "arith" for other elementwise ops, None if `n` is not an elementwise op we evaluate."""
    if n.op == "call_function":
        if n.target in _ACT_FNS:
            return _ACT_FNS[n.target]
        return "arith" if n.target in _ARITH_FNS else None
    if n.op == "call_method":
        if n.target in _ACT_METHODS:
            return _ACT_METHODS[n.target]
        return "arith" if n.target in _ARITH_METHODS else None
    return None


class _Slice:
    """The elementwise subgraph computing `root` from its tensor inputs (leaves)."""

    def __init__(self, root, stop=None):
        self.root, self.nodes, self.leaves, self.ops, self.complete = root, [], set(), set(), True
        shape = meta(root).shape if is_tensor(root) else None
        stack, seen = [root], set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            name = _op_name(n) if n is not stop else None
            if name is None or not is_tensor(n) or meta(n).shape != shape:
                self.leaves.add(n)
                continue
            if len(self.nodes) >= _MAX_SLICE:
                self.complete = False
                return
            self.nodes.append(n)
            self.ops.add(name)
            for a in [*n.args, *n.kwargs.values()]:
                if isinstance(a, fx.Node):
                    if not is_tensor(a):   # symbolic scalar: not evaluable
                        self.complete = False
                        return
                    stack.append(a)
                elif not (number(a) or isinstance(a, (bool, str)) or a is None):
                    self.complete = False
                    return

    @property
    def activation_like(self) -> bool:
        return self.complete and bool(self.ops - {"arith"})

    @property
    def gate(self):
        return next(iter(self.leaves))

    def evaluate(self, x: torch.Tensor):
        env = {self.gate: x}

        def ev(n):
            if n not in env:
                args = fx.node.map_arg(n.args, ev)
                kwargs = {k: v for k, v in fx.node.map_arg(n.kwargs, ev).items() if k != "inplace"}
                env[n] = n.target(*args, **kwargs) if n.op == "call_function" else \
                    getattr(args[0], n.target)(*args[1:], **kwargs)
            return env[n]
        return ev(self.root)

    def identify(self):
        """'silu' | 'gelu' | 'gelu_tanh', or None."""
        try:
            with torch.no_grad():
                y = self.evaluate(_SAMPLES.clone())
        except Exception:  # noqa: BLE001 - an op that does not run on float64 samples is not recognized
            return None
        if not isinstance(y, torch.Tensor) or y.shape != _SAMPLES.shape or not y.dtype.is_floating_point:
            return None
        for name, ref in _REFS.items():
            if torch.allclose(y.double(), ref, rtol=1e-6, atol=1e-9):
                return name
        return None

    def describe(self) -> str:
        return "(" + ", ".join(sorted(self.ops - {"arith"})) + ")"


def _activation(root):
    """The slice from the nearest node x that `root` is an elementwise function of alone (x: the gate), if that
    slice contains an activation-like op. x is not always a leaf of the whole slice: with LoRA on the gate
    projection x = base + lora, itself elementwise. Dominators of root form a chain whose slices grow, so the
    smallest single-input slice is the nearest one."""
    full = _Slice(root)
    if not full.activation_like:
        return None
    best = None
    for n in [*full.nodes[1:], *full.leaves]:
        s = _Slice(root, stop=n)
        if s.activation_like and s.leaves == {n} and (best is None or len(s.nodes) < len(best.nodes)):
            best = s
    return best


def _gating(mul: fx.Node):
    """(activation slice, up) if `mul` multiplies an activation of one tensor x by something not a function of x."""
    if not call(mul, torch.mul) or mul.kwargs or len(mul.args) != 2 or not all(is_tensor(a) for a in mul.args):
        return None
    found = []
    for i in (0, 1):
        s = _activation(mul.args[i])
        if s is not None:
            # both sides elementwise in the same inputs: a multiply inside a larger expression (x * sigmoid(x),
            # 0.5 x * (1 + tanh(..x..))), not a gate
            other = _Slice(mul.args[1 - i])
            if not (other.complete and other.leaves <= _Slice(mul.args[i]).leaves):
                found.append((s, mul.args[1 - i]))
    if len(found) == 2:   # act(a) * act(b): gate the side that is recognized
        found.sort(key=lambda f: f[0].identify() is None)
    return found[0] if found else None


def _family(kind, ops=frozenset()) -> str:
    """The pattern that owns activation `kind`; an unrecognized one (None) goes by the ops it uses."""
    if kind is not None:
        return "swiglu" if kind == "silu" else "geglu"
    return "geglu" if ops & _GELU_OPS else "swiglu"


def _candidates_for(name):
    def candidates(graph):
        out = []
        for n in graph.nodes:
            g = _gating(n)
            if g is not None and _family(g[0].identify(), g[0].ops) == name:
                out.append(n)
        return out
    return candidates


def _packed(gate, up, inside):
    """(gu, gate_first, [getitem nodes, split node]) if gate and up are the two halves of one chunk/split of gu."""
    if not (call(gate, operator.getitem) and call(up, operator.getitem)):
        return None
    sp = gate.args[0]
    if up.args[0] is not sp or {gate.args[1], up.args[1]} != {0, 1}:
        return None
    if call(sp, torch.chunk):
        ok = arg(sp, 1, "chunks") == 2
        dim = arg(sp, 2, "dim", 0)
    elif call(sp, torch.split):
        size = arg(sp, 1, "split_size_or_sections")
        c = meta(gate).shape[-1] if is_tensor(gate) else None
        ok = size == c or (isinstance(size, (list, tuple)) and list(size) == [c, c])
        dim = arg(sp, 2, "dim", 0)
    else:
        return None
    gu = sp.args[0]
    if not (ok and is_tensor(gu)):
        return None
    mg = meta(gu)
    if dim not in (-1, mg.dim() - 1) or mg.shape[-1] != 2 * meta(gate).shape[-1]:
        return None
    # the chunk and its halves must die with the match, else reading gu would not save anything
    if set(sp.users) != {gate, up} or not set(gate.users) <= inside or not set(up.users) <= inside:
        return None
    return gu, gate.args[1] == 0, [gate, up, sp]


def match_gated_mlp(mul):
    g = _gating(mul)
    require(g is not None, "not act(gate) * up")
    s, up = g
    kind = s.identify()
    require(kind is not None, f"activation not recognized: {s.describe()} of {s.gate.name} is not silu, gelu "
                              "or gelu(tanh) (compared on sample points)")
    gate = s.gate
    # an in-place activation is the out-of-place one when nothing else reads the gate it overwrites
    inplace = [n.name for n in s.nodes if n.kwargs.get("inplace") is True]
    require(not inplace or set(gate.users) <= set(s.nodes),
            f"in-place activation {inplace} overwrites {gate.name}, which is also read elsewhere")
    mg, mu, my = meta(gate), meta(up), meta(mul)
    require(mg.shape == mu.shape == my.shape,
            f"shapes broadcast: gate {tuple(mg.shape)} * up {tuple(mu.shape)} -> {tuple(my.shape)}")
    require(mg.dim() >= 1, "0-d gate")
    require(mg.dtype in _DTYPES and mu.dtype in _DTYPES and my.dtype in _DTYPES,
            f"dtypes {mg.dtype}/{mu.dtype} not supported")
    require(mg.device == mu.device, "gate and up on different devices")
    inside = {*s.nodes, mul}
    reason = single_use(s.nodes, inside)
    require(reason is None, reason or "")
    params = dict(gate=gate, up=up, act=kind, out_dtype=my.dtype, packed=None)
    nodes = [*s.nodes, mul]
    packed = _packed(gate, up, inside)
    if packed is not None:
        params["packed"] = packed[:2]
        nodes += packed[2]
    return Match(anchor=mul, output=mul, nodes=nodes, params=params)


def replace_gated_mlp(graph, m):
    q = m.params
    if q["packed"] is not None:
        gu, gate_first = q["packed"]
        y = insert_op(graph, m.output, torch.ops.fxopt.gated_mlp_packed.default, (gu, q["act"], gate_first,
                                                                                  q["out_dtype"]))
    else:
        y = insert_op(graph, m.output, torch.ops.fxopt.gated_mlp.default, (q["gate"], q["up"], q["act"],
                                                                           q["out_dtype"]))
    replace_output(graph, m, y)
    return y


def _match_for(name):
    def match(mul):
        m = match_gated_mlp(mul)
        if isinstance(m, Match) and _family(m.params["act"]) != name:
            raise NoMatch(f"{m.params['act']} belongs to the other gated-MLP pattern")
        return m
    return match


SWIGLU = Pattern("swiglu", _candidates_for("swiglu"), _match_for("swiglu"), replace_gated_mlp)
GEGLU = Pattern("geglu", _candidates_for("geglu"), _match_for("geglu"), replace_gated_mlp)
