"""TRL `SFTTrainer` + peft LoRA on a `datasets` Dataset of English text, the layers compiled with fxopt.

    python examples/trl_sft.py                       # tiny random Llama, in-memory tokenizer
    python examples/trl_sft.py --model PATH_OR_NAME  # your model and its tokenizer

TRL (>= 1.0) computes the SFT loss with its own chunked LM head (`fused_lm_head`), which dynamo splits into
several graphs. So compile only the decoder stack: `fxopt.hf.compile_for_trainer(model, backbone_only=True)`;
the layers (norms, RoPE, attention, MLP, LoRA) get fxopt's kernels, TRL keeps its head.
Three settings matter (all below):
  - bf16 weights and bf16=False, not SFTConfig's default autocast: under autocast q/k/v reach attention in
    different dtypes and fxopt rejects it.
  - gradient_checkpointing=False (SFTConfig turns it on by default): fxopt's `memory_budget` option plans
    recomputation by cost instead of recomputing whole layers (checkpointed layers are matched too).
  - sequences of one fixed length (pad_to_multiple_of=max_length): with varying lengths dynamo recompiles with
    symbolic shapes and fxopt rejects attention there ("symbolic q/k/v shapes").
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
    p.add_argument("--model", help="a local folder or hub name (default: a tiny random Llama)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="weights dtype (default: bfloat16 on CUDA, float32 on CPU); no autocast either way")
    p.add_argument("--no-inductor", action="store_true", help="hand off to aot_eager (fast compile, CPU tests)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from trl import SFTConfig, SFTTrainer

    import fxopt
    import fxopt.hf

    args = parse_args(argv)
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model)
    else:
        tok = offline_text.train_tokenizer()
        model = offline_text.tiny_llama(len(tok))
    # bf16 weights instead of SFTConfig's default autocast (bf16=True), under which fxopt rejects attention
    model.to(getattr(torch, args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")))
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    fxopt.hf.compile_for_trainer(model, backbone_only=True, inductor=not args.no_inductor)
    # paragraphs of >= 400 characters are longer than max_length tokens, so every row is cut to max_length
    data = offline_text.text_dataset(args.steps * args.batch, min_chars=400)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SFTConfig(output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=args.batch,
                        learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                        report_to=[], disable_tqdm=True, seed=0, max_length=args.max_length,
                        pad_to_multiple_of=args.max_length, dataset_text_field="text", gradient_checkpointing=False,
                        bf16=False)
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok)
        trainer.train()
    losses = offline_text.loss_curve(trainer.state.log_history)
    return offline_text.check_run(losses)


if __name__ == "__main__":
    main()
