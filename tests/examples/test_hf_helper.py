"""fxopt.hf.compile_for_trainer: option checking, the loss-only training forward, backbone-only compilation."""
import pytest
import torch

import fxopt
import fxopt.hf
from tests.helpers import batch, rel, tiny_model


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch, fresh_dynamo):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def test_bad_option_fails_at_once():
    with pytest.raises(ValueError, match="unknown fxopt option"):
        fxopt.hf.compile_for_trainer(torch.nn.Linear(2, 2), inductr=False)


def test_training_forward_returns_only_the_loss():
    m = tiny_model("llama")
    ref = tiny_model("llama")
    fxopt.hf.compile_for_trainer(m, inductor=False)
    ids, labels = batch()
    out = m(input_ids=ids, labels=labels)
    assert out.logits is None and out["loss"] is out.loss
    assert fxopt.last_report().matched["linear_cross_entropy"] == 1
    r = ref(input_ids=ids, labels=labels)
    out.loss.backward()
    r.loss.backward()
    assert rel(out.loss, r.loss) <= 1e-5 and rel(m.lm_head.weight.grad, ref.lm_head.weight.grad) <= 1e-4
    m.eval()
    assert m(input_ids=ids, labels=labels).logits is not None    # eval: the full output


@pytest.mark.slow
def test_keep_logits():
    m = fxopt.hf.compile_for_trainer(tiny_model("llama"), keep_logits=True, inductor=False)
    ids, labels = batch()
    assert m(input_ids=ids, labels=labels).logits is not None
    assert fxopt.last_report().matched["linear_cross_entropy"] == 0


def test_backbone_only():
    from peft import LoraConfig, get_peft_model
    m = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    fxopt.hf.compile_for_trainer(m, backbone_only=True, inductor=False)
    assert fxopt.hf.backbone(m) is m.get_base_model().model
    ids, labels = batch()
    out = m(input_ids=ids, labels=labels)
    assert out.logits is not None
    rep = fxopt.last_report()
    assert rep.matched["lora"] == 4 and rep.matched["rms_norm"] == 5 and rep.matched["linear_cross_entropy"] == 0


def test_backbone_of_a_plain_module():
    with pytest.raises(ValueError, match="no separate decoder stack"):
        fxopt.hf.backbone(torch.nn.Linear(2, 2))


def test_training_arguments_backend_is_rejected_by_accelerate():
    """The documented fact: accelerate's fixed backend list refuses 'fxopt' when the Trainer is built."""
    from transformers import Trainer, TrainingArguments
    try:
        args = TrainingArguments(output_dir="/tmp/fxopt_unused", torch_compile=True, torch_compile_backend="fxopt",
                                 report_to=[], use_cpu=True)
    except ValueError as e:     # a later transformers may refuse it here already
        assert "fxopt" in str(e).lower()
        return
    with pytest.raises(ValueError, match="not a valid DynamoBackend"):
        Trainer(model=torch.nn.Linear(2, 2), args=args)


def test_signature_and_deepcopy():
    import copy
    import inspect
    m = fxopt.hf.compile_for_trainer(tiny_model("llama"), inductor=False)
    assert "labels" in inspect.signature(m.forward).parameters and "self" not in inspect.signature(m.forward).parameters
    c = copy.deepcopy(m)
    assert c.forward.__self__ is c      # the copy's forward runs the copy, not the original


def test_decoder_layers_found_by_structure():
    m = tiny_model("llama", num_hidden_layers=3)
    layers = fxopt.hf.decoder_layers(m)
    assert len(layers) == 3 and len({type(x) for x in layers}) == 1
    with pytest.raises(ValueError, match="no nn.ModuleList of identical blocks"):
        fxopt.hf.decoder_layers(torch.nn.Linear(2, 2))
