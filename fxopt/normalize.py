"""Graph canonicalization before matching, on dynamo's torch-level FX graph.

After this pass patterns see one spelling per operation:
  - tensor methods -> torch functions   (x.pow(2) -> torch.pow(x, 2); x.mean(-1) -> torch.mean(x, -1))
  - operator.add/mul/sub/truediv/neg on tensors -> torch.add/mul/sub/div/neg
  - dtype casts (.to(dtype), .float(), .half(), .bfloat16(), .type(dtype), .type_as(y)) -> `x.to(dtype)` as
    call_method "to" with exactly (x, dtype); casts to the dtype x already has are dropped
  - view/reshape to the shape x already has are dropped
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


def normalize(gm: fx.GraphModule) -> dict:
    """Canonicalize `gm` in place; returns counts of rewrites (for logging)."""
    g = gm.graph
    counts = {"methods": 0, "operators": 0, "casts": 0, "dropped": 0}
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
        elif node.op == "call_function" and node.target in _OPERATOR_TO_FN and node.args:
            # torch.add/mul/... want a tensor first: swap commutative ones, leave `1 - x` / `1 / x` as they are
            if not is_tensor(node.args[0]) and node.target in (operator.add, operator.mul) and len(node.args) == 2 \
                    and is_tensor(node.args[1]):
                node.args = (node.args[1], node.args[0])
            if is_tensor(node.args[0]):
                node.target = _OPERATOR_TO_FN[node.target]
                counts["operators"] += 1
    g.lint()
    gm.recompile()
    return counts
