"""The `fxopt finetune` loop: LoRA / QLoRA (peft), fxopt compile, AdamW + warmup/cosine, gradient accumulation,
mixed precision, progress bar, JSONL log, resumable checkpoints."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import resource
import time

import torch

from fxopt.finetune import data as _data
from fxopt.finetune.data import FinetuneError


@dataclasses.dataclass
class FinetuneResult:
    output_dir: str
    adapter_dir: str | None
    merged_dir: str | None
    steps: int
    losses: list            # one per optimizer step (mean over its micro-batches)
    data_info: dict
    precision: str
    model: object = dataclasses.field(repr=False, default=None)       # the trained peft model
    tokenizer: object = dataclasses.field(repr=False, default=None)


def resolve_precision(precision: str, device: str) -> str:
    """auto: bf16 on CUDA GPUs that support it, fp16 (+ dynamic loss scaling) on other CUDA GPUs, fp32 on CPU."""
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise FinetuneError(f"precision {precision!r}: use auto, bf16, fp16 or fp32")
    if precision == "auto":
        if device.startswith("cuda"):
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision == "fp16" and not device.startswith("cuda"):
        raise FinetuneError("fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")
    return precision


_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _max_positions(cfg):
    for c in (cfg, getattr(cfg, "text_config", None)):
        for k in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            v = getattr(c, k, None) if c is not None else None
            if isinstance(v, int) and v > 0:
                return v
    return None


def check_model_dir(model: str):
    if not os.path.isdir(model):
        raise FinetuneError(f"model folder not found: {model!r} (a local Hugging Face model folder)")
    if not os.path.exists(os.path.join(model, "config.json")):
        raise FinetuneError(f"{model!r} is not a Hugging Face model folder (no config.json)")


def resolve_seq_len(cfg, seq_len):
    maxpos = _max_positions(cfg)
    if seq_len is None:
        return min(1024, maxpos) if maxpos else 1024
    if seq_len < 2:
        raise FinetuneError(f"seq_len {seq_len} is too short")
    if maxpos is not None and seq_len > maxpos:
        raise FinetuneError(f"seq_len {seq_len} is longer than the model supports "
                            f"(max_position_embeddings = {maxpos})")
    return seq_len


def _memory(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux: KiB -> GiB


def _rng_state():
    s = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
        s["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return s


def _set_rng_state(s):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    if "numpy" in s:
        import numpy as np
        np.random.set_state(s["numpy"])


def _latest_checkpoint(output_dir):
    if not os.path.isdir(output_dir):
        return None
    steps = [int(d.split("-")[1]) for d in os.listdir(output_dir)
             if d.startswith("checkpoint-") and d.split("-")[1].isdigit()
             and os.path.exists(os.path.join(output_dir, d, "training_state.pt"))]
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def load_model(model_dir, precision, device, *, qlora=False, lora_rank=16, lora_alpha=None, lora_dropout=0.0,
               target_modules="all-linear"):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    kw = {"dtype": _DTYPE[precision]}
    if qlora:
        from transformers import BitsAndBytesConfig
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=_DTYPE[precision] if precision != "fp32" else torch.float32)
        kw["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kw)
    if not qlora:
        model = model.to(device)
    model.config.use_cache = False
    if hasattr(model, "loss_type"):
        model.loss_type = "ForCausalLM"
    targets = target_modules
    if isinstance(targets, str) and targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    cfg = LoraConfig(r=lora_rank, lora_alpha=lora_alpha if lora_alpha is not None else 2 * lora_rank,
                     lora_dropout=lora_dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


class _Log:
    def __init__(self, output_dir, quiet):
        self.text = open(os.path.join(output_dir, "finetune.log"), "a")
        self.jsonl = open(os.path.join(output_dir, "log.jsonl"), "a")
        self.quiet = quiet

    def __call__(self, msg):
        self.text.write(msg + "\n")
        self.text.flush()
        if not self.quiet:
            from tqdm.auto import tqdm
            tqdm.write(msg)

    def row(self, d):
        self.jsonl.write(json.dumps(d) + "\n")
        self.jsonl.flush()

    def close(self):
        self.text.close()
        self.jsonl.close()


def _batches(ds, batch_size, seed, epoch, skip):
    """Micro-batches (lists of rows) of one epoch, shuffled with (seed, epoch), the first `skip` left out."""
    n = len(ds)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    for i in range(skip * batch_size, n, batch_size):
        cols = ds[perm[i:i + batch_size]]
        yield [dict(zip(cols, vals)) for vals in zip(*cols.values())]


def _stream_batches(ds, batch_size, skip):
    buf, k = [], 0
    for row in ds:
        buf.append(row)
        if len(buf) == batch_size:
            if k >= skip:
                yield buf
            k, buf = k + 1, []
    if buf and k >= skip:
        yield buf


def train(model, tokenizer, ds, *, output_dir, packing, batch_size, grad_accum, lr, scheduler, warmup_ratio,
          weight_decay, max_steps, epochs, precision, device, seed, save_steps, resume, compile, compile_options,
          max_grad_norm, log, progress):
    from transformers import get_scheduler
    streaming = not hasattr(ds, "__len__")
    if max_steps is None:
        if streaming:
            raise FinetuneError("streaming data has no length: pass max_steps")
        max_steps = max(1, math.ceil(math.ceil(len(ds) / batch_size) * epochs / grad_accum))
    n_micro = None if streaming else math.ceil(len(ds) / batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.startswith("cuda") or None)
    sched = get_scheduler(scheduler, opt, num_warmup_steps=math.ceil(warmup_ratio * max_steps),
                          num_training_steps=max_steps)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    if device.startswith("cuda") and torch.cuda.get_device_capability(device)[0] >= 8:
        torch.backends.cuda.matmul.allow_tf32 = True    # fp32 matmuls (LoRA adapters, fp32 runs) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    step = 0
    if resume:
        ckpt = _latest_checkpoint(output_dir) if resume is True or resume == "latest" else resume
        if ckpt is None or not os.path.exists(os.path.join(ckpt, "training_state.pt")):
            raise FinetuneError(f"no checkpoint to resume from ({resume!r} in {output_dir!r})")
        st = torch.load(os.path.join(ckpt, "training_state.pt"), map_location=device, weights_only=False)
        named = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in st["params"].items():
                named[k].copy_(v)
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        if scaler is not None and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        _set_rng_state(st["rng"])
        step = st["step"]
        log(f"resumed from {ckpt} at step {step}")
    else:
        torch.manual_seed(seed)
        random.seed(seed)
    if compile:
        import fxopt.hf
        fxopt.hf.compile_for_trainer(model, **compile_options)
    model.train()
    autocast = torch.autocast(device.split(":")[0], dtype=_DTYPE[precision]) if precision != "fp32" else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    def micro_batches(start_micro):
        m = start_micro
        while True:
            if streaming:
                it = _stream_batches(ds, batch_size, m)
                epoch = 0
            else:
                epoch, off = divmod(m, n_micro)
                it = _batches(ds, batch_size, seed, epoch, off)
            got = False
            for rows in it:
                got = True
                yield rows
            if streaming and not got:
                raise FinetuneError("streaming data ran out before max_steps")
            if streaming:
                m = 0   # a stream starts over from its beginning
            else:
                m = (epoch + 1) * n_micro

    from tqdm.auto import tqdm
    bar = tqdm(total=max_steps, initial=step, disable=not progress, dynamic_ncols=True, desc="finetune")
    losses, batches = [], micro_batches(step * grad_accum)
    t0, tokens_window = time.perf_counter(), 0
    while step < max_steps:
        total = 0.0
        for _ in range(grad_accum):
            b = _data.collate(next(batches), pad, packing)
            b = {k: v.to(device) for k, v in b.items()}
            for v in b.values():   # lengths vary per batch: one dynamic-length compile instead of static + dynamic
                torch._dynamo.maybe_mark_dynamic(v, 1)
            tokens_window += int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
            if autocast is not None:
                with autocast:
                    loss = model(**b).loss
            else:
                loss = model(**b).loss
            loss = loss.float() / grad_accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
            total += loss.item()
        if scaler is not None:
            scaler.unscale_(opt)
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        losses.append(total)
        dt = time.perf_counter() - t0
        row = {"step": step, "loss": total, "lr": sched.get_last_lr()[0], "tok_s": tokens_window / max(dt, 1e-9),
               "mem_gib": _memory(device)}
        log.row(row)
        bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{row['tok_s']:.0f}", mem=f"{row['mem_gib']:.2f}GiB")
        bar.update(1)
        t0, tokens_window = time.perf_counter(), 0
        if save_steps and (step % save_steps == 0 or step == max_steps):
            save_checkpoint(model, opt, sched, scaler, step, os.path.join(output_dir, f"checkpoint-{step}"))
    bar.close()
    return losses, step


def save_checkpoint(model, opt, sched, scaler, step, path):
    os.makedirs(path, exist_ok=True)
    params = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    tmp = os.path.join(path, "training_state.pt.tmp")
    torch.save({"params": params, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None, "step": step, "rng": _rng_state()},
               tmp)
    os.replace(tmp, os.path.join(path, "training_state.pt"))   # a killed save leaves no half checkpoint
