"""The planner: which saved activations to recompute so that the predicted peak fits a budget, at least recompute time.

Solver: greedy by bytes-per-second over "moves", each checked against the exact liveness model (cost.Joint).
  move(g)   for a saved recomputable group g: recompute g and, transitively, every input group that is neither
            saved nor already recomputed (a segment recomputed back to saved tensors, as checkpointing does);
            gain = saved bytes it frees, cost = roofline time of the groups it adds. A second, shorter move
            recomputes g alone and saves its missing inputs instead (gain = bytes(g) - bytes(new inputs)).
  step      in order of gain/cost, take the first move that the exact model says lowers the peak (and the saved
            bytes); if none does (within SCAN more), the first that lowers the saved bytes and keeps the peak (a
            plateau: e.g. the peak sits in the last layer, whose recomputes are materialized right at the peak);
            a move that raises the peak (its backward transient outweighs its saving) is rejected for good.
            Stop at the first plan whose predicted peak <= budget.
Why greedy and not a knapsack DP or an ILP: the exact objective (peak of a liveness schedule) is not additive over
moves, so a DP on (bytes, time) would optimize a proxy anyway; the greedy re-checks every step on the exact model.
When it is optimal: if moves are independent (a transformer: L identical layers, moves per layer disjoint) and the
peak falls by each move's gain, this is the fractional-knapsack greedy, optimal for the relaxation, so its time is
within one move (the last one taken) of the 0/1 optimum; with L copies of each move type the plan recomputes the
best types in every layer and splits at most one type across layers.
Monotone in the budget by construction: the sequence of plans does not depend on the budget (only where it stops),
each accepted plan recomputes a superset of the previous one with a peak that does not rise.
"""
from __future__ import annotations

import dataclasses
import operator
import os

from fxopt.config import env_number
from fxopt.errors import FxoptError
from fxopt.recompute.cost import ACT, Joint, Sim
from fxopt.recompute.ops import op_arg, op_time, op_workspace, registered_call, set_op_arg


class BudgetError(FxoptError, ValueError):
    """The budget is below the smallest predicted peak the planner can reach."""

    def __init__(self, budget: int, smallest: int, base: int):
        self.budget, self.smallest, self.base = budget, smallest, base
        super().__init__(f"fxopt memory_budget {fmt_bytes(budget)} ({budget} B) is infeasible: the smallest "
                         f"achievable predicted peak is {fmt_bytes(smallest)} ({smallest} B); saving everything "
                         f"needs {fmt_bytes(base)} ({base} B)")


def fmt_bytes(n) -> str:
    for unit, k in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n} B"


@dataclasses.dataclass
class Plan:
    budget: int              # bytes (a float budget resolved against `base`)
    base: Sim                # save everything
    sim: Sim                 # the chosen plan
    steps: int               # moves taken

    def recompute_nodes(self, joint: Joint) -> list:
        return [joint.groups[g].node for g in sorted(self.sim.recompute)]


def resolve_budget(budget, base_peak: int) -> int:
    """int bytes as given; float = fraction of the save-everything predicted peak."""
    if isinstance(budget, float):
        return int(budget * base_peak)
    return int(budget)


# Pinned host<->device copies ran at 55 GB/s each way on the H200 (benchmarks/results/pcie_h200.json).
OFFLOAD_BW = 55e9


# Offloading is priced at its copy time, bytes / OFFLOAD_BW. Pricing copies as hidden by compute instead (a GEMM ran
# 1.3% (d2h) / 3.9% (h2d) slower beside one-way copies, pcie_h200.json; so bytes / (OFFLOAD_BW / 0.039) within the
# forward's copy capacity) was measured slower: the 8B QLoRA step at memory_budget 1.15 GiB offloaded 6.1 GB per
# step with 33 ms of recompute and ran 9,924 tok/s, against 1.0 GB, 59 ms and 10,822 tok/s priced at the copy time
# (both 6.9 GiB in all; train_step_h200.jsonl, tags cg-offload-hidden and cg-offload). FXOPT_OFFLOAD_BW sets the
# price of copies within the capacity, for such experiments.
def offload_bw() -> float:
    """The price in bytes/s of an offload within the forward's copy capacity: OFFLOAD_BW, or FXOPT_OFFLOAD_BW."""
    return env_number(os.environ, "FXOPT_OFFLOAD_BW", OFFLOAD_BW, lambda v: v > 0,
                      "a positive number of bytes per second")


def offload_capacity() -> float:
    """The share of the forward's copy capacity (roofline forward time x OFFLOAD_BW) priced at offload_bw():
    FXOPT_OFFLOAD_CAPACITY, default 1. The hidden-priced 8B plan at full capacity moved 6.1 GB per step, whose d2h
    copies took about the whole forward (docs/recompute.md)."""
    return env_number(os.environ, "FXOPT_OFFLOAD_CAPACITY", 1.0, lambda v: 0 <= v <= 1, "a number from 0 to 1")


def offload_depth() -> int:
    """Copies in flight each way (FXOPT_OFFLOAD_DEPTH, default 1): the forward waits for copy j at offload j + D;
    the backward fetches D slots ahead. The liveness model (Joint.simulate) and the rewrite use it; the ops get it
    as an argument."""
    return env_number(os.environ, "FXOPT_OFFLOAD_DEPTH", 1, lambda v: v >= 1, "a whole number >= 1", kind=int)


def forward_time(joint: Joint) -> float:
    """Roofline seconds of the whole forward (every op, recomputable or not); cached on the joint."""
    if "_fwd_time" not in joint.__dict__:
        joint._fwd_time = sum(op_time(n) for n in joint.fwd_order
                              if n.op == "call_function" and n.target is not operator.getitem)
    return joint._fwd_time


def _moves(joint: Joint, sim: Sim, sizes, offloadable=frozenset(), hidden=None):
    """Candidate moves from the state `sim`: (gain bytes, cost s, groups to add), and with `offloadable` (storage
    ids) (bytes, copy seconds, ("offload", sid)) for each of those still saved on the device."""
    R = sim.recompute
    saved = set(sim.saved)
    out = []
    if offloadable:
        hidden = hidden or offload_bw()
        room = forward_time(joint) * OFFLOAD_BW * offload_capacity() - sim.offload_bytes
        out = [(sizes[sid], sizes[sid] / (hidden if sizes[sid] <= room else OFFLOAD_BW), ("offload", sid))
               for sid in sim.act_saved if sid in offloadable]
    gains_of = {}
    for sid in sim.act_saved:
        g = joint.storages[sid].group
        if g is not None and not joint.groups[g].fixed:
            gains_of.setdefault(g, 0)
            gains_of[g] += sizes[sid]
    for g, own in gains_of.items():
        # segment back to saved tensors
        members, stack, extra, seen_extra = [g], list(joint.groups[g].in_sids), 0, set()
        seen = {g}
        while stack:
            sid = stack.pop()
            st = joint.storages[sid]
            if st.kind != ACT or sid in saved:
                continue
            h = st.group
            if h is None or h in R or h in seen:
                continue
            if joint.groups[h].fixed:
                if sid not in seen_extra:
                    seen_extra.add(sid)
                    extra += sizes[sid]
                continue
            seen.add(h)
            members.append(h)
            stack.extend(joint.groups[h].in_sids)
        gain = own + sum(gains_of.get(h, 0) for h in members[1:]) - extra
        cost = sum(joint.groups[h].time for h in members)
        if gain > 0:
            out.append((gain, cost, tuple(sorted(members))))
        if len(members) > 1:   # g alone, its missing inputs saved instead
            new_in = {s for s in joint.groups[g].in_sids if joint.storages[s].kind == ACT and s not in saved
                      and joint.storages[s].group not in R}
            gain1 = own - sum(sizes[s] for s in new_in)
            if gain1 > 0:
                out.append((gain1, joint.groups[g].time, (g,)))
    out.sort(key=_order)
    return out


def _order(move):
    """Most bytes per second first; offloads (all at OFFLOAD_BW) largest first, then in storage order."""
    gain, cost, members = move
    off = members[0] == "offload"
    return (-gain / max(cost, 1e-12), off, -gain if off else 0, members[1:] if off else members)


SCAN = 8   # moves simulated past the first one that keeps the peak, looking for one that lowers it


def _apply(joint: Joint, sim: Sim, members, sizes) -> Sim:
    if members[0] == "offload":
        return joint.simulate(sim.recompute, sizes, offload=sim.offloaded + (members[1],))
    return joint.simulate(sim.recompute | set(members), sizes, offload=sim.offloaded)


def trajectory(joint: Joint, sizes=None, stop=None, offloadable=frozenset(), hidden=None):
    """Yield the plans (Sim) of the greedy, from save-everything on, until no move is accepted or stop(sim).
    `offloadable`: storage ids that may be kept in host memory (fxopt/recompute/offload.py: candidates); `hidden`:
    the price of a hidden offload in bytes/s (default offload_bw())."""
    sizes = sizes or joint.sizes
    sim = joint.simulate(frozenset(), sizes)
    yield sim
    rejected = set()
    while not (stop and stop(sim)):
        weak, tried_after_weak = None, 0
        for gain, cost, members in _moves(joint, sim, sizes, offloadable, hidden):
            if members in rejected:
                continue
            if weak is not None:
                tried_after_weak += 1
                if tried_after_weak > SCAN:
                    trial = weak
                    break
            trial = _apply(joint, sim, members, sizes)
            if trial.saved_bytes >= sim.saved_bytes or trial.peak > sim.peak:
                rejected.add(members)
            elif trial.peak < sim.peak:
                break
            elif weak is None:
                weak = trial
        else:
            if weak is None:
                return
            trial = weak           # nothing lowers the peak now: the best move that keeps it
        sim = trial
        yield sim


# The plan aims this fraction under the budget. H200, sha 13b6842..bf161d9, nine planned steps (1B LoRA, 8B QLoRA,
# budgets 0.2-0.8, with and without CUDA graphs): measured activation peak / predicted = 1.000 to 1.009.
MARGIN = 0.015


# Ops whose workspace function takes `chunk` (rows per chunk; linear_cross_entropy) can run in smaller chunks. The
# planner halves the largest such workspace, down to CHUNK_FLOOR rows, when recomputation alone cannot reach the
# budget, or when the smaller chunks cost less time than the recomputation and offloads they save (plan_seconds,
# the op priced at its chunk by its registered cost). H200, 1B shape, trainable lm_head + loss GEMMs: 2048 rows
# 20.2 ms (0.49 GiB of logits), 1024 22.3 ms, 512 26.4 ms, 256 38.9 ms.
CHUNK_FLOOR = 512


def _smaller_chunk(node, ws: int) -> int | None:
    """For an op whose registered workspace takes `chunk` (rows): the largest power-of-2 chunk >= CHUNK_FLOOR whose
    workspace is below its current `ws` (0 = the op's default chunk, so it is found the same way); else None."""
    import inspect

    from fxopt.kernels.registry import WORKSPACES
    call = registered_call(WORKSPACES, node)
    if call is None or "chunk" not in inspect.signature(call[0]).parameters:
        return None
    fn, args = call
    rows = 1 << 20
    while rows >= CHUNK_FLOOR:
        if fn(**{**args, "chunk": rows}) < ws:
            return rows
        rows //= 2
    return None


def _shrink_chunk(joint: Joint) -> bool:
    """Halve the chunk of the op with the largest shrinkable workspace; False when none is left."""
    for ws, node in sorted(((ws, n) for n, ws in joint.workspace.items()), key=lambda t: -t[0]):
        rows = _smaller_chunk(node, ws)
        if rows is not None:
            _set_chunk(joint, node, rows)
            return True
    return False


def plan_seconds(joint: Joint, sim: Sim) -> float:
    """Predicted seconds a plan adds or moves per step: its recomputation, its offloads at the copy price, and the
    chunked ops' own time at their chunk (roofline; the default chunk is in it too, so plans compare)."""
    return sim.time + sim.offload_bytes / OFFLOAD_BW + sum(op_time(n) for n in joint.workspace)


def _set_chunk(joint: Joint, node, rows: int) -> None:
    """The op call runs with `rows` per chunk (0: its default); its workspace follows."""
    set_op_arg(node, "chunk", rows)
    joint.workspace[node] = op_workspace(node)


def _cheaper_with_smaller_chunks(joint: Joint, sizes, aim, offloadable, last: Sim, steps: int):
    """Smaller chunks free workspace at the peak; where the plan then needs less recomputation (or fewer offloads)
    than the chunks cost, take them. Before this, chunks shrank only when recomputation alone missed the aim: the 8B
    QLoRA plans on the H200 (1.15 GiB + offload, 0.7, 15.1 GiB) all peaked in the forward's lm_head + loss with its
    1.05 GB logits buffer (one chunk of 4096 rows), while the 1.15 GiB plan recomputed ~190 NF4 linears (61 ms
    predicted); with a frozen lm_head smaller chunks cost ~nothing (no dW GEMM over a chunk's rows)."""
    best = (plan_seconds(joint, last), last, steps, chunked_ops(joint))
    while (last.time > 0 or last.offload_bytes) and _shrink_chunk(joint):
        last, steps = _walk_offload(joint, sizes, aim, offloadable)
        cost = plan_seconds(joint, last)
        if last.peak <= aim and cost < best[0]:
            best = (cost, last, steps, chunked_ops(joint))
    for n in joint.workspace:     # back to the cheapest plan's chunks
        if op_arg(n, "chunk", None) is not None:
            _set_chunk(joint, n, best[3].get(n.name, 0))
    return best[1], best[2]


def chunked_ops(joint: Joint) -> dict:
    """{op node name: rows} of the op calls given an explicit chunk (by _shrink_chunk)."""
    return {n.name: rows for n in joint.workspace if (rows := op_arg(n, "chunk", 0))}


def _walk(joint: Joint, sizes, aim, offloadable=frozenset(), hidden=None):
    last, steps = None, 0
    for steps, sim in enumerate(trajectory(joint, sizes, stop=lambda s: s.peak <= aim, offloadable=offloadable,
                                           hidden=hidden)):
        last = sim
    return last, steps


def _walk_offload(joint: Joint, sizes, aim, offloadable):
    """With a cheaper price for offloads (FXOPT_OFFLOAD_BW), where that greedy ends above the aim, the one at the
    copy price (recompute first, offload the rest), whose path can reach lower: one tiny LoRA Llama ended at the
    recompute-only smallest peak with the first and 3% under it with the second."""
    first = _walk(joint, sizes, aim, offloadable)
    if not offloadable or first[0].peak <= aim or offload_bw() == OFFLOAD_BW:
        return first
    second = _walk(joint, sizes, aim, offloadable, hidden=OFFLOAD_BW)
    return second if second[0].peak < first[0].peak else first


def make_plan(joint: Joint, budget, sizes=None, offload: bool = False) -> Plan:
    """The plan for `budget` (int bytes or float fraction); BudgetError when no plan fits. Aims at MARGIN under the
    budget (unless saving everything fits); where that is out of reach, the smallest plan, if it fits the budget.
    When recomputation alone cannot reach the aim, or costs more than smaller chunks would, ops with chunked
    workspaces get smaller chunks (the op call in the joint graph is changed, so the compiled op runs with them).
    offload: saved activations may also be kept in host memory, a move that costs its bytes / OFFLOAD_BW."""
    from fxopt.recompute.offload import candidates
    base = joint.simulate(frozenset(), sizes or joint.sizes)
    target = resolve_budget(budget, base.peak)
    aim = target if base.peak <= target else int(target * (1 - MARGIN))   # fits saving everything: nothing to do
    offloadable = candidates(joint) if offload else frozenset()
    last, steps = _walk_offload(joint, sizes, aim, offloadable)
    while last.peak > aim and _shrink_chunk(joint):
        last, steps = _walk_offload(joint, sizes, aim, offloadable)
    if last.peak <= aim:
        last, steps = _cheaper_with_smaller_chunks(joint, sizes, aim, offloadable, last, steps)
    if last.peak > target:
        raise BudgetError(target, last.peak, base.peak)
    return Plan(target, base, last, steps)


def smallest_peak(joint: Joint, sizes=None, shrink_chunks: bool = True, offload: bool = False) -> Sim:
    """The lowest predicted peak the planner reaches: every accepted move taken, and (shrink_chunks) chunked
    workspaces at their floor. Changes the chunk arguments of the joint graph's op calls."""
    while shrink_chunks and _shrink_chunk(joint):
        pass
    from fxopt.recompute.offload import candidates
    return _walk_offload(joint, sizes, -1, candidates(joint) if offload else frozenset())[0]
