"""Packed vs padded fine-tuning through `fxopt finetune` on the GPU: padding saved and tokens/s of real tokens.

Model: a random-init Llama (default 8 layers, hidden 1024, 16/4 heads) with a BPE tokenizer trained in memory on the
English text CPython ships (examples/offline_text.py), saved as a local HF folder. Data: that text's paragraphs, one
document each (lengths vary: that is what packing is for). Both runs: LoRA r=16, bf16, fxopt + Inductor, the same
documents, seq_len and batch; tok/s counts real (label-bearing or attended) tokens only, as finetune logs it, median
after the warm-up steps. Packed attention reads document ids (no dense mask) and skips other documents' blocks.

  python benchmarks/packing.py --out $OUT/packing_h200.json          # GPU, ~2-3 min
  python benchmarks/packing.py --device cpu --layers 2 --hidden 64 --steps 4 --seq 128 --out /tmp/p.json   # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# run as a script, benchmarks/ is sys.path[0] and its kernels.py shadows the `kernels` package bitsandbytes probes
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "examples"))   # offline_text, as the examples import it


def _median_tok_s(out_dir, skip):
    rows = [json.loads(x) for x in open(os.path.join(out_dir, "log.jsonl"))]
    vals = [r["tok_s"] for r in rows[skip:] if r.get("tok_s")]
    return statistics.median(vals) if vals else None


class _StepWatch:
    """Prints each new row of a finetune log.jsonl (step, loss, tok/s, seconds since start) from a thread: the GPU
    run of this script was once cut at 130 s with nothing to say where the time went."""

    def __init__(self, path, name, every=1.0):
        import threading
        self.path, self.name, self.every, self.t0 = path, name, every, time.time()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        seen, last = 0, False
        while not last:
            last = self.done.wait(self.every)
            try:
                with open(self.path) as f:
                    rows = [x for x in f.readlines() if x.endswith("\n")]
            except OSError:
                continue
            for line in rows[seen:]:
                r = json.loads(line)
                print(f"  {self.name} step {r['step']} loss {r['loss']:.4f} tok/s {r['tok_s']:.0f} "
                      f"[{time.time() - self.t0:.0f}s]", file=sys.stderr, flush=True)
            seen = len(rows)

    def stop(self):
        self.done.set()
        self.thread.join(timeout=5)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the median")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "packing.json"))
    a = p.parse_args(argv)
    import torch

    from benchmarks.kernel_bench.common import environment
    import offline_text as off

    from fxopt.finetune import finetune
    work = tempfile.mkdtemp(prefix="fxopt_packing_")
    tok = off.train_tokenizer(vocab_size=4096)
    model = off.tiny_llama(len(tok), layers=a.layers, hidden=a.hidden, max_position_embeddings=max(a.seq, 256),
                           num_attention_heads=max(1, a.hidden // 64), num_key_value_heads=max(1, a.hidden // 256), head_dim=64,
                           intermediate_size=int(a.hidden * 8 / 3) // 64 * 64 or 64)
    mdir = os.path.join(work, "model")
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    docs = off.paragraphs()
    data = os.path.join(work, "docs.jsonl")
    with open(data, "w") as f:
        for t in docs:
            f.write(json.dumps({"text": t}) + "\n")
    lengths = sorted(len(tok(t)["input_ids"]) for t in docs)
    # quiet=False: finetune's own log lines (data, packing fill) reach stderr, so a run cut short still says where it was
    common = dict(seq_len=a.seq, batch_size=a.batch, max_steps=a.steps, progress=False, quiet=False, save_steps=None,
                  export="", cache_dir=os.path.join(work, "cache"), device=a.device)
    res = dict(environment(), model=dict(layers=a.layers, hidden=a.hidden, vocab=len(tok)), seq_len=a.seq,
               batch=a.batch, steps=a.steps, documents=len(docs),
               doc_tokens=dict(median=lengths[len(lengths) // 2], p90=lengths[int(0.9 * len(lengths))],
                               max=lengths[-1]))
    def write():
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1, default=str)

    for name, packing in (("packed", True), ("padded", False)):
        t0 = time.time()
        print(f"{name}: start", file=sys.stderr, flush=True)
        watch = _StepWatch(os.path.join(work, name, "log.jsonl"), name)
        try:
            r = finetune(mdir, data, output_dir=os.path.join(work, name), packing=packing, **common)
        finally:
            watch.stop()
        res[name] = dict(tok_s=_median_tok_s(r.output_dir, a.skip), wall_s=round(time.time() - t0, 1),
                         final_loss=r.losses[-1] if r.losses else None, data_info=r.data_info,
                         peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2)
                         if torch.cuda.is_available() else None)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        print(f"{name}: {res[name]['tok_s']} tok/s, {res[name]['wall_s']} s", flush=True)
        write()   # after each run: a later run cut short leaves this one
    if res["packed"]["tok_s"] and res["padded"]["tok_s"]:
        res["speedup_packed_over_padded"] = round(res["packed"]["tok_s"] / res["padded"]["tok_s"], 3)
    write()
    print(json.dumps({k: res.get(k) for k in ("speedup_packed_over_padded", "doc_tokens")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
