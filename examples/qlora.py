"""QLoRA: a 4-bit NF4 base (bitsandbytes `BitsAndBytesConfig`) + peft LoRA, trained by `Trainer`, compiled with fxopt.

    python examples/qlora.py                        # tiny random Llama saved to a temp folder, then loaded in 4 bit
    python examples/qlora.py --model PATH_OR_NAME   # your model

Quantization happens in `from_pretrained`, so the tiny model is first saved with `save_pretrained`. fxopt matches
the LoRA layers on NF4 weights (`lora_nf4`: dequantize fused into the GEMM on the GPU). bitsandbytes >= 0.48 runs
NF4 on the CPU too, so this runs anywhere; on the CPU fxopt's ops run their PyTorch reference.
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
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--compute-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--no-inductor", action="store_true", help="hand off to aot_eager (fast compile, CPU tests)")
    return p.parse_args(argv)


def load_4bit(folder, compute_dtype):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=getattr(torch, compute_dtype))
    device_map = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, device_map=device_map,
                                                dtype=getattr(torch, compute_dtype))


def main(argv=None) -> dict:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    import fxopt
    import fxopt.hf

    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            folder, tok = args.model, AutoTokenizer.from_pretrained(args.model)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
        else:
            tok = offline_text.train_tokenizer()
            folder = os.path.join(tmp, "tiny-llama")
            offline_text.tiny_llama(len(tok)).save_pretrained(folder)
        model = load_4bit(folder, args.compute_dtype)
        model.config.use_cache = False
        # Checkpointing off: fxopt can plan recomputation by cost itself (memory_budget).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        model.print_trainable_parameters()
        fxopt.hf.compile_for_trainer(model, inductor=not args.no_inductor)

        data = offline_text.token_blocks(tok, args.seq_len, n_blocks=args.steps * args.batch)
        targs = TrainingArguments(output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=args.batch,
                                  learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=1,
                                  save_strategy="no", report_to=[], disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=targs, train_dataset=data)
        trainer.train()
    losses = offline_text.loss_curve(trainer.state.log_history)
    report = fxopt.last_report()
    print(report)
    assert report is not None and report.matched.get("lora_nf4", 0) > 0, "fxopt matched no LoRA layer on NF4 weights"
    k = max(1, len(losses) // 5)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(f"loss: first {k} steps {first:.3f} -> last {k} steps {last:.3f}")
    assert last < first, f"loss did not decrease: {first:.3f} -> {last:.3f}"
    return dict(losses=losses, matched=report.matched, rejected=len(report.rejected))


if __name__ == "__main__":
    main()
