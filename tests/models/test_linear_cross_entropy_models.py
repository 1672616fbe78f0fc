"""Tiny random HF causal LMs: lm_head + loss fused into fxopt::linear_cross_entropy, loss and every grad as eager.

The fusion needs the logits dead: an HF model returns `.logits`, so `torch.compile(model)` keeps them as a graph
output and the pattern is rejected (with that reason); compiling a function/module that returns only the loss
(`LossOnly` below) lets it match. transformers has no option to skip the logits (`logits_to_keep` also slices the
hidden states the loss is computed from)."""
import pytest
import torch

import fxopt
from tests.helpers import batch, compare_with_eager, rel, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")
OPTS = {"inductor": False, "patterns": ["linear_cross_entropy"]}


class LossOnly(torch.nn.Module):
    """Returns an output object holding only the loss, so the logits never leave the compiled graph."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, **kw):
        from transformers.modeling_outputs import CausalLMOutputWithPast
        return CausalLMOutputWithPast(loss=self.model(input_ids=input_ids, labels=labels, **kw).loss)


# arch -> (tiny_model kwargs): untied; tied (lm_head weight = embedding weight); tied + softcap /30 tanh *30;
# cohere: tied + logits * logit_scale
ARCHS = {
    "llama": dict(),
    "llama-tied": dict(tie_word_embeddings=True),
    "gemma2": dict(attn="eager", tie_word_embeddings=True, final_logit_softcapping=3.0),
    "cohere": dict(tie_word_embeddings=True, logit_scale=0.5),
}


@pytest.mark.parametrize("name", list(ARCHS))
def test_model_loss_and_grads(name, fresh_dynamo):
    kw = dict(ARCHS[name])
    m = tiny_model(name.split("-")[0], **kw)
    worst, _ = compare_with_eager(LossOnly(m), options=OPTS)
    rep = fxopt.last_report()
    assert rep.matched["linear_cross_entropy"] == 1, [r.reason for r in rep.rejected]
    assert not rep.fallbacks
    assert worst <= 1e-5, worst


def test_num_items_in_batch(fresh_dynamo):
    m = tiny_model("llama")
    cm = torch.compile(LossOnly(m), backend="fxopt", options=OPTS)
    ids, labels = batch()
    n = (labels[:, 1:] != -100).sum() + 3
    out = cm(ids, labels, num_items_in_batch=n).loss
    ref = m(input_ids=ids, labels=labels, num_items_in_batch=n).loss
    assert fxopt.last_report().matched["linear_cross_entropy"] == 1
    g = torch.autograd.grad(out, list(m.parameters()))
    rg = torch.autograd.grad(ref, list(m.parameters()))
    assert rel(out, ref) <= 1e-5 and max(rel(a, b) for a, b in zip(g, rg)) <= 1e-5


def test_model_returning_logits_not_fused(fresh_dynamo):
    m = tiny_model("llama")
    ids, labels = batch()
    out = torch.compile(m, backend="fxopt", options=OPTS)(input_ids=ids, labels=labels)
    rep = fxopt.last_report()
    assert rep.matched["linear_cross_entropy"] == 0
    assert any("graph output" in r.reason for r in rep.rejected if r.pattern == "linear_cross_entropy")
    ref = m(input_ids=ids, labels=labels)
    assert rel(out.logits, ref.logits) <= 1e-6 and rel(out.loss, ref.loss) <= 1e-6


def test_bf16_model_all_patterns(fresh_dynamo):
    """bf16 weights, every fxopt pattern on: lm_head + loss still fused, loss and grads within bf16 tolerance."""
    m = tiny_model("llama", dtype=torch.bfloat16)
    worst, _ = compare_with_eager(LossOnly(m), options={"inductor": False})
    assert fxopt.last_report().matched["linear_cross_entropy"] == 1
    assert worst <= 3e-2, worst
