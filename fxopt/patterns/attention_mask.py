"""What an attention mask in the graph allows: causal / sliding window (the kernel skips blocks, reads no mask), or a
tensor the kernel reads (padding, packed sequences, anything else).

A mask computed only from constants (HF's `sdpa_mask`/`eager_mask`: arange, comparisons, and_, where(.., 0, min)) is
evaluated once at compile time on its device and compared with the causal / window masks: this proves the pattern for
the shapes the graph was specialized to, whatever ops built it. A mask that depends on graph inputs (a padding
`attention_mask`, symbolic shapes) is passed to the kernel as a tensor; if one of its conjuncts (through and_ /
expand / device moves / where(c, 0, -big)) is constant and contained in a causal/window mask, the flags are set as
well so fully masked blocks are still skipped (mask & flags = mask).
Packed sequences (HF builds the mask from position_ids): the conjuncts
  P[b, q] == P[b, k]   with   P = cumsum(diff(X, prepend=X[:, :1] - 1) != 1, -1)   (a document id per token)
  X[b, k] <= X[b, q]   (causal in position space; X = position_ids),  X[b, k] > X[b, q] - W   (a window)
and constant causal/window conjuncts are recognised; inside one document X rises by exactly 1 per token (that is
what keeps P constant), so X[k] <= X[q] <=> k <= q there, and the mask equals causal & (P[q] == P[k]): the kernel
reads P ([B, S]), never a dense [B, 1, S, S] mask.
A constant mask of more than MAX_EVAL_NUMEL elements (HF's causal mask past S = 32768) goes through the same
conjunct analysis; when its document ids (a constant [B, S]) hold one document per row, it is plain causal / window.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from fxopt.kernels.attention_masks import MASKED_BELOW, allowed_mask
from fxopt.normalize import is_inplace as _inplace, meta

MAX_EVAL_NUMEL = 1 << 30        # larger constant masks are read as tensors instead of being evaluated
_BIG_NEG = MASKED_BELOW          # additive values at or below this mask
_IMPURE = ("rand", "dropout", "bernoulli", "normal", "empty", "uniform", "multinomial", "poisson", "exponential",
           "cauchy", "geometric", "log_api_usage", "print", "assert")
_AND = {operator.and_, torch.logical_and, torch.bitwise_and, torch.Tensor.__and__}


@dataclasses.dataclass(frozen=True)
class MaskInfo:
    causal: bool = False
    window: int = 0
    tensor: bool = False        # the kernel must read the mask tensor
    why: str = ""               # for the log: how the mask was classified
    docs: object = None         # fx.Node of document ids [B, S] (packed sequences): the kernel reads these instead


def _name(target) -> str:
    return getattr(target, "__name__", str(target))


def _constant_subgraph(node: fx.Node):
    """Ancestors of `node` in graph order if none is a graph input or impure op (else None)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op in ("placeholder", "call_module", "get_attr", "output"):
            return None
        name = _name(n.target).lower()
        if any(w in name for w in _IMPURE):
            return None
        stack.extend(n.all_input_nodes)
    for n in seen:   # an in-place op on an ancestor (not itself an ancestor) would change the value
        if any(u not in seen and _inplace(u) for u in n.users):
            return None
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _meta_to_cpu(a):
    """args / kwargs with each meta device (torch.device or string) replaced by the CPU."""
    def leaf(x):
        meta_dev = isinstance(x, torch.device) and x.type == "meta" or isinstance(x, str) and x == "meta"
        return torch.device("cpu") if meta_dev else x
    return fx.node.map_aggregate(a, leaf)


def evaluate_constant(node: fx.Node):
    """The real value of a node computed only from constants, or None."""
    v = meta(node)
    if not isinstance(v, torch.Tensor) or v.numel() > MAX_EVAL_NUMEL:
        return None
    if any(not isinstance(s, int) for s in v.shape):
        return None
    nodes = _constant_subgraph(node)
    if nodes is None:
        return None
    try:
        from torch._subclasses.fake_tensor import unset_fake_temporarily
    except ImportError:  # pragma: no cover
        import contextlib
        unset_fake_temporarily = contextlib.nullcontext
    env = {}
    # a model on the meta device (`fxopt plan` traces one) has masks with no values: build them on the CPU instead
    on_meta = v.device.type == "meta"
    try:
        with unset_fake_temporarily(), torch.no_grad():
            for n in nodes:
                args = fx.node.map_arg(n.args, env.__getitem__)
                kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
                if on_meta:
                    args, kwargs = _meta_to_cpu(args), _meta_to_cpu(kwargs)
                if n.op == "call_function":
                    env[n] = n.target(*args, **kwargs)
                else:
                    env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
    except Exception:  # noqa: BLE001 - anything unexpected: treat the mask as unknown
        return None
    out = env[node]
    return out if isinstance(out, torch.Tensor) and out.shape == v.shape else None


def _allowed_of_value(t: torch.Tensor):
    """Allowed positions of a bool or binary additive (0 / <= -1e4) mask value; None for a real bias."""
    if t.dtype == torch.bool:
        return t
    if not t.is_floating_point():
        return None
    neg = t <= _BIG_NEG
    return ~neg if bool(((t == 0) | neg).all()) else None


def _as_rows(allowed: torch.Tensor, Sq: int, Sk: int):
    """(any over leading dims [Sq, Sk], uniform over leading dims?)."""
    a = allowed.expand(*allowed.shape[:-2], Sq, Sk) if allowed.dim() >= 2 else allowed.expand(Sq, Sk)
    a = a.reshape(-1, Sq, Sk)
    any_, all_ = a.any(0), a.all(0)
    return any_, bool(torch.equal(any_, all_))


def _flag_mask(Sq, Sk, causal, window, device):
    """[Sq, Sk] bool of what the causal/window flags allow (the kernels' own definition)."""
    ok = allowed_mask(Sq, Sk, causal, window, None, device)
    return torch.ones(Sq, Sk, dtype=torch.bool, device=device) if ok is None else ok


def _tightest_flags(rows: torch.Tensor, Sq: int, Sk: int):
    """Smallest (causal, window) whose allowed set contains `rows` ([Sq, Sk] bool, Sq == Sk)."""
    if Sq != Sk or not bool(rows.any()):
        return False, 0
    i = torch.arange(Sq, device=rows.device)[:, None]
    j = torch.arange(Sk, device=rows.device)[None, :]
    d = (i - j).expand(Sq, Sk)[rows]
    causal = bool((d >= 0).all())
    w = int(d.max()) + 1
    return causal, (w if w < Sq else 0)


def classify_constant(t: torch.Tensor, Sq: int, Sk: int):
    """MaskInfo for a constant mask value: flags only when it is exactly causal/window, else read as a tensor."""
    allowed = _allowed_of_value(t)
    if allowed is None:
        return MaskInfo(tensor=True, why="constant additive mask with non-binary values")
    rows, uniform = _as_rows(allowed, Sq, Sk)
    if not uniform:
        return MaskInfo(tensor=True, why="constant mask that differs across batch/heads")
    if bool(rows.all()):
        return MaskInfo(why="constant mask that allows everything")
    causal, window = _tightest_flags(rows, Sq, Sk)
    if (causal or window) and torch.equal(rows, _flag_mask(Sq, Sk, causal, window, rows.device)):
        return MaskInfo(causal=causal, window=window, why="constant mask == causal/window (evaluated)")
    return MaskInfo(causal=causal, window=window, tensor=True, why="constant mask, not causal/window: read")


def bias_row_problem(t: fx.Node, causal: bool, window: int, Sq: int, Sk: int):
    """Why a constant additive bias with real values (ALiBi) cannot be read by the kernel, else None. Where it is
    <= -1e4 the kernel masks; that equals eager unless a row keeps nothing above it within the causal / window flags
    (eager then weights those values, the kernel finds an empty row), e.g. ALiBi's first rows at long lengths."""
    v = evaluate_constant(t) if meta(t).is_floating_point() else None
    if v is None or _allowed_of_value(v) is not None:   # input-dependent, or a 0 / -big mask
        return None
    rows = v.expand(*v.shape[:-2], Sq, Sk) if v.dim() >= 2 else v.expand(Sq, Sk)
    allowed = _flag_mask(Sq, Sk, causal, window, v.device)
    kept = ((rows > _BIG_NEG) & allowed).any(-1) | ~allowed.any(-1)
    if bool(kept.all()):
        return None
    return (f"constant additive bias <= {_BIG_NEG} over a whole row (min {float(v.min()):.3g}): the kernel would "
            "read the row as empty")


def _transparent_input(n: fx.Node):
    """For ops that keep each element's (q, k) position (broadcast, device move, bool cast), the input."""
    if n.op == "call_method" and n.target == "expand":
        return n.args[0]
    if n.op == "call_method" and n.target in ("to", "contiguous") and isinstance(meta(n.args[0]), torch.Tensor) \
            and meta(n.args[0]).shape == meta(n).shape and meta(n).dtype in (meta(n.args[0]).dtype, torch.bool):
        return n.args[0]
    if n.op == "call_function" and n.target is operator.getitem and isinstance(meta(n.args[0]), torch.Tensor) \
            and meta(n.args[0]).shape == meta(n).shape:
        idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
        if all(isinstance(s, slice) and s.start in (None, 0) and s.step in (None, 1) for s in idx):
            return n.args[0]
    return None


def _conjuncts(n: fx.Node, out: list, depth=0):
    """Nodes whose AND (after broadcasting) is the allowed set of bool mask `n`."""
    if depth > 32:
        out.append(n)
        return
    inner = _transparent_input(n) if isinstance(n, fx.Node) else None
    if inner is not None:
        return _conjuncts(inner, out, depth + 1)
    if isinstance(n, fx.Node) and n.op == "call_function" and n.target in _AND and len(n.args) == 2:
        for a in n.args:
            if isinstance(a, fx.Node):
                _conjuncts(a, out, depth + 1)
        return
    out.append(n)


def scalar_value(v):
    """v as a float: a number, or a node of a constant one-element tensor (torch.tensor(finfo.min)); else None."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, fx.Node) and isinstance(meta(v), torch.Tensor) and meta(v).numel() == 1:
        z = evaluate_constant(v)
        return float(z) if z is not None else None
    return None


def _additive_to_bool(n: fx.Node):
    """cond of an additive mask where(cond, 0, -big), else None."""
    if n.op == "call_function" and n.target is torch.where and len(n.args) == 3:
        c, a, b = n.args
        a, b = scalar_value(a), scalar_value(b)
        if isinstance(c, fx.Node) and a == 0 and b is not None and b <= _BIG_NEG:
            return c
    return None


def tighter_window(w1: int, w2: int) -> int:
    """The window of two conjuncts' windows (0 = no window)."""
    return min(w1, w2) if w1 and w2 else (w1 or w2)


def _op(n, *names) -> bool:
    return isinstance(n, fx.Node) and n.op in ("call_function", "call_method") and _name(n.target) in names


def _const_equals(n, expected: torch.Tensor) -> bool:
    v = evaluate_constant(n) if isinstance(n, fx.Node) else None
    return v is not None and v.shape == expected.shape and torch.equal(v.to(expected.device, expected.dtype),
                                                                       expected)


def _strip(n):
    """n without the position-keeping ops around it (expand, device moves, full slices)."""
    while isinstance(n, fx.Node) and _transparent_input(n) is not None:
        n = _transparent_input(n)
    return n


def _gather(n, B: int, S: int, axis: int):
    """T for T[b_idx, idx] with b_idx = arange(B)[:, None, None, None] and idx = arange(S) on dim `axis` (2: q,
    3: k) of the 4-D mask; else None."""
    if not (_op(n, "getitem") and isinstance(n.args[1], tuple) and len(n.args[1]) == 2):
        return None
    t, (bi, ii) = n.args[0], n.args[1]
    tv = meta(t) if isinstance(t, fx.Node) else None
    if not isinstance(tv, torch.Tensor) or tv.dim() != 2 or tv.is_floating_point():
        return None
    idx_shape = [1, 1, 1, 1]
    idx_shape[axis] = S
    if not (_const_equals(bi, torch.arange(B).view(B, 1, 1, 1)) and _const_equals(ii, torch.arange(S).view(idx_shape))):
        return None
    return _strip(t)                              # expand(B, -1) of the [B, S] / [1, S] source


def _doc_ids_source(p):
    """X if p = cumsum(ne(diff(X, prepend=X[:, :1] - 1, dim=-1), 1), -1) (HF's packed-sequence ids), else None."""
    if not (_op(p, "cumsum") and (p.args[1:2] or [p.kwargs.get("dim")])[0] in (-1, 1)):
        return None
    ne = p.args[0]
    if not (_op(ne, "ne") and len(ne.args) == 2 and ne.args[1] == 1):
        return None
    d = ne.args[0]
    if not (_op(d, "diff") and d.kwargs.get("dim", d.args[3] if len(d.args) > 3 else -1) in (-1, 1)
            and d.kwargs.get("n", 1) == 1):
        return None
    x, pre = d.args[0], d.kwargs.get("prepend")
    if not (_op(pre, "sub") and pre.args[1] == 1 and _op(pre.args[0], "getitem") and pre.args[0].args[0] is x
            and pre.args[0].args[1] == (slice(None), slice(None, 1))):
        return None
    return x


def _packed_docs(parts, B, Sq, Sk):
    """(docs node, causal, window, why) when the conjuncts are exactly causal/window constants & same-document &
    positional causality derived from the same position ids; else None."""
    if Sq != Sk:
        return None
    docs = pos = None
    causal, window, wpos = False, 0, []
    for p in parts:
        v = evaluate_constant(p) if isinstance(p, fx.Node) else None
        if v is not None:                          # a constant conjunct must be exactly all-true / causal / window
            if v.dtype != torch.bool:
                return None
            if v.numel() == 1:                     # broadcast to [Sq, Sk] it would be 4 GiB at S = 65536
                if bool(v):
                    continue
                return None
            rows, uniform = _as_rows(v, Sq, Sk)
            c, w = _tightest_flags(rows, Sq, Sk)
            if not uniform or not (bool(rows.all()) or torch.equal(rows, _flag_mask(Sq, Sk, c, w, rows.device))):
                return None
            causal, window = causal or c, tighter_window(window, w)
            continue
        if _op(p, "eq") and len(p.args) == 2:
            a = _gather(p.args[0], B, Sq, 2) or _gather(p.args[0], B, Sk, 3)
            b = _gather(p.args[1], B, Sk, 3) or _gather(p.args[1], B, Sq, 2)
            if a is not None and a is b and docs in (None, a):
                docs = a
                continue
        if _op(p, "new_ones") and len(p.args) >= 2 and p.args[1] in ((), []):   # the scalar True HF starts from
            continue
        if _op(p, "gt", "lt") and len(p.args) == 2:   # X[k] > X[q] - W  or  X[q] - W < X[k]: a window in positions
            k_side, q_side = p.args if _name(p.target) == "gt" else p.args[::-1]
            a = _gather(k_side, B, Sk, 3)
            if a is not None and _op(q_side, "sub") and isinstance(q_side.args[1], int) and q_side.args[1] > 0 \
                    and _gather(q_side.args[0], B, Sq, 2) is a:
                wpos.append((a, q_side.args[1]))
                continue
        if _op(p, "le", "ge") and len(p.args) == 2:   # X[k] <= X[q]  or  X[q] >= X[k]
            lo, hi = p.args if _name(p.target) == "le" else p.args[::-1]
            a, b = _gather(lo, B, Sk, 3), _gather(hi, B, Sq, 2)
            if a is not None and a is b:
                pos = a
                continue
        return None
    if docs is None:
        return None
    if pos is not None or wpos:
        src = _strip(_doc_ids_source(docs))
        if src is None or any(src is not _strip(x) for x in [pos] * (pos is not None) + [x for x, _ in wpos]):
            return None
        causal = causal or pos is not None
        for _, w in wpos:   # inside a document X[q] - X[k] = q - k
            w = w if w < Sq else 0
            window = tighter_window(window, w)
    return docs, causal, window, "packed sequences: document ids from position_ids, no dense mask read"


_FLIP = {"le": "ge", "lt": "gt", "ge": "le", "gt": "lt", "eq": "eq"}


def _side(v: torch.Tensor, Sq: int, Sk: int):
    """Which axis a broadcast operand of a [.., Sq, Sk] comparison varies along: "q" ([.., Sq, 1]), "k" ([.., 1, Sk]),
    "const" (one element), else None."""
    if v.numel() == 1:
        return "const"
    if v.dim() >= 2 and v.shape[-1] == 1 and v.shape[-2] == Sq:
        return "q"
    if v.dim() >= 2 and v.shape[-2] == 1 and v.shape[-1] == Sk:
        return "k"
    return None


def _outer_flags(p, Sq: int, Sk: int):
    """A constant conjunct too large to evaluate, compared from small operands: cmp(A[q], B[k]) (HF's kv_idx <= q_idx,
    kv_idx > q_idx - W, doc[q] == doc[k]). Decided from the operands alone in O(S log S): "all", (causal, window)
    when it equals exactly that flag set, else None. B sorted along k; each q's allowed k then form a prefix (<=, <)
    or a suffix (>=, >) of 0..Sk-1, found by searchsorted; rows of different batch/heads must agree."""
    name = (p.target if p.op == "call_method" else _name(p.target) if p.op == "call_function" else "").strip("_")
    if name not in _FLIP or len(p.args) != 2 or Sq != Sk:
        return None
    vals = [evaluate_constant(a) if isinstance(a, fx.Node) else torch.tensor(a) for a in p.args]
    if any(v is None for v in vals):
        return None
    sides = [_side(v, Sq, Sk) for v in vals]
    if sorted(sides, key=str) != ["k", "q"]:
        return None
    if sides[0] == "q":   # read it as  B[k] op A[q]
        name, vals = _FLIP[name], vals[::-1]
    b, a = vals
    lead = torch.broadcast_shapes(b.shape[:-2], a.shape[:-2])
    dt = torch.promote_types(a.dtype, b.dtype)
    b = b.to(dt).expand(*lead, 1, Sk).reshape(-1, Sk)
    a = a.to(dt).expand(*lead, Sq, 1).reshape(-1, Sq)
    if name == "eq":   # one value on both sides of every row: all allowed
        return "all" if bool((b == b[:, :1]).all() and (a == b[:, :1]).all()) else None
    if b.dtype == torch.bool or not bool((b[:, 1:] >= b[:, :-1]).all()):
        return None
    edge = torch.searchsorted(b.contiguous(), a.contiguous(), right=name in ("le", "gt"))
    if not bool((edge == edge[:1]).all()):
        return None
    edge, q = edge[0], torch.arange(Sq, device=edge.device)
    if name in ("le", "lt"):          # allowed k < edge[q]
        if bool((edge == Sk).all()):
            return "all"
        return (True, 0) if torch.equal(edge, q + 1) else None
    if bool((edge == 0).all()):       # allowed k >= edge[q]
        return "all"
    w = int(q[-1] - edge[-1]) + 1
    return (False, w) if 0 < w < Sq and torch.equal(edge, (q - w + 1).clamp(min=0)) else None


def _one_document(docs) -> bool:
    """Document ids [B, S] computed from constants (position ids from arange) with one id per row: then the
    same-document conjunct allows everything, and position = index + constant inside the row."""
    v = evaluate_constant(docs) if isinstance(docs, fx.Node) else None
    return v is not None and v.dim() == 2 and bool((v == v[:, :1]).all())


def classify(mask: fx.Node, Sq, Sk, allowed_is_not: bool = False) -> MaskInfo:
    """MaskInfo of mask node `mask` (bool: True = attend, unless allowed_is_not; float: additive)."""
    if not (isinstance(Sq, int) and isinstance(Sk, int)):
        return MaskInfo(tensor=True, why="symbolic sequence length: mask read")
    key = ("fxopt_attention_mask", str(Sq), str(Sk), allowed_is_not)
    cached = mask.meta.get(key)
    if cached is not None:
        return cached
    val = evaluate_constant(mask)
    if val is not None:
        info = classify_constant(~val if allowed_is_not else val, Sq, Sk)
    else:
        big = _constant_subgraph(mask) is not None and meta(mask).numel() > MAX_EVAL_NUMEL
        info = MaskInfo(tensor=True, why=f"constant mask of {meta(mask).numel()} elements, too large to evaluate: read"
                        if big else "mask depends on graph inputs: read")
        root = _additive_to_bool(mask) if meta(mask).is_floating_point() else mask
        if root is not None and not allowed_is_not:
            parts = []
            _conjuncts(root, parts)
            packed = _packed_docs(parts, meta(mask).shape[0] if meta(mask).dim() == 4 else -1, Sq, Sk)
            if packed is not None:
                info = MaskInfo(causal=packed[1], window=packed[2], docs=packed[0], why=packed[3])
                if _one_document(packed[0]):
                    info = MaskInfo(causal=packed[1], window=packed[2], why=(
                        f"constant mask of {meta(mask).numel()} elements, too large to evaluate; its conjuncts: "
                        "positions rising by 1 (one document per row), so causal/window in positions = in indices"))
                mask.meta[key] = info
                return info
            causal, window, decided = False, 0, 0
            for p in parts:
                v = evaluate_constant(p) if isinstance(p, fx.Node) else None
                if v is None and big and isinstance(p, fx.Node):
                    flags = _outer_flags(p, Sq, Sk)
                    decided += flags is not None
                    if isinstance(flags, tuple):
                        causal, window = causal or flags[0], tighter_window(window, flags[1])
                    continue
                if v is not None and v.dtype == torch.bool and bool(v.all()):
                    decided += 1
                    continue
                if v is None or v.dtype != torch.bool or v.dim() < 2:
                    continue
                rows, uniform = _as_rows(v, Sq, Sk)
                c, w = _tightest_flags(rows, Sq, Sk)
                if c or w:
                    causal, window = causal or c, tighter_window(window, w)
                    decided += uniform and torch.equal(rows, _flag_mask(Sq, Sk, c, w, rows.device))
            if big and decided == len(parts) and (causal or window):   # every conjunct exactly all / causal / window
                info = MaskInfo(causal=causal, window=window, why=(
                    f"constant mask of {meta(mask).numel()} elements, too large to evaluate; each conjunct decided "
                    "from its small operands (index comparisons, one document per row): causal/window"))
            elif causal or window:
                info = MaskInfo(causal=causal, window=window, tensor=True,
                                why="mask depends on graph inputs: read, with constant causal/window conjunct")
    mask.meta[key] = info
    return info
