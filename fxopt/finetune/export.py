"""Export after `fxopt finetune`: the LoRA adapter (peft format) and a merged model in plain HF format.

The merge reloads the base model from its folder (in its stored dtype), applies the saved adapter and folds
W + (alpha/r) B A into W (`merge_and_unload`), then writes safetensors + config + tokenizer.
QLoRA: the base weights the adapter was trained against are the NF4 ones, so the 4-bit layers of the trained model
are dequantized (bitsandbytes) into the bf16 base before the merge: the export computes what was trained (up to
bf16 rounding), in plain bf16 safetensors that transformers loads without bitsandbytes.
"""
from __future__ import annotations

import os

import torch


def export_adapter(model, tokenizer, out_dir: str) -> str:
    """peft `save_pretrained` (adapter_config.json + adapter_model.safetensors) and the tokenizer."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _dequantized_weights(trained) -> dict:
    """{base model weight name: dequantized weight} for the bitsandbytes 4-bit layers of a trained peft model."""
    import bitsandbytes as bnb
    out = {}
    for name, mod in trained.named_modules():
        w = getattr(mod, "weight", None)
        if getattr(w, "quant_state", None) is None:
            continue
        name = name.removeprefix("base_model.model.").removesuffix(".base_layer")
        out[name + ".weight"] = bnb.functional.dequantize_4bit(w.data, w.quant_state).detach().cpu()
    return out


def export_merged(base_dir: str, adapter_dir: str, out_dir: str, *, dtype="auto", tokenizer=None,
                  quantized_from=None) -> str:
    """Base model from `base_dir` + adapter from `adapter_dir`, merged, saved to `out_dir` (safetensors).
    quantized_from: the trained QLoRA peft model, whose dequantized 4-bit weights replace the base's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    if isinstance(dtype, str) and dtype != "auto":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(dtype) or \
            getattr(torch, dtype)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    if quantized_from is not None:
        deq = _dequantized_weights(quantized_from)
        params = dict(base.named_parameters())
        missing = set(deq) - set(params)
        if missing:
            raise ValueError(f"4-bit weights without a match in the base model: {sorted(missing)[:3]}")
        with torch.no_grad():
            for k, w in deq.items():
                params[k].copy_(w.to(params[k].dtype))
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.config.use_cache = True     # for generation; training turned it off
    os.makedirs(out_dir, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
