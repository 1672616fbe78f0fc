"""The hook into AOTAutograd's partitioner: plan on the joint graph, tag every node, let the min-cut partition.

Tags (node.meta["recompute"] = CheckpointPolicy.*), honoured by `min_cut_rematerialization_partition` in torch 2.11
and 2.13: a MUST_RECOMPUTE node gets an infinite edge to the sink and is never banned -- custom ops included (the
"non-builtin op" ban applies only to untagged nodes) -- and a MUST_SAVE node is banned from recompute. With every
forward node tagged (aliases and backward-only nodes MUST_RECOMPUTE, each op group by the plan) the cut is forced
at the storage creators, so the partition saves what cost.Joint predicts.
Where it plugs in (feature-detected): Inductor's `custom_partitioner_fn` (a CustomPartitionerFn; it runs after
Inductor's joint-graph passes and gets num_fwd_outputs), present in torch 2.11 and 2.13; `partition_fn` of
aot_autograd for the `inductor=False` path. Both run the same `FxoptPartitioner.__call__`.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import pathlib

import torch
import torch.fx as fx

from fxopt.recompute import cost as _cost
from fxopt.recompute import offload as _offload
from fxopt.recompute.plan import chunked_ops, fmt_bytes, make_plan

log = logging.getLogger("fxopt.recompute")
LAST: dict = {}     # the latest partition: predicted vs partitioned saved node names, the model, the plan (tests)

try:
    from torch.utils.checkpoint import CheckpointPolicy
except ImportError:  # pragma: no cover - older torch
    CheckpointPolicy = None

try:
    from torch._inductor.custom_graph_pass import CustomPartitionerFn as _Base
except ImportError:  # pragma: no cover
    _Base = object


def supported() -> str | None:
    """None when tag-driven partitioning is available, else the reason."""
    if CheckpointPolicy is None:
        return "torch.utils.checkpoint.CheckpointPolicy is missing"
    return None


def inductor_hook_available() -> bool:
    import torch._inductor.config as ic
    return _Base is not object and hasattr(ic, "custom_partitioner_fn")


@functools.lru_cache(None)
def _source_hash() -> str:
    root = pathlib.Path(__file__).resolve().parent.parent
    files = sorted(root.glob("recompute/*.py")) + sorted(root.glob("kernels/*.py"))   # the model and COSTS
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def tag(joint: _cost.Joint, recompute) -> None:
    """MUST_RECOMPUTE on aliases, backward-only nodes and planned groups; MUST_SAVE on the other forward ops."""
    import operator
    save, again = CheckpointPolicy.MUST_SAVE, CheckpointPolicy.MUST_RECOMPUTE
    for n in joint.fwd_order:
        if n.op != "call_function":
            continue
        if n.target is operator.getitem:
            continue                                     # follows its op, below
        gid = joint.group_of.get(n)
        if gid is None:
            v = _cost._val(n)
            if isinstance(v, torch.Tensor):
                n.meta["recompute"] = again             # alias of an earlier storage
            continue
        g = joint.groups[gid]
        only_views = g.fixed == "creates no tensor" and not _cost._never_recompute(n)   # e.g. split
        pol = again if (gid in recompute or only_views) else save
        n.meta["recompute"] = pol
        for u in n.users:
            if u.target is operator.getitem:
                u.meta["recompute"] = pol
    for n in joint.bwd:
        if n.op == "call_function" and n.meta.get("recompute") is None and not _cost._never_recompute(n) and \
                not _depends_on_tangents(n, joint):
            n.meta["recompute"] = again                  # forward-only values computed in the backward


def _depends_on_tangents(n, joint) -> bool:
    cache = joint.__dict__.setdefault("_tan", {})
    if n in cache:
        return cache[n]
    stack, seen, hit = [n], set(), False
    while stack and not hit:
        x = stack.pop()
        if x in seen:
            continue
        seen.add(x)
        if x.op == "placeholder":
            hit = "tangents" in str(x.target)
        elif x in cache:
            hit = cache[x]
        else:
            stack.extend(x.all_input_nodes)
    cache[n] = hit
    return hit


def _drop_backward_detaches(gm: fx.GraphModule) -> int:
    """Replace each `detach(x)` that is not a graph output by x (in the joint graph a detach is the identity).
    A custom op's autograd saves its outputs through such detaches, which AOT places right after the forward op:
    the backward then reads every layer's saved outputs at its very start, so a recomputed output was materialized
    for all layers at once (1B-shape LoRA, meta trace: smallest plan 7.70 GiB of activations; read where used
    instead: see tests/recompute/test_plan.py). Returns how many were dropped."""
    dropped = 0
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target is torch.ops.aten.detach.default and isinstance(n.args[0], fx.Node) \
                and n.users and all(u.op != "output" for u in n.users):
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
            dropped += 1
    return dropped


def prepare_joint(gm: fx.GraphModule) -> None:
    """The joint graph both the cost model and the partitioner see: detaches dropped (_drop_backward_detaches),
    then what min_cut_rematerialization_partition does first (DCE, then CSE)."""
    _drop_backward_detaches(gm)
    gm.graph.eliminate_dead_code()
    from torch._functorch import config as fconfig
    if fconfig.cse:
        from torch._functorch.compile_utils import fx_graph_cse
        gm.graph = fx_graph_cse(gm.graph)
    gm.recompile()


class FxoptPartitioner(_Base):
    """Plan + tag + min-cut partition. `budget`: int bytes or float fraction; the result goes to `graph_report`."""

    def __init__(self, budget, graph_report=None, no_dropout=None, offload=False):
        self.budget = budget
        self.graph_report = graph_report
        self.no_dropout = _cost.recompute_no_dropout() if no_dropout is None else no_dropout   # part of the key
        self.offload = offload

    def uuid(self):
        from fxopt.recompute.plan import offload_bw
        bw = offload_bw() if self.offload else None
        return f"fxopt-recompute-{_source_hash()}-{self.budget!r}-{self.no_dropout}-{self.offload}-{bw}"

    def __reduce__(self):   # the config cache key pickles the partitioner: only what decides the result
        return (FxoptPartitioner, (self.budget, None, self.no_dropout, self.offload))

    def __call__(self, gm, joint_inputs, compiler="inductor", *, num_fwd_outputs, static_lifetime_input_indices=None,
                 **kwargs):
        from torch._functorch.partitioners import min_cut_rematerialization_partition
        prepare_joint(gm)
        joint = _cost.Joint(gm, num_fwd_outputs, static_lifetime_input_indices or ())
        p = make_plan(joint, self.budget, offload=self.offload)
        tag(joint, p.sim.recompute)
        offloaded = _offload.rewrite(joint, p.sim, CheckpointPolicy.MUST_SAVE, CheckpointPolicy.MUST_RECOMPUTE)
        memory = report_dict(joint, p)
        memory["offloaded"] = offloaded
        if self.graph_report is not None:
            self.graph_report.memory = memory
        log.info("memory plan: budget %s, predicted peak %s (save-everything %s), %d saved, %d recomputed, "
                 "recompute %.3f ms", fmt_bytes(p.budget), fmt_bytes(p.sim.peak), fmt_bytes(p.base.peak),
                 len(memory["saved"]), len(memory["recomputed"]), 1e3 * p.sim.time)
        fw, bw = min_cut_rematerialization_partition(gm, joint_inputs, compiler=compiler,
                                                     num_fwd_outputs=num_fwd_outputs,
                                                     static_lifetime_input_indices=static_lifetime_input_indices,
                                                     **kwargs)
        if offloaded:
            dropped = _offload.compact(fw, bw)
            if dropped:
                log.warning("fxopt offload: %d of %d offloaded tensors had no reload left after partitioning "
                            "(slots %s); their offloads were dropped", len(dropped), len(offloaded), dropped)
                memory["offload_dropped_slots"] = dropped
        LAST.clear()
        on_host = set(p.sim.offloaded)
        tokens = [r["token"] for r in offloaded if r["slot"] not in memory.get("offload_dropped_slots", ())]
        LAST.update(memory=memory, predicted=sorted([joint.storages[s].node.name for s in p.sim.saved
                                                     if s not in on_host] + tokens),
                    partitioned=_saved_names(fw, num_fwd_outputs), joint=joint, plan=p)
        return fw, bw


def _saved_names(fw: fx.GraphModule, num_fwd_outputs: int) -> list:
    out = next(n for n in reversed(fw.graph.nodes) if n.op == "output")
    vals = out.args[0] if isinstance(out.args[0], (list, tuple)) else out.args
    return sorted(n.name for n in vals[num_fwd_outputs:]
                  if isinstance(n, fx.Node) and isinstance(_cost._val(n), torch.Tensor))


def report_dict(joint: _cost.Joint, p) -> dict:
    sim = p.sim
    saved = [joint.describe(s) for s in sim.saved if joint.storages[s].kind == _cost.ACT]
    recomputed = []
    for g in sim.recomputed:
        grp = joint.groups[g]
        d = {"name": grp.node.name, "op": _cost._op_name(grp.node),
             "bytes": sum(joint.sizes[s] for s in grp.sids), "time_s": grp.time}
        recomputed.append(d)
    out = {"budget": p.budget, "predicted_peak": sim.peak, "saved": saved, "recomputed": recomputed,
           "saved_bytes": sim.saved_bytes, "recompute_time_s": sim.time, "save_all_peak": p.base.peak,
           "save_all_bytes": p.base.saved_bytes, "peak_at": sim.peak_at,
           "peak_workspace": sim.peak_workspace, "chunks": chunked_ops(joint), "offload_bytes": sim.offload_bytes}
    if joint.symbols():   # dynamic shapes: planned at the size hints; the peak as a formula of the symbols
        out["predicted_peak_expr"] = str(joint.peak_expr(sim))
    return out


def partitioner(config, graph_report) -> FxoptPartitioner:
    why = supported()
    if why:
        raise RuntimeError(f"fxopt memory_budget needs {why}")
    if config.inductor and not inductor_hook_available():
        raise RuntimeError("this torch has no torch._inductor.config.custom_partitioner_fn; use memory_budget "
                           "with options={'inductor': False}")
    return FxoptPartitioner(config.memory_budget, graph_report, offload=config.offload)
