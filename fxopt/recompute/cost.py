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

from fxopt.recompute.ops import _arg_index, _val, op_arg, op_time, op_workspace, tensor_nbytes

PARAM, INPUT, TANGENT, ACT, BWD = "param", "input", "tangent", "act", "bwd"


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
    """Seeded ops whose dropout_p is 0 may be recomputed (see _no_dropout); FXOPT_RECOMPUTE_NO_DROPOUT=0 turns it
    off."""
    from fxopt.config import _env_flag
    return _env_flag(os.environ, "FXOPT_RECOMPUTE_NO_DROPOUT", default=True)


def _no_dropout(node) -> bool:
    """A seeded op whose only randomness is a `dropout_p` argument that is 0 (SDPA's flash / cuDNN / efficient / CPU
    kernels in training without attention dropout): recomputing it gives the same values. The partitioner then
    wraps it in torch's RNG functionalization (its RNG state saved: 16 B on CUDA, 5 KiB on CPU, not in the
    prediction). Where the per-shape dispatch keeps SDPA, its output was otherwise always saved: on the H200 the
    smallest 1B LoRA plan took 1.55 GiB of activations that way, 1.40 GiB with SDPA recomputed (planned 1.22; the
    rest was a tuner's timing buffer, since removed); 8B QLoRA 2.31 -> 1.58 GiB (train_step_h200.jsonl)."""
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
        self._made_at = {c: i for i, (creates, _) in enumerate(self._fwd_items) for c in creates}
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

    def simulate(self, recompute=frozenset(), sizes=None, offload=(), depth=None) -> "Sim":
        """The plan's saved set, peak and time. `offload`: saved activations kept in host memory instead
        (fxopt/kernels/offload.py), D = `depth` copies in flight: in the forward each lives until the D-th next
        offload (whose call waits for its copy; the last D until the last offload); in the backward from the first
        read of the storage reloaded D before it (fetched D ahead; the first D where the first one is read) to its
        last read."""
        from fxopt.kernels.offload import join_call
        from fxopt.recompute.plan import offload_depth
        depth = depth or offload_depth()
        sizes = sizes or self.sizes
        saved, rec_order, schedule = self.saved_for(recompute)
        off = [s for s in dict.fromkeys(offload) if s in saved and self.storages[s].kind == ACT
               and s not in self.out_sids]
        keep = ({s for s in saved if self.storages[s].kind == ACT} | self.out_sids) - set(off)
        # forward
        last = {}
        for i, (_, reads) in enumerate(self._fwd_items):
            for s in reads:
                last[s] = i
        by_made = sorted(off, key=self._made_at.__getitem__)
        late: dict = {}                                  # forward index -> offloaded sids whose copy is joined there
        for j, s in enumerate(by_made):
            nxt = by_made[join_call(j, len(by_made), depth)]
            last[s] = max(last.get(s, -1), self._made_at[nxt])
            late.setdefault(last[s], []).append(s)
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
            for s in creates + reads + late.get(i, []):
                if s in live and s not in keep and last.get(s, -1) <= i:
                    live.discard(s)
                    cur -= sizes[s]
        # backward: saved + outputs + tangents live at the start
        live = {s for s in keep if self.counted(s)} | self._tangents
        cur = sum(sizes[s] for s in live)
        items = [(self.groups[x].sids, self.groups[x].in_sids) if kind == "g" else (self._bwd_creates[x],
                                                                                      self.bwd_reads[x])
                 for kind, x in schedule]
        blast, first = {}, {}
        for i, (_, reads) in enumerate(items):
            for s in reads:
                blast[s] = i
                first.setdefault(s, i)
        slots = sorted(off, key=lambda s: first.get(s, len(items)))        # the order the backward reloads them
        fetched: dict = {}                                                   # item index -> offloaded sids made
        for k, s in enumerate(slots):
            fetched.setdefault(first.get(slots[max(0, k - depth)], 0), []).append(s)
        stay = self.out_sids | self.grad_sids
        peak_b, peak_b_live, peak_b_i, peak_b_ws = cur, set(live), None, 0
        for i, (creates, reads) in enumerate(items):
            for s in creates + fetched.get(i, []):
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
        fetched_sids = set(slots)                 # on the host: not among the saved device bytes
        act_saved = sorted(s for s in saved if self.storages[s].kind == ACT and s not in self.out_sids
                           and s not in fetched_sids)
        fwd_is_peak = peak_f >= peak_b
        return Sim(recompute=frozenset(recompute), saved=sorted(saved), act_saved=act_saved,
                   saved_bytes=sum(sizes[s] for s in act_saved), recomputed=rec_order, offloaded=tuple(slots),
                   offload_bytes=sum(sizes[s] for s in slots), offload_depth=depth,
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
    offloaded: tuple = ()    # saved activations kept in host memory, in the order the backward reloads them
    offload_bytes: int = 0   # their bytes (each copied to the host and back once per step)
    offload_depth: int = 1   # copies in flight each way, as simulated
