"""Offloading saved activations to host memory (options={"offload": True}): which tensors may go, and the joint-graph
rewrite that sends them (the runtime ops are fxopt/kernels/offload.py; the liveness model is cost.Joint.simulate).

The planner (plan.py) prices offloading a saved activation at its bytes / OFFLOAD_BW and mixes it with the
recompute moves by bytes per second, so cheap recomputes (norms, pointwise) come first and tensors that would need a
long recompute segment (the residual stream: a whole layer) are offloaded.
Rewrite, for the chosen storages x_1..x_n in forward order (slots numbered in backward read order):
    tok_j = fxopt.offload(x_j, tok_{j-1}, [x_{j-D}], key, slot_j, n, D)  right after x_j; MUST_SAVE (1 byte saved)
    r_j   = fxopt.reload(tok_j, key, slot_j, n, D, shape, dtype)         before x_j's first backward reader
and every backward reader of x_j (or of a view of it, or of a recomputed op that reads it) reads r_j (or a copy of
that view / recomputed op made on r_j) instead. Those copies and r_j are MUST_RECOMPUTE, so the min-cut keeps them
in the backward and saves only the tokens.
"""
from __future__ import annotations

import itertools

import torch

from fxopt.kernels.offload import joined_by
from fxopt.patterns.match import fake_call
from fxopt.recompute.cost import ACT, Joint, Sim
from fxopt.recompute.ops import _val, op_arg, set_op_arg

MIN_BYTES = 1 << 20     # smaller tensors are not worth a copy (tests lower it)
_KEYS = itertools.count(1)


def candidates(joint: Joint) -> frozenset:
    """Storage ids that offloading can take: forward activations that are one whole contiguous tensor of static
    size, on CUDA (the CPU for tests, meta for `fxopt plan`), not a forward output, at least MIN_BYTES."""
    out = set()
    for st in joint.storages:
        if st.kind != ACT or st.sid in joint.out_sids or st.node not in joint.fwd:
            continue
        v = _val(st.node)
        if not isinstance(v, torch.Tensor) or v.device.type not in ("cuda", "cpu", "meta") or st.nbytes < MIN_BYTES \
                or not all(isinstance(d, int) for d in v.shape):       # (a dynamic shape: reload's is a constant)
            continue
        try:
            whole = v.is_contiguous() and v.storage_offset() == 0 and \
                v.numel() * v.element_size() == v.untyped_storage().nbytes()
        except Exception:  # noqa: BLE001 - a tensor whose storage cannot be inspected stays on the device
            whole = False
        if whole:
            out.add(st.sid)
    return frozenset(out)


def rewrite(joint: Joint, sim: Sim, policy_save, policy_recompute) -> list:
    """Insert the offload / reload ops for `sim.offloaded` into joint.gm (already tagged); returns the report rows."""
    if not sim.offloaded:
        return []
    g = joint.gm.graph
    key, n = next(_KEYS), len(sim.offloaded)
    slot = {sid: k for k, sid in enumerate(sim.offloaded)}
    node_of = {joint.storages[sid].node: sid for sid in sim.offloaded}
    depth, made = sim.offload_depth, []
    tok_of, prev_tok = {}, None
    for j, sid in enumerate(sorted(sim.offloaded, key=joint._made_at.__getitem__)):
        x = joint.storages[sid].node
        # the earlier tensors whose copies this call joins: the graph keeps them alive until here
        prev_x = [made[i] for i in joined_by(j, n, depth)]
        with g.inserting_after(x):
            tok = g.call_function(torch.ops.fxopt.offload.default, (x, prev_tok, prev_x, key, slot[sid], n, depth))
        tok.meta["val"] = fake_call(torch.ops.fxopt.offload.default, *tok.args)
        tok.meta["recompute"] = policy_save
        tok_of[sid], prev_tok = tok, tok
        made.append(x)
    fwd = joint.fwd

    def recomputed(a) -> bool:
        return a in fwd and a.meta.get("recompute") == policy_recompute

    dep: dict = {}

    def depends(a) -> bool:
        """a's value is (computed in the backward from) an offloaded storage. Iterative: a recomputed segment can
        span layers."""
        stack = [(a, False)]
        while stack:
            u, expanded = stack.pop()
            if u in dep:
                continue
            direct = u in node_of or (joint.sid_of.get(u) in slot and recomputed(u))
            if direct or not recomputed(u):
                dep[u] = direct
            elif not expanded:
                stack.append((u, True))
                stack.extend((b, False) for b in u.all_input_nodes if b not in dep)
            else:
                dep[u] = any(dep[b] for b in u.all_input_nodes)
        return dep[a]

    mirror: dict = {}

    def mirrored(a, before):
        """The backward's copy of a (reload for an offloaded storage), made with every dependent input first, in
        graph order, before the backward node `before`."""
        need, stack = set(), [a]
        while stack:
            u = stack.pop()
            if u in mirror or u in need:
                continue
            need.add(u)
            if u not in node_of:
                stack.extend(b for b in u.all_input_nodes if depends(b))
        for u in sorted(need, key=joint.pos.__getitem__):
            with g.inserting_before(before):
                if u in node_of:
                    sid, v = node_of[u], _val(u)
                    m = g.call_function(torch.ops.fxopt.reload.default,
                                        (tok_of[sid], key, slot[sid], n, depth, list(v.shape), v.dtype))
                    m.meta["val"] = fake_call(torch.ops.fxopt.reload.default, *m.args)
                else:
                    m = g.node_copy(u, lambda b: mirror[b] if depends(b) else b)
            m.meta["recompute"] = policy_recompute
            mirror[u] = m
        return mirror[a]

    for b in list(joint.bwd):
        for a in list(b.all_input_nodes):
            if depends(a):
                b.replace_input_with(a, mirrored(a, b))
    # The originals now serve the forward only. The min-cut gives every MUST_RECOMPUTE node an infinite edge to
    # the sink whether the backward reads it or not, which would save x_j for them: they become MUST_SAVE.
    # (every such node, read by the backward or not: a multi-output op's getitems follow it)
    for a in [a for a in joint.fwd_order if recomputed(a) and depends(a)]:
        a.meta["recompute"] = policy_save
    joint.gm.recompile()
    rows = []
    for sid in sim.offloaded:
        d = joint.describe(sid)
        d.update(slot=slot[sid], token=tok_of[sid].name)
        rows.append(d)
    return rows


def _calls(gm, op):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is op]


def compact(fw, bw) -> list:
    """After the min-cut partition: drop the forward's offloads whose reload did not survive in the backward (its
    readers were dead or got their value another way) and renumber the rest, so the runtime's slot count matches
    the calls that run. Otherwise the backward would fetch ahead a slot that is never reloaded and keep that tensor
    (under CUDA graphs: a tensor of the graph's pool that no output tracks), and the forward would copy it for
    nothing. Returns the dropped slots."""
    offs = _calls(fw, torch.ops.fxopt.offload.default)
    rels = _calls(bw, torch.ops.fxopt.reload.default)
    live = {op_arg(r, "slot") for r in rels}
    dead = [o for o in offs if op_arg(o, "slot") not in live]
    if not dead:
        return []
    for o in dead:   # a token's only reader is the next offload (prev_tok): it orders after this one's predecessor
        for u in list(o.users):
            set_op_arg(u, "prev_tok", op_arg(o, "prev_tok"))
        fw.graph.erase_node(o)
    offs = [o for o in offs if o not in dead]
    n = len(offs)
    new_slot = {s: k for k, s in enumerate(sorted(op_arg(o, "slot") for o in offs))}
    for j, o in enumerate(offs):
        set_op_arg(o, "prev", [op_arg(offs[i], "x") for i in joined_by(j, n, op_arg(o, "depth"))])
    for c in offs + rels:
        set_op_arg(c, "slot", new_slot[op_arg(c, "slot")])
        set_op_arg(c, "nslots", n)
    fw.recompile()
    bw.recompile()
    return sorted(op_arg(o, "slot") for o in dead)
