"""SDPA dispatch: a mask-free SDPA node is kept when SDPA is measured faster (on CUDA), with both times in the
report; `FXOPT_ATTN_SDPA` forces either side; CPU never dispatches. The timing is faked here (no GPU)."""
import pytest
import torch

import fxopt
from fxopt.patterns import attention_dispatch as AD
from tests.helpers import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore")

INF = float("inf")


def _compile_llama():
    """Report of a compiled tiny llama step; asserts loss and grads equal eager's (the kept SDPA node, with its
    constant causal mask turned into is_causal=True, computes the same function)."""
    import copy
    m = tiny_model("llama")
    ref = copy.deepcopy(m)
    ids = torch.randint(3, 128, (2, 24))
    torch._dynamo.reset()
    out = torch.compile(m, backend="fxopt", options={"inductor": False})(input_ids=ids, labels=ids)
    out.loss.backward()
    ref(input_ids=ids, labels=ids).loss.backward()
    assert torch.allclose(out.loss, ref(input_ids=ids, labels=ids).loss, rtol=1e-5)
    for a, b in zip(m.parameters(), ref.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    return fxopt.last_report()


@pytest.fixture
def as_if_cuda(monkeypatch):
    """Pretend the graph is on CUDA in bf16 (the CPU model is fp32) and that the probe measured (fxopt ms, sdpa ms)."""
    def fake_keep(qs, ks, dtype, device, causal, scale, repeated):
        return AD.keep_sdpa(qs, ks, torch.bfloat16, "cuda", causal, scale, repeated)
    monkeypatch.setattr("fxopt.patterns.attention.keep_sdpa", fake_keep)
    monkeypatch.setattr(AD, "_TIMES", {})
    times = {}
    monkeypatch.setattr(AD, "_measure", lambda *a: times["value"])
    return times


def test_sdpa_kept_when_measured_faster(as_if_cuda, fresh_dynamo):
    as_if_cuda["value"] = (1.0, 0.5, INF)
    r = _compile_llama()
    assert r.matched["attention"] == 0 and r.matched["rms_norm"] == 5
    reasons = [x.reason for x in r.rejected if x.pattern == "attention"]
    assert len(reasons) == 2 and all("kept SDPA" in x and "0.500 ms" in x and "1.000 ms" in x for x in reasons)


def test_fxopt_kept_when_not_clearly_slower(as_if_cuda, fresh_dynamo):
    as_if_cuda["value"] = (1.0, 0.98, INF)          # within the 3% margin: fxopt's kernel
    assert _compile_llama().matched["attention"] == 2


def test_env_forces_either_side(as_if_cuda, monkeypatch, fresh_dynamo):
    as_if_cuda["value"] = (1.0, 0.1, INF)
    monkeypatch.setenv("FXOPT_ATTN_SDPA", "never")
    assert _compile_llama().matched["attention"] == 2
    as_if_cuda["value"] = (0.1, 1.0, INF)
    monkeypatch.setenv("FXOPT_ATTN_SDPA", "always")
    assert _compile_llama().matched["attention"] == 0


def test_cpu_never_dispatches_and_bad_env_is_an_error(monkeypatch):
    assert AD.keep_sdpa((1, 4, 8, 16), (1, 2, 8, 16), torch.float32, "cpu", True, 0.25, False) is None
    monkeypatch.setenv("FXOPT_ATTN_SDPA", "sometimes")
    with pytest.raises(ValueError, match="FXOPT_ATTN_SDPA must be"):
        AD.mode()


def test_fp32_on_cuda_keeps_sdpa_without_measuring(monkeypatch):
    """fp32 builds of the kernel compile for minutes (H200): SDPA stays, said so; `never` still forces fxopt."""
    monkeypatch.setattr(AD, "_measure", lambda *a: pytest.fail("measured"))
    reason = AD.keep_sdpa((1, 4, 8, 16), (1, 2, 8, 16), torch.float32, "cuda", True, 0.25, False)
    assert "fp32 on CUDA" in reason and "FXOPT_ATTN_SDPA=never" in reason
    monkeypatch.setenv("FXOPT_ATTN_SDPA", "never")
    assert AD.keep_sdpa((1, 4, 8, 16), (1, 2, 8, 16), torch.float32, "cuda", True, 0.25, False) is None


def test_failed_probe_keeps_fxopt(monkeypatch):
    monkeypatch.setattr(AD, "_TIMES", {})
    monkeypatch.setattr(AD, "_measure", lambda *a: (_ for _ in ()).throw(RuntimeError("out of memory")))
    assert AD.keep_sdpa((1, 4, 8, 16), (1, 2, 8, 16), torch.bfloat16, "cuda", True, 0.25, False) is None


def test_probe_runs_both_sides_and_leaves_rng_alone(monkeypatch):
    """The probe's own code (timing faked: one call each) runs fxopt's op and SDPA with a private generator."""
    import triton.testing
    ran = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep: (fn(), ran.append(1), 1.0)[2])
    state = torch.get_rng_state()
    assert AD._measure((1, 4, 8, 16), (1, 2, 8, 16), torch.float32, "cpu", True, 0.25, False) == (1.0, 1.0, INF)
    assert AD._measure((1, 4, 8, 16), (1, 2, 8, 16), torch.float32, "cpu", True, 0.25, True) == (1.0, 1.0, 1.0)
    assert len(ran) == 5 and torch.equal(state, torch.get_rng_state())   # the GQA form only where repeated


def test_kept_sdpa_drops_the_repeat_when_gqa_is_no_slower(as_if_cuda, fresh_dynamo):
    """SDPA kept, and its own GQA (enable_gqa, no repeat_kv copy) measured no slower than repeat + SDPA: the node
    reads the un-repeated k/v; the step still equals eager (_compile_llama checks loss and grads)."""
    as_if_cuda["value"] = (1.0, 0.5, 0.45)
    r = _compile_llama()
    reasons = [x.reason for x in r.rejected if x.pattern == "attention"]
    assert len(reasons) == 2 and all("k/v not repeated (enable_gqa: 0.450 ms" in x for x in reasons), reasons
    AD._TIMES.clear()
    as_if_cuda["value"] = (1.0, 0.5, 0.55)              # slower than the repeat: left as it was
    reasons = [x.reason for x in _compile_llama().rejected if x.pattern == "attention"]
    assert len(reasons) == 2 and not any("not repeated" in x for x in reasons)


def test_dropping_the_repeat_changes_the_graph(as_if_cuda, fresh_dynamo):
    """The rewritten SDPA call has enable_gqa=True and k/v with the kv heads, not the repeated heads."""
    from fxopt.patterns import attention as PA
    seen = []
    real = PA._drop_repeat

    def spy(n, k0, v0):
        real(n, k0, v0)
        seen.append((n.kwargs.get("enable_gqa"), n.args[1].meta["example_value"].shape[1],
                     n.args[0].meta["example_value"].shape[1]))
    PA._drop_repeat = spy
    try:
        as_if_cuda["value"] = (1.0, 0.5, 0.45)
        _compile_llama()
    finally:
        PA._drop_repeat = real
    assert seen and all(g is True and hkv < hq for g, hkv, hq in seen), seen
