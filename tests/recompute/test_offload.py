"""Offloading saved activations to host memory: the runtime ops, the planner's offload moves, training like eager."""
import copy
import gc

import pytest
import torch

import fxopt
from fxopt.kernels import offload as rt
from fxopt.recompute import make_plan, smallest_peak
from fxopt.recompute import offload as off
from fxopt.recompute.plan import MARGIN
from tests.helpers import assert_trains_like, batch, tiny_config, tiny_model


def _xs(n, device="cpu"):
    return [torch.randn(3, 5 + i, device=device) for i in range(n)]


def _forward(xs, key, depth=1):
    """Offload xs (forward order) into slots numbered in reverse (the backward reads the last one first)."""
    n, toks, prev_tok = len(xs), {}, None
    for j, x in enumerate(xs):
        slot = n - 1 - j
        prev = [xs[i] for i in rt.joined_by(j, n, depth)]
        toks[slot] = torch.ops.fxopt.offload(x, prev_tok, prev, key, slot, n, depth)
        prev_tok = toks[slot]
    return toks


def _backward(xs, toks, key, order=None, depth=1):
    n = len(xs)
    for slot in (order or range(n)):
        x = xs[n - 1 - slot]
        y = torch.ops.fxopt.reload(toks[slot], key, slot, n, depth, list(x.shape), x.dtype)
        assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("order", [None, [2, 0, 3, 1]])
def test_round_trip_any_reload_order(order):
    xs, key = _xs(4), 9001
    toks = _forward(xs, key)
    _backward(xs, toks, key, order)


@pytest.mark.gpu
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("order", [None, [2, 0, 3, 1], [3, 2, 1, 0]])
def test_gpu_round_trip_leaves_nothing_fetched(order, depth):
    """Side-stream copies, `depth` in flight each way; reloads out of slot order (a compiled backward may run them
    so) fetch no slot twice and leave no fetched tensor behind (under CUDA graphs one would stay in the graph's
    pool)."""
    xs, key = _xs(4, "cuda"), 9101 + depth
    toks = _forward(xs, key, depth)
    assert not rt._TABLES[key].copies                     # every copy joined by the forward's last offload
    before = rt._STATS["prefetched"]
    _backward(xs, toks, key, order, depth)
    assert not rt._TABLES[key].prefetch
    if order is None:
        assert rt._STATS["prefetched"] - before == 3      # slots 1..3 were fetched while the previous one was used
    torch.cuda.synchronize()


def test_two_forwards_before_their_backwards_keep_both_copies():
    """A second forward while the first one's copies are pending takes a new generation of host buffers."""
    key = 9002
    a, b = _xs(3), [x + 1 for x in _xs(3)]
    ta = _forward(a, key)
    tb = _forward(b, key)
    _backward(b, tb, key)
    _backward(a, ta, key)
    assert len(rt._TABLES[key].gens) == 2
    _backward(a, _forward(a, key), key)          # both free again: no third generation
    assert len(rt._TABLES[key].gens) == 2


def test_forward_without_backward_releases_its_generation():
    key = 9003
    toks = _forward(_xs(2), key)
    gen = rt._TABLES[key].gens[0]
    assert gen.pending == 2
    del toks
    gc.collect()
    assert gen.pending == 0
    _forward(_xs(2), key)
    assert len(rt._TABLES[key].gens) == 1


def test_reload_without_its_copy_says_what_to_do():
    key = 9004
    xs = _xs(2)
    toks = _forward(xs, key)
    _backward(xs, toks, key)
    with pytest.raises(fxopt.FxoptError, match="Run each backward once"):
        torch.ops.fxopt.reload(toks[0], key, 0, 2, 1, list(xs[1].shape), xs[1].dtype)


def test_compact_drops_offloads_without_a_reload():
    """A reload the partition left out (its slot 1 here): its offload goes, the other slots are renumbered in
    backward order with the new count, the join arguments follow the new order, and the graphs still round-trip."""
    from torch import fx
    key, off_op, rel_op = 4242, torch.ops.fxopt.offload.default, torch.ops.fxopt.reload.default

    def fw(a, b, c):
        t0 = off_op(a, None, [], key, 2, 3, 1)
        t1 = off_op(b, t0, [a], key, 1, 3, 1)
        t2 = off_op(c, t1, [b], key, 0, 3, 1)
        return t0, t2

    def bw(t0, t2):
        return rel_op(t2, key, 0, 3, 1, [3, 7], torch.float32), rel_op(t0, key, 2, 3, 1, [3, 5], torch.float32)
    f, b = fx.symbolic_trace(fw), fx.symbolic_trace(bw)
    assert off.compact(f, b) == [1]
    offs = [n for n in f.graph.nodes if n.target is off_op]
    assert [(o.args[4], o.args[5]) for o in offs] == [(1, 2), (0, 2)]
    assert offs[1].args[1] is offs[0] and offs[1].args[2] == [offs[0].args[0]]
    assert [(r.args[2], r.args[3]) for r in b.graph.nodes if r.target is rel_op] == [(0, 2), (1, 2)]
    assert off.compact(f, b) == []
    xs = [torch.randn(3, 5), torch.randn(3, 6), torch.randn(3, 7)]
    y2, y0 = b(*f(*xs))
    assert torch.equal(y2, xs[2]) and torch.equal(y0, xs[0])

    def fw_last_only(a, b, c):                  # the first two reloads are gone: the last call starts the chain
        return fw(a, b, c)[1]

    def bw_last_only(t2):
        return rel_op(t2, key, 0, 3, 1, [3, 7], torch.float32)
    f, b = fx.symbolic_trace(fw_last_only), fx.symbolic_trace(bw_last_only)
    assert off.compact(f, b) == [1, 2]
    (last,) = [n for n in f.graph.nodes if n.target is off_op]
    assert last.args[1] is None and last.args[2] == [] and (last.args[4], last.args[5]) == (0, 1)


def test_offload_needs_a_budget():
    with pytest.raises(ValueError, match="needs a 'memory_budget'"):
        fxopt.config.parse({"offload": True})


# ---- the planner ----

def _trace(cfg):
    from fxopt.recompute.model_plan import _trace as trace
    return trace(copy.deepcopy(cfg), 2, S, torch.float32, 4, None)[0]   # LoRA r=4 on all linear layers


S, LAYERS = 128, 6


@pytest.fixture(scope="module")
def lora_cfg():
    return tiny_config("llama", num_hidden_layers=LAYERS)


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(off, "MIN_BYTES", 0)


def test_offload_lowers_the_smallest_peak(lora_cfg, small, monkeypatch):
    """Past what recomputation reaches, offloading lowers the peak; the model keeps the offloaded tensors out of
    the device's saved bytes. At the copy price (55 GB/s, default) only the residual stream goes (recomputing it
    means a whole layer); priced cheaper (FXOPT_OFFLOAD_BW, within the forward's copy capacity) more goes and less
    is recomputed; with no capacity, the copy price applies again."""
    from fxopt.recompute import plan
    recompute_only = smallest_peak(_trace(lora_cfg))
    j = _trace(lora_cfg)
    exposed = smallest_peak(j, offload=True)
    assert exposed.peak < recompute_only.peak and exposed.offloaded
    assert exposed.saved_bytes + exposed.offload_bytes >= recompute_only.saved_bytes
    assert not set(exposed.offloaded) & set(exposed.act_saved)
    assert {j.describe(s)["op"] for s in exposed.offloaded} == {"aten.add"}
    monkeypatch.setenv("FXOPT_OFFLOAD_BW", str(plan.OFFLOAD_BW / 0.039))
    hidden = smallest_peak(_trace(lora_cfg), offload=True)
    assert hidden.peak <= exposed.peak
    assert make_plan(_trace(lora_cfg), int(exposed.peak / (1 - MARGIN)) + 1, offload=True).sim.offload_bytes > \
        exposed.offload_bytes
    monkeypatch.setenv("FXOPT_OFFLOAD_CAPACITY", "0")                 # no capacity: every copy at the copy price
    assert smallest_peak(_trace(lora_cfg), offload=True).offloaded == exposed.offloaded
    monkeypatch.delenv("FXOPT_OFFLOAD_CAPACITY")
    monkeypatch.setattr(plan, "forward_time", lambda joint: 0.0)       # the same through the roofline forward time
    assert smallest_peak(_trace(lora_cfg), offload=True).offloaded == exposed.offloaded


def test_dynamic_shapes_are_not_offloaded(small, fresh_dynamo):
    """A storage whose shape is symbolic (dynamic seq) is never a candidate: reload's shape is a constant."""
    from fxopt.recompute.model_plan import capture_joint
    ids, labels = batch(s=S)
    j = capture_joint(_lora_model(), {"input_ids": ids, "labels": labels}, dynamic_dims={"input_ids": [1],
                                                                                         "labels": [1]})[0]
    assert j.symbols(), "the trace is not dynamic"
    dynamic = {st.sid for st in j.storages if st.expr.free_symbols}
    assert dynamic and not off.candidates(j) & dynamic


def test_cli_plan_with_offload(lora_cfg, small, tmp_path, capsys):
    """`fxopt plan --offload`: a budget below the recompute-only smallest peak is feasible, and the plan says what
    goes to host memory (also with the seq fit: the storages' sizes become polynomials in seq there)."""
    import json

    from fxopt.cli import main
    path = tmp_path / "config.json"
    path.write_text(json.dumps(lora_cfg.to_dict()))
    hi = smallest_peak(_trace(lora_cfg)).peak
    with pytest.raises(SystemExit) as e:
        main(["plan", str(path), "--batch", "2", "--seq", str(S), "--budget", str(hi - 1), "--dtype", "float32",
              "--lora-rank", "4", "--offload"])
    out = capsys.readouterr().out
    assert e.value.code == 0, out
    assert "smallest predicted peak with recompute and offload" in out and "saved tensors to host memory" in out


def test_depth_keeps_copies_in_flight_longer(lora_cfg, small, monkeypatch):
    """With D copies in flight an offloaded tensor stays on the device until the D-th next offload (forward) and is
    fetched D slots ahead (backward): for the same plan the predicted peak does not drop, and the rewrite passes
    x_{j-D} to offload j, and every tensor still in flight to the last one (the graph must not free them before
    their copies are joined)."""
    j = _trace(lora_cfg)
    rec = frozenset()                       # nothing recomputed: every saved candidate offloaded
    cand = off.candidates(j)
    offs = tuple(s for s in j.simulate(rec).act_saved if s in cand)
    assert len(offs) > 3
    peaks = [j.simulate(rec, offload=offs, depth=d).peak for d in (1, 2, 3)]
    assert peaks[0] <= peaks[1] <= peaks[2] and peaks[0] < peaks[2]
    sim = j.simulate(rec, offload=offs, depth=2)
    assert sim.offload_depth == 2
    from torch.utils.checkpoint import CheckpointPolicy
    off.rewrite(j, sim, CheckpointPolicy.MUST_SAVE, CheckpointPolicy.MUST_RECOMPUTE)
    calls = [n for n in j.gm.graph.nodes if n.target is torch.ops.fxopt.offload.default]
    assert [c.args[2] for c in calls[2:-1]] == [[c.args[0]] for c in calls[:-3]]
    assert calls[0].args[2] == [] and calls[1].args[2] == [] and {c.args[6] for c in calls} == {2}
    assert calls[-1].args[2] == [calls[-3].args[0], calls[-2].args[0]]   # the last call keeps both in flight alive


def test_offload_capacity_env_is_checked(monkeypatch):
    from fxopt.recompute import plan
    monkeypatch.setenv("FXOPT_OFFLOAD_CAPACITY", "1.5")
    with pytest.raises(ValueError, match="FXOPT_OFFLOAD_CAPACITY must be a number from 0 to 1"):
        plan.offload_capacity()


def test_offload_depth_env_is_checked(monkeypatch):
    from fxopt.recompute import plan
    monkeypatch.setenv("FXOPT_OFFLOAD_DEPTH", "0")
    with pytest.raises(ValueError, match="FXOPT_OFFLOAD_DEPTH must be a whole number"):
        plan.offload_depth()


def test_offload_price_env_is_checked(monkeypatch):
    from fxopt.recompute import plan
    monkeypatch.setenv("FXOPT_OFFLOAD_BW", "fast")
    with pytest.raises(ValueError, match="FXOPT_OFFLOAD_BW must be a positive number"):
        plan.offload_bw()


def test_offload_not_taken_when_recompute_reaches_the_budget(lora_cfg, small):
    j = _trace(lora_cfg)
    p = make_plan(j, 0.6, offload=True)
    assert not p.sim.offloaded


def test_min_bytes_keeps_small_tensors_on_the_device(lora_cfg):
    j = _trace(lora_cfg)
    assert not off.candidates(j)                       # every tiny tensor is under 1 MiB


@pytest.fixture(scope="module")
def budget(lora_cfg):
    """A budget only offloading can meet: its aim is between the smallest peaks with and without offloading."""
    import unittest.mock
    with unittest.mock.patch.object(off, "MIN_BYTES", 0):
        lo = smallest_peak(_trace(lora_cfg), offload=True).peak
    hi = smallest_peak(_trace(lora_cfg)).peak
    b = int((lo + hi) / 2 / (1 - MARGIN))
    assert b * (1 - MARGIN) < hi
    return b


def _lora_model():
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(1)
    return get_peft_model(tiny_model("llama", num_hidden_layers=LAYERS),
                          LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))


@pytest.mark.parametrize("inductor,depth", [(False, "1"), (True, "1"), (False, "2")])
def test_trains_like_eager_with_offload(budget, small, inductor, depth, fresh_dynamo, no_fallback, monkeypatch):
    """Planned, rewritten, partitioned as predicted (only the tokens saved for the offloaded tensors); the ops ran
    in each step; loss and LoRA grads as eager. FXOPT_OFFLOAD_DEPTH copies in flight: the plan and the ops use it."""
    import fxopt.hf
    from fxopt.recompute import partition
    monkeypatch.setenv("FXOPT_OFFLOAD_DEPTH", depth)
    m = _lora_model()
    ref = copy.deepcopy(m)
    fxopt.hf.compile_for_trainer(m, inductor=inductor, memory_budget=budget, offload=True)
    ids, labels = batch(s=S)
    before = dict(rt._STATS)
    for _ in range(2):
        m.zero_grad()
        loss = m(input_ids=ids, labels=labels).loss
        loss.backward()
    mem = fxopt.last_report().memory
    assert mem["offloaded"] and mem["predicted_peak"] <= budget
    assert f"{len(mem['offloaded'])} offloaded ({mem['offload_bytes']} B)" in str(fxopt.last_report())
    n = len(mem["offloaded"])
    assert rt._STATS["offload"] - before["offload"] == 2 * n and rt._STATS["reload"] - before["reload"] == 2 * n
    assert partition.LAST["predicted"] == partition.LAST["partitioned"]
    assert rt._STATS["last_depth"] == int(depth)
    assert_trains_like(m, ref, loss, 1e-5, 1e-4, input_ids=ids, labels=labels)


@pytest.mark.gpu
@pytest.mark.parametrize("cudagraphs,depth", [(False, "1"), (True, "1"), (True, "2")])
def test_gpu_offload_trains_like_eager(cudagraphs, depth, small, fresh_dynamo, monkeypatch):
    """CUDA: pinned buffers, side-stream copies, one-ahead prefetch; with CUDA graphs the copies are recorded. The
    budget comes from this CUDA graph's own joint (fxopt's attention forced: the SDPA dispatch is timed, so two
    compiles could differ)."""
    from fxopt.recompute.model_plan import capture_joint
    monkeypatch.setenv("FXOPT_ATTN_SDPA", "never")
    monkeypatch.setenv("FXOPT_OFFLOAD_DEPTH", depth)
    m = _lora_model().cuda()
    ref = copy.deepcopy(m)
    ids, labels = (t.cuda() for t in batch(s=S))
    lo = smallest_peak(capture_joint(copy.deepcopy(m), {"input_ids": ids, "labels": labels})[0], offload=True).peak
    hi = smallest_peak(capture_joint(copy.deepcopy(m), {"input_ids": ids, "labels": labels})[0]).peak
    assert lo < hi, (lo, hi)
    budget = int((lo + hi) / 2 / (1 - MARGIN))
    torch._dynamo.reset()
    step = torch.compile(m, backend="fxopt", options={"memory_budget": budget, "offload": True,
                                                      "cudagraphs": cudagraphs})
    before = dict(rt._STATS)
    for _ in range(4):
        m.zero_grad()
        loss = step(input_ids=ids, labels=labels).loss
        loss.backward()
    assert fxopt.last_report().memory["offloaded"] and rt._STATS["offload"] > before["offload"]
    if not cudagraphs and len(fxopt.last_report().memory["offloaded"]) > 1:     # (one slot: nothing to fetch ahead)
        assert rt._STATS["prefetched"] > before["prefetched"]
    assert_trains_like(m, ref, loss, 1e-4, 1e-3, input_ids=ids, labels=labels)
