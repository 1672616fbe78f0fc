"""`fxopt finetune` end to end on the CPU: a tiny random Llama (saved to a temp folder, BPE tokenizer trained on
the Python docs) and real English text (pydoc_data). aot_eager hand-off (inductor is off on the CPU by default);
fxopt's ops run their PyTorch references (see `reference_kernels`)."""
import json
import os
import re

import pytest
import torch

import fxopt
from fxopt.finetune import FinetuneError, finetune
from fxopt.finetune import data as D

from tests.finetune.conftest import kw, write_jsonl
from tests.helpers import rel


@pytest.fixture(scope="module", autouse=True)
def reference_kernels():
    """fxopt's ops run their PyTorch reference here (each Triton kernel is tested under the interpreter in
    tests/kernels; test_data.py's leakage test runs attention in the interpreter): training steps take ~0.1 s."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        yield


@pytest.fixture(scope="module")
def run(reference_kernels, model_dir, jsonl, tmp_path_factory):
    """4 steps (lr 1e-2 so the adapter is far from zero), checkpoints every 2, adapter + merged export."""
    tmp = tmp_path_factory.mktemp("run")
    return finetune(model_dir, jsonl, **kw(tmp, max_steps=4, save_steps=2, lr=1e-2, warmup_ratio=0.0)), tmp


def test_end_to_end(run):
    r, tmp = run
    assert r.steps == 4 and len(r.losses) == 4 and all(torch.isfinite(torch.tensor(r.losses)))
    assert r.precision == "fp32" and r.data_info["format"] == "text" and r.data_info["cache_hit"] is False
    assert r.losses[-1] < r.losses[0]
    rows = [json.loads(line) for line in open(os.path.join(r.output_dir, "log.jsonl"))]
    assert [x["step"] for x in rows] == [1, 2, 3, 4] and {"loss", "lr", "tok_s", "mem_gib"} <= set(rows[0])
    assert "seq_len 128" in open(os.path.join(r.output_dir, "finetune.log")).read()
    assert os.path.exists(os.path.join(r.adapter_dir, "adapter_config.json"))
    assert os.path.exists(os.path.join(r.adapter_dir, "adapter_model.safetensors"))
    assert os.path.exists(os.path.join(r.output_dir, "checkpoint-2", "training_state.pt"))
    rep = fxopt.last_report()          # the compiled model got fxopt's kernels
    assert rep.matched.get("lora", 0) > 0 and rep.matched.get("attention", 0) > 0


def test_second_run_hits_the_tokenize_cache(run, model_dir, jsonl, monkeypatch):
    r, tmp = run
    files = r.data_info["cache_files"]
    mtimes = [os.path.getmtime(f) for f in files]
    calls = []
    for cls in (D.Tokenize, D.Pack):
        orig = cls.__call__
        monkeypatch.setattr(cls, "__call__", lambda self, b, _o=orig: calls.append(1) or _o(self, b))
    r2 = finetune(model_dir, jsonl, **kw(tmp, output_dir=str(tmp / "out2"), max_steps=1, compile=False, export=""))
    assert r2.data_info["cache_hit"] is True and r2.data_info["cache_files"] == files
    assert calls == [], "tokenized again despite the cache"
    assert [os.path.getmtime(f) for f in files] == mtimes
    assert r2.losses[0] == pytest.approx(r.losses[0], rel=1e-5)    # same data order, same init


def test_merged_export_matches_trained_model(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    r, _ = run
    merged = AutoModelForCausalLM.from_pretrained(r.merged_dir).eval()
    tok = AutoTokenizer.from_pretrained(r.merged_dir)
    ids = tok("Exceptions are raised when an error occurs.", return_tensors="pt")["input_ids"]
    r.model.eval()
    with torch.no_grad():
        want = r.model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        with r.model.disable_adapter():
            base = r.model(input_ids=ids).logits
    assert rel(got, want) < 1e-5
    assert rel(base, want) > 1e-3, "adapter has no effect: the test would not see a bad merge"
    out = merged.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4
    r.model.train()


def test_resume_gives_the_same_losses(run, model_dir, jsonl, tmp_path):
    r, _ = run
    ckpt = os.path.join(r.output_dir, "checkpoint-2")
    r2 = finetune(model_dir, jsonl, **kw(tmp_path, max_steps=4, save_steps=2, lr=1e-2, warmup_ratio=0.0,
                                         resume=ckpt, export="", cache_dir=os.path.dirname(
                                             r.data_info["cache_files"][0])))
    assert r2.steps == 4 and len(r2.losses) == 2
    for a, b in zip(r2.losses, r.losses[2:]):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6)


def test_defaults_from_the_cli(model_dir, paragraphs, tmp_path, monkeypatch, capsys):
    """`fxopt finetune --model DIR --data FILE` alone: seq 1024 capped at max_position_embeddings (256), one epoch."""
    from fxopt import cli
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in paragraphs[100:108]])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        cli.main(["finetune", "--model", model_dir, "--data", data])
    assert e.value.code == 0
    out, err = capsys.readouterr()
    assert "loss=" in err and "tok_s=" in err and "mem=" in err      # the progress bar
    assert "merged:" in out and "adapter:" in out
    od = tmp_path / ("fxopt-finetune-" + os.path.basename(model_dir))
    log = open(od / "finetune.log").read()
    assert "seq_len 256" in log and "precision fp32" in log
    n_rows = int(re.search(r"^data: .*; (\d+) rows$", log, re.M).group(1))
    assert "packing: 8 documents" in log and "% padding" in log
    assert len(open(od / "log.jsonl").readlines()) == n_rows     # one epoch, batch 1
    assert os.path.exists(od / "merged" / "model.safetensors")


@pytest.mark.parametrize("case", ["no_model", "no_config", "no_data", "empty", "empty_file", "blank_texts",
                                  "unknown_column", "seq_too_long", "no_text", "bad_budget", "fp16_on_cpu"])
def test_bad_input(case, model_dir, jsonl, tmp_path):
    args = dict(model=model_dir, data=jsonl)
    extra, msg = {}, None
    if case == "no_model":
        args["model"], msg = str(tmp_path / "nope"), "model folder not found"
    elif case == "no_config":
        args["model"], msg = str(tmp_path), "not a Hugging Face model folder"
    elif case == "no_data":
        args["data"], msg = str(tmp_path / "missing.jsonl"), "data not found"
    elif case == "empty":
        (tmp_path / "empty.csv").write_text("text\n")
        args["data"], msg = str(tmp_path / "empty.csv"), "empty"
    elif case == "empty_file":
        (tmp_path / "e.jsonl").write_text("")
        args["data"], msg = str(tmp_path / "e.jsonl"), "the dataset is empty"
    elif case == "blank_texts":
        args["data"] = write_jsonl(tmp_path / "b.jsonl", [{"text": ""}, {"text": ""}])
        msg = "has 2 rows but no trainable tokens"
    elif case == "unknown_column":
        extra, msg = {"text_field": "body"}, "column 'body' not in the dataset; its columns are ['text']"
    elif case == "seq_too_long":
        extra, msg = {"seq_len": 1000}, "longer than the model supports (max_position_embeddings = 256)"
    elif case == "no_text":
        args["data"] = write_jsonl(tmp_path / "x.jsonl", [{"body": "a"}])
        msg = "no known columns"
    elif case == "bad_budget":
        extra, msg = {"memory_budget": "lots"}, "lots"
    elif case == "fp16_on_cpu":
        extra, msg = {"precision": "fp16", "device": "cpu"}, "fp16 needs a CUDA device"
    k = kw(tmp_path, **extra)
    if "seq_len" in extra:
        k["seq_len"] = extra["seq_len"]
    with pytest.raises(FinetuneError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        finetune(args["model"], args["data"], **k)


def test_bad_input_cli_message(tmp_path, capsys):
    from fxopt import cli
    with pytest.raises(SystemExit) as e:
        cli.main(["finetune", "--model", str(tmp_path / "nope"), "--data", "x.jsonl"])
    assert e.value.code == 2
    assert "model folder not found" in capsys.readouterr().err


@pytest.mark.slow
def test_qlora_merges_into_bf16(model_dir, jsonl, tmp_path):
    """QLoRA (bitsandbytes NF4 on the CPU): the merged export is plain bf16 and computes what was trained."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM
    r = finetune(model_dir, jsonl, **kw(tmp_path, qlora=True, max_steps=2, lr=1e-2, warmup_ratio=0.0, seq_len=64,
                                        save_steps=None))
    assert fxopt.last_report().matched.get("lora_nf4", 0) > 0
    merged = AutoModelForCausalLM.from_pretrained(r.merged_dir).eval()
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert json.load(open(os.path.join(r.merged_dir, "config.json"))).get("quantization_config") is None
    ids = torch.tensor([list(range(3, 40))])
    r.model.eval()
    with torch.no_grad():
        want = r.model(input_ids=ids).logits.float()
        got = merged.float()(input_ids=ids).logits
        with r.model.disable_adapter():
            base = r.model(input_ids=ids).logits.float()
    print(f"qlora merged vs trained: rel {rel(got, want):.2e}; base vs trained: rel {rel(base, want):.2e}")
    assert rel(got, want) < 2e-2, rel(got, want)      # bf16 weights
    assert rel(base, want) > 5 * rel(got, want)


def test_streaming_and_padded_batches(model_dir, jsonl, tmp_path):
    """streaming=True (IterableDataset, needs max_steps) and packing=False (right-padded batches + attention_mask,
    batch 3, grad accumulation 2)."""
    with pytest.raises(FinetuneError, match="pass max_steps"):
        finetune(model_dir, jsonl, **kw(tmp_path, streaming=True, compile=False, export=""))
    r = finetune(model_dir, jsonl, **kw(tmp_path, streaming=True, max_steps=2, compile=False, export=""))
    assert len(r.losses) == 2 and r.data_info["cache_hit"] is None
    r = finetune(model_dir, jsonl, **kw(tmp_path, packing=False, batch_size=3, grad_accum=2, max_steps=2,
                                        export="adapter", output_dir=str(tmp_path / "o2")))
    assert len(r.losses) == 2 and all(x == x for x in r.losses)
    assert r.data_info["pad_fraction_at_seq_len"] > 0
