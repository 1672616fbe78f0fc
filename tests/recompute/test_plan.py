"""The planner: monotone in the budget, a clear error below the smallest peak, training unchanged under a budget."""
import re

import pytest
import torch

import fxopt
from fxopt.recompute import BudgetError, make_plan, smallest_peak
from fxopt.recompute.plan import MARGIN
from fxopt.recompute.cost import _op_name
from fxopt.recompute.model_plan import capture_joint
from fxopt.recompute.plan import trajectory
from tests.helpers import batch, compare_with_eager, tiny_model


@pytest.fixture(scope="module")
def joint():
    torch._dynamo.reset()
    m = tiny_model("llama")
    ids, _ = batch(s=64)
    j, _, matched = capture_joint(m, {"input_ids": ids, "labels": ids})
    torch._dynamo.reset()
    assert matched["rms_norm"] == 5 and matched["attention"] == 2
    return j


def test_plan_is_monotone_in_the_budget(joint):
    base, best = joint.simulate(), smallest_peak(joint)
    assert best.peak < base.peak
    prev = None
    for k in range(11):
        budget = int(base.peak - (base.peak - best.peak) * k / 10)
        p = make_plan(joint, budget)
        assert p.sim.peak <= budget
        if prev is not None:   # smaller budget: a superset recomputed, peak not higher
            assert prev.sim.recompute <= p.sim.recompute
            assert len(p.sim.recomputed) >= len(prev.sim.recomputed)
            assert p.sim.peak <= prev.sim.peak and p.sim.time >= prev.sim.time
        prev = p
    assert make_plan(joint, 1.0).sim.recompute == frozenset()
    assert make_plan(joint, 1.0).sim.peak == base.peak


def test_plan_aims_margin_under_the_budget(joint):
    """Measured peaks ran up to 0.9% above prediction on the H200: the plan aims MARGIN under a budget it can."""
    base, best = joint.simulate(), smallest_peak(joint)
    for budget in ((base.peak + best.peak) // 2, base.peak - 1):
        p = make_plan(joint, budget)
        assert p.sim.peak <= budget * (1 - MARGIN) or p.sim.peak == best.peak, (budget, p.sim.peak)
    assert make_plan(joint, (base.peak + best.peak) // 2).sim.peak <= (base.peak + best.peak) // 2 * (1 - MARGIN)


def test_backward_reads_saved_outputs_where_used(joint, monkeypatch):
    """The custom ops' saved outputs reach the backward through detaches placed right after each forward op; kept,
    they make the backward read every layer's outputs at its start, so the smallest plan materializes all the
    recomputed ones at once. Dropped, each is recomputed where its layer's backward uses it: a lower smallest peak."""
    from fxopt.recompute import partition
    assert not [n for n in joint.gm.graph.nodes if n.target is torch.ops.aten.detach.default]
    monkeypatch.setattr(partition, "_drop_backward_detaches", lambda gm: 0)
    torch._dynamo.reset()
    ids, _ = batch(s=64)
    kept, _, _ = capture_joint(tiny_model("llama"), {"input_ids": ids, "labels": ids})
    torch._dynamo.reset()
    assert [n for n in kept.gm.graph.nodes if n.target is torch.ops.aten.detach.default]
    assert smallest_peak(joint).peak < smallest_peak(kept).peak


def test_infeasible_budget_names_the_smallest(joint):
    best = smallest_peak(joint)
    with pytest.raises(BudgetError) as e:
        make_plan(joint, best.peak - 1)
    assert e.value.smallest == best.peak
    assert f"smallest achievable predicted peak is" in str(e.value) and f"({best.peak} B)" in str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, fxopt.FxoptError)
    assert make_plan(joint, best.peak).sim.peak == best.peak    # exactly the smallest is feasible


def test_infeasible_budget_through_torch_compile(fresh_dynamo):
    m = tiny_model("llama")
    ids, labels = batch(s=32)
    cm = torch.compile(m, backend="fxopt", options={"inductor": False, "memory_budget": 1000, "patterns": []})
    with pytest.raises(Exception) as e:
        cm(input_ids=ids, labels=labels)
    msg = str(e.value)
    assert "infeasible" in msg and re.search(r"smallest achievable predicted peak is .* \((\d+) B\)", msg), msg


def test_cheap_ops_recomputed_before_attention_and_gemms(joint):
    """Norms / activations / rope go first; attention (it keeps its logsumexp) and GEMMs only later."""
    first = {}
    for i, sim in enumerate(trajectory(joint)):
        for g in sim.recompute:
            first.setdefault(_op_name(joint.groups[g].node), i)
    assert "fxopt.rms_norm" in first and "fxopt.gated_mlp" in first
    if "fxopt.attention" in first:   # (vs gated_mlp the order follows the sizes: at this tiny shape the attention
        assert first["fxopt.attention"] > first["fxopt.rms_norm"]   # roofline, 23 ns, is below gated_mlp's 46 ns)
    grp = next(g for g in joint.groups if _op_name(g.node) == "fxopt.attention")
    assert len(grp.sids) == 2    # (out, logsumexp): saved or recomputed together, never the scores


def test_tight_budget_trains_like_eager(joint, fresh_dynamo):
    """Loss and every grad match eager with most activations recomputed (aot_eager)."""
    budget = int(smallest_peak(joint).peak * 1.02)
    m = tiny_model("llama")
    worst, _ = compare_with_eager(m, options={"inductor": False, "memory_budget": budget}, steps=2, s=64)
    mem = fxopt.last_report().memory
    assert worst <= 1e-5, worst
    assert mem["predicted_peak"] <= budget
    ops = {r["op"] for r in mem["recomputed"]}
    assert any(op.startswith("fxopt.") for op in ops), ops      # fxopt ops are recomputable when tagged
    assert fxopt.last_report().fallbacks == []


def test_inductor_with_budget(fresh_dynamo, no_fallback):
    """The Inductor hand-off through custom_partitioner_fn: plan reported, loss and grads as eager."""
    m = tiny_model("llama")
    worst, _ = compare_with_eager(m, options={"memory_budget": 0.85}, steps=1, s=32)
    rep = fxopt.last_report()
    assert worst <= 1e-4, worst
    assert rep.memory is not None and rep.memory["recomputed"], rep.memory
    assert rep.memory["predicted_peak"] <= rep.memory["budget"]
    assert sum(sum(g.compiled.values()) for g in rep._all()) == 2 and rep.fallbacks == []   # fwd + bwd
    from fxopt.recompute import partition
    assert partition.LAST["predicted"] == partition.LAST["partitioned"]   # after Inductor's joint passes too


def test_no_budget_leaves_partition_alone(fresh_dynamo):
    m = tiny_model("llama")
    ids, labels = batch(s=16)
    torch.compile(m, backend="fxopt", options={"inductor": False})(input_ids=ids, labels=labels).loss.backward()
    assert fxopt.last_report().memory is None


@pytest.mark.gpu
@pytest.mark.parametrize("inductor", [True, False])
@pytest.mark.parametrize("frac", [1.0, 0.8, 0.6])
def test_gpu_measured_peak_within_10pct(frac, inductor, fresh_dynamo):
    """H200: the measured step peak (max_memory_allocated - allocated before) is within +-10% of the prediction.
    Compiled as training compiles it (compile_for_trainer: the loss-only forward, lm_head + loss fused). The first
    H200 run compiled the logits forward instead: 0.6 was infeasible (smallest 0.76 of save-all) and with Inductor
    the measured peak was 0.88-0.91x the prediction (Inductor fused away part of the fp32 logits' buffers)."""
    import fxopt.hf
    m = tiny_model("llama", dtype=torch.bfloat16, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                   num_attention_heads=16, num_key_value_heads=4, head_dim=64, vocab_size=32000).cuda().train()
    ids = torch.randint(3, 32000, (4, 2048), device="cuda")
    cm = fxopt.hf.compile_for_trainer(m, memory_budget=frac, inductor=inductor)
    for _ in range(2):
        cm(input_ids=ids, labels=ids).loss.backward()
        m.zero_grad(set_to_none=True)
    rep = fxopt.last_report()
    assert rep.matched["linear_cross_entropy"] == 1 and not rep.fallbacks, (rep.matched, rep.fallbacks)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = cm(input_ids=ids, labels=ids)
    out.loss.backward()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - before
    mem = rep.memory
    print(f"inductor {inductor} frac {frac}: budget {mem['budget']} predicted {mem['predicted_peak']} measured "
          f"{measured} ratio {measured / mem['predicted_peak']:.3f} saved {mem['saved_bytes']} "
          f"recomputed {len(mem['recomputed'])} at {mem['peak_at']}")
    assert abs(measured / mem["predicted_peak"] - 1) <= 0.10
    assert frac == 1.0 or measured <= mem["budget"]   # the plan aims MARGIN under a budget (1.0: save-all itself)


def test_smaller_chunks_when_recompute_alone_cannot_fit(monkeypatch, fresh_dynamo):
    """linear_cross_entropy's chunk buffer is a workspace the planner can shrink: below the smallest peak of
    recomputation alone, the plan halves the chunk (the compiled op runs with it) and still trains like eager."""
    import copy
    import fxopt.hf
    from fxopt.recompute import plan as _plan
    from fxopt.recompute.model_plan import _trace
    from tests.helpers import assert_trains_like, tiny_config
    monkeypatch.setattr(_plan, "CHUNK_FLOOR", 8)             # (512 rows on a GPU; the tiny shape has 128)
    cfg = tiny_config("llama", vocab_size=4096)
    trace = lambda: _trace(copy.deepcopy(cfg), 2, 64, torch.float32, 4, None)[0]   # LoRA r=4: frozen embedding
    recompute_only = smallest_peak(trace(), shrink_chunks=False).peak
    chunked = trace()
    assert smallest_peak(chunked).peak < recompute_only and _plan.chunked_ops(chunked)
    budget = int((recompute_only + smallest_peak(trace()).peak) / 2 / (1 - MARGIN))
    fitted = trace()
    assert make_plan(fitted, budget).sim.peak <= budget and _plan.chunked_ops(fitted)
    assert not _plan.chunked_ops(j := trace()) and make_plan(j, 1.0) and not _plan.chunked_ops(j)

    from peft import LoraConfig, get_peft_model
    torch.manual_seed(1)
    m = get_peft_model(tiny_model("llama", vocab_size=4096), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                       target_modules="all-linear"))
    ref = copy.deepcopy(m)
    fxopt.hf.compile_for_trainer(m, inductor=False, memory_budget=budget)
    ids, labels = batch(vocab=4096, s=64)
    loss = m(input_ids=ids, labels=labels).loss
    loss.backward()
    mem = fxopt.last_report().memory
    assert fxopt.last_report().matched["linear_cross_entropy"] == 1 and mem["chunks"], mem.get("chunks")
    assert_trains_like(m, ref, loss, 1e-5, 1e-4, input_ids=ids, labels=labels)


def test_smaller_chunks_when_cheaper_than_the_recompute_they_replace(monkeypatch, fresh_dynamo):
    """Where recomputation alone reaches the budget, the plan still takes smaller chunks when the recomputation
    (and offloads) they save cost more than the chunks do (plan_seconds), and keeps the default chunk when the
    chunked op costs more. The tiny shape's lm_head + loss is memory-bound (each chunk re-reads W: dearer than its
    sub-microsecond recomputation, so kept whole); priced here as compute-bound, as at 8B with a frozen lm_head
    (`fxopt plan`, 1.15 GiB + offload: 4096-row chunk -> 512, offloads 1.0 -> 0.57 GB, recompute 61 -> 59 ms)."""
    import copy
    from fxopt.recompute import plan as _plan
    from fxopt.recompute.model_plan import _trace
    from tests.helpers import tiny_config
    monkeypatch.setattr(_plan, "CHUNK_FLOOR", 8)
    cfg = tiny_config("llama", vocab_size=4096)
    trace = lambda: _trace(copy.deepcopy(cfg), 2, 64, torch.float32, 4, None)[0]
    save_all = trace().simulate(frozenset()).peak
    budget = int((smallest_peak(trace(), shrink_chunks=False).peak + save_all) / 2)
    real_time = _plan.op_time
    is_lce = lambda n: "linear_cross_entropy" in str(n.target)

    def priced(extra):   # the lm_head + loss op at a fixed price, plus `extra` seconds once chunked smaller
        monkeypatch.setattr(_plan, "op_time", lambda n: (1e-3 + (extra if _plan.op_arg(n, "chunk", 0) else 0.0))
                            if is_lce(n) else real_time(n))

    real = _plan._cheaper_with_smaller_chunks
    monkeypatch.setattr(_plan, "_cheaper_with_smaller_chunks", lambda j, sz, aim, off, last, steps: (last, steps))
    priced(0.0)
    old = make_plan(j_old := trace(), budget)
    monkeypatch.setattr(_plan, "_cheaper_with_smaller_chunks", real)
    new = make_plan(j_new := trace(), budget)
    assert not _plan.chunked_ops(j_old) and old.sim.time > 0          # recomputation alone reached the budget
    assert _plan.chunked_ops(j_new) and new.sim.peak <= budget and new.sim.time < old.sim.time
    assert _plan.plan_seconds(j_new, new.sim) < _plan.plan_seconds(j_old, old.sim)

    priced(1.0)                                                       # a smaller chunk: +1 s
    kept = make_plan(j_kept := trace(), budget)
    assert not _plan.chunked_ops(j_kept) and kept.sim.time == old.sim.time


def test_sdpa_kept_is_recomputed_with_dropout_0(monkeypatch, fresh_dynamo):
    """Where the dispatch keeps SDPA (its kernels are seeded ops, for dropout), a call with dropout_p 0 is
    recomputable (FXOPT_RECOMPUTE_NO_DROPOUT=0: its output is always saved): the smallest plan drops to that of
    fxopt's own attention op, the partitioner saves only the RNG state in addition (torch's RNG functionalization),
    and training matches eager, with and without Inductor."""
    from fxopt.recompute import partition
    from fxopt.recompute.model_plan import capture_joint
    monkeypatch.setattr("fxopt.patterns.attention.keep_sdpa", lambda *a: "kept SDPA (test)")
    ids, labels = batch(s=64)

    def smallest():
        torch._dynamo.reset()
        j, _, matched = capture_joint(tiny_model("llama", attn="sdpa"), {"input_ids": ids, "labels": labels})
        assert matched["attention"] == 0
        return smallest_peak(j).peak
    monkeypatch.setenv("FXOPT_RECOMPUTE_NO_DROPOUT", "0")
    saved_sdpa = smallest()
    monkeypatch.delenv("FXOPT_RECOMPUTE_NO_DROPOUT")   # the default
    recomputed_sdpa = smallest()
    assert recomputed_sdpa < saved_sdpa
    for inductor in (False, True):
        torch._dynamo.reset()
        worst, _ = compare_with_eager(tiny_model("llama", attn="sdpa"), steps=2, s=64,
                                      options={"inductor": inductor, "memory_budget": int(recomputed_sdpa * 1.02)})
        mem = fxopt.last_report().memory
        assert worst <= 1e-4, worst
        assert any("scaled_dot_product" in r["op"] for r in mem["recomputed"]), mem["recomputed"]
        pred, part = set(partition.LAST["predicted"]), set(partition.LAST["partitioned"])
        assert pred <= part and len(part - pred) == 2        # one RNG state per recomputed SDPA call (2 layers)
