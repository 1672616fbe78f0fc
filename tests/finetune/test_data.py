"""fxopt.finetune.data: file formats, chat/instruction rendering with prompt masking, packing, no cross-document
leakage through fxopt's compiled attention."""
import json

import pytest
import torch

import fxopt
from fxopt.finetune import FinetuneError
from fxopt.finetune import data as D

from tests.finetune.conftest import write_jsonl
from tests.helpers import rel


@pytest.fixture(scope="module")
def tok(model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "txt", "saved"])
def test_formats(fmt, paragraphs, tok, tmp_path):
    import datasets
    texts = [p[:300] for p in paragraphs[:12]]
    ds = datasets.Dataset.from_dict({"text": texts})
    path = tmp_path / f"d.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, [{"text": t} for t in texts])
    elif fmt == "json":
        path.write_text(json.dumps([{"text": t} for t in texts]))
    elif fmt == "csv":
        ds.to_csv(str(path))
    elif fmt == "parquet":
        ds.to_parquet(str(path))
    elif fmt == "txt":
        path.write_text("\n".join(t.replace("\n", " ") for t in texts))
    else:
        ds.save_to_disk(str(path))
    raw = D.load_raw(str(path), cache_dir=str(tmp_path / "hf"))
    assert len(raw) == 12 and raw.column_names == ["text"]
    out, info = D.prepare(raw, tok, seq_len=64, cache_dir=str(tmp_path / "c"), log=lambda m: None)
    n_tok = sum(len(r) for r in out["input_ids"])
    assert all(len(r) <= 64 for r in out["input_ids"]) and n_tok >= 12 * 30
    assert info["cache_hit"] is False


def test_chat_template_and_prompt_masking(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"},
            {"role": "assistant", "content": "A mutable sequence."}, {"role": "user", "content": "And a tuple?"},
            {"role": "assistant", "content": "An immutable one."}]
    t = D.Tokenize(tok, "messages", ("messages",), 256, mask_prompts=True, truncate=True)
    ids, labels = t.one({"messages": msgs})
    full = list(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
    assert ids == full     # the template already ends each turn with <eos>
    kept = tok.decode([i for i, lab in zip(ids, labels) if lab != D.IGNORE])
    assert "A mutable sequence." in kept and "An immutable one." in kept
    assert "What is a list" not in kept and "Be brief" not in kept and "tuple" not in kept
    t2 = D.Tokenize(tok, "messages", ("messages",), 256, mask_prompts=False, truncate=True)
    assert t2.one({"messages": msgs})[1] == ids


def test_instruction_without_chat_template(tok):
    import copy
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    kind, fields = D.detect_format(["instruction", "input", "output"])
    assert (kind, fields) == ("pair", ("instruction", "input", "output"))
    t = D.Tokenize(plain, kind, fields, 256, mask_prompts=True, truncate=True)
    ids, labels = t.one({"instruction": "Sort the list.", "input": "[3, 1]", "output": "[1, 3]"})
    kept = [i for i, lab in zip(ids, labels) if lab != D.IGNORE]
    assert plain.decode(kept) == "[1, 3]<eos>"
    assert plain.decode(ids).startswith("Sort the list.\n\n[3, 1]\n")
    with pytest.raises(FinetuneError, match="no chat template"):
        D.Tokenize(plain, "messages", ("messages",), 64, True, True).one({"messages": [{"role": "user",
                                                                                        "content": "x"}]})


def test_pack():
    docs = {"input_ids": [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16], [17, 18]],
            "labels": [[5, 6, 7], [-100, 9], [10, 11, 12, 13, 14, 15, 16], [17, 18]]}
    out = D.Pack(5)(docs)
    assert out["input_ids"] == [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [15, 16, 17, 18]]
    assert out["position_ids"] == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4], [0, 1, 0, 1]]
    assert out["labels"] == [[-100, 6, 7, -100, 9], [-100, 11, 12, 13, 14], [-100, 16, -100, 18]]
    b = D.collate([{k: out[k][i] for k in out} for i in (0, 2)], pad_id=0, packing=True)
    assert b["input_ids"].shape == (1, 9) and "attention_mask" not in b
    assert b["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 1, 0, 1]


def test_streaming(jsonl, tok, tmp_path):
    raw = D.load_raw(jsonl, streaming=True)
    ds, _ = D.prepare(raw, tok, seq_len=64, log=lambda m: None)
    rows = list(ds.take(5))
    assert len(rows) == 5 and all(len(r["input_ids"]) <= 64 and r["position_ids"][0] == 0 for r in rows)


def test_no_cross_document_leakage(model_dir, paragraphs, tok, fresh_dynamo):
    """Row = [doc B, doc A] packed, position_ids restarting, loss on A only. Changing B must not change A's loss,
    which must equal A's loss alone; through fxopt (aot_eager) and eager. Contiguous positions (no restart) do leak:
    the check sees a leak when there is one."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir).train()
    model.loss_type = "ForCausalLM"
    a = tok(paragraphs[3])["input_ids"][:40]
    b1 = tok(paragraphs[5])["input_ids"][:30]
    b2 = tok(paragraphs[9])["input_ids"][:30]
    assert b1 != b2 and len(b2) == 30

    def row(b, restart=True):
        ids = torch.tensor([b + a])
        pos = torch.tensor([list(range(len(b))) + list(range(len(a)))]) if restart else \
            torch.arange(len(b) + len(a))[None]
        labels = torch.tensor([[-100] * (len(b) + 1) + a[1:]])
        return dict(input_ids=ids, position_ids=pos, labels=labels)

    alone = model(input_ids=torch.tensor([a]), labels=torch.tensor([a])).loss
    cm = torch.compile(model, backend="fxopt", options={"inductor": False})
    for fn in (model, cm):
        l1, l2 = fn(**row(b1)).loss, fn(**row(b2)).loss
        assert rel(l1, l2) < 1e-6 and rel(l1, alone) < 1e-5, (l1.item(), l2.item(), alone.item())
    rep = fxopt.last_report()
    assert rep.matched.get("attention", 0) == 2, rep
    leak1, leak2 = model(**row(b1, False)).loss, model(**row(b2, False)).loss
    assert rel(leak1, leak2) > 1e-4


def test_num_proc_and_cache(paragraphs, tok, tmp_path, monkeypatch):
    import datasets
    raw = datasets.Dataset.from_dict({"text": [p[:200] for p in paragraphs[:130]]})
    one, _ = D.prepare(raw, tok, seq_len=64, packing=False, cache_dir=str(tmp_path / "a"), log=lambda m: None)
    two, info = D.prepare(raw, tok, seq_len=64, packing=False, num_proc=2, cache_dir=str(tmp_path / "b"),
                          log=lambda m: None)
    assert len(info["cache_files"]) == 2 and info["cache_hit"] is False
    assert one["input_ids"] == two["input_ids"] and one["labels"] == two["labels"]
    monkeypatch.setattr(D.Tokenize, "__call__", lambda self, b: pytest.fail("tokenized again"))
    again, info2 = D.prepare(raw, tok, seq_len=64, packing=False, num_proc=2, cache_dir=str(tmp_path / "b"),
                             log=lambda m: None)
    assert info2["cache_hit"] is True and again["input_ids"] == two["input_ids"]


def test_cache_follows_the_data(paragraphs, tok, tmp_path):
    """Same file -> cache hit; edited file -> tokenized again (datasets' fingerprint of the loaded files)."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": p} for p in paragraphs[:10]])
    prep = lambda: D.prepare(D.load_raw(path, cache_dir=str(tmp_path / "hf")), tok, seq_len=64,   # noqa: E731
                             cache_dir=str(tmp_path / "c"), log=lambda m: None)[1]["cache_hit"]
    assert [prep(), prep()] == [False, True]
    import time
    time.sleep(0.01)
    write_jsonl(path, [{"text": p} for p in paragraphs[1:11]])
    assert prep() is False
