"""Graph canonicalization before matching, on dynamo's torch-level FX graph.

After this pass patterns see one spelling per operation:
  - tensor methods -> torch functions   (x.pow(2) -> torch.pow(x, 2); x.mean(-1) -> torch.mean(x, -1))
  - operator.add/mul/sub/truediv/neg on tensors -> torch.add/mul/sub/div/neg
  - in-place `x += y`, `-=`, `*=`, `/=` (operator.iadd/...) -> torch.add/sub/mul/div when nothing can see the
    mutation: x is an intermediate used only by that op, no other node shares x's storage, and the out-of-place
    result has x's dtype and shape (falcon's eager `scores /= sqrt(d)`)
  - `x @ W.T` with a 2-D W (any spelling of the transpose: .T, .t(), transpose(0, 1), permute(1, 0)) -> linear(x, W)
    (the same GEMM; falcon's FalconLinear)
  - `addmm(b, x.view(-1, K), W).view(*x.shape[:-1], N)` (and the 2-D `addmm(b, x, W)`) -> linear(x, W.t(), b)
    (transformers' Conv1D: gpt2 and its LoRA)
  - dtype casts (.to(dtype), .float(), .half(), .bfloat16(), .type(dtype), .type_as(y)) -> `x.to(dtype)` as
    call_method "to" with exactly (x, dtype); casts to the dtype x already has are dropped; two casts of one tensor
    to one dtype become one node (unless either result is written in place)
  - view/reshape to the shape x already has are dropped
  - dropout that is the identity (p == 0 or training=False, not inplace) is dropped
  - `pow(x, -0.5)` on a floating tensor -> rsqrt(x)   (gemma4's RMSNorm spells it so)
Every rewrite is checked against dynamo's fake-tensor metadata (node.meta["example_value"]).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

_METHOD_TO_FN = {name: getattr(torch, name) for name in (
    "pow", "mean", "rsqrt", "sqrt", "add", "mul", "sub", "div", "neg", "tanh", "exp", "sigmoid", "square",
    "softmax", "cat", "var", "sum", "matmul", "erf", "reciprocal", "chunk", "split", "transpose", "unsqueeze",
    "where", "masked_fill")}
_OPERATOR_TO_FN = {operator.add: torch.add, operator.mul: torch.mul, operator.sub: torch.sub,
                   operator.truediv: torch.div, operator.neg: torch.neg, operator.pow: torch.pow}
_INPLACE_TO_FN = {operator.iadd: torch.add, operator.isub: torch.sub, operator.imul: torch.mul,
                  operator.itruediv: torch.div}
_CAST_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}


def meta(node):
    """The fake tensor (or value) dynamo recorded for `node`, else None."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def is_tensor(node) -> bool:
    return isinstance(meta(node), torch.Tensor)


def _cast_target(node: fx.Node):
    """dtype if `node` is a pure dtype cast (same shape/device, not copy=True), else None."""
    if node.op != "call_method" or not node.args:
        return None
    src, out = meta(node.args[0]), meta(node)
    if not (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor)):
        return None
    if src.shape != out.shape or src.device != out.device or node.kwargs.get("copy", False):
        return None
    name = node.target
    if name in _CAST_METHODS and len(node.args) == 1 and not node.kwargs:
        return _CAST_METHODS[name]
    if name in ("to", "type", "type_as") and (len(node.args) >= 2 or "dtype" in node.kwargs):
        extra = [a for a in node.args[1:]] + [v for k, v in node.kwargs.items() if k in ("dtype", "device")]
        if any(not isinstance(a, (torch.dtype, torch.device, fx.Node)) for a in extra):
            return None
        if name == "type_as" and not is_tensor(node.args[1]):
            return None
        return out.dtype
    return None


def _noop_dropout(node: fx.Node) -> bool:
    """F.dropout(x, p, training, inplace) / torch.dropout(x, p, train) with constant p == 0 or training False."""
    if node.op != "call_function" or node.target not in (torch.nn.functional.dropout, torch.dropout) \
            or not node.args or not is_tensor(node.args[0]):
        return False
    names = ("input", "p", "training", "inplace") if node.target is torch.nn.functional.dropout else \
        ("input", "p", "train")
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    p = bound.get("p", 0.5)
    training = bound.get("training", bound.get("train", True))
    if bound.get("inplace", False) is not False or isinstance(p, fx.Node) or isinstance(training, fx.Node):
        return False
    return p == 0 or training is False


def _storages(graph: fx.Graph) -> dict:
    """node -> id of the storage of its fake value (views and in-place results share their base's)."""
    from torch.multiprocessing.reductions import StorageWeakRef
    out = {}
    for n in graph.nodes:
        v = meta(n)
        if isinstance(v, torch.Tensor):
            try:
                out[n] = StorageWeakRef(v.untyped_storage()).cdata
            except Exception:  # noqa: BLE001 - a tensor without storage (sparse, nested): aliases nothing dense
                out[n] = None
    return out


def _private_inplace(node: fx.Node, storages: dict) -> bool:
    """True if in-place `node` = x op= y can become out-of-place: only `node` can observe x's mutation."""
    x = node.args[0] if len(node.args) == 2 and not node.kwargs else None
    if not (isinstance(x, fx.Node) and x.op in ("call_function", "call_method") and len(x.users) == 1):
        return False
    sx = storages.get(x)
    if sx is None or storages.get(node) != sx or any(s == sx for n, s in storages.items() if n not in (x, node)):
        return False
    y = node.args[1]
    ym = meta(y) if isinstance(y, fx.Node) else y
    if not isinstance(ym, (torch.Tensor, int, float, bool)):
        return False
    try:
        dtype = torch.result_type(meta(x), ym)
        shape = torch.broadcast_shapes(meta(x).shape, ym.shape) if isinstance(ym, torch.Tensor) else meta(x).shape
    except Exception:  # noqa: BLE001
        return False
    return dtype == meta(x).dtype and shape == meta(x).shape


def _transposed_2d(node):
    """W if `node` is the transpose of a 2-D tensor W, else None."""
    if not (isinstance(node, fx.Node) and is_tensor(node)):
        return None
    src = node.args[0] if node.args else None
    if not (isinstance(src, fx.Node) and is_tensor(src) and meta(src).dim() == 2):
        return None
    t, rest = node.target, tuple(node.args[1:])
    if node.kwargs:
        return None
    ok = (node.op == "call_function" and t is getattr and rest in (("T",), ("mT",))) or \
         (node.op == "call_method" and t == "t" and not rest) or (node.op == "call_function" and t is torch.t) or \
         (t in ("transpose", torch.transpose) and sorted(d % 2 for d in rest) == [0, 1] and len(rest) == 2) or \
         (t == "permute" and node.op == "call_method" and rest in ((1, 0), ((1, 0),), ([1, 0],)))
    return src if ok else None


def _matmul_to_linear(g: fx.Graph) -> int:
    n = 0
    for node in list(g.nodes):
        if not (node.op == "call_function" and node.target in (operator.matmul, torch.matmul)
                and len(node.args) == 2 and not node.kwargs and is_tensor(node) and is_tensor(node.args[0])):
            continue
        w = _transposed_2d(node.args[1])
        if w is None or meta(node.args[0]).dim() < 1:
            continue
        wt = node.args[1]
        node.target, node.args = torch._C._nn.linear, (node.args[0], w)
        if not wt.users:
            g.erase_node(wt)
        n += 1
    return n


def _is_view_call(node) -> bool:
    return isinstance(node, fx.Node) and ((node.op == "call_method" and node.target in ("view", "reshape")) or
                                          (node.op == "call_function" and node.target is torch.reshape))


def _fake(fn, *nodes):
    vals = [meta(n) for n in nodes]
    mode = next((v.fake_mode for v in vals if hasattr(v, "fake_mode")), None)
    if mode is None:
        return None
    with mode:
        return fn(*vals)


def _addmm_to_linear(g: fx.Graph) -> int:
    n = 0
    for mm in list(g.nodes):
        if not (mm.op == "call_function" and mm.target is torch.addmm and len(mm.args) == 3 and not mm.kwargs
                and all(is_tensor(a) for a in mm.args)):
            continue
        b, xf, w = mm.args
        bm, xm, wm = meta(b), meta(xf), meta(w)
        if not (wm.dim() == 2 and bm.shape == (wm.shape[1],) and xm.dim() == 2):
            continue
        x, out = xf, mm                       # 2-D addmm(b, x, W)
        if len(mm.users) == 1 and _is_view_call(next(iter(mm.users))) and _is_view_call(xf) and len(xf.users) == 1:
            full, flat = meta(xf.args[0]), next(iter(mm.users))
            if isinstance(full, torch.Tensor) and full.dim() >= 2 and full.shape[-1] == xm.shape[1] and \
                    tuple(meta(flat).shape) == tuple(full.shape[:-1]) + (wm.shape[1],):
                x, out = xf.args[0], flat      # the flatten/unflatten views of Conv1D
        with g.inserting_before(out):
            wt = g.call_function(torch.t, (w,))
            wt.meta["example_value"] = _fake(torch.t, w)
            lin = g.call_function(torch._C._nn.linear, (x, wt, b))
            lin.meta["example_value"] = _fake(torch._C._nn.linear, x, wt, b)
        out.replace_all_uses_with(lin)
        for dead in (out, mm, xf):
            if dead is not x and not dead.users:
                g.erase_node(dead)
        n += 1
    return n


def is_inplace(n: fx.Node) -> bool:
    """Whether call `n` is an in-place op by its name: `x.add_()`, `torch.relu_`, `operator.iadd` and co."""
    name = getattr(n.target, "__name__", str(n.target))
    if n.op == "call_function" and getattr(n.target, "__module__", "") in ("_operator", "operator"):
        return name.startswith("i")        # iadd, iand, ... (and_, or_ are not in-place)
    return name.endswith("_") and not name.startswith("_")


def _mutated(node: fx.Node) -> bool:
    """Whether any user may write into `node`'s tensor (an in-place op, setitem)."""
    return any(is_inplace(u) or u.target is operator.setitem for u in node.users)


def _merge_duplicate_casts(g: fx.Graph) -> int:
    """`x.float()` written twice (two casts of one tensor to one dtype) -> one node, so patterns that need the same
    upcast value in two places see it (RMSNorm as `w * (x.float() * rsqrt(x.float().pow(2).mean(-1) + eps))`).
    Only when nothing writes into either cast's result."""
    first, merged = {}, 0
    for node in list(g.nodes):
        if node.op != "call_method" or node.target != "to" or len(node.args) != 2 or node.kwargs:
            continue
        key = (node.args[0], node.args[1])
        prev = first.get(key)
        if prev is None:
            first[key] = node
        elif not _mutated(prev) and not _mutated(node):
            node.replace_all_uses_with(prev)
            g.erase_node(node)
            merged += 1
    return merged


def _pow_to_rsqrt(g: fx.Graph) -> int:
    """torch.pow(x, -0.5) -> torch.rsqrt(x) for a floating-point tensor x (the same value, one spelling)."""
    n_done = 0
    for node in g.nodes:
        if node.op == "call_function" and node.target is torch.pow and len(node.args) == 2 and not node.kwargs \
                and node.args[1] == -0.5 and is_tensor(node.args[0]) and meta(node.args[0]).is_floating_point() \
                and is_tensor(node) and meta(node).dtype == meta(node.args[0]).dtype:
            node.target, node.args = torch.rsqrt, (node.args[0],)
            n_done += 1
    return n_done


def normalize(gm: fx.GraphModule) -> dict:
    """Canonicalize `gm` in place; returns counts of rewrites (for logging)."""
    g = gm.graph
    counts = {"methods": 0, "operators": 0, "casts": 0, "dropped": 0, "inplace": 0, "cse": 0, "linear": 0,
              "rsqrt": 0}
    inplace = [n for n in g.nodes if n.op == "call_function" and n.target in _INPLACE_TO_FN and is_tensor(n)]
    if inplace:
        storages = _storages(g)
        for node in inplace:
            if _private_inplace(node, storages):
                node.target = _INPLACE_TO_FN[node.target]
                storages[node] = None   # a fresh tensor now
                counts["inplace"] += 1
    for node in list(g.nodes):
        if node.op == "call_method":
            dtype = _cast_target(node)
            if dtype is not None:
                src = node.args[0]
                if meta(src).dtype == dtype:
                    node.replace_all_uses_with(src)
                    g.erase_node(node)
                    counts["dropped"] += 1
                else:
                    node.target, node.args, node.kwargs = "to", (src, dtype), {}
                    counts["casts"] += 1
                continue
            if node.target in ("view", "reshape") and is_tensor(node) and is_tensor(node.args[0]) \
                    and meta(node).shape == meta(node.args[0]).shape and meta(node).stride() == meta(node.args[0]).stride():
                node.replace_all_uses_with(node.args[0])
                g.erase_node(node)
                counts["dropped"] += 1
                continue
            fn = _METHOD_TO_FN.get(node.target)
            if fn is not None and is_tensor(node.args[0]):
                node.op, node.target = "call_function", fn
                counts["methods"] += 1
        elif _noop_dropout(node):
            node.replace_all_uses_with(node.args[0])
            g.erase_node(node)
            counts["dropped"] += 1
        elif node.op == "call_function" and node.target in _OPERATOR_TO_FN and node.args:
            # torch.add/mul/... want a tensor first: swap commutative ones, leave `1 - x` / `1 / x` as they are
            if not is_tensor(node.args[0]) and node.target in (operator.add, operator.mul) and len(node.args) == 2 \
                    and is_tensor(node.args[1]):
                node.args = (node.args[1], node.args[0])
            if is_tensor(node.args[0]):
                node.target = _OPERATOR_TO_FN[node.target]
                counts["operators"] += 1
    counts["rsqrt"] = _pow_to_rsqrt(g)
    counts["cse"] = _merge_duplicate_casts(g)
    counts["linear"] = _matmul_to_linear(g) + _addmm_to_linear(g)
    g.lint()
    gm.recompile()
    return counts
