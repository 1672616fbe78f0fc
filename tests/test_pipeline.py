"""Pipeline: passes reach into higher-order-op bodies (activation checkpointing)."""
import copy

import torch

import fxopt
from tests.helpers import batch, rel, tiny_model


def test_gradient_checkpointed_layers_are_matched(fresh_dynamo, no_fallback):
    m = tiny_model("llama")
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = copy.deepcopy(m)
    ids, labels = batch()
    out = torch.compile(m, backend="fxopt", options={"inductor": False})(input_ids=ids, labels=labels)
    out.loss.backward()
    r = ref(input_ids=ids, labels=labels)
    r.loss.backward()
    worst = max([rel(out.loss, r.loss)] + [rel(a.grad, b.grad) for a, b in zip(m.parameters(), ref.parameters())])
    assert worst <= 1e-5, worst
    rep = fxopt.last_report()
    n = m.config.num_hidden_layers
    assert rep.matched["rms_norm"] == 2 * n + 1 and rep.matched["rope"] == n and rep.matched["swiglu"] == n
    assert rep.matched["attention"] == n and rep.fallbacks == []
    ops = rep.ops_in_compiled()
    assert ops["rms_norm"] > rep.matched["rms_norm"]     # checkpointed norms run again in the backward graph
