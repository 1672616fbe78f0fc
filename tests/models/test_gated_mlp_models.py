"""Tiny random HF models compiled with fxopt: one swiglu/geglu per layer, loss and every grad match eager."""
import pytest
import torch

import fxopt
from tests.helpers import batch, compare_with_eager, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")

# arch -> (config overrides, pattern, fxopt ops in the compiled fwd/bwd graphs)
ARCHS = {
    "llama": ({}, "swiglu", ("gated_mlp", "gated_mlp_backward")),
    "mistral": ({}, "swiglu", ("gated_mlp", "gated_mlp_backward")),
    "qwen2": ({}, "swiglu", ("gated_mlp", "gated_mlp_backward")),
    "gemma": (dict(hidden_activation="gelu_pytorch_tanh"), "geglu", ("gated_mlp", "gated_mlp_backward")),
    "phi3": ({}, "swiglu", ("gated_mlp_packed", "gated_mlp_packed_backward")),   # fused gate_up + chunk
}


@pytest.fixture
def aot_graphs(monkeypatch):
    """The aten graphs aot_eager hands to its (nop) compilers: [(kind, GraphModule)]."""
    import torch._dynamo.backends.debugging as dbg
    seen, nop = [], dbg.boxed_nop

    def recording(gm, example_inputs, *a, **k):
        kind = "backward" if any(n.op == "placeholder" and "tangents" in n.name for n in gm.graph.nodes) \
            else "forward"
        seen.append((kind, gm))
        return nop(gm, example_inputs, *a, **k)
    monkeypatch.setattr(dbg, "boxed_nop", recording)
    return seen


def _aten_count(gm, op):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is op)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_gated_mlp_models_match_eager(arch, fresh_dynamo, no_fallback, aot_graphs):
    overrides, pattern, ops = ARCHS[arch]
    m = tiny_model(arch, **overrides)
    layers = m.config.num_hidden_layers
    worst, _ = compare_with_eager(m, options={"inductor": False, "patterns": ["swiglu", "geglu"]}, steps=2)
    rep = fxopt.last_report()
    other = "geglu" if pattern == "swiglu" else "swiglu"
    assert rep.matched == {pattern: layers, other: 0}, rep.matched
    assert rep.rejected == [] and rep.fallbacks == []
    assert worst <= 1e-5, worst
    assert rep.dynamo_graphs == 1                          # fxopt adds no graph break
    assert rep.ops_in_compiled() == {ops[0]: layers, ops[1]: layers}
    if arch == "phi3":   # the packed op returns d(gate_up) whole: no cat of the two halves' grads in backward
        bwd = [gm for kind, gm in aot_graphs if kind == "backward"]
        assert bwd and all(_aten_count(gm, torch.ops.aten.cat.default) == 0 for gm in bwd)


def test_llama_lora_on_gate_and_up(fresh_dynamo, no_fallback):
    """peft LoRA on gate_proj/up_proj: the gate is `base + lora` (elementwise itself), still one match per layer."""
    from peft import LoraConfig, get_peft_model
    m = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                         target_modules=["gate_proj", "up_proj"]))
    for name, p in m.named_parameters():
        if "lora_B" in name:      # B starts at zero: make the LoRA branch count
            torch.nn.init.normal_(p, std=0.1)
    worst, _ = compare_with_eager(m, options={"inductor": False, "patterns": ["swiglu", "geglu"]})
    rep = fxopt.last_report()
    assert rep.matched["swiglu"] == m.config.num_hidden_layers and rep.rejected == []
    assert worst <= 1e-5, worst


def test_phi3_inductor(fresh_dynamo, no_fallback):
    """The real hand-off: Inductor around the packed op (its input gu is the projection's output, its grad d gu)."""
    m = tiny_model("phi3")
    worst, _ = compare_with_eager(m, options={"patterns": ["swiglu", "geglu"]}, steps=1)
    rep = fxopt.last_report()
    assert rep.matched["swiglu"] == m.config.num_hidden_layers
    assert worst <= 1e-5, worst
    assert rep.fallbacks == []


def test_inference_no_grad(fresh_dynamo, no_fallback):
    m = tiny_model("gemma", hidden_activation="gelu_pytorch_tanh").eval()
    ids, _ = batch()
    cm = torch.compile(m, backend="fxopt", options={"inductor": False, "patterns": ["geglu"]})
    with torch.no_grad():
        out = cm(input_ids=ids).logits
        ref = m(input_ids=ids).logits
    assert fxopt.last_report().matched["geglu"] == m.config.num_hidden_layers
    assert float((out - ref).abs().max()) <= 1e-5
