"""Tiny random HF models compiled with fxopt: rms_norm matched 2L+1 times, loss and every grad match eager."""
import pytest
import torch

import fxopt
from tests.helpers import batch, compare_with_eager, tiny_model

ARCHS = ["llama", "qwen2", "gemma"]   # gemma: the (1 + w) offset form


def _count_graphs(model):
    n = [0]

    def counting(gm, example_inputs):
        n[0] += 1
        return gm.forward
    torch._dynamo.reset()
    ids, labels = batch()
    torch.compile(model, backend=counting)(input_ids=ids, labels=labels)
    return n[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_rms_norm_models_match_eager(arch, fresh_dynamo, no_fallback):
    m = tiny_model(arch)
    plain_graphs = _count_graphs(m)
    torch._dynamo.reset()
    worst, _ = compare_with_eager(m, options={"inductor": False, "patterns": ["rms_norm"]}, steps=2)
    rep = fxopt.last_report()
    assert rep.matched["rms_norm"] == 2 * m.config.num_hidden_layers + 1
    assert worst <= 1e-5, worst
    assert rep.dynamo_graphs == plain_graphs == 1      # fxopt adds no graph break
    assert rep.ops_in_compiled().get("rms_norm") == rep.matched["rms_norm"]
    assert rep.ops_in_compiled().get("rms_norm_backward") == rep.matched["rms_norm"]


def test_llama_inductor_default_options(fresh_dynamo, no_fallback):
    """The real hand-off: Inductor, every pattern enabled."""
    m = tiny_model("llama")
    with torch._inductor.config.patch(force_disable_caches=True):   # a cache hit would skip the counted compile
        worst, _ = compare_with_eager(m, steps=1)
    rep = fxopt.last_report()
    assert rep.matched["rms_norm"] == 2 * m.config.num_hidden_layers + 1
    assert worst <= 1e-5, worst
    assert rep.graphs == 1 and rep.fallbacks == []
    assert rep.compiled() == {"forward": 1, "backward": 1}
    assert rep.ops_in_compiled()["rms_norm"] == rep.matched["rms_norm"]


def test_inference_graph_no_grad(fresh_dynamo, no_fallback):
    m = tiny_model("llama").eval()
    ids, _ = batch()
    cm = torch.compile(m, backend="fxopt", options={"inductor": False})
    with torch.no_grad():
        out = cm(input_ids=ids).logits
        ref = m(input_ids=ids).logits
    rep = fxopt.last_report()
    assert rep.matched["rms_norm"] == 2 * m.config.num_hidden_layers + 1
    assert rep.to_dict()["graphs"] >= 1
    assert float((out - ref).abs().max()) <= 1e-5
