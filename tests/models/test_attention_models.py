"""Tiny random HF models compiled with fxopt: attention matched once per layer, loss and every grad match eager,
no graph break added; the HF masks are recognized (causal / sliding window, no mask read) where they are constant.

llama/qwen2/gpt_neox: causal mask built by sdpa_mask/eager_mask (bool to SDPA, additive where(.., 0, min) to eager);
mistral: sliding_window=8 < seq 24; gemma2 (eager only): soft-cap 50 and alternating sliding (8) / full layers.
"""
import logging

import pytest
import torch

import fxopt
from fxopt.kernels import attention as K
from tests.helpers import batch, compare_with_eager, rel, tiny_model

CASES = [  # (arch, attn, overrides, what the log must say for every layer)
    ("llama", "sdpa", {}, ["causal=True window=0 softcap=0.0 mask=none"]),
    ("llama", "eager", {}, ["causal=True window=0 softcap=0.0 mask=none"]),
    ("mistral", "sdpa", {"sliding_window": 8}, ["causal=True window=8 softcap=0.0 mask=none"]),
    ("gemma2", "eager", {"sliding_window": 8},
     ["causal=True window=8 softcap=50.0 mask=none", "causal=True window=0 softcap=50.0 mask=none"]),
    ("qwen2", "sdpa", {}, ["causal=True window=0 softcap=0.0 mask=none"]),
    ("gpt_neox", "sdpa", {}, ["causal=True window=0 softcap=0.0 mask=none"]),
    ("gpt_neox", "eager", {}, ["causal=True window=0 softcap=0.0 mask=none"]),
]
OPTS = {"inductor": False, "patterns": ["attention"]}


def _count_graphs(model, **kw):
    n = [0]

    def counting(gm, example_inputs):
        n[0] += 1
        return gm.forward
    torch._dynamo.reset()
    ids, labels = batch()
    torch.compile(model, backend=counting)(input_ids=ids, labels=labels, **kw)
    return n[0]


@pytest.mark.parametrize("arch,attn,overrides,expect", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_attention_models_match_eager(arch, attn, overrides, expect, caplog, fresh_dynamo, no_fallback):
    m = tiny_model(arch, attn=attn, **overrides)
    plain_graphs = _count_graphs(m)
    torch._dynamo.reset()
    caplog.set_level(logging.INFO, logger="fxopt.patterns.attention")
    runs = K.RUNS["triton"] + K.RUNS["reference"]
    worst, _ = compare_with_eager(m, options=OPTS)
    rep = fxopt.last_report()
    layers = m.config.num_hidden_layers
    assert rep.matched["attention"] == layers, (rep.matched, [r.reason for r in rep.rejected])
    assert rep.dynamo_graphs == plain_graphs
    assert not rep.fallbacks
    assert K.RUNS["triton"] + K.RUNS["reference"] > runs
    lines = [r.getMessage() for r in caplog.records if "fxopt::attention" in r.getMessage()]
    assert len(lines) == layers and all(any(e in ln for e in expect) for ln in lines), lines
    assert all(any(e in ln for ln in lines) for e in expect), lines
    assert worst <= 1e-5, worst


def test_llama_left_padding_reads_mask(fresh_dynamo, no_fallback):
    """A padded batch: the mask depends on attention_mask, so it is read (with the causal block skip); the loss over
    real tokens and every grad match eager."""
    import copy
    m = tiny_model("llama", attn="sdpa")
    ref = copy.deepcopy(m)
    ids, labels = batch()
    am = torch.ones_like(ids)
    am[1, :6] = 0
    labels = labels.masked_fill(am == 0, -100)
    cm = torch.compile(m, backend="fxopt", options=OPTS)
    out = cm(input_ids=ids, attention_mask=am, labels=labels)
    out.loss.backward()
    rout = ref(input_ids=ids, attention_mask=am, labels=labels)
    rout.loss.backward()
    assert fxopt.last_report().matched["attention"] == m.config.num_hidden_layers
    worst = max([rel(out.loss, rout.loss)] + [rel(a.grad, b.grad) for a, b in zip(m.parameters(), ref.parameters())])
    assert worst <= 1e-5, worst
    assert rel(out.logits[am.bool()], rout.logits[am.bool()]) <= 1e-5
