"""What one op call of a joint graph costs: sizes of its tensors (concrete or symbolic), its roofline time (FLOPs and
bytes over the measured H200 ceilings; an fxopt op declares its own cost and workspace in its kernel file), and its
arguments by schema name. The whole-graph model (storages, liveness, plans) is in cost.py."""
from __future__ import annotations

import sympy
import torch
import torch.fx as fx

# Measured on the H200 (benchmarks): bf16 GEMM 790 TFLOP/s, copy 4.3 TB/s. fp32 has no measured number: the
# H200's spec sheet gives 67 TFLOP/s for non-tensor-core fp32 (torch's default, TF32 off).
GEMM_FLOPS = {torch.bfloat16: 790e12, torch.float16: 790e12, torch.float32: 67e12, torch.float64: 33e12}
COPY_BYTES = 4.3e12

aten = torch.ops.aten

# ---- sizes ----

def hint(x) -> int:
    """A concrete int for an int or SymInt (its hint; 4096 for an unbacked symbol, as the partitioner does)."""
    if isinstance(x, int):
        return x
    node = getattr(x, "node", None)
    h = getattr(node, "hint", None)
    if h is not None:
        return int(h)
    try:
        return int(node.shape_env.size_hint(node.expr))
    except Exception:  # noqa: BLE001
        return 4096


def expr(x) -> sympy.Expr:
    """sympy expression of an int or SymInt, with the shape env's replacements applied (e.g. s2 -> s0)."""
    if isinstance(x, int):
        return sympy.Integer(x)
    e = x.node.expr
    try:
        e = x.node.shape_env.replace(e)
    except Exception:  # noqa: BLE001
        pass
    return sympy.sympify(e)


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def tensor_nbytes(t: torch.Tensor, symbolic=False):
    """Bytes of the allocation behind `t` (its storage; numel * itemsize where the storage is not visible)."""
    try:
        nb = t.untyped_storage().nbytes()
    except Exception:  # noqa: BLE001 - no storage (e.g. some subclasses)
        nb = t.numel() * t.element_size()
    return expr(nb) if symbolic else hint(nb)


def _val(node):
    return node.meta.get("val", node.meta.get("example_value"))


def _tensors(v):
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in _tensors(x)]
    return []


# ---- roofline time of one forward op ----

def _shape(t):
    return [hint(s) for s in t.shape]


_SDPA = tuple(getattr(aten, n) for n in ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention",
                                          "_scaled_dot_product_efficient_attention", "scaled_dot_product_attention",
                                          "_scaled_dot_product_flash_attention_for_cpu") if hasattr(aten, n))


def _sdpa_flops(node, args) -> int:
    """Forward FLOPs of an aten SDPA call: 2 * Sq * Sk * (D + Dv) per query head (k/v heads may be fewer: GQA),
    halved when is_causal. torch's flop_registry counts causal calls in full, and (torch 2.11) rejects k/v with
    fewer heads: the H200 plan of the 8B step at 65,536 tokens priced cuDNN attention's recompute at its bytes,
    0.31 ms, where the profile measured 60.6 ms per call."""
    q, k, v = args[:3]
    b, hq, sq, d = _shape(q)
    sk, dv = _shape(k)[-2], _shape(v)[-1]
    causal = bool(op_arg(node, "is_causal", False))
    return int(2 * b * hq * sq * sk * (d + dv) * (0.5 if causal else 1.0))


def _aten_flops(node) -> int:
    """FLOPs of GEMM-like aten ops (0 for the rest, which are bandwidth bound)."""
    tgt = getattr(node.target, "overloadpacket", None)
    args = [_val(a) if isinstance(a, fx.Node) else a for a in node.args]
    out = _val(node)
    if tgt in (aten.mm, aten.addmm, aten.bmm, aten.baddbmm) and isinstance(out, torch.Tensor):
        a = args[1] if tgt in (aten.addmm, aten.baddbmm) else args[0]
        return 2 * _numel(_shape(out)) * _shape(a)[-1]
    if tgt in _SDPA and all(isinstance(t, torch.Tensor) for t in args[:3]):
        return _sdpa_flops(node, args)
    if isinstance(tgt, torch._ops.OpOverloadPacket):
        try:   # convolution, sdpa, ...: torch's own flop formulas
            from torch.utils.flop_counter import flop_registry
            fn = flop_registry.get(tgt)
            if fn is not None:
                kw = {k: _val(v) if isinstance(v, fx.Node) else v for k, v in node.kwargs.items()}
                return hint(fn(*args, **kw, out_val=out))
        except Exception:  # noqa: BLE001 - a formula that cannot take fake/symbolic args: bytes only
            return 0
    return 0


def _io_bytes(node) -> int:
    ins = [t for a in node.all_input_nodes for t in _tensors(_val(a))]
    return sum(hint(t.numel()) * t.element_size() for t in ins + _tensors(_val(node)))


def _bind_cost_args(fn, node):
    """Arguments of a registered cost function, by name, from the op call (see fxopt.kernels.registry.COSTS):
    `<arg>_shape` -> shape of op argument <arg> (`out_shape`: of the first output), `has_<arg>` -> argument is
    not None, `dtype_bytes` -> itemsize of the first tensor argument, GEMM-like `m`, `k` (rows and last dim of the
    first tensor), `n` (last dim of the first output), `rank` (`lora_a` rows), `vocab` (`weight` rows), any other
    name -> the op argument of that name. Raises KeyError when a parameter without default cannot be bound."""
    import inspect
    schema = node.target._schema
    named = {a.name: None for a in schema.arguments}
    for a, v in zip(schema.arguments, node.args):
        named[a.name] = v
    named.update(node.kwargs)
    vals = {k: fx.node.map_arg(v, _val) for k, v in named.items()}   # also inside list arguments (Tensor[])
    first = next((v for v in vals.values() if isinstance(v, torch.Tensor)), None)
    outs = _tensors(_val(node))
    derived = {"out_shape": _shape(outs[0]) if outs else None,
               "dtype_bytes": first.element_size() if first is not None else None,
               "m": hint(first.numel()) // max(1, hint(first.shape[-1])) if first is not None and first.dim() else None,
               "k": hint(first.shape[-1]) if first is not None and first.dim() else None,
               "n": hint(outs[0].shape[-1]) if outs and outs[0].dim() else None,
               "rank": hint(vals["lora_a"].shape[0]) if isinstance(vals.get("lora_a"), torch.Tensor) else 0,
               "vocab": hint(vals["weight"].shape[0]) if isinstance(vals.get("weight"), torch.Tensor) else None}
    kwargs = {}
    for p in inspect.signature(fn).parameters.values():
        name = p.name
        if name.endswith("_shape") and isinstance(vals.get(name[:-6]), torch.Tensor):
            v = _shape(vals[name[:-6]])
        elif name.startswith("has_") and name[4:] in vals:
            v = vals[name[4:]] is not None
        elif name in vals and not isinstance(vals[name], torch.Tensor):
            v = vals[name]
        elif derived.get(name) is not None:
            v = derived[name]
        elif p.default is not inspect.Parameter.empty:
            continue
        else:
            raise KeyError(name)
        kwargs[name] = v
    return kwargs


def _fxopt_op_name(node) -> str | None:
    tgt = node.target if node.op == "call_function" else None
    return tgt._schema.name.split("::")[-1] if str(getattr(tgt, "namespace", "")) == "fxopt" else None


def registered_call(table: dict, node):
    """(fn, bound arguments) of what the fxopt op's kernel file registered in `table` (COSTS, WORKSPACES) for this
    call; None when the op registered nothing there or its arguments do not bind."""
    fn = table.get(_fxopt_op_name(node))
    if fn is None:
        return None
    try:
        return fn, _bind_cost_args(fn, node)
    except Exception:  # noqa: BLE001 - the caller falls back to its estimate
        return None


def _registered(table: dict, node):
    """What the registered function says of this call (see registered_call); None when there is none or it fails."""
    call = registered_call(table, node)
    if call is None:
        return None
    try:
        return call[0](**call[1])
    except Exception:  # noqa: BLE001 - the caller falls back to its estimate
        return None


def op_flops_bytes(node) -> tuple[int, int, str]:
    """(flops, bytes, source) of one forward op: an fxopt op's registered cost, aten GEMM formulas, else bytes."""
    name = _fxopt_op_name(node)
    if name is not None:
        from fxopt.kernels.registry import COSTS
        cost = _registered(COSTS, node)
        if cost is not None:
            return int(cost[0]), int(cost[1]), f"COSTS[{name}]"
        return 0, _io_bytes(node), "bytes"
    if isinstance(node.target, torch._ops.OpOverload):
        return _aten_flops(node), _io_bytes(node), "roofline"
    return 0, _io_bytes(node), "bytes"


def op_workspace(node) -> int:
    """Bytes an fxopt op holds while it runs beyond its outputs (its kernel file's register_workspace), else 0."""
    from fxopt.kernels.registry import WORKSPACES
    return int(_registered(WORKSPACES, node) or 0)


def _arg_index(node, name: str) -> int | None:
    schema = getattr(node.target, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else []
    return names.index(name) if name in names else None


def op_arg(node, name: str, default=None):
    """The op call's argument `name` (positional or keyword, by the op's schema); `default` when absent."""
    i = _arg_index(node, name)
    if i is None:
        return default
    return node.args[i] if i < len(node.args) else node.kwargs.get(name, default)


def set_op_arg(node, name: str, value) -> None:
    """Set the op call's argument `name` (positional or keyword, by the op's schema) to `value`, in place."""
    i = _arg_index(node, name)
    if i < len(node.args):
        node.args = node.args[:i] + (value,) + node.args[i + 1:]
    else:
        node.kwargs = {**node.kwargs, name: value}


def op_time(node) -> float:
    flops, nbytes, _ = op_flops_bytes(node)
    # the operands' dtype sets the GEMM ceiling (linear_cross_entropy's first output is its fp32 loss: priced at the
    # fp32 ceiling, its 8B-shape GEMMs took 129 ms instead of 11)
    ins = [t for a in node.all_input_nodes for t in _tensors(_val(a)) if t.is_floating_point()]
    outs = ins or _tensors(_val(node))
    dtype = outs[0].dtype if outs else torch.bfloat16
    return max(flops / GEMM_FLOPS.get(dtype, GEMM_FLOPS[torch.float32]), nbytes / COPY_BYTES)
