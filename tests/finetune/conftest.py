"""Fixtures for the finetune tests: a tiny random Llama saved with an offline BPE tokenizer, real-text data files."""
import json
import os

import pytest

from tests.examples.test_examples import load

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")   # num_proc forks after the tokenizer ran

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="session")
def offline():
    return load("offline_text")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, offline):
    """A 2-layer hidden-64 Llama (random) + a 512-token BPE trained on the Python docs, saved as an HF folder."""
    d = tmp_path_factory.mktemp("tiny_llama")
    tok = offline.train_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    m = offline.tiny_llama(len(tok), max_position_embeddings=256)
    m.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def paragraphs(offline):
    return offline.paragraphs()


@pytest.fixture(scope="session")
def jsonl(tmp_path_factory, paragraphs):
    """40 paragraphs of the Python docs, one {"text"} per line."""
    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(p, "w") as f:
        for t in paragraphs[:40]:
            f.write(json.dumps({"text": t[:400]}) + "\n")
    return str(p)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


FAST = dict(seq_len=128, progress=False, quiet=True, num_proc=None)


def kw(tmp_path, **over):
    d = dict(FAST, output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    d.update(over)
    return d

