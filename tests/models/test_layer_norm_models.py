"""Tiny random HF models with LayerNorm compiled with fxopt: layer_norm matched once per LayerNorm module, loss and
every grad match eager, no graph break added.

gpt_neox / phi / stablelm: nn.LayerNorm with weight and bias (F.layer_norm in the dynamo graph); stablelm with
qk_layernorm: one nn.LayerNorm per head (bias=False) on split slices; cohere: a hand-written LayerNorm without bias
(fp32 upcast, `x32 - mean` computed twice, pow, rsqrt, `w.float() * h`, cast back).
"""
import pytest
import torch

import fxopt
from tests.helpers import batch, compare_with_eager, tiny_model

CASES = [("gpt_neox", {}), ("phi", {}), ("stablelm", {}), ("stablelm", {"qk_layernorm": True}), ("cohere", {})]


def _count_graphs(model):
    n = [0]

    def counting(gm, example_inputs):
        n[0] += 1
        return gm.forward
    torch._dynamo.reset()
    ids, labels = batch()
    torch.compile(model, backend=counting)(input_ids=ids, labels=labels)
    return n[0]


def _layer_norms(model):
    return sum(isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith("LayerNorm") for m in model.modules())


@pytest.mark.parametrize("arch,overrides", CASES, ids=[f"{a}{'-qk' if o else ''}" for a, o in CASES])
def test_layer_norm_models_match_eager(arch, overrides, fresh_dynamo, no_fallback):
    m = tiny_model(arch, **overrides)
    expected = _layer_norms(m)
    assert expected >= m.config.num_hidden_layers + 1
    plain_graphs = _count_graphs(m)
    torch._dynamo.reset()
    worst, _ = compare_with_eager(m, options={"inductor": False, "patterns": ["layer_norm"]}, steps=2)
    rep = fxopt.last_report()
    assert rep.matched["layer_norm"] == expected, [r.reason for r in rep.rejected]
    assert worst <= 1e-5, worst
    assert rep.dynamo_graphs == plain_graphs == 1      # fxopt adds no graph break
    assert rep.ops_in_compiled().get("layer_norm") == expected
    assert rep.ops_in_compiled().get("layer_norm_backward") == expected
    assert rep.fallbacks == []


def test_gpt_neox_inductor(fresh_dynamo, no_fallback):
    """The real hand-off to Inductor (one layer: the C++ compile dominates the test time; only layer_norm enabled so
    this file tests this op, the all-pattern runs live with the other model tests)."""
    m = tiny_model("gpt_neox", num_hidden_layers=1)
    worst, _ = compare_with_eager(m, options={"patterns": ["layer_norm"]}, steps=1)
    rep = fxopt.last_report()
    assert rep.matched["layer_norm"] == _layer_norms(m)
    assert worst <= 1e-5, worst
    assert rep.fallbacks == []
