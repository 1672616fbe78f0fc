"""rope on tiny random HF models (aot_eager, kernels under the interpreter): one match per layer, loss and grads as
eager. Rotate-half: llama, mistral, qwen2, gemma; partial rotary folded: phi3, gpt_neox; interleaved: cohere
(`q.float()` ... `.to(dtype)`), gptj (partial, [B, S, H, D]; cos/sin recomputed per tensor: q and k are two ops).
About 30 s alone on 2 cores."""
import pytest
import torch

import fxopt
from tests.helpers import compare_with_eager, tiny_model

OPTS = {"patterns": ["rope"], "inductor": False, "strict": True}

CASES = [
    ("llama", {}, 1),
    ("mistral", {}, 1),
    ("qwen2", {}, 1),
    ("gemma", {}, 1),
    ("phi3", dict(partial_rotary_factor=0.5), 1),
    ("gpt_neox", dict(rotary_pct=0.25), 1),
    ("cohere", {}, 1),
    ("gptj", dict(rotary_dim=8, n_embd=64, n_head=4, n_layer=2), 2),
]


@pytest.mark.parametrize("arch,overrides,per_layer", CASES, ids=[c[0] for c in CASES])
def test_model_fp32(arch, overrides, per_layer, fresh_dynamo, no_fallback):
    model = tiny_model(arch, **overrides)
    worst, _ = compare_with_eager(model, options=OPTS)
    report = fxopt.last_report()
    assert report.matched["rope"] == per_layer * model.config.num_hidden_layers, report.rejected
    assert not report.fallbacks
    assert worst <= 1e-5


def test_llama_bf16_same_bits_as_without_rope(fresh_dynamo, no_fallback, monkeypatch):
    """bf16 with FXOPT_ROPE_EXACT=1: the op reproduces eager's roundings, so loss and grads are bit-identical to the
    same compile without the rewrite (aot_eager itself differs from eager by ~7e-3 in bf16 here, with or without
    rope)."""
    monkeypatch.setenv("FXOPT_ROPE_EXACT", "1")
    from tests.helpers import batch
    results = []
    for pats in (["rope"], []):
        torch._dynamo.reset()
        model = tiny_model("llama", dtype=torch.bfloat16)
        cm = torch.compile(model, backend="fxopt", options=dict(OPTS, patterns=pats))
        ids, labels = batch()
        loss = cm(input_ids=ids, labels=labels).loss
        loss.backward()
        if pats:
            assert fxopt.last_report().matched["rope"] == model.config.num_hidden_layers
        results.append([loss.detach()] + [p.grad for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)
