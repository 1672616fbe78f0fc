"""Data for `fxopt finetune`: load a local file or `datasets` folder, render, tokenize (cached), pack.

Row formats, found from the columns (or `text_field`):
  messages                 -> the tokenizer's chat template (each message's tokens found by rendering prefixes);
                              only assistant tokens are trained on when `mask_prompts`
  prompt + completion      -> chat template as a user/assistant pair if the tokenizer has one, else concatenated
  instruction [+ input] + output   (alpaca) -> same as prompt + completion
  text (or `text_field`)   -> plain text
Every document ends with EOS. Labels are -100 where no loss is wanted.

Tokenizing runs `Dataset.map(num_proc=...)` with a fingerprint we compute from the data's fingerprint, the tokenizer
files and the options, and writes to `cache_dir`; a second run with the same inputs loads the cache file instead.

Packing (padding-free): documents are concatenated greedily (in order) into rows of at most `seq_len` tokens;
position_ids restart at 0 for each document, and the first token of each document has label -100 (the token before
it belongs to another document). Transformers turns restarting position_ids (with attention_mask=None) into a
block-diagonal mask, so no token attends across a document boundary.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os

IGNORE = -100
_EXT = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text", ".text": "text",
        ".md": "text"}


class FinetuneError(ValueError):
    """Bad input to `fxopt finetune` (the message says what and how to fix it)."""


def load_raw(path: str, *, streaming: bool = False, cache_dir: str | None = None):
    """A `datasets.Dataset` (or `IterableDataset` when streaming) from a local file, glob or `save_to_disk` folder."""
    import datasets
    if not glob.glob(path):
        raise FinetuneError(f"data not found: {path!r} (a local JSON/JSONL/CSV/Parquet/text file or a datasets folder)")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_info.json")) or \
                os.path.exists(os.path.join(path, "dataset_dict.json")) or \
                os.path.exists(os.path.join(path, "state.json")):
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
            return ds.to_iterable_dataset() if streaming else ds
        files = sorted(f for f in glob.glob(os.path.join(path, "*")) if os.path.splitext(f)[1].lower() in _EXT)
        if not files:
            raise FinetuneError(f"{path!r} is a folder with neither a saved dataset nor data files "
                                f"({', '.join(sorted(_EXT))})")
    else:
        files = sorted(glob.glob(path))
    if all(os.path.getsize(f) == 0 for f in files):
        raise FinetuneError(f"the dataset is empty: {files} (0 bytes)")
    kinds = {_EXT.get(os.path.splitext(f)[1].lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        raise FinetuneError(f"cannot tell the format of {files}: use one kind of file among {sorted(_EXT)}")
    try:
        ds = datasets.load_dataset(kinds.pop(), data_files=files, split="train", streaming=streaming,
                                   cache_dir=cache_dir)
    except Exception as e:   # datasets raises many kinds; an empty file is the common one
        raise FinetuneError(f"could not read {path!r} as a dataset: {type(e).__name__}: {e}") from e
    return ds


def detect_format(columns, text_field: str | None = None) -> tuple[str, tuple[str, ...]]:
    """(kind, fields) with kind in text/messages/pair; raises FinetuneError naming the columns."""
    cols = list(columns or [])
    if text_field is not None:
        if text_field not in cols:
            raise FinetuneError(f"column {text_field!r} not in the dataset; its columns are {cols}")
        return ("messages" if text_field in ("messages", "conversations") else "text"), (text_field,)
    for c in ("messages", "conversations"):
        if c in cols:
            return "messages", (c,)
    if "prompt" in cols and "completion" in cols:
        return "pair", ("prompt", "completion")
    if "instruction" in cols and "output" in cols:
        return "pair", ("instruction", "input", "output") if "input" in cols else ("instruction", "output")
    if "text" in cols:
        return "text", ("text",)
    raise FinetuneError(f"no known columns in the dataset ({cols}): expected 'text', 'messages', "
                        "'prompt'+'completion' or 'instruction'+'output'; or pass text_field=")


def _norm_messages(msgs):
    out = []
    for m in msgs:   # ShareGPT ({"from", "value"}) -> {"role", "content"}
        if "role" in m:
            out.append({"role": m["role"], "content": m["content"]})
        else:
            role = {"human": "user", "gpt": "assistant"}.get(m.get("from"), m.get("from"))
            out.append({"role": role, "content": m.get("value", "")})
    return out


class Tokenize:
    """Row -> {"input_ids", "labels"}; a plain class so datasets can pickle it into worker processes."""

    def __init__(self, tokenizer, kind, fields, seq_len, mask_prompts, truncate):
        self.tok, self.kind, self.fields = tokenizer, kind, fields
        self.seq_len, self.mask_prompts, self.truncate = seq_len, mask_prompts, truncate
        self.chat = getattr(tokenizer, "chat_template", None) is not None

    def _ids(self, text, special=True):
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def _chat_ids(self, msgs):
        return list(self.tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])

    def _messages(self, msgs):
        if not self.chat:
            raise FinetuneError("the data has chat messages but the tokenizer has no chat template "
                                "(set one, or use a 'text' column)")
        ids, labels, prev = [], [], 0
        for i in range(len(msgs)):   # tokens of message i: render(msgs[:i+1]) minus render(msgs[:i])
            cur = self._chat_ids(msgs[:i + 1])
            new = cur[prev:]
            ids += new
            keep = msgs[i]["role"] == "assistant" or not self.mask_prompts
            labels += new if keep else [IGNORE] * len(new)
            prev = len(cur)
        return ids, labels

    def one(self, row):
        eos = self.tok.eos_token_id
        if self.kind == "text":
            ids = self._ids(row[self.fields[0]])
            labels = list(ids)
        elif self.kind == "messages":
            ids, labels = self._messages(_norm_messages(row[self.fields[0]]))
        else:
            prompt = "\n\n".join(str(row[f]) for f in self.fields[:-1] if row[f])
            answer = str(row[self.fields[-1]])
            if self.chat:
                ids, labels = self._messages([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": answer}])
            else:
                p = self._ids(prompt + "\n")
                a = self._ids(answer, special=False)
                ids = p + a
                labels = ([IGNORE] * len(p) if self.mask_prompts else list(p)) + a
        if eos is not None and (not ids or ids[-1] != eos):
            ids, labels = ids + [eos], labels + [eos]
        if self.truncate:
            ids, labels = ids[:self.seq_len], labels[:self.seq_len]
        return ids, labels

    def __call__(self, batch):
        out = {"input_ids": [], "labels": []}
        n = len(next(iter(batch.values())))
        for i in range(n):
            ids, labels = self.one({k: v[i] for k, v in batch.items()})
            if len(ids) > 1 and any(x != IGNORE for x in labels[1:]):
                out["input_ids"].append(ids)
                out["labels"].append(labels)
        return out


class Pack:
    """Greedy in-order packing of tokenized documents into rows of <= seq_len tokens (documents longer than
    seq_len are cut into pieces, each starting at position 0)."""

    def __init__(self, seq_len):
        self.seq_len = seq_len

    def __call__(self, batch):
        out = {"input_ids": [], "labels": [], "position_ids": []}
        row = {k: [] for k in out}

        def flush():
            if row["input_ids"]:
                for k in out:
                    out[k].append(row[k][:])
                    row[k].clear()

        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            for s in range(0, len(ids), self.seq_len):
                piece, lab = ids[s:s + self.seq_len], list(labels[s:s + self.seq_len])
                if len(piece) < 2:
                    continue
                if len(row["input_ids"]) + len(piece) > self.seq_len:
                    flush()
                lab[0] = IGNORE   # predicted from the previous document's last token
                row["input_ids"] += piece
                row["labels"] += lab
                row["position_ids"] += list(range(len(piece)))
        flush()
        return out


def _hash_files(folder):
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "chat_template")):
            with open(os.path.join(folder, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def prepare(raw, tokenizer, *, seq_len: int, text_field=None, mask_prompts=False, packing=True, num_proc=None,
            cache_dir: str | None = None, tokenizer_id: str = "", log=print):
    """Tokenized (and packed) dataset; returns (dataset, info dict with cache_hit and token counts)."""
    import datasets
    kind, fields = detect_format(raw.column_names, text_field)
    tok_fn = Tokenize(tokenizer, kind, fields, seq_len, mask_prompts, truncate=not packing)
    info = {"format": kind, "fields": fields, "cache_hit": None}
    streaming = isinstance(raw, datasets.IterableDataset)
    if streaming:
        ds = raw.map(tok_fn, batched=True, remove_columns=raw.column_names)
        if packing:
            ds = ds.map(Pack(seq_len), batched=True, batch_size=256)
        return ds, info
    if len(raw) == 0:
        raise FinetuneError("the dataset is empty (0 rows)")
    key = json.dumps([raw._fingerprint, tokenizer_id, getattr(tokenizer, "chat_template", None), kind, fields, seq_len,
                      mask_prompts, packing, tokenizer.eos_token_id, 1], default=str)
    fp = hashlib.sha256(key.encode()).hexdigest()[:32]
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "fxopt", "finetune")
    os.makedirs(cache_dir, exist_ok=True)
    num_proc = num_proc if num_proc and len(raw) >= 64 * num_proc else None
    tok_file = os.path.join(cache_dir, f"tok-{fp}.arrow")
    pack_file = os.path.join(cache_dir, f"pack-{fp}.arrow")
    final = pack_file if packing else tok_file
    info["cache_hit"] = bool(glob.glob(final[:-6] + "*.arrow"))
    if info["cache_hit"]:
        log(f"tokenized data: cache hit ({final})")
    ids = datasets.Sequence(datasets.Value("int64"))
    feats = datasets.Features({"input_ids": ids, "labels": ids})
    ds = raw.map(tok_fn, batched=True, remove_columns=raw.column_names, num_proc=num_proc, features=feats,
                 cache_file_name=tok_file, new_fingerprint="tok-" + fp, desc="tokenizing")
    if len(ds) == 0:
        raise FinetuneError(f"the dataset has {len(raw)} rows but no trainable tokens after tokenizing "
                            f"(empty {fields[-1]!r} fields?)")
    info.update(_length_stats(ds, seq_len))
    if packing:
        feats = datasets.Features({"input_ids": ids, "labels": ids, "position_ids": ids})
        ds = ds.map(Pack(seq_len), batched=True, batch_size=1000, cache_file_name=pack_file, features=feats,
                    new_fingerprint="pack-" + fp, desc="packing")
        info["packed_rows"] = len(ds)
        if len(ds):
            info["packed_fill"] = info["tokens"] / (len(ds) * seq_len)
            log(f"packing: {info['documents']} documents, {info['tokens']} tokens in {len(ds)} rows of <= {seq_len} "
                f"({100 * info['packed_fill']:.0f}% full); padding each document to {seq_len} would be "
                f"{100 * info['pad_fraction_at_seq_len']:.0f}% padding")
    info["cache_files"] = [c["filename"] for c in ds.cache_files]
    return ds, info


def _length_stats(ds, seq_len):
    """Documents, tokens, and the padding fraction if every document were padded to seq_len (unpacked)."""
    import pyarrow.compute as pc
    lengths = pc.list_value_length(ds.data.column("input_ids"))
    n, tokens = len(lengths), int(pc.sum(lengths).as_py() or 0)
    kept = int(pc.sum(pc.min_element_wise(lengths, seq_len)).as_py() or 0)     # unpacked rows are truncated
    return {"documents": n, "tokens": tokens, "pad_fraction_at_seq_len": 1 - kept / (n * seq_len) if n else 0.0}


def collate(rows, pad_id: int, packing: bool):
    """Rows -> a batch. Packed: all rows concatenated into one (1, sum) row (padding-free; position_ids restart
    per document, attention_mask None). Padded: right-padded to the longest row with an attention_mask."""
    import torch
    if packing:
        cat = lambda k: torch.tensor([x for r in rows for x in r[k]], dtype=torch.long)[None]   # noqa: E731
        return {"input_ids": cat("input_ids"), "labels": cat("labels"), "position_ids": cat("position_ids")}
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, :k] = torch.tensor(r["input_ids"])
        labels[i, :k] = torch.tensor(r["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
