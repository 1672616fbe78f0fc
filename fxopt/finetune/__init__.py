"""`fxopt finetune` / `fxopt.finetune.finetune(...)`: LoRA / QLoRA fine-tuning of a local HF model with fxopt.

    from fxopt.finetune import finetune
    r = finetune(model="models/llama", data="train.jsonl")          # everything else has a default
    r.adapter_dir, r.merged_dir, r.losses

The CLI takes the same options (`--lora-rank 8 --max-steps 100 ...`). docs/finetune.md has the details.
"""
from __future__ import annotations

import inspect
import os

from fxopt.finetune.data import FinetuneError

__all__ = ["finetune", "FinetuneError", "add_parser"]


def finetune(model: str, data: str, *, output_dir: str | None = None, text_field: str | None = None,
             mask_prompts: bool = False, packing: bool = True, seq_len: int | None = None, batch_size: int = 1,
             grad_accum: int = 1, lr: float = 2e-4, scheduler: str = "cosine", warmup_ratio: float = 0.03,
             weight_decay: float = 0.0, max_steps: int | None = None, epochs: float = 1.0, lora_rank: int = 16,
             lora_alpha: float | None = None, lora_dropout: float = 0.0, target_modules: str = "all-linear",
             qlora: bool = False, precision: str = "auto", device: str | None = None, compile: bool = True,
             inductor: bool | None = None, memory_budget=None, max_grad_norm: float | None = 1.0, seed: int = 0,
             save_steps: int | None = 500, resume: bool | str = False, export: str = "adapter,merged",
             merge_dtype: str = "auto", num_proc: int | None = None, cache_dir: str | None = None,
             streaming: bool = False, progress: bool = True, quiet: bool = False):
    """Fine-tune `model` (a local HF folder) on `data` (a local file or `datasets` folder); returns FinetuneResult.

    seq_len: default min(1024, max_position_embeddings). max_steps: default one pass over the data (`epochs`).
    lora_alpha: default 2 * lora_rank. target_modules: "all-linear" or a comma list ("q_proj,v_proj").
    precision: auto = bf16 on CUDA GPUs with bf16, fp16 + dynamic loss scaling on older ones, fp32 on the CPU.
    inductor: default on CUDA, off (aot_eager) on the CPU. memory_budget: fxopt's recompute budget (API.md).
    packing: several documents per row, position_ids restarting per document, no attention across documents.
    mask_prompts: no loss on prompts (prompt/completion, instruction/output) and non-assistant chat turns.
    resume: True/"latest" (newest checkpoint in output_dir) or a checkpoint folder.
    export: comma list of "adapter", "merged" (or "" for none). merge_dtype: "auto" = the model's stored dtype
      (bf16 for QLoRA).
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from fxopt import config as fx_config
    from fxopt.finetune import data as D
    from fxopt.finetune import export as E
    from fxopt.finetune import train as T

    T.check_model_dir(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = T.resolve_precision(precision, device)
    cfg = AutoConfig.from_pretrained(model)
    seq = T.resolve_seq_len(cfg, seq_len)
    if batch_size < 1 or grad_accum < 1:
        raise FinetuneError("batch_size and grad_accum must be >= 1")
    exports = [e.strip() for e in export.split(",") if e.strip()]
    bad = set(exports) - {"adapter", "merged"}
    if bad:
        raise FinetuneError(f"export {sorted(bad)}: use 'adapter' and/or 'merged'")
    compile_options = {"inductor": device.startswith("cuda") if inductor is None else inductor}
    if memory_budget is not None:
        compile_options["memory_budget"] = memory_budget
    if compile:
        try:
            fx_config.parse(compile_options)
        except ValueError as e:
            raise FinetuneError(str(e)) from e
    output_dir = output_dir or os.path.join(os.getcwd(), "fxopt-finetune-" + os.path.basename(os.path.abspath(model)))
    os.makedirs(output_dir, exist_ok=True)
    log = T._Log(output_dir, quiet)
    try:
        tok = AutoTokenizer.from_pretrained(model)
        raw = D.load_raw(data, streaming=streaming, cache_dir=cache_dir)
        ds, info = D.prepare(raw, tok, seq_len=seq, text_field=text_field, mask_prompts=mask_prompts,
                             packing=packing, num_proc=num_proc, cache_dir=cache_dir,
                             tokenizer_id=D._hash_files(model), log=log)
        if not streaming:
            info["rows"] = len(ds)
        log(f"data: {info['format']} {list(info['fields'])}; seq_len {seq}; packing {packing}; precision {precision}"
            f"; device {device}" + (f"; {info['rows']} rows" if "rows" in info else ""))
        torch.manual_seed(seed)
        peft_model = T.load_model(model, precision, device, qlora=qlora, lora_rank=lora_rank, lora_alpha=lora_alpha,
                                  lora_dropout=lora_dropout, target_modules=target_modules)
        losses, steps = T.train(peft_model, tok, ds, output_dir=output_dir, packing=packing, batch_size=batch_size,
                                grad_accum=grad_accum, lr=lr, scheduler=scheduler, warmup_ratio=warmup_ratio,
                                weight_decay=weight_decay, max_steps=max_steps, epochs=epochs, precision=precision,
                                device=device, seed=seed, save_steps=save_steps, resume=resume, compile=compile,
                                compile_options=compile_options, max_grad_norm=max_grad_norm, log=log,
                                progress=progress and not quiet)
        adapter_dir = merged_dir = None
        if exports:
            adapter_dir = E.export_adapter(peft_model, tok, os.path.join(output_dir, "adapter"))
            log(f"adapter: {adapter_dir}")
        if "merged" in exports:
            md = "bf16" if qlora and merge_dtype == "auto" else merge_dtype
            merged_dir = E.export_merged(model, adapter_dir, os.path.join(output_dir, "merged"), dtype=md,
                                         tokenizer=tok, quantized_from=peft_model if qlora else None)
            log(f"merged model: {merged_dir}")
        if "adapter" not in exports:
            adapter_dir = None
    finally:
        log.close()
    return T.FinetuneResult(output_dir=output_dir, adapter_dir=adapter_dir, merged_dir=merged_dir, steps=steps,
                            losses=losses, data_info=info, precision=precision, model=peft_model, tokenizer=tok)


def _cli_type(p):
    ann = p.annotation if isinstance(p.annotation, str) else ""
    if "bool" in ann and "str" not in ann and "None" not in ann:
        return None
    if "int" in ann and "float" not in ann:
        return int
    if "float" in ann:
        return float
    return str


def add_parser(sub):
    """The `finetune` subcommand: one --flag per keyword of `finetune` (same names, - for _)."""
    sig = inspect.signature(finetune)
    p = sub.add_parser("finetune", help="LoRA/QLoRA fine-tuning of a local HF model on a local dataset, with fxopt",
                       description=finetune.__doc__)
    p.add_argument("--model", required=True, help="a local Hugging Face model folder")
    p.add_argument("--data", required=True, help="JSON/JSONL/CSV/Parquet/text file(s) or a datasets folder")
    for name, prm in sig.parameters.items():
        if name in ("model", "data"):
            continue
        flag = "--" + name.replace("_", "-")
        t = _cli_type(prm)
        if t is None:      # plain bool: --x / --no-x
            import argparse
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=prm.default)
        elif name in ("resume", "memory_budget", "inductor"):
            p.add_argument(flag, default=prm.default, help="(see docs/finetune.md)")
        else:
            p.add_argument(flag, type=t, default=prm.default)
    p.set_defaults(fn=_run_cli)
    return p


def _run_cli(args) -> int:
    import sys
    kw = {k: v for k, v in vars(args).items() if k not in ("cmd", "fn")}
    if isinstance(kw.get("resume"), str):
        kw["resume"] = {"true": True, "false": False, "latest": True}.get(kw["resume"].lower(), kw["resume"])
    if isinstance(kw.get("inductor"), str):
        kw["inductor"] = kw["inductor"].lower() in ("1", "true", "yes", "on")
    mb = kw.get("memory_budget")
    if isinstance(mb, str):
        kw["memory_budget"] = float(mb) if "." in mb else int(mb) if mb.isdigit() else mb
    try:
        r = finetune(**kw)
    except FinetuneError as e:
        print(f"fxopt finetune: {e}", file=sys.stderr)
        return 2
    print(f"done: {r.steps} steps, final loss {r.losses[-1]:.4f}" if r.losses else "done")
    for k in ("adapter_dir", "merged_dir"):
        if getattr(r, k):
            print(f"{k.replace('_dir', '')}: {getattr(r, k)}")
    return 0
