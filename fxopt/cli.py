"""`python -m fxopt` / `fxopt`: command-line entry points."""
from __future__ import annotations

import argparse
import sys
import time


def demo(args) -> int:
    """Tiny random Llama (no downloads) compiled with fxopt, trained in lockstep with an eager copy."""
    import copy

    import torch
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        print("fxopt demo needs transformers: pip install 'fxopt[hf]'", file=sys.stderr)
        return 2
    import fxopt

    dev = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    cfg = AutoConfig.for_model("llama", hidden_size=128, intermediate_size=256, num_hidden_layers=args.layers,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=256, head_dim=32,
                               max_position_embeddings=512, use_cache=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(dev)
    model.loss_type = "ForCausalLM"
    ref = copy.deepcopy(model)
    opts = {"inductor": not args.no_inductor}
    compiled = torch.compile(model, backend="fxopt", options=opts)
    opt_c = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt_r = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    g = torch.Generator(device="cpu").manual_seed(1)
    print(f"fxopt demo: llama {args.layers} layers, hidden 128, on {dev}; "
          f"hand-off {'Inductor' if opts['inductor'] else 'aot_eager'}", flush=True)
    if dev == "cpu":
        import os
        print("on CPU tensors fxopt ops run their PyTorch reference"
              + (" (TRITON_INTERPRET=1: Triton kernels in the interpreter)" if os.environ.get("TRITON_INTERPRET") == "1"
                 else "; TRITON_INTERPRET=1 runs the Triton kernels in the interpreter"), flush=True)
    worst_loss = worst_grad = 0.0
    t0 = time.time()
    for step in range(args.steps):
        ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=g).to(dev)
        out = compiled(input_ids=ids, labels=ids)
        out.loss.backward()
        rout = ref(input_ids=ids, labels=ids)
        rout.loss.backward()
        d_loss = abs(out.loss.item() - rout.loss.item()) / abs(rout.loss.item())
        d_grad = max(float((a.grad - b.grad).norm() / b.grad.norm().clamp_min(1e-12))
                     for a, b in zip(model.parameters(), ref.parameters()))
        worst_loss, worst_grad = max(worst_loss, d_loss), max(worst_grad, d_grad)
        print(f"step {step}: loss {out.loss.item():.4f} (eager {rout.loss.item():.4f})  "
              f"rel loss diff {d_loss:.1e}  max rel grad diff {d_grad:.1e}  [{time.time() - t0:.1f}s]", flush=True)
        for o in (opt_c, opt_r):
            o.step()
            o.zero_grad(set_to_none=True)
    print()
    print(fxopt.last_report())
    print(f"\nlargest relative difference vs eager: loss {worst_loss:.2e}, grads {worst_grad:.2e}")
    ok = worst_loss <= 1e-4 and worst_grad <= 1e-3
    print("OK" if ok else "MISMATCH: compiled training diverges from eager")
    return 0 if ok else 1


def plan(args) -> int:
    """Memory plan for a transformers config: predicted peak, what to recompute, the largest seq that fits."""
    import json

    try:
        from transformers import AutoConfig
    except ImportError:
        print("fxopt plan needs transformers: pip install 'fxopt[hf]'", file=sys.stderr)
        return 2
    import torch

    from fxopt.config import parse_budget
    from fxopt.recompute.model_plan import format_plan, plan_for_config
    if args.config.endswith(".json"):
        with open(args.config) as f:
            d = json.load(f)
        cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    else:
        cfg = AutoConfig.from_pretrained(args.config)    # a local directory (no downloads here)
    for kv in args.set or []:
        k, v = kv.split("=", 1)
        setattr(cfg, k, json.loads(v))
    budget = args.budget
    try:
        budget = float(budget) if "." in budget and budget.replace(".", "", 1).isdigit() else \
            int(budget) if budget.isdigit() else budget
        parse_budget(budget)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    r = plan_for_config(cfg, args.batch, args.seq, budget, dtype=getattr(torch, args.dtype), lora_rank=args.lora_rank,
                        fit=not args.no_fit)
    r.pop("joint", None)
    print(json.dumps(r, indent=1, default=str) if args.json else format_plan(r))
    return 0 if r["feasible"] else 1


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="fxopt", description="fxopt: torch.compile backend for LLM fine-tuning")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="compile a tiny random Llama with fxopt, train a few steps, compare with eager")
    d.add_argument("--steps", type=int, default=3)
    d.add_argument("--layers", type=int, default=2)
    d.add_argument("--cpu", action="store_true", help="stay on the CPU even if CUDA is available")
    d.add_argument("--no-inductor", action="store_true", help="hand off to aot_eager instead of Inductor")
    d.set_defaults(fn=demo)
    pl = sub.add_parser("plan", help="memory plan for a model config: predicted peak, recompute plan, largest seq")
    pl.add_argument("config", help="a transformers config.json (with model_type) or a local model directory")
    pl.add_argument("--batch", type=int, default=1)
    pl.add_argument("--seq", type=int, default=2048)
    pl.add_argument("--budget", required=True, help="bytes, a size like 12GiB, or a fraction like 0.5")
    pl.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    pl.add_argument("--lora-rank", type=int, default=0, help="LoRA on all linear layers (peft) instead of full FT")
    pl.add_argument("--set", action="append", help="override a config field, e.g. --set num_hidden_layers=4")
    pl.add_argument("--no-fit", action="store_true", help="one trace only (no largest-seq answer)")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(fn=plan)
    from fxopt import cli_bench, explain
    explain.add_parser(sub)
    cli_bench.add_parser(sub)
    from fxopt import finetune as _finetune
    _finetune.add_parser(sub)
    args = p.parse_args(argv)
    sys.exit(args.fn(args))
