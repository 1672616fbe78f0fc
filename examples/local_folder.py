"""A model loaded from a local folder, fully fine-tuned in a plain PyTorch loop compiled with `torch.compile`.

    python examples/local_folder.py                 # saves a tiny random Llama + tokenizer to a temp folder first
    python examples/local_folder.py --model FOLDER  # any causal LM folder written by save_pretrained

No Trainer: `torch.compile(model, backend="fxopt", options=...)` returns a wrapper that trains like the model.
The loss is computed inside the compiled call from `labels`; only `.loss` is used, but the model still returns
its logits, so fxopt reports `linear_cross_entropy` as rejected with that reason (see examples/trainer_lora.py
and fxopt.hf.compile_for_trainer for the loss-only path that fuses it).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import offline_text  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a folder written by save_pretrained (default: a tiny random Llama, saved first)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--no-inductor", action="store_true", help="hand off to aot_eager (fast compile, CPU tests)")
    return p.parse_args(argv)


def save_tiny(folder):
    tok = offline_text.train_tokenizer()
    offline_text.tiny_llama(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)


def main(argv=None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if folder is None:
            folder = os.path.join(tmp, "tiny-llama")
            save_tiny(folder)
        elif not os.path.isdir(folder):
            raise SystemExit(f"no such folder: {folder}")
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(dev).train()
    model.config.use_cache = False
    compiled = torch.compile(model, backend="fxopt", options={"inductor": not args.no_inductor})
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    data = offline_text.token_blocks(tok, args.seq_len, n_blocks=args.steps * args.batch)
    ids_all = torch.tensor(data["input_ids"])
    losses = []
    for step in range(args.steps):
        ids = ids_all[step * args.batch:(step + 1) * args.batch].to(dev)
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        print(f"step {step}: loss {losses[-1]:.4f}", flush=True)
    return offline_text.check_run(losses)


if __name__ == "__main__":
    main()
