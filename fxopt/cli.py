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
                        fit=not args.no_fit, keep_logits=args.keep_logits, offload=args.offload)
    r.pop("joint", None)
    print(json.dumps(r, indent=1, default=str) if args.json else format_plan(r))
    return 0 if r["feasible"] else 1


def coverage(args) -> int:
    """Tiny random models of many architectures compiled with fxopt: matched counts, rejections -> markdown."""
    import json
    import os

    try:
        import transformers  # noqa: F401
    except ImportError:
        print("fxopt coverage needs transformers: pip install 'fxopt[hf]'", file=sys.stderr)
        return 2
    from fxopt import coverage as cov
    from fxopt.config import PATTERNS
    exp = cov.load_expectations()
    if exp is None and not args.archs:
        print("no tests/models/expectations.py next to this fxopt: name the model types with --archs",
              file=sys.stderr)
        return 2
    known = exp.ARCHS if exp is not None else {}
    archs = args.archs.split(",") if args.archs else list(known)
    attns = args.attn.split(",") if args.attn else None
    adapters = args.adapters.split(",")
    cases = []
    for a in archs:
        supported = known[a].attn if a in known else ("sdpa", "eager")
        for t in attns or supported:
            if t not in supported:
                continue
            for d in adapters:
                if a not in known or d in known[a].adapters:
                    cases.append((a, t, d))
    small = exp.SMALL if exp is not None else None
    if small is None:
        print("no SMALL config (tests/models/expectations.py) found", file=sys.stderr)
        return 2
    print(f"fxopt coverage: {len(cases)} cases ({len(archs)} architectures)", file=sys.stderr, flush=True)
    import warnings

    import transformers
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():         # model/peft warnings would break the progress line
        warnings.simplefilter("ignore")
        results = cov.run_matrix(cases, small, spec=lambda a: exp.spec(a) if a in known else {}, ops=args.ops)
    expected = (lambda a, t, d: exp.counts_for(a, t, d) if a in known else None) if exp is not None else None
    cmd = "python -m fxopt coverage" + "".join(f" {x}" for x in (argv_tail(args)))
    notes = [f"{a} `{p}`: {why}" for a in archs if a in known for p, why in known[a].xfail.items()]
    md = cov.render_markdown(results, list(PATTERNS), expected, command=cmd, notes=notes,
                             header=f"torch {_ver('torch')}, transformers {_ver('transformers')}, peft "
                                    f"{_ver('peft')}; {_where_ops_ran(args.ops)}; {time.strftime('%Y-%m-%d')}.")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in results], f, indent=1)
    bad = [r for r in results if cov.problems(r)]
    for r in bad:
        print(f"PROBLEM {r.label}: {'; '.join(cov.problems(r))}", file=sys.stderr)
    print(f"wrote {args.out}: {len(results) - len(bad)}/{len(results)} cases without problems", file=sys.stderr)
    return 1 if bad else 0


def _where_ops_ran(ops=None):
    import os
    if ops == "reference" or (ops is None and os.environ.get("TRITON_INTERPRET") != "1"):
        return "CPU, fxopt ops as their PyTorch references"
    return "CPU, fxopt ops as Triton kernels under TRITON_INTERPRET=1"


def _ver(dist):
    import importlib.metadata as md
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "?"


def argv_tail(args):
    out = []
    for flag, v in (("--archs", args.archs), ("--attn", args.attn), ("--ops", args.ops), ("--out", args.out)):
        if v and not (flag == "--out" and v == "docs/coverage.md"):
            out.append(f"{flag} {v}")
    if args.adapters != "plain,lora":
        out.append(f"--adapters {args.adapters}")
    return out


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
    pl.add_argument("--keep-logits", action="store_true",
                    help="plan the forward that also returns the logits (a plain model.compile()); default: the "
                         "loss-only forward of fxopt.hf.compile_for_trainer, where lm_head + loss fuse")
    pl.add_argument("--offload", action="store_true", help="the planner may keep saved activations in host memory "
                    "(option 'offload')")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(fn=plan)
    from fxopt import cli_bench, explain
    explain.add_parser(sub)
    cli_bench.add_parser(sub)
    from fxopt import finetune as _finetune
    _finetune.add_parser(sub)
    cv = sub.add_parser("coverage", help="architecture x pattern matrix of tiny random models -> docs/coverage.md")
    cv.add_argument("--archs", help="comma-separated model types (default: tests/models/expectations.py's list)")
    cv.add_argument("--attn", help="comma-separated attention implementations (default: each model's supported)")
    cv.add_argument("--adapters", default="plain,lora", help="plain and/or lora (peft r=4, all-linear)")
    cv.add_argument("--out", default="docs/coverage.md")
    cv.add_argument("--json", help="also write the raw results as JSON")
    cv.add_argument("--ops", choices=["reference", "triton"],
                    help="fxopt ops on CPU: PyTorch references, or Triton kernels in the interpreter (needs "
                         "TRITON_INTERPRET=1 in the environment); default: as TRITON_INTERPRET says")
    cv.set_defaults(fn=coverage)
    args = p.parse_args(argv)
    sys.exit(args.fn(args))
