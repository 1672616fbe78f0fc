"""Memory and time model on AOTAutograd's joint (forward + backward) aten graph.

Units of the model:
  storage  one allocation: a node that creates memory and every alias of it (views, detach, `_unsafe_view`, getitems
           of view ops share it; identified by the fake tensor's storage, as Inductor's CSE does). Bytes = the
           storage's nbytes (a sympy expression of the shape symbols when shapes are dynamic; its hint otherwise).
  group    one forward op (a multi-output op with its getitems) that creates storages: the unit saved or recomputed.
           Aliases are always recomputed (free); graph inputs, random and impure ops are never recomputed.
A plan is the set R of recomputed groups. Given R:
  saved    = storages created in the forward that the backward reads, directly or through recomputed groups
             (a recomputed group's inputs are needed in turn) -- exactly the min-cut result once every forward node
             is tagged MUST_SAVE / MUST_RECOMPUTE (partition.py), since the cut is then forced at the creators.
  peak     = liveness over the forward (nodes in graph order; a storage lives from its op to its last forward read,
             or to the backward if saved or a forward output) and over the backward (graph order, each recomputed
             group scheduled right before its first backward reader, as torch's `reordering_to_mimic_autograd_engine`
             does; saved storages freed after their last backward read; forward outputs and gradients stay).
             Counted: activations, forward outputs, tangents, backward temporaries and gradients; not counted:
             parameters and the graph's other inputs (alive anyway). Every op output is counted as materialized
             (Inductor's fusion of aten pointwise chains makes the real transient part smaller).
  time     = recompute time of R, a roofline per op: max(flops / GEMM ceiling, bytes / copy ceiling).
"""
from __future__ import annotations

import dataclasses
import operator
import os

import sympy
import torch
import torch.fx as fx

# Measured on the H200 (benchmarks): bf16 GEMM 790 TFLOP/s, copy 4.3 TB/s. fp32 has no measured number: the
# H200's spec sheet gives 67 TFLOP/s for non-tensor-core fp32 (torch's default, TF32 off).
GEMM_FLOPS = {torch.bfloat16: 790e12, torch.float16: 790e12, torch.float32: 67e12, torch.float64: 33e12}
COPY_BYTES = 4.3e12

aten = torch.ops.aten
PARAM, INPUT, TANGENT, ACT, BWD = "param", "input", "tangent", "act", "bwd"

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


def _aten_flops(node) -> int:
    """FLOPs of GEMM-like aten ops (0 for the rest, which are bandwidth bound)."""
    tgt = getattr(node.target, "overloadpacket", None)
    args = [_val(a) if isinstance(a, fx.Node) else a for a in node.args]
    out = _val(node)
    if tgt in (aten.mm, aten.addmm, aten.bmm, aten.baddbmm) and isinstance(out, torch.Tensor):
        a = args[1] if tgt in (aten.addmm, aten.baddbmm) else args[0]
        return 2 * _numel(_shape(out)) * _shape(a)[-1]
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
    vals = {k: (_val(v) if isinstance(v, fx.Node) else v) for k, v in named.items()}
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


def _registered(table: dict, node):
    """What the fxopt op's kernel file registered in `table` (COSTS, WORKSPACES) says of this call; None when the op
    registered nothing there or its arguments do not bind."""
    fn = table.get(_fxopt_op_name(node))
    if fn is None:
        return None
    try:
        return fn(**_bind_cost_args(fn, node))
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
    outs = _tensors(_val(node))
    dtype = outs[0].dtype if outs else torch.bfloat16
    return max(flops / GEMM_FLOPS.get(dtype, GEMM_FLOPS[torch.float32]), nbytes / COPY_BYTES)


# ---- the joint graph model ----

@dataclasses.dataclass
class Storage:
    sid: int
    node: fx.Node            # the node that creates it
    kind: str                # param | input | tangent | act | bwd
    nbytes: int              # at the trace's size hints
    expr: sympy.Expr         # symbolic in the shape symbols
    group: int | None = None  # creating forward group (kind act)


@dataclasses.dataclass
class Group:
    gid: int
    node: fx.Node
    sids: list               # storages it creates
    in_sids: list            # storages it reads
    fixed: str | None        # why it is never recomputed (None: recomputable)
    time: float              # roofline seconds to recompute it


def _op_name(node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._schema.name.split('::')[-1]}"
    return getattr(t, "__name__", str(t))


def recompute_no_dropout() -> bool:
    """FXOPT_RECOMPUTE_NO_DROPOUT=1: seeded ops whose dropout_p is 0 may be recomputed (opt-in, see _no_dropout)."""
    from fxopt.config import _env_flag
    return _env_flag(os.environ, "FXOPT_RECOMPUTE_NO_DROPOUT")


def _no_dropout(node) -> bool:
    """A seeded op whose only randomness is a `dropout_p` argument that is 0 (SDPA's flash / cuDNN / efficient / CPU
    kernels in training without attention dropout): recomputing it gives the same values. Opt-in: the partitioner
    then wraps it in torch's RNG functionalization (its RNG state saved: 16 B on CUDA, 5 KiB on CPU, not in the
    prediction), not yet run on a GPU. Where the per-shape dispatch keeps SDPA, its output is otherwise always saved:
    on the H200 the smallest 1B LoRA plan was 1.55 GiB against 1.22 with fxopt's recomputable attention op."""
    return recompute_no_dropout() and _arg_index(node, "dropout_p") is not None and \
        op_arg(node, "dropout_p", 0.0) == 0


def _never_recompute(node) -> str | None:
    t = node.target
    seeded_without_dropout = False   # fx calls every seeded op impure: such an op skips that check below
    if isinstance(t, torch._ops.OpOverload):
        if torch.Tag.nondeterministic_seeded in t.tags:
            if not _no_dropout(node):
                return "random op"
            seeded_without_dropout = True
        if t._schema.is_mutable:
            return "mutates an input"
        if t.namespace not in ("aten", "prims", "fxopt"):
            return f"custom op of namespace {t.namespace!r}"
    elif t is not operator.getitem and not isinstance(t, torch._ops.HigherOrderOperator):
        return "not an op overload"
    try:
        if not seeded_without_dropout and node.is_impure():
            return "impure"
    except Exception:  # noqa: BLE001
        pass
    return None


class Joint:
    """Storages, forward groups and the forward/backward split of one joint graph (see the module doc)."""

    def __init__(self, gm: fx.GraphModule, num_fwd_outputs: int, static_input_indices=()):
        self.gm = gm
        nodes = list(gm.graph.nodes)
        self.pos = {n: i for i, n in enumerate(nodes)}
        out = nodes[-1]
        import torch.utils._pytree as pytree
        flat = pytree.arg_tree_leaves(*out.args)
        self.fwd_outputs = [o for o in flat[:num_fwd_outputs] if isinstance(o, fx.Node)]
        self.bwd_outputs = [o for o in flat[num_fwd_outputs:] if isinstance(o, fx.Node)]
        placeholders = [n for n in nodes if n.op == "placeholder"]
        tangents = [n for n in placeholders if "tangents" in str(n.target)]
        primals = [n for n in placeholders if n not in tangents]
        static = set(static_input_indices or ())
        # forward: ancestors of the forward outputs; backward: the tangents' closure, nodes that must run there
        # and everything else that is not forward (computed in the backward; tagged MUST_RECOMPUTE)
        self.fwd: set = set()
        stack = list(self.fwd_outputs)
        while stack:
            n = stack.pop()
            if n in self.fwd or n.op == "placeholder":
                continue
            self.fwd.add(n)
            stack.extend(n.all_input_nodes)
        self.bwd = [n for n in nodes if n.op in ("call_function", "get_attr") and n not in self.fwd]
        self.fwd_order = [n for n in nodes if n in self.fwd]
        # storages
        self.storages: list[Storage] = []
        self.sid_of: dict = {}           # node -> sid of the storage its (tensor) value lives in
        by_key: dict = {}
        kind_of = {n: (PARAM if i in static else INPUT) for i, n in enumerate(primals)}
        kind_of.update({n: TANGENT for n in tangents})
        self.groups: list[Group] = []
        self.group_of: dict = {}         # op node -> gid
        for n in nodes:
            if n.op == "output":
                continue
            v = _val(n)
            if isinstance(v, torch.Tensor):
                key = self._key(v)
                parent = n.args[0] if n.target is operator.getitem else None
                if key is not None and key in by_key:
                    self.sid_of[n] = by_key[key]          # an alias of an existing storage
                    continue
                kind = kind_of.get(n, ACT if (n in self.fwd or (parent is not None and parent in self.fwd))
                                   else (PARAM if n.op == "get_attr" else BWD))
                st = Storage(len(self.storages), n, kind, tensor_nbytes(v), tensor_nbytes(v, symbolic=True))
                self.storages.append(st)
                self.sid_of[n] = st.sid
                if key is not None:
                    by_key[key] = st.sid
        for n in self.fwd_order:
            if n.op != "call_function" or n.target is operator.getitem:
                continue
            outs = [n] if isinstance(_val(n), torch.Tensor) else \
                [u for u in n.users if u.target is operator.getitem]
            sids = [self.sid_of[o] for o in outs if o in self.sid_of and self.storages[self.sid_of[o]].node is o]
            if not sids and isinstance(_val(n), torch.Tensor):
                continue                                   # an alias: recomputed for free
            ins = sorted({self.sid_of[a] for a in n.all_input_nodes if a in self.sid_of})
            fixed = _never_recompute(n) or (None if sids else "creates no tensor")
            g = Group(len(self.groups), n, sids, ins, fixed, 0.0 if fixed else op_time(n))
            self.groups.append(g)
            self.group_of[n] = g.gid
            for s in sids:
                self.storages[s].group = g.gid
        self.out_sids = {self.sid_of[o] for o in self.fwd_outputs if o in self.sid_of}
        self.grad_sids = {self.sid_of[o] for o in self.bwd_outputs if o in self.sid_of}
        # storages read by the backward (directly: aliases resolve to their storage)
        self.bwd_reads = {}
        for n in self.bwd:
            self.bwd_reads[n] = sorted({self.sid_of[a] for a in n.all_input_nodes if a in self.sid_of})
        self.fwd_reads = {n: sorted({self.sid_of[a] for a in n.all_input_nodes if a in self.sid_of})
                          for n in self.fwd_order}
        self.sizes = [s.nbytes for s in self.storages]
        # per-node storage lists, precomputed for simulate(): (created, read) in forward / backward order
        self._fwd_items = [([c for c in self._creates(n) if self.storages[c].kind == ACT], self.fwd_reads[n])
                           for n in self.fwd_order]
        self._bwd_creates = {n: [c for c in self._creates(n) if self.storages[c].kind == BWD] for n in self.bwd}
        self._tangents = {st.sid for st in self.storages if st.kind == TANGENT}
        # transient bytes of the ops themselves (chunk buffers: linear_cross_entropy's 0.49 GiB at the 1B shape)
        self.workspace = {n: w for n in self.fwd_order + self.bwd if (w := op_workspace(n))}

    @staticmethod
    def _key(v):
        try:
            from torch.multiprocessing.reductions import StorageWeakRef
            return StorageWeakRef(v.untyped_storage())
        except Exception:  # noqa: BLE001
            return None

    def counted(self, sid) -> bool:
        return self.storages[sid].kind in (ACT, BWD, TANGENT)

    def symbols(self):
        out = set()
        for s in self.storages:
            out |= s.expr.free_symbols
        return out

    def sizes_at(self, subs: dict):
        """Storage sizes with the shape symbols set to `subs` ({sympy.Symbol: int})."""
        return [int(s.expr.subs(subs)) if s.expr.free_symbols else s.nbytes for s in self.storages]

    # ---- saved set and peak for a plan ----

    def saved_for(self, recompute: set):
        """(saved storage ids, recomputed groups actually needed by the backward, in schedule order)."""
        saved, rec_order, rec_seen = set(), [], set()
        schedule = []                     # backward schedule: ("g", gid) recompute, ("n", node) backward op
        for n in self.bwd:
            self._need(self.bwd_reads[n], recompute, saved, rec_seen, rec_order, schedule)
            schedule.append(("n", n))
        return saved, rec_order, schedule

    def _need(self, sids, recompute, saved, rec_seen, rec_order, schedule):
        for sid in sids:
            st = self.storages[sid]
            if st.kind != ACT:
                if st.kind in (PARAM, INPUT):
                    saved.add(sid)
                continue
            g = st.group
            if g is not None and g in recompute:
                if g not in rec_seen:
                    rec_seen.add(g)
                    self._need(self.groups[g].in_sids, recompute, saved, rec_seen, rec_order, schedule)
                    rec_order.append(g)
                    schedule.append(("g", g))
            else:
                saved.add(sid)

    def simulate(self, recompute=frozenset(), sizes=None) -> "Sim":
        sizes = sizes or self.sizes
        saved, rec_order, schedule = self.saved_for(recompute)
        keep = {s for s in saved if self.storages[s].kind == ACT} | self.out_sids
        # forward
        last = {}
        for i, (_, reads) in enumerate(self._fwd_items):
            for s in reads:
                last[s] = i
        cur = peak_f = peak_f_ws = 0
        live, peak_f_live, peak_f_at = set(), set(), None
        for i, (creates, reads) in enumerate(self._fwd_items):
            for s in creates:
                if s not in live:
                    live.add(s)
                    cur += sizes[s]
            here = cur + self.workspace.get(self.fwd_order[i], 0)
            if here > peak_f:
                peak_f, peak_f_live, peak_f_at = here, set(live), self.fwd_order[i].name
                peak_f_ws = here - cur
            for s in creates + reads:
                if s in live and s not in keep and last.get(s, -1) <= i:
                    live.discard(s)
                    cur -= sizes[s]
        # backward: saved + outputs + tangents live at the start
        live = {s for s in keep if self.counted(s)} | self._tangents
        cur = sum(sizes[s] for s in live)
        items = [(self.groups[x].sids, self.groups[x].in_sids) if kind == "g" else (self._bwd_creates[x],
                                                                                      self.bwd_reads[x])
                 for kind, x in schedule]
        blast = {}
        for i, (_, reads) in enumerate(items):
            for s in reads:
                blast[s] = i
        stay = self.out_sids | self.grad_sids
        peak_b, peak_b_live, peak_b_i, peak_b_ws = cur, set(live), None, 0
        for i, (creates, reads) in enumerate(items):
            for s in creates:
                if s not in live:
                    live.add(s)
                    cur += sizes[s]
            kind, x = schedule[i]
            here = cur + self.workspace.get(self.groups[x].node if kind == "g" else x, 0)
            if here > peak_b:
                peak_b, peak_b_live, peak_b_i, peak_b_ws = here, set(live), i, here - cur
            for s in creates + reads:
                if s in live and s not in stay and blast.get(s, -1) <= i:
                    live.discard(s)
                    cur -= sizes[s]
        if peak_b_i is None:
            peak_b_at = "start"
        else:
            kind, x = schedule[peak_b_i]
            peak_b_at = f"recompute {self.groups[x].node.name}" if kind == "g" else x.name
        act_saved = sorted(s for s in saved if self.storages[s].kind == ACT and s not in self.out_sids)
        fwd_is_peak = peak_f >= peak_b
        return Sim(recompute=frozenset(recompute), saved=sorted(saved), act_saved=act_saved,
                   saved_bytes=sum(sizes[s] for s in act_saved), recomputed=rec_order,
                   time=sum(self.groups[g].time for g in rec_order), peak=max(peak_f, peak_b),
                   peak_live=peak_f_live if fwd_is_peak else peak_b_live,
                   peak_workspace=peak_f_ws if fwd_is_peak else peak_b_ws,
                   peak_at=("forward " + str(peak_f_at)) if fwd_is_peak else "backward " + peak_b_at)

    def _creates(self, n):
        if n.target is operator.getitem:
            return []                     # its storage was counted at the multi-output op
        outs = [n] + [u for u in n.users if u.target is operator.getitem]
        return [self.sid_of[o] for o in outs if o in self.sid_of and self.storages[self.sid_of[o]].node is o]

    def peak_expr(self, sim: "Sim") -> sympy.Expr:
        """The predicted peak as an expression of the shape symbols (the live set at the peak)."""
        return sympy.Add(*[self.storages[s].expr for s in sim.peak_live]) + sim.peak_workspace

    def describe(self, sid) -> dict:
        st = self.storages[sid]
        return {"name": st.node.name, "op": _op_name(st.node.args[0]) if st.node.target is operator.getitem
                else _op_name(st.node), "bytes": self.sizes[sid], "kind": st.kind}


@dataclasses.dataclass
class Sim:
    recompute: frozenset     # the plan: recomputed group ids
    saved: list              # storages the forward keeps for the backward (activations and inputs)
    act_saved: list          # ... activations only (not graph inputs, not forward outputs)
    saved_bytes: int         # their bytes
    recomputed: list         # groups the backward recomputes, in schedule order
    time: float              # predicted recompute seconds
    peak: int                # predicted peak bytes
    peak_live: set           # storages live at the peak
    peak_at: str
    peak_workspace: int = 0  # the op's own transient bytes in the peak (at the size hints)
