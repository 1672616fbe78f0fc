"""`python -m fxopt` / `fxopt`: explain and bench (plan and demo are tested with their own code)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fxopt import cli
from fxopt.explain import block_of

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture(autouse=True)
def reference_ops(monkeypatch, fresh_dynamo):
    monkeypatch.setenv("TRITON_INTERPRET", "0")   # these tests are about matching, not kernels


def test_help_lists_commands(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and all(c in out for c in ("demo", "explain", "bench"))
    for cmd in ("explain", "bench"):
        code, out, _ = run_cli(capsys, cmd, "--help")
        assert code == 0 and "usage: fxopt " + cmd in out


def test_explain_lora_json_per_layer(capsys):
    code, out, err = run_cli(capsys, "explain", "llama", "--mode", "lora", "--json", "--seq", "16")
    assert code == 0, err
    res = json.loads(out)
    assert res["model_type"] == "llama" and res["graphs"] == 1 and res["graph_breaks"] == []
    per = {}
    for e in res["entries"]:
        if e["status"] == "matched":
            per.setdefault(e["block"], {}).setdefault(e["pattern"], 0)
            per[e["block"]][e["pattern"]] += 1
    for layer in ("layers.0", "layers.1"):
        assert per[layer] == {"attention": 1, "rms_norm": 2, "rope": 1, "swiglu": 1, "lora": 7}, per
    assert per["(outside layers)"] == {"rms_norm": 1, "linear_cross_entropy": 1}
    assert res["matched"]["lora"] == 14
    assert any(e["module"] == "self_attn.q_proj.lora_B.default" for e in res["entries"] if e["pattern"] == "lora")


def test_explain_table_shows_rejections(capsys):
    code, out, err = run_cli(capsys, "explain", "llama", "--keep-logits", "--seq", "16", "--options",
                             '{"disable": ["rope"]}')
    assert code == 0, err
    header = next(line for line in out.splitlines() if line.startswith("block"))
    assert "rms_norm" in header and "rope" not in header            # disabled: no column
    assert "layers.0" in out and "layers.1" in out
    assert "linear_cross_entropy x1 [(outside layers)]" in out and "graph output" in out
    assert "0 graph break(s)" in out


@pytest.mark.slow
def test_explain_folder(tmp_path, capsys):
    from tests.helpers import tiny_model
    tiny_model("qwen2").save_pretrained(tmp_path)
    code, out, err = run_cli(capsys, "explain", str(tmp_path), "--json", "--seq", "8")
    assert code == 0, err
    res = json.loads(out)
    assert res["model_type"] == "qwen2" and res["matched"]["rms_norm"] == 5 and res["matched"]["attention"] == 2


@pytest.mark.parametrize("argv,msg", [
    (["lama"], "unknown architecture 'lama'"),
    (["/no/such/folder"], "no such file or folder"),
    (["llama", "--options", '{"bogus": 1}'], "unknown fxopt option"),
    (["llama", "--options", "{not json"], "not valid JSON"),
])
def test_explain_errors(capsys, argv, msg):
    code, _, err = run_cli(capsys, "explain", *argv)
    assert code == 2 and msg in err and "Traceback" not in err


def test_explain_folder_without_config(tmp_path, capsys):
    code, _, err = run_cli(capsys, "explain", str(tmp_path))
    assert code == 2 and "no config.json" in err


def test_block_of():
    assert block_of("base_model.model.model.layers.3.mlp.down_proj") == ("layers.3", "mlp.down_proj")
    assert block_of("transformer.h.0.attn") == ("h.0", "attn")
    assert block_of("lm_head") == ("(outside layers)", "lm_head")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_bench_without_gpu(capsys):
    code, _, err = run_cli(capsys, "bench", "kernels")
    assert code == 2 and "needs a CUDA GPU" in err


def test_bench_suite_list():
    # runs on the CPU (no GPU needed to list); a subprocess, as the real command is
    r = subprocess.run([sys.executable, "-m", "fxopt", "bench", "suite", "quick", "--list"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "1b-lora-b4x2048-nogc-fxopt" in r.stdout
