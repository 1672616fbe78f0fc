"""A memory plan for a transformers model config without running it (`python -m fxopt plan`).

The model is built on the meta device and traced by dynamo with static shapes (as torch.compile first compiles it),
rewritten by fxopt's patterns; AOTAutograd's joint graph is captured, never compiled or run. Traces at 2*seq and
3*seq make each storage's bytes a polynomial in seq; the largest sequence that fits the budget is the root of the
peak's live-set polynomial (sympy), checked and refined on the liveness model.
"""
from __future__ import annotations

import math

import sympy
import torch

from fxopt.recompute.cost import Joint
from fxopt.recompute.plan import MARGIN, BudgetError, chunked_ops, fmt_bytes, make_plan, smallest_peak


class _Captured(Exception):
    pass


def capture_joint(model, inputs: dict, *, patterns=None, dynamic_dims=None):
    """(Joint, example inputs) of `model(**inputs)` (training: the loss's joint graph), patterns applied."""
    from torch._dynamo.backends.common import aot_autograd

    from fxopt import config as _config, pipeline, report as _report

    box = {}
    opts = {} if patterns is None else {"patterns": list(patterns)}
    cfg = _config.parse(opts)

    def partition(joint_gm, joint_inputs, **kw):
        from fxopt.recompute.partition import prepare_joint
        prepare_joint(joint_gm)
        box["joint"] = Joint(joint_gm, kw["num_fwd_outputs"], kw.get("static_lifetime_input_indices") or ())
        raise _Captured()

    def backend(gm, example_inputs):
        graph_report = _report.GraphReport("plan")
        pipeline.run(gm, cfg, graph_report, "plan")
        box["matched"] = dict(graph_report.matched)
        box["inputs"] = example_inputs
        return aot_autograd(fw_compiler=lambda g, _: g, partition_fn=partition)(gm, example_inputs)

    for name, dims in (dynamic_dims or {}).items():
        for d in dims:
            torch._dynamo.mark_dynamic(inputs[name], d)
    torch._dynamo.reset()
    try:
        out = torch.compile(model, backend=backend, fullgraph=True)(**inputs)
        getattr(out, "loss", out).sum().backward()
    except Exception as e:  # noqa: BLE001 - _Captured arrives wrapped by dynamo
        if "joint" not in box:
            raise
        del e
    finally:
        torch._dynamo.reset()
    if "joint" not in box:
        raise RuntimeError("no joint graph was captured (the model did not trace as one training graph)")
    return box["joint"], box["inputs"], box.get("matched", {})


def build_meta_model(config, dtype=torch.bfloat16, lora_rank: int = 0, keep_logits: bool = False):
    """The model on the meta device, in training mode; without keep_logits its forward returns only the loss in
    training, as `fxopt.hf.compile_for_trainer` makes it (so lm_head + loss fuse into linear_cross_entropy)."""
    from transformers import AutoModelForCausalLM
    config.use_cache = False
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if lora_rank:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                                 target_modules="all-linear"))
    if hasattr(model, "loss_type"):
        model.loss_type = "ForCausalLM"
    base = getattr(getattr(model, "base_model", None), "model", model)
    if hasattr(base, "loss_type"):
        base.loss_type = "ForCausalLM"
    if not keep_logits:
        from fxopt.hf import _loss_only_forward
        model.forward = _loss_only_forward(model.forward, model)
    return model.train()


def largest_seq(joint: Joint, recompute, budget: int, seq_sym, hi_limit: int = 1 << 24, offload=()):
    """The largest integer seq with predicted peak <= budget for the plan `recompute` (0 if none fits)."""
    def fits(s):
        return joint.simulate(recompute, joint.sizes_at({seq_sym: s}), offload=offload).peak <= budget

    # sympy on the peak's live set: the root of p(seq) = budget, refined while the peak's location moves
    guess, s_try = None, 64
    for _ in range(8):
        sim = joint.simulate(recompute, joint.sizes_at({seq_sym: s_try}))
        p = sympy.expand(joint.peak_expr(sim))
        if seq_sym not in p.free_symbols:
            break
        roots = [r for r in sympy.solve(sympy.Eq(p, budget), seq_sym) if r.is_real and r > 0]
        if not roots:
            break
        g = int(math.floor(max(float(r) for r in roots)))
        if g == guess or g < 1:
            break
        guess, s_try = g, g
    if guess is not None and fits(guess) and not fits(guess + 1):
        return guess
    lo, hi = 0, max(2, guess or 64)     # the expression moved or had no root: bracket and bisect on the model
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > hi_limit:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _trace(config, batch, seq, dtype, lora_rank, patterns, keep_logits=False):
    model = build_meta_model(config, dtype, lora_rank, keep_logits)
    ids = torch.empty((batch, seq), dtype=torch.long, device="meta")
    return capture_joint(model, {"input_ids": ids, "labels": ids}, patterns=patterns)


def fit_seq(joint: Joint, others: dict, seq: int, sym: sympy.Symbol) -> None:
    """Make every storage's bytes a polynomial in `sym` from static traces at other sequence lengths
    ({seq_i: Joint}; storages matched by the name of the node that creates them; degree <= len(others))."""
    by_name = [{s.node.name: s.nbytes for s in j.storages} for j in others.values()]
    names = {s.node.name for s in joint.storages}
    if any(set(b) != names for b in by_name):
        raise RuntimeError("the joint graph's structure changes with the sequence length; no size formula")
    for st in joint.storages:
        pts = [(seq, st.nbytes)] + [(s_i, b[st.node.name]) for s_i, b in zip(others, by_name)]
        st.expr = sympy.expand(sympy.interpolate(pts, sym)) if len({b for _, b in pts}) > 1 else \
            sympy.Integer(st.nbytes)


def plan_for_config(config, batch: int, seq: int, budget, *, dtype=torch.bfloat16, lora_rank: int = 0,
                    patterns=None, fit=True, keep_logits=False, offload=False) -> dict:
    """Predicted peak, the plan, and the largest sequence that fits, for `config` (a transformers config).

    budget: int bytes, a size string ('12GiB') or a float fraction of the save-everything peak. The graph is traced
    with static shapes, as torch.compile first compiles it (fxopt's attention pattern needs static shapes); with
    `fit`, two more traces at 2*seq and 3*seq give each storage's bytes as a polynomial in seq (exact up to
    quadratic terms such as materialized attention scores). keep_logits: plan the forward that also returns the
    logits (a plain `model.compile()`); by default the loss-only forward of `fxopt.hf.compile_for_trainer`."""
    from fxopt.config import parse_budget
    budget = parse_budget(budget)
    joint, _, matched = _trace(config, batch, seq, dtype, lora_rank, patterns, keep_logits)
    seq_sym = sympy.Symbol("seq", positive=True, integer=True)
    if fit:
        others = {k * seq: _trace(config, batch, k * seq, dtype, lora_rank, patterns, keep_logits)[0]
                  for k in (2, 3)}
        fit_seq(joint, others, seq, seq_sym)
    base = joint.simulate(frozenset())
    out = {"batch": batch, "seq": seq, "matched": matched, "save_all_peak": base.peak, "offload": offload,
           "save_all_bytes": base.saved_bytes}
    try:
        p = make_plan(joint, budget, offload=offload)
    except BudgetError as e:
        out.update(budget=e.budget, feasible=False, error=str(e), predicted_peak=None, recomputed={},
                   recompute_time_s=None)
        p = None
    else:
        out.update(budget=p.budget, feasible=True, predicted_peak=p.sim.peak, saved_bytes=p.sim.saved_bytes,
                   recompute_time_s=p.sim.time, peak_at=p.sim.peak_at,
                   recomputed=_summary(joint, p.sim.recomputed), chunks=chunked_ops(joint),
                   offloaded=len(p.sim.offloaded), offload_bytes=p.sim.offload_bytes)
    best = smallest_peak(joint, offload=offload)   # after the plan: it leaves chunked workspaces at their floor
    out["smallest_peak"] = best.peak
    if fit:
        target = int(out["budget"] * (1 - MARGIN))   # the planner's own aim (measured peaks ran <= 0.9% over)
        out["max_seq"] = largest_seq(joint, best.recompute, target, seq_sym, offload=best.offloaded)
        out["max_seq_with_plan"] = largest_seq(joint, p.sim.recompute, target, seq_sym,
                                               offload=p.sim.offloaded) if p else None
        out["peak_expr"] = str(sympy.expand(joint.peak_expr(best if p is None else p.sim)))
    out["joint"] = joint
    return out


def _summary(joint, groups) -> dict:
    """Recomputed ops counted by op name, with their bytes and roofline time."""
    from fxopt.recompute.cost import _op_name
    acc = {}
    for g in groups:
        grp = joint.groups[g]
        d = acc.setdefault(_op_name(grp.node), {"count": 0, "bytes": 0, "time_s": 0.0})
        d["count"] += 1
        d["bytes"] += sum(joint.sizes[s] for s in grp.sids)
        d["time_s"] += grp.time
    return acc


def format_plan(r: dict) -> str:
    lines = [f"batch {r['batch']}, seq {r['seq']}; fxopt patterns matched: "
             + ", ".join(f"{k} {v}" for k, v in r["matched"].items() if v),
             f"save everything: predicted peak {fmt_bytes(r['save_all_peak'])}, "
             f"saved activations {fmt_bytes(r['save_all_bytes'])}",
             f"smallest predicted peak with recompute{' and offload' if r.get('offload') else ''}: "
             f"{fmt_bytes(r['smallest_peak'])}",
             f"budget {fmt_bytes(r['budget'])}: " + (
                 f"predicted peak {fmt_bytes(r['predicted_peak'])} (at {r['peak_at']}), recompute "
                 f"{1e3 * r['recompute_time_s']:.3f} ms (roofline)" if r["feasible"] else r["error"])]
    if r.get("offload_bytes"):
        lines.append(f"  offload {r['offloaded']} saved tensors to host memory, {fmt_bytes(r['offload_bytes'])} "
                     f"each way per step")
    for name, rows in (r.get("chunks") or {}).items():
        lines.append(f"  {name}: chunks of {rows} rows (smaller than its default: recomputation alone did not fit, "
                     "or cost more than the smaller chunks)")
    for op, d in sorted(r["recomputed"].items(), key=lambda kv: -kv[1]["bytes"]):
        lines.append(f"  recompute {op:<28} x{d['count']:<4} frees {fmt_bytes(d['bytes']):>12}  "
                     f"{1e3 * d['time_s']:.3f} ms")
    if "max_seq" in r:
        lines.append(f"largest seq that fits the budget: {r['max_seq']} (most memory-saving plan)"
                     + (f", {r['max_seq_with_plan']} (this plan)" if r.get("max_seq_with_plan") is not None
                        else ""))
    return "\n".join(lines)
