"""lora / lora_nf4: base(x) + s * B(A(x)) -> fxopt::lora (dense base) / fxopt::lora_nf4 (bitsandbytes NF4 base).

The peft LoRA branch in a dynamo graph (after normalize):
    xa = linear(x', A);  u = linear(xa, B);  v = mul(u, s) [-> to(dt)];  out = add(base', v) [-> to(dt)]
x' is x or x.to(A.dtype); base' is the base output, possibly followed by a cast and peft's `clone()` (4-bit).
Base forms:
  lora:      linear(x, W, bias) with a dense 2-D W (x possibly cast to W's dtype first)
  lora_nf4:  bitsandbytes NF4, in each spelling bnb produces —
             (a) torch.ops.bitsandbytes.gemm_4bit(x, packed, shape, absmax, bs, "nf4", bias=, absmax_8bit=,
                 absmax_code=, absmax_offset=)          (bnb 0.50 when x needs no grad)
             (b) getitem(higher_order.autograd_function_apply(fwd_body, bwd_body, *operands), 0) with that gemm_4bit
                 inside fwd_body (bnb 0.50 MatMul4Bit when x needs grad; operands map 1:1 to fwd_body placeholders)
             (c) linear(x, dequantize_4bit(packed, absmax', bs, "nf4", shape, dt) [-> to(x.dtype)], bias) with
                 absmax' = absmax or dequantize_blockwise(q, absmax2, code2, bs2, fp32) + offset   (older bnb)
  With double quantization gemm_4bit's `absmax` is absmax2 and `absmax_8bit` the uint8 codes (bs2 = 256).
A frozen NF4 linear with no adapter is replaced alone (counted under lora_nf4).
Rejected with a reason: lora_dropout p > 0 in training (dropout is not fused: set lora_dropout=0), a bias on A or B,
a rank above 128, FP4 quantization, scales that are not constants, intermediates used elsewhere.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxopt.kernels import lora as _ops  # noqa: F401  (registers the ops)
from fxopt.kernels.nf4 import nf4_code
from fxopt.normalize import meta
from fxopt.patterns.match import (Match, NoMatch, Pattern, arg, call, cast_dtype, insert_op, number, only_user,
                                  replace_output, require, single_use)

_LINEAR = (F.linear, torch._C._nn.linear)
_MAX_RANK = 128
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _op_name(node) -> str | None:
    """'ns::name' of a call to a torch.ops overload (or packet), else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function"):
        return None
    name = getattr(node.target, "name", None)
    if callable(name):
        try:
            return name()
        except Exception:  # noqa: BLE001
            return None
    return getattr(node.target, "_qualified_op_name", None)


def _is_hop_apply(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and \
        getattr(node.target, "__name__", str(node.target)) == "autograd_function_apply"


def _strip_cast(node):
    dt = cast_dtype(node)
    return (node.args[0], dt) if dt is not None else (node, None)


def _is_clone(node) -> bool:
    if not isinstance(node, fx.Node) or node.kwargs.get("memory_format") is not None:
        return False
    return (node.op == "call_method" and node.target == "clone") or call(node, torch.clone)


def _linear_args(node):
    return node.args[0], node.args[1], arg(node, 2, "bias")


# ---- the LoRA branch: linear(linear(x', A), B) * s ----

def _branch(b_lin):
    """(x root, A, B, scale, last node of the branch, inner nodes, input nodes) from the lora_B linear.
    Inner nodes must be used only inside the match; input nodes (casts / p=0 dropout of x) are erased if unused."""
    xa, B, b_bias = _linear_args(b_lin)
    require(b_bias is None, "lora_B has a bias (peft lora_bias=True): not fused")
    require(call(xa, *_LINEAR), "lora_B input is not a linear")
    x_in, A, a_bias = _linear_args(xa)
    require(a_bias is None, "lora_A has a bias: not fused")
    ma, mb = meta(A), meta(B)
    require(isinstance(ma, torch.Tensor) and isinstance(mb, torch.Tensor) and ma.dim() == 2 and mb.dim() == 2,
            "lora_A/lora_B weights are not 2-D tensors")
    rank = ma.shape[0]
    require(mb.shape[1] == rank, f"lora_B in_features {mb.shape[1]} != lora_A rank {rank}")
    require(rank <= _MAX_RANK, f"rank {rank} > {_MAX_RANK} (the rank-r epilogue keeps r in registers)")
    require(ma.dtype in _FLOATS and mb.dtype == ma.dtype, f"adapter dtypes {ma.dtype}/{mb.dtype} not supported")
    nodes, inputs = [xa, b_lin], []
    if call(x_in, F.dropout):
        p, training = arg(x_in, 1, "p", 0.5), arg(x_in, 2, "training", True)
        require(not (training and p > 0), f"lora_dropout p={p} > 0 in training: dropout before lora_A is not "
                                          "fused (use lora_dropout=0)")
        inputs.append(x_in)
        x_in = x_in.args[0]
    x_root, dt = _strip_cast(x_in)
    if dt is not None:
        require(dt == ma.dtype, f"lora input cast to {dt}, not to the adapter dtype {ma.dtype}")
        inputs.append(x_in)
    cur, scale = b_lin, 1.0
    nxt = only_user(cur)
    if nxt is not None and call(nxt, torch.mul):
        s = nxt.args[1] if nxt.args[0] is cur else nxt.args[0]
        require(number(s), "LoRA scaling is not a constant number")
        scale, cur = float(s), nxt
        nodes.append(nxt)
        nxt = only_user(cur)
    if nxt is not None and cast_dtype(nxt) in _FLOATS:
        cur = nxt
        nodes.append(nxt)
    return x_root, A, B, scale, cur, nodes, inputs


def _branch_add(last):
    add = only_user(last)
    require(add is not None and call(add, torch.add) and len(add.args) == 2 and "alpha" not in add.kwargs,
            "LoRA branch output is not added to a base output")
    base_out = add.args[0] if add.args[1] is last else add.args[1]
    require(isinstance(base_out, fx.Node) and base_out is not last, "LoRA branch added to itself")
    return add, base_out


def _base_root(node):
    """Walk back from the add's base operand through a cast / clone / cast: (base node, walked nodes)."""
    walked = []
    for _ in range(3):
        if cast_dtype(node) in _FLOATS or _is_clone(node):
            walked.append(node)
            node = node.args[0]
    return node, walked


def _tail(add):
    """The add, or the float cast that is its only user (peft's result.to(result_dtype))."""
    nxt = only_user(add)
    return (nxt, [nxt]) if nxt is not None and cast_dtype(nxt) in _FLOATS else (add, [])


def _same_input(x_branch, x_base, compute_dtype):
    xb, dt = _strip_cast(x_base)
    require(dt is None or dt == compute_dtype, f"base input cast to {dt}, not the compute dtype {compute_dtype}")
    require(xb is x_branch, "LoRA branch and base read different inputs")
    return [x_base] if dt is not None else []


# ---- NF4 bases ----

def _gemm_4bit_params(g, operand=lambda n: n):
    """Captured quant state of a bitsandbytes gemm_4bit call; `operand` maps its tensor args to outer nodes."""
    qt = arg(g, 5, "quant_type")
    require(qt == "nf4", f"4-bit quant_type {qt!r}: only NF4 is fused")
    shape = arg(g, 2, "shapeB")
    require(isinstance(shape, (tuple, list)) and len(shape) == 2 and all(isinstance(s, int) for s in shape),
            f"weight shape {shape} is not a static 2-D shape")
    q = arg(g, 7, "absmax_8bit")
    p = dict(x=operand(g.args[0]), packed=operand(arg(g, 1, "B")), blocksize=int(arg(g, 4, "blocksize")),
             n=int(shape[0]), k=int(shape[1]), bias=operand(arg(g, 6, "bias")), blocksize2=256)
    if q is not None:   # nested: `absmax` is absmax2, the codes come as absmax_8bit
        p.update(absmax=operand(q), absmax2=operand(arg(g, 3, "absmax")), code2=operand(arg(g, 8, "absmax_code")),
                 offset=operand(arg(g, 9, "absmax_offset")))
    else:
        p.update(absmax=operand(arg(g, 3, "absmax")), absmax2=None, code2=None, offset=None)
    return p


_SIZE_METHODS = ("numel", "size", "dim")
_SIZE_FNS = (operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.add,
             operator.sub, operator.mul, operator.floordiv, operator.mod, operator.not_)


def _size_query(n) -> bool:
    """A size computation that yields no tensor (with dynamic shapes bnb's `A.numel() == 0` check is traced into
    the forward body as numel + eq); it cannot change what the gemm computes."""
    if not isinstance(meta(n), (int, bool, torch.SymInt, torch.SymBool)):
        return False
    return (n.op == "call_method" and n.target in _SIZE_METHODS) or (n.op == "call_function" and n.target in _SIZE_FNS)


def _hop_gemm(getitem):
    """(params, nodes) of getitem(autograd_function_apply(fwd_body, ...), 0) whose forward is one gemm_4bit."""
    require(call(getitem, operator.getitem) and getitem.args[1] == 0, "not output 0 of an autograd function")
    hop = getitem.args[0]
    require(len(hop.users) == 1, "autograd function output used beyond output 0")
    body_node = hop.args[0]
    body = getattr(getitem.graph.owning_module, body_node.target, None) if body_node.op == "get_attr" else None
    require(isinstance(body, fx.GraphModule), "autograd function forward body not found")
    gemms = [n for n in body.graph.nodes if _op_name(n) == "bitsandbytes::gemm_4bit"]
    require(len(gemms) == 1, "autograd function forward is not one bitsandbytes gemm_4bit")
    allowed = {"placeholder", "output"}
    for n in body.graph.nodes:
        ok = n.op in allowed or n is gemms[0] or (n.op == "call_function" and n.target is torch._C._set_grad_enabled) \
            or (n.op == "call_method" and n.target in ("view", "reshape") and n.args[0].op == "placeholder") \
            or _size_query(n)
        require(ok, f"autograd function forward does more than gemm_4bit ({n.format_node()[:80]})")
    leaves = torch.utils._pytree.tree_leaves(list(body.graph.nodes)[-1].args[0])
    require(leaves and leaves[0] is gemms[0], "autograd function output 0 is not the gemm_4bit result")
    ph = [n for n in body.graph.nodes if n.op == "placeholder"]
    operands = list(hop.args[2:])
    ph = ph[len(ph) - len(operands):] if len(ph) in (len(operands), len(operands) + 1) else None
    require(ph is not None, "autograd function placeholders do not line up with its operands")
    outer = {}
    for inner, out in zip(ph, operands):
        mi, mo = meta(inner), meta(out)
        require(getattr(mi, "shape", None) == getattr(mo, "shape", None), "operand/placeholder shapes differ")
        outer[inner] = out

    def operand(n):
        if n is None or not isinstance(n, fx.Node):
            return n
        if n.op == "call_method":   # packed.view(-1, 1) inside the body: the op flattens it itself
            n = n.args[0]
        require(n in outer, f"gemm_4bit argument {n.name} is not a forward-body input")
        return outer[n]
    return _gemm_4bit_params(gemms[0], operand), [getitem, hop, body_node, hop.args[1]]


def _dequant_weight(w):
    """Older bnb: (params, nodes) of a linear weight that is dequantize_4bit(...) [cast] [t().t()]."""
    nodes, flips = [], 0
    while True:
        if cast_dtype(w) is not None:
            pass
        elif call(w, torch.t) or (isinstance(w, fx.Node) and w.op == "call_method" and w.target == "t"):
            flips += 1
        else:
            break
        nodes.append(w)
        w = w.args[0]
    require(_op_name(w) == "bitsandbytes::dequantize_4bit", "linear weight is not dequantize_4bit")
    require(flips % 2 == 0, "dequantized weight is transposed")
    qt, shape, dt = arg(w, 3, "quant_type"), arg(w, 4, "shape"), arg(w, 5, "dtype")
    require(qt == "nf4", f"4-bit quant_type {qt!r}: only NF4 is fused")
    require(isinstance(shape, (tuple, list)) and len(shape) == 2, f"weight shape {shape} is not 2-D")
    p = dict(packed=w.args[0], blocksize=int(arg(w, 2, "blocksize")), n=int(shape[0]), k=int(shape[1]),
             blocksize2=256, absmax2=None, code2=None, offset=None, dequant_dtype=dt)
    am = arg(w, 1, "absmax")
    nodes.append(w)
    if call(am, torch.add, operator.add, operator.iadd) and \
            _op_name(am.args[0]) == "bitsandbytes::dequantize_blockwise":
        dq = am.args[0]
        p.update(absmax=dq.args[0], absmax2=dq.args[1], code2=dq.args[2], blocksize2=int(arg(dq, 3, "blocksize")),
                 offset=am.args[1])
        require(arg(dq, 4, "dtype", torch.float32) == torch.float32, "absmax not dequantized to fp32")
        nodes += [am, dq]
    else:
        require(isinstance(meta(am), torch.Tensor) and meta(am).dtype == torch.float32,
                "absmax is neither fp32 nor dequantize_blockwise(...) + offset")
        p["absmax"] = am
    return p, nodes


def nf4_base(node):
    """(params incl. x, bias, compute dtype; nodes) if `node` is an NF4 linear output, else NoMatch."""
    if _op_name(node) == "bitsandbytes::gemm_4bit":
        p, nodes = _gemm_4bit_params(node), [node]
    elif call(node, operator.getitem) and _is_hop_apply(node.args[0]):
        p, nodes = _hop_gemm(node)
    elif call(node, *_LINEAR):
        x, w, bias = _linear_args(node)
        p, nodes = _dequant_weight(w)
        cdt = meta(x).dtype
        require(p.pop("dequant_dtype") in (cdt, torch.float32), "dequantized to a dtype other than fp32 or the "
                                                               "compute dtype, then cast (double rounding)")
        p.update(x=x, bias=bias)
        nodes = [node] + nodes
    else:
        raise NoMatch("not an NF4 linear")
    mp = meta(p["packed"])
    require(isinstance(mp, torch.Tensor) and mp.element_size() * mp.numel() * 2 >= p["n"] * p["k"],
            "packed weight too small for its shape")
    p["compute_dtype"] = meta(node).dtype
    require(p["compute_dtype"] in _FLOATS, f"compute dtype {p['compute_dtype']} not supported")
    require(meta(p["x"]).shape[-1] == p["k"], "input features do not match the weight shape")
    return p, nodes


def _is_nf4(node) -> bool:
    try:
        nf4_base(node)
        return True
    except NoMatch:
        return False


# ---- lora (dense base) ----

def _lora_candidates(graph):
    out = []
    for n in graph.nodes:
        if call(n, *_LINEAR) and call(n.args[0], *_LINEAR) and len(n.users) == 1:
            try:
                last = _branch(n)[4]
                _, base = _branch_add(last)
                if _is_nf4(_base_root(base)[0]):
                    continue   # lora_nf4's
            except NoMatch:
                pass
            out.append(n)
    return out


def match_lora(b_lin):
    x, A, B, scale, last, nodes, inputs = _branch(b_lin)
    add, base_out = _branch_add(last)
    base, walked = _base_root(base_out)
    require(call(base, *_LINEAR), "base of the LoRA sum is not a linear")
    xb, W, bias = _linear_args(base)
    mw = meta(W)
    require(isinstance(mw, torch.Tensor) and mw.dim() == 2 and mw.dtype in _FLOATS, "base weight is not a 2-D "
                                                                                     "float tensor")
    require(bias is None or (isinstance(meta(bias), torch.Tensor) and meta(bias).dim() == 1), "bias is not 1-D")
    in_cast = _same_input(x, xb, mw.dtype)
    out, tail = _tail(add)
    inside = {*nodes, add, base, *walked, *tail}
    reason = single_use([*nodes, base, *walked], inside)
    require(reason is None, reason or "")
    return Match(anchor=b_lin, output=out, nodes=[*nodes, add, base, *walked, *tail, *in_cast, *inputs],
                 params=dict(x=x, w=W, bias=bias, A=A, B=B, scale=scale, out_dtype=meta(out).dtype))


def replace_lora(graph, m):
    q = m.params
    y, _ = insert_op(graph, m.output, torch.ops.fxopt.lora.default,
                     (q["x"], q["w"], q["bias"], q["A"], q["B"], q["scale"], q["out_dtype"]), n_outputs=2)
    replace_output(graph, m, y)
    return y


# ---- lora_nf4 ----

def _nf4_candidates(graph):
    return [n for n in graph.nodes if _op_name(n) == "bitsandbytes::gemm_4bit"
            or (call(n, operator.getitem) and _is_hop_apply(n.args[0]))
            or (call(n, *_LINEAR) and isinstance(n.args[1], fx.Node) and _dequant_source(n.args[1]))]


def _dequant_source(w) -> bool:
    for _ in range(4):
        if _op_name(w) == "bitsandbytes::dequantize_4bit":
            return True
        if not isinstance(w, fx.Node) or not w.args or not isinstance(w.args[0], fx.Node):
            return False
        w = w.args[0]
    return False


def _adapter_after(base_node):
    """The LoRA branch added to this NF4 output, or None when there is none (a frozen linear)."""
    cur, walked = base_node, []
    for _ in range(3):
        nxt = only_user(cur)
        if nxt is None:
            return None
        if cast_dtype(nxt) in _FLOATS or _is_clone(nxt):
            walked.append(nxt)
            cur = nxt
            continue
        if not (call(nxt, torch.add) and len(nxt.args) == 2):
            return None
        other = nxt.args[0] if nxt.args[1] is cur else nxt.args[1]
        probe = other
        while isinstance(probe, fx.Node) and (cast_dtype(probe) is not None or call(probe, torch.mul)):
            probe = probe.args[0]
        if call(probe, *_LINEAR) and call(probe.args[0], *_LINEAR):
            return probe
        return None
    return None


def _reads(b_lin, x) -> bool:
    """Whether the A-linear of this branch reads x (through a dropout and/or a cast)."""
    a_in = b_lin.args[0].args[0]
    for _ in range(2):
        if call(a_in, F.dropout) or cast_dtype(a_in) is not None:
            a_in = a_in.args[0]
    return a_in is x or a_in is _strip_cast(x)[0]


def _frozen(node, p, base_nodes):
    x, dt = _strip_cast(p["x"])
    x = x if dt == p["compute_dtype"] else p["x"]
    return Match(anchor=node, output=node, nodes=[*base_nodes, p["x"]],
                 params=dict(p, x=x, A=None, B=None, scale=1.0, out_dtype=meta(node).dtype))


def match_lora_nf4(node):
    p, base_nodes = nf4_base(node)
    b_lin = _adapter_after(node)
    if b_lin is None:   # frozen NF4 linear
        return _frozen(node, p, base_nodes)
    try:
        x, A, B, scale, last, nodes, inputs = _branch(b_lin)
    except NoMatch:
        if _reads(b_lin, p["x"]):   # this linear's own adapter, in a form not fused: say why
            raise
        return _frozen(node, p, base_nodes)   # an unrelated sum that merely looks like a LoRA branch
    add, base_out = _branch_add(last)
    root, walked = _base_root(base_out)
    require(root is node, "LoRA sum does not read this NF4 output")
    in_cast = _same_input(x, p["x"], p["compute_dtype"])
    out, tail = _tail(add)
    inside = {*nodes, add, *base_nodes, *walked, *tail}
    reason = single_use([*nodes, node, *walked], inside)
    require(reason is None, reason or "")
    return Match(anchor=node, output=out, nodes=[*nodes, add, *walked, *tail, *base_nodes, *in_cast, *inputs],
                 params=dict(p, x=x, A=A, B=B, scale=scale, out_dtype=meta(out).dtype))


def replace_lora_nf4(graph, m):
    q = m.params
    args = (q["x"], q["packed"], q["absmax"], q["absmax2"], q["code2"], q["offset"], q["bias"], q["A"], q["B"],
            q["scale"], q["blocksize"], q["blocksize2"], q["n"], q["k"], q["compute_dtype"], q["out_dtype"])
    y, _ = insert_op(graph, m.output, torch.ops.fxopt.lora_nf4.default, args, n_outputs=2)
    replace_output(graph, m, y)
    # The kernels read the NF4 code-book from a tensor cached per device. Made now, at compile time: made on the
    # first run instead, under the `cudagraphs` option it would land in the CUDA graph pool, a live allocation no
    # graph output owns (Inductor refuses that: H200, 8B QLoRA, sha 13b6842).
    device = getattr(meta(q["packed"]), "device", None)
    if device is not None:
        nf4_code(device)
    return y


LORA = Pattern("lora", _lora_candidates, match_lora, replace_lora)
LORA_NF4 = Pattern("lora_nf4", _nf4_candidates, match_lora_nf4, replace_lora_nf4)
