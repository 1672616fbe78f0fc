"""Convergence at the 1B shape on one GPU: eager vs fxopt, bf16 weights + peft LoRA, real text, same seeds and data.

Model: benchmarks/train_step.py's "1b" shape (Llama-3.2-1B: 16 layers, hidden 2048, GQA 32/8, vocab 128256, tied
embeddings), random init in bf16, peft LoRA r=16 alpha=32 dropout 0 on every Linear but the LM head (q,k,v,o,gate,
up,down: what peft's "all-linear" picks); adapters fp32 (peft's default autocast of adapter dtype). Data, tokenizer,
optimizer, schedule and the loss-only compiled forward are benchmarks/convergence.py's (pydoc_data text, in-memory
byte-level BPE). Vocab: the model keeps the shape's 128256 (the LM head + loss, fxopt's linear_cross_entropy, at full
size); BPE id i is model token i, ids past the BPE vocab never occur in the data (--model-vocab tokenizer: the
model's vocab is the BPE's instead). Runs, in order: eager, fxopt (Inductor), eager from adapters perturbed by 1e-6
relative noise (the noise baseline; --no-noise skips it, and it is skipped when the time left cannot hold it;
--noise-seeds K runs K of them), then one fxopt run per --fxopt-variant NAME:KEY=VAL with that environment (which
kernel choice moves the curve). The verdict compares fxopt alone; "bf16_noise_max" is the largest difference any noise
sample shows, "bf16_over_noise" fxopt's difference over it.

  source benchmarks/gpu_env.sh && python3 benchmarks/convergence_gpu.py --out $OUT/convergence_1b_h200
  python benchmarks/convergence_gpu.py --device cpu --shape tiny --vocab 300 --steps 8 --batch 2 --seq 32 \\
      --no-inductor --out /tmp/conv_gpu_smoke                                       # CPU smoke, ~10 s

Writes <out>.json (curves, step times, tok/s, stats, tolerance, verdict, versions, git sha, GPU) and <out>.png after
every run, so a run cut short still leaves what it has (marked partial). --time-limit S: no step starts after S-20 s
from the start, and at S s a compile or step in progress is interrupted (SIGALRM); the files are written then.
Exit: 0 pass, 1 a tolerance exceeded or a run failed, 2 incomplete (time limit) with no failure so far.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import threading
import time
import traceback
from unittest import mock

START = time.time()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # run as a script: benchmarks/kernels.py would shadow the `kernels` package peft/bnb probe
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

from benchmarks import convergence as C  # noqa: E402
from benchmarks import train_step as T  # noqa: E402

# Tolerances on |loss_fxopt - loss_eager| (bf16 LoRA, same init, batches and seeds), stated a priori: set before the
# first GPU run, not fitted to it. The loss starts at ~ln(128256) = 11.8; bf16 rounds each op's output to 2^-9
# relative where fxopt's fused ops keep fp32 inside, so the curves differ by rounding from step 0 on. Measured on CPU
# (reference ops, aot_eager) at the 1B widths with 2 layers, 2x128 tokens/step, 30 steps (--layers 2 --batch 2 --seq
# 128 --steps 30): early/whole max 8.1e-3 (at step 2), final smoothed 1.2e-3, eval 1.2e-3; the 1e-6-perturbed eager
# run: max 1.2e-3, final 2.0e-4. Adam's first updates are sign-like (m/sqrt(v) = +-1), so rounding that flips the sign
# of a small LoRA gradient moves its weight by the full lr; a 1e-6 perturbation flips few, hence the gap early. Here
# (16 layers, 2048 tokens/step, 300 steps): early 3e-2 (~4x that CPU max), whole curve 1e-1, end of training and held
# out 2e-2: small against the loss's fall (2.8 in the 30 CPU steps above). Adam cancels a uniform gradient scale, so
# these curves test the forward and the gradient's direction, not its overall scale.
TOL = {"max_abs_early": 3e-2, "max_abs": 1e-1, "final_smoothed_abs": 2e-2, "eval_abs": 2e-2}
TOL_BASIS = ("a priori (set before the first GPU run; see TOL in benchmarks/convergence_gpu.py); the eager_perturbed "
             "stats, when present, show how far training alone carries a 1e-6 difference")
RESERVE = 20.0  # seconds between the last step start and the hard limit (eval, files)


VARIANTS: dict = {}   # run name -> environment for that run (--fxopt-variant)


class TimeUp(Exception):
    pass


def _time_up(signum, frame):
    raise TimeUp("hard time limit")


def build_lora_model(cfg, device: str, seed: int, r: int, alpha: int, perturb: float = 0.0, noise_seed: int = 1):
    """Random-init bf16 model on `device` with fp32 LoRA adapters; perturb > 0: adapters w <- w*(1 + perturb*N(0,1))
    (lora_A; lora_B starts at zero): a rounding-size change of the start of what trains (1e-6 is below bf16's
    resolution, so the frozen bf16 base is left as it is)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
    model.config.use_cache = False
    model.loss_type = "ForCausalLM"
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                                             target_modules=T.LORA_TARGETS, task_type="CAUSAL_LM"))
    if perturb:
        C.perturb_([p for p in model.parameters() if p.requires_grad], perturb, seed + noise_seed)
    return model.train()


def fingerprint(model) -> dict:
    """Sums of the initial weights: equal for eager and fxopt (same init) or the comparison means nothing."""
    with torch.no_grad():
        train = [p for p in model.parameters() if p.requires_grad]
        frozen = [p for p in model.parameters() if not p.requires_grad]
        return {"trainable_sum": float(sum(p.double().sum() for p in train)),
                "frozen_sum": float(sum(p.double().sum() for p in frozen))}


def throughput(rec: dict, tokens_per_step: int, skip: int = 5) -> None:
    """tok/s from the median step wall time after `skip` steps (compilation, warm-up), and over the whole run."""
    st = rec.get("step_seconds") or []
    steady = sorted(st[skip:] if len(st) > skip else st)
    if steady:
        rec["median_step_s"] = steady[len(steady) // 2]
        rec["tok_per_s"] = round(tokens_per_step / rec["median_step_s"])
    if st and rec.get("seconds"):
        rec["tok_per_s_incl_compile"] = round(tokens_per_step * len(st) / rec["seconds"])


def one_run(name, rec, args, cfg, data, eval_data, deadline, backend) -> None:
    """Fills `rec` (already in the result, so an interruption anywhere leaves what was done)."""
    compiled, noisy = name.startswith("fxopt"), name.startswith("eager_perturbed")
    perturb = C.PERTURB if noisy else 0.0
    noise_seed = int(name.rsplit("_", 1)[1]) if noisy and name[-1].isdigit() else 1
    if VARIANTS.get(name):
        rec["env"] = VARIANTS[name]
    cuda, model = args.device == "cuda", None
    rec["losses"] = []
    t0 = time.time()
    try:
        model = build_lora_model(cfg, args.device, args.seed, args.lora_r, args.lora_alpha, perturb, noise_seed)
        rec["init"] = fingerprint(model)
        rec["build_seconds"] = round(time.time() - t0, 1)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        C.fit(model, data, compiled, args.lr, args.warmup, args.inductor, eval_data, backend=backend,
              device=args.device, deadline=deadline, out=rec)
    except TimeUp:
        rec["partial"] = True
        rec["error"] = f"time limit ({args.time_limit:g} s) reached after {len(rec['losses'])} steps"
    except Exception as e:  # noqa: BLE001  (recorded; the other runs still go)
        traceback.print_exc()
        rec["error"] = f"{type(e).__name__}: {e}"[:1000]
        rec["oom"] = T.is_oom(e)
    finally:
        if cuda:
            rec["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        del model
        torch._dynamo.reset()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    rec["wall_seconds"] = round(time.time() - t0, 1)
    throughput(rec, args.batch * args.seq)


def finalize(result: dict, steps: int) -> None:
    """Stats on the common prefix of the curves, failures, verdict."""
    runs, stats, failures = result["runs"]["bf16"], {}, []
    e = runs.get("eager", {})
    others = [("fxopt", "bf16")] + [(n, "bf16_" + n) for n in runs if n.startswith(("eager_perturbed", "fxopt_"))]
    for name, key in others:
        o = runs.get(name, {})
        n = min(len(e.get("losses", [])), len(o.get("losses", [])))
        if n == 0:
            continue
        st = C.compare(e["losses"][:n], o["losses"][:n], smooth=min(C.SMOOTH, n))
        st["steps_compared"] = n
        if e.get("eval_loss") is not None and o.get("eval_loss") is not None:
            st["eval_abs"] = abs(e["eval_loss"] - o["eval_loss"])
        stats[key] = st
    if "bf16" in stats:
        failures += [f"bf16: {p}" for p in C.check(stats["bf16"], {k: v for k, v in TOL.items()
                                                                    if k in stats["bf16"]})]
        samples = [v for k, v in stats.items() if k.startswith("bf16_eager_perturbed")]
        if samples:   # the largest difference any noise sample shows, per statistic
            keys = ("max_abs", "mean_abs", "final_smoothed_abs", "eval_abs")
            noise = {k: max(v.get(k) or 0.0 for v in samples) for k in keys}
            stats["bf16_noise_max"] = dict(noise, samples=len(samples))
            stats["bf16_over_noise"] = {k: stats["bf16"][k] / noise[k] if noise[k] and k in stats["bf16"] else None
                                        for k in keys}
    for name, rec in runs.items():
        if rec.get("error") and not rec["error"].startswith("time limit"):
            failures.append(f"{name}: {rec['error'][:300]}")
    if "init" in e and "init" in runs.get("fxopt", {}) and e["init"] != runs["fxopt"]["init"]:
        failures.append(f"eager and fxopt started from different weights: {e['init']} vs {runs['fxopt']['init']}")
    rep = runs.get("fxopt", {}).get("report")
    if rep is not None and (rep["fallbacks"] or not rep["matched"]):
        failures.append(f"fxopt did not run its rewrite: matched {rep['matched']}, fallbacks {rep['fallbacks']}")
    if e.get("tok_per_s") and runs.get("fxopt", {}).get("tok_per_s"):
        result["speedup_tok_per_s"] = round(runs["fxopt"]["tok_per_s"] / e["tok_per_s"], 3)
    expected = ["eager", "fxopt"] + [n for n in result.get("planned", [])
                                     if n not in ("eager", "fxopt") and n not in result["skipped"]]
    complete = all(len(runs.get(n, {}).get("losses", [])) == steps and not runs[n].get("partial")
                   for n in expected)
    result.update(stats=stats, failures=failures, partial=not complete,
                  verdict="fail" if failures else ("pass" if complete else "incomplete"))


def write(result: dict, out: str, t0: float) -> None:
    """<out>.json (atomically: a kill mid-write leaves the previous one), then <out>.png."""
    result["seconds"] = round(time.time() - t0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    def dump():
        with open(out + ".json.tmp", "w") as f:
            json.dump(result, f, indent=1, default=str)
        os.replace(out + ".json.tmp", out + ".json")
    dump()
    try:
        tps = {k: v.get("tok_per_s") for k, v in result["runs"]["bf16"].items()}
        line = (f"\nverdict: {result.get('verdict')}{' (PARTIAL)' if result.get('partial') else ''}; tok/s eager "
                f"{tps.get('eager')}, fxopt {tps.get('fxopt')}")
        C.plot(dict(result, title=result["title"] + line), out + ".png")
    except Exception as e:  # noqa: BLE001
        result["plot_error"] = f"{type(e).__name__}: {e}"[:300]
        log(f"plot failed: {result['plot_error']}")
        dump()


def log(msg):
    print(f"[convergence_gpu] {msg}", file=sys.stderr, flush=True)


def environment(args) -> dict:
    import importlib.metadata as md
    env = C.environment(args)
    env.update(peft=md.version("peft"), fxopt_src=T.fxopt_source_hash(), device=args.device)
    if args.device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return env


def new_result(args) -> dict:
    return {"args": vars(args), "env": environment(args), "dtypes": ["bf16"], "tolerance": {"bf16": TOL},
            "tolerance_basis": TOL_BASIS, "smooth": C.SMOOTH, "early": C.EARLY, "title": "",
            "runs": {"bf16": {}}, "skipped": {}}


def run(args, t0: float, result: dict) -> None:
    """Fills `result` as it goes (a TimeUp anywhere leaves it consistent for finalize + write)."""
    hard = t0 + args.time_limit
    soft = t0 + max(0.0, args.time_limit - RESERVE)
    text = C.load_text()
    tok = C.train_tokenizer(text, args.vocab)
    train_ds, eval_ds = C.make_datasets(tok, text, args.seq, args.seed)
    data = C.batches(train_ds, args.batch, args.steps, args.seed)
    eval_data = C.batches(eval_ds, args.batch, args.eval_batches, args.seed)
    n_tok = tok.get_vocab_size() + 1  # + the paragraph separator
    cfg = T.make_config(args.shape, args.seq)
    if args.layers:
        cfg.num_hidden_layers = args.layers
    if args.model_vocab == "tokenizer":
        cfg.vocab_size = n_tok
    elif n_tok > cfg.vocab_size:
        raise SystemExit(f"BPE vocab {n_tok} > model vocab {cfg.vocab_size}: lower --vocab")
    tokens = len(train_ds) * args.seq
    log(f"text {len(text)} chars, BPE {n_tok} ids, {len(train_ds)} train / {len(eval_ds)} eval blocks of {args.seq}, "
        f"model vocab {cfg.vocab_size} [{time.time() - t0:.1f}s]")
    backend, result["env"]["fxopt_backend"] = T.resolve_fxopt_backend()
    where = args.device if args.device != "cuda" else torch.cuda.get_device_name()
    result.update({
        "model": {"shape": args.shape, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
                  "heads": [cfg.num_attention_heads, cfg.num_key_value_heads], "ffn": cfg.intermediate_size,
                  "vocab": cfg.vocab_size, "tied_embeddings": cfg.tie_word_embeddings, "weights": "bf16, random init"},
        "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": 0.0, "targets": T.LORA_TARGETS,
                 "adapter_dtype": "fp32 (peft default)"},
        "vocab": {"model": cfg.vocab_size, "tokenizer_ids": n_tok, "mapping": (
            f"identity: BPE id i is model token i (ids >= {n_tok} never occur in the data; their logits are in the "
            "softmax)" if args.model_vocab == "shape" else "model vocab = BPE ids")},
        "noise_baseline": ("eager_perturbed: eager from the same init with the trainable (fp32 LoRA) weights times "
                           f"(1 + {C.PERTURB:g} N(0,1)); lora_B is 0 at init, so step 0 is identical and the "
                           "difference enters with the first update; the frozen bf16 base is unchanged"),
        "data": {"text": "pydoc_data.topics (CPython docs)", "chars": len(text), "train_blocks": len(train_ds),
                 "eval_blocks": len(eval_ds), "train_tokens": tokens,
                 "epochs": round(args.steps * args.batch * args.seq / max(1, tokens), 2)},
        "title": (f"{args.shape} shape ({cfg.num_hidden_layers}L h{cfg.hidden_size} vocab {cfg.vocab_size}), random "
                  f"bf16 + LoRA r{args.lora_r} a{args.lora_alpha}\n{args.batch}x{args.seq} tokens/step, {args.steps} "
                  f"steps, pydoc_data text (BPE, {n_tok} ids)\n{where}, torch {torch.__version__}, fxopt -> "
                  f"{'Inductor' if args.inductor else 'aot_eager'}"),
    })
    noise = [] if args.no_noise else ["eager_perturbed"] + [f"eager_perturbed_{k}" for k in
                                                            range(2, args.noise_seeds + 1)]
    names = ["eager", "fxopt"] + noise + list(VARIANTS)
    result["planned"] = names
    if args.no_noise:
        result["skipped"]["eager_perturbed"] = "--no-noise"
    stop = False
    for name in names:
        like = "fxopt" if name.startswith("fxopt") else "eager"
        need = 1.15 * result["runs"]["bf16"].get(like, {}).get("wall_seconds", 0) + 10
        if stop or time.time() > soft:
            result["skipped"][name] = f"time limit: no run starts after {args.time_limit - RESERVE:g} s"
        elif name != "eager" and name != "fxopt" and time.time() + need > soft:
            result["skipped"][name] = f"time: needs ~{need:.0f} s, {soft - time.time():.0f} s left"
        if name in result["skipped"]:
            log(f"skip {name}: {result['skipped'][name]}")
            continue
        log(f"{name}: [{time.time() - t0:.0f}s]")
        rec = result["runs"]["bf16"][name] = {}
        with mock.patch.dict(os.environ, VARIANTS.get(name, {})):   # a variant's environment, for its run only
            one_run(name, rec, args, cfg, data, eval_data, soft, backend)
        log(f"{name}: {len(rec['losses'])} steps, tok/s {rec.get('tok_per_s')}, peak {rec.get('peak_gib')} GiB, "
            f"{rec['wall_seconds']} s{', ' + rec['error'] if rec.get('error') else ''}")
        finalize(result, args.steps)
        write(dict(result), args.out, t0)
        stop = time.time() > hard or (rec.get("error") or "").startswith("time limit")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test this script (--shape tiny)")
    p.add_argument("--shape", default="1b", choices=sorted(k for k, v in T.SHAPES.items()
                                                         if v["model_type"] == "llama"))
    p.add_argument("--layers", type=int, default=0, help="override the shape's layer count (0: keep)")
    p.add_argument("--model-vocab", default="shape", choices=["shape", "tokenizer"],
                   help="shape: keep the shape's vocab, BPE ids as model ids; tokenizer: vocab = BPE ids")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8192, help="BPE vocab asked for (pydoc_data saturates at 6692)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-batches", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--inductor", action=argparse.BooleanOptionalAction, default=True,
                   help="fxopt hands off to Inductor (--no-inductor: aot_eager)")
    p.add_argument("--no-noise", action="store_true", help="skip the eager_perturbed noise-baseline run")
    p.add_argument("--noise-seeds", type=int, default=1,
                   help="noise-baseline runs, each perturbed with its own seed (eager_perturbed, _2, ...)")
    p.add_argument("--fxopt-variant", action="append", default=[], metavar="NAME:KEY=VAL[,KEY=VAL]",
                   help="one more fxopt run, fxopt_NAME, with these environment variables set (e.g. "
                        "rope_exact:FXOPT_ROPE_EXACT=1): which kernel choice moves the curve")
    p.add_argument("--time-limit", type=float, default=480,
                   help="seconds from start: no step starts after limit-20, a compile/step is interrupted at limit")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave)")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "convergence_1b_h200"),
                   help="writes <out>.json and <out>.png")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    VARIANTS.clear()
    for spec in args.fxopt_variant:
        name, _, env = spec.partition(":")
        pairs = [kv.split("=", 1) for kv in env.split(",") if kv]
        if not name or not pairs or any(len(kv) != 2 for kv in pairs):
            raise SystemExit(f"--fxopt-variant {spec!r}: expected NAME:KEY=VAL[,KEY=VAL]")
        VARIANTS["fxopt_" + name] = dict(pairs)
    t0 = START if argv is None else time.time()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --device cpu --shape tiny for a smoke run)")
    if args.threads:
        torch.set_num_threads(args.threads)
    alarm = (hasattr(signal, "setitimer") and signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None)
             and threading.current_thread() is threading.main_thread())  # else only the between-steps guard
    if alarm:
        old = signal.signal(signal.SIGALRM, _time_up)
        signal.setitimer(signal.ITIMER_REAL, max(0.01, t0 + args.time_limit - time.time()))
    result = new_result(args)
    try:
        run(args, t0, result)
    except TimeUp:
        result["stopped"] = f"hard time limit {args.time_limit:g} s outside a training run"
        log(result["stopped"])
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    finalize(result, args.steps)
    write(result, args.out, t0)
    runs = result["runs"]["bf16"]
    summary = {"verdict": result["verdict"], "partial": result["partial"], "failures": result["failures"],
               "tok_per_s": {k: v.get("tok_per_s") for k, v in runs.items()},
               "speedup": result.get("speedup_tok_per_s"), "stats": result["stats"], "skipped": result["skipped"],
               "seconds": result["seconds"]}
    print("RESULT " + json.dumps(summary, default=str), flush=True)
    log(f"wrote {args.out}.json, {args.out}.png: {result['verdict']} [{result['seconds']:.0f}s]")
    for msg in result["failures"]:
        log(f"FAIL {msg}")
    return 1 if result["failures"] else (2 if result["partial"] else 0)


if __name__ == "__main__":
    sys.exit(main())
