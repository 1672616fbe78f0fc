"""Fine-tune with transformers `Trainer` + peft LoRA, the model compiled with fxopt.

    python examples/trainer_lora.py                       # tiny random Llama, in-memory tokenizer, CPU or GPU
    python examples/trainer_lora.py --model PATH_OR_NAME  # your model and its tokenizer

The one line that matters: compile the model before it goes to the Trainer,
    fxopt.hf.compile_for_trainer(model, inductor=...)     # or: model.compile(backend="fxopt", options={...})
`TrainingArguments(torch_compile=True, torch_compile_backend="fxopt")` does not work: accelerate only accepts
its own list of backend names (ValueError: 'FXOPT' is not a valid DynamoBackend). Both ways compile in place,
so the Trainer still sees the PeftModel (saving, unwrapping and peft's helpers keep working). The helper also
checks the options at once and, in training, returns only the loss from the compiled forward, so lm_head and
the cross-entropy fuse (`linear_cross_entropy`); with plain `model.compile` the logits are a graph output and
that pattern is rejected with the reason. The data is English text that ships with CPython (offline_text.py).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import offline_text  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a local folder or hub name (default: a tiny random Llama)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="weights dtype (default: bfloat16 on CUDA, float32 on CPU); no autocast either way")
    p.add_argument("--no-inductor", action="store_true", help="hand off to aot_eager (fast compile, CPU tests)")
    p.add_argument("--plain-compile", action="store_true",
                   help='model.compile(backend="fxopt") instead of fxopt.hf.compile_for_trainer')
    p.add_argument("--output-dir", default=None, help="Trainer output_dir (default: a temporary folder)")
    return p.parse_args(argv)


def load(model_name):
    """(model, tokenizer): yours, or a tiny random Llama with a BPE tokenizer trained on the fly."""
    if model_name:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(model_name)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return AutoModelForCausalLM.from_pretrained(model_name), tok
    tok = offline_text.train_tokenizer()
    return offline_text.tiny_llama(len(tok)), tok


def lora(model, rank):
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, cfg)


def train(model, dataset, args, output_dir):
    from transformers import Trainer, TrainingArguments
    targs = TrainingArguments(output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch,
                              learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
                              save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
                              dataloader_num_workers=0)
    trainer = Trainer(model=model, args=targs, train_dataset=dataset)
    trainer.train()
    return offline_text.loss_curve(trainer.state.log_history)


def main(argv=None) -> dict:
    import tempfile

    import fxopt
    import fxopt.hf

    import torch

    args = parse_args(argv)
    model, tok = load(args.model)
    # bf16 weights, not autocast: under autocast q/k/v and lm_head's output change dtype inside the graph and
    # fxopt rejects attention and linear_cross_entropy (reasons in the report). peft keeps the adapters in fp32.
    model.to(getattr(torch, args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")))
    model.config.use_cache = False
    model = lora(model, args.rank)
    model.print_trainable_parameters()
    # Compile in place with fxopt; the Trainer gets the same (Peft)model object.
    if args.plain_compile:
        model.compile(backend="fxopt", options={"inductor": not args.no_inductor})
    else:
        fxopt.hf.compile_for_trainer(model, inductor=not args.no_inductor)
    data = offline_text.token_blocks(tok, args.seq_len, n_blocks=args.steps * args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        losses = train(model, data, args, args.output_dir or tmp)
    return offline_text.check_run(losses)


if __name__ == "__main__":
    main()
