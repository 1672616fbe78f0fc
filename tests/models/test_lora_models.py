"""Tiny random llama / qwen2 with peft LoRA (fp32) and QLoRA (bitsandbytes NF4, double quant, fp32 compute, loaded
from a local folder): 7 LoRA linears per layer matched, loss and every A/B grad match eager (aot_eager)."""
import tempfile

import pytest
import torch

import fxopt
from tests.helpers import batch, rel, tiny_config

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")


def build(arch, adapter, target_modules="all-linear"):
    """Two identical models (compiled, eager), built as /work/shared/tools/check_models.py does."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    cfg = tiny_config(arch)
    torch.manual_seed(0)
    if adapter == "qlora":
        d = tempfile.mkdtemp()
        AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
        models = [AutoModelForCausalLM.from_pretrained(d, quantization_config=q, dtype=torch.float32,
                                                       device_map="cpu") for _ in range(2)]
    else:
        a = AutoModelForCausalLM.from_config(cfg)
        import copy
        models = [a, copy.deepcopy(a)]
    out = []
    for m in models:
        m.config.use_cache = False
        m.loss_type = "ForCausalLM"
        torch.manual_seed(1)
        out.append(get_peft_model(m, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=target_modules,
                                                init_lora_weights=False)).train())
    return out


def compare(comp, ref, options):
    ids, labels = batch()
    out = torch.compile(comp, backend="fxopt", options=options)(input_ids=ids, labels=labels)
    out.loss.backward()
    rout = ref(input_ids=ids, labels=labels)
    rout.loss.backward()
    worst, n = rel(out.loss, rout.loss), 0
    for (na, pa), (nb, pb) in zip(comp.named_parameters(), ref.named_parameters()):
        assert (pa.grad is None) == (pb.grad is None), na
        if pa.grad is not None:
            worst, n = max(worst, rel(pa.grad, pb.grad)), n + 1
    return worst, n


CASES = [("llama", "lora", "lora"), ("qwen2", "lora", "lora"), ("llama", "qlora", "lora_nf4"),
         ("qwen2", "qlora", "lora_nf4")]


@pytest.mark.parametrize("arch,adapter,pattern", CASES)
def test_lora_models_match_eager(arch, adapter, pattern, fresh_dynamo, no_fallback):
    comp, ref = build(arch, adapter)
    layers = comp.config.num_hidden_layers
    worst, n_grads = compare(comp, ref, {"inductor": False, "patterns": ["lora", "lora_nf4"]})
    rep = fxopt.last_report()
    assert rep.matched[pattern] == 7 * layers, (rep.matched, [r.reason for r in rep.rejected])
    assert n_grads == 2 * 7 * layers            # every lora_A / lora_B has a gradient
    assert worst <= 1e-4, worst
    # q/k/v and gate/up read one input each: two group calls per layer (patterns/lora_group.py), o and down alone
    ops = rep.ops_in_compiled()
    assert rep.grouped == {pattern: 5 * layers}, rep.grouped
    assert (ops.get(pattern), ops.get(f"{pattern}_group")) == (2 * layers, 2 * layers), ops
    assert (ops.get(f"{pattern}_backward"), ops.get(f"{pattern}_group_backward")) == (2 * layers, 2 * layers), ops


def test_qlora_some_targets_all_patterns(fresh_dynamo, no_fallback):
    """Adapters on q/v only: the 5 other NF4 linears per layer are frozen and still matched; every pattern on."""
    comp, ref = build("llama", "qlora", target_modules=["q_proj", "v_proj"])
    worst, n_grads = compare(comp, ref, {"inductor": False})
    rep = fxopt.last_report()
    assert rep.matched["lora_nf4"] == 7 * comp.config.num_hidden_layers, rep.matched
    assert n_grads == 2 * 2 * comp.config.num_hidden_layers
    assert worst <= 1e-4, worst
