"""The examples/ scripts, run tiny on the CPU in this process (aot_eager hand-off, few steps).

Each example asserts by itself that fxopt matched something and that the loss went down; here we also check
which patterns matched. fxopt's ops run their PyTorch reference on CPU tensors (TRITON_INTERPRET=0 here: the
kernels are tested in tests/kernels; these tests are about the workflow).
"""
import importlib.util
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


def load(name):
    """Import examples/<name>.py once (as the scripts do, with examples/ on sys.path)."""
    key = f"fxopt_example_{name}"
    if key not in sys.modules:
        if os.path.abspath(EXAMPLES) not in sys.path:
            sys.path.insert(0, os.path.abspath(EXAMPLES))
        spec = importlib.util.spec_from_file_location(key, os.path.join(EXAMPLES, f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch, fresh_dynamo):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


TINY = ["--no-inductor", "--steps", "8", "--batch", "2"]


def test_trainer_lora_fuses_lm_head_and_loss():
    out = load("trainer_lora").main(TINY)
    m = out["matched"]
    assert m["lora"] == 14 and m["rms_norm"] == 5 and m["rope"] == 2 and m["swiglu"] == 2, m
    assert m["linear_cross_entropy"] == 1, m      # compile_for_trainer returns only the loss in training
    assert out["losses"][-1] < out["losses"][0]


@pytest.mark.slow
def test_trainer_lora_bf16_weights():
    out = load("trainer_lora").main(TINY + ["--dtype", "bfloat16"])
    assert out["matched"]["attention"] == 2 and out["matched"]["linear_cross_entropy"] == 1 and out["rejected"] == 0


@pytest.mark.slow
def test_trainer_lora_plain_compile():
    import fxopt
    out = load("trainer_lora").main(TINY + ["--plain-compile"])
    assert out["matched"]["lora"] == 14 and out["matched"]["linear_cross_entropy"] == 0
    assert any("graph output" in r.reason for r in fxopt.last_report().rejected if r.pattern == "linear_cross_entropy")


def test_trl_sft_trainer():
    pytest.importorskip("trl")
    out = load("trl_sft").main(TINY)
    m = out["matched"]
    assert m["lora"] == 14 and m["attention"] == 2 and m["rms_norm"] == 5, m
    assert out["rejected"] == 0


@pytest.mark.slow
def test_qlora_nf4():
    pytest.importorskip("bitsandbytes")
    out = load("qlora").main(TINY)
    m = out["matched"]
    assert m["lora_nf4"] == 14 and m["lora"] == 0 and m["linear_cross_entropy"] == 1, m


@pytest.mark.slow
def test_local_folder():
    out = load("local_folder").main(TINY)
    assert out["matched"]["rms_norm"] == 5 and out["matched"]["attention"] == 2


def test_local_folder_missing():
    with pytest.raises(SystemExit, match="no such folder"):
        load("local_folder").main(["--model", "/nonexistent/folder"])
