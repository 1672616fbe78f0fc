"""Real English text and a tokenizer without any download, for the examples.

CPython ships its documentation's topic pages in `pydoc_data.topics` (~465k characters of English prose and
code). A byte-level BPE tokenizer trains on it in memory in about 0.2 s (`tokenizers`), so the examples run
offline. With a real model, use its own tokenizer instead (`AutoTokenizer.from_pretrained`).
"""
from __future__ import annotations


def english_text() -> str:
    import pydoc_data.topics
    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def train_tokenizer(text: str | None = None, vocab_size: int = 512):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `text` (default: english_text())."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = english_text() if text is None else text
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((text[i:i + 2000] for i in range(0, len(text), 2000)), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def paragraphs(text: str | None = None, min_chars: int = 80) -> list[str]:
    text = english_text() if text is None else text
    return [p.strip() for p in text.split("\n\n") if len(p.strip()) >= min_chars]


def text_dataset(n: int | None = None, min_chars: int = 80):
    """`datasets.Dataset` with one column "text": paragraphs of the Python docs (for TRL's SFTTrainer)."""
    from datasets import Dataset
    ps = paragraphs(min_chars=min_chars)
    return Dataset.from_dict({"text": ps[:n] if n else ps})


def token_blocks(tokenizer, seq_len: int = 64, n_blocks: int | None = None):
    """`datasets.Dataset` of fixed-length blocks ("input_ids", "labels") cut from the tokenized text."""
    from datasets import Dataset
    text = english_text()
    if n_blocks is not None:   # ~2.5 characters per token with the 512-token BPE; 8 per token is plenty
        text = text[:n_blocks * seq_len * 8]
    ids = tokenizer(text)["input_ids"]
    n = len(ids) // seq_len if n_blocks is None else min(n_blocks, len(ids) // seq_len)
    blocks = [ids[i * seq_len:(i + 1) * seq_len] for i in range(n)]
    return Dataset.from_dict({"input_ids": blocks, "labels": [list(b) for b in blocks]})


def tiny_llama(vocab_size: int, layers: int = 2, hidden: int = 64, seed: int = 0, **overrides):
    """A small random Llama from a config (stand-in for `from_pretrained(...)` in the examples)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, head_dim=hidden // 4, vocab_size=vocab_size, max_position_embeddings=512,
              use_cache=False, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    kw.update(overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **kw))


def loss_curve(log_history) -> list[float]:
    """The training losses a Trainer logged (trainer.state.log_history)."""
    return [row["loss"] for row in log_history if "loss" in row]


def check_run(losses: list[float]) -> dict:
    """What every example asserts: fxopt matched something, and the loss went down (first vs last fifth)."""
    import fxopt
    report = fxopt.last_report()
    print(report)
    assert report is not None and sum(report.matched.values()) > 0, "fxopt matched nothing"
    k = max(1, len(losses) // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(f"loss: first {k} steps {first:.3f} -> last {k} steps {last:.3f}")
    assert last < first, f"loss did not decrease: {first:.3f} -> {last:.3f}"
    return dict(losses=losses, matched=report.matched, rejected=len(report.rejected))
