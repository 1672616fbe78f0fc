"""One causal-LM fine-tuning step (forward, backward, fused AdamW), timed on one GPU.

Random weights from a config (nothing is downloaded), random token ids, labels = inputs.
Prints progress to stderr and one `RESULT {json}` line to stdout.

  python benchmarks/train_step.py --shape 1b --mode lora --variant fxopt:8GiB [--gc]
  python benchmarks/train_step.py --shape 8b --mode qlora --batch 1 --gc --variant eager --max-seq-search
  python benchmarks/train_step.py --shape 8b --mode qlora --dry-run        # config + FLOPs, no CUDA

Variants: eager | inductor | liger | unsloth | fxopt | fxopt:<memory_budget> (e.g. fxopt:8GiB, fxopt:0.3).
Exit codes: 0 ok, 1 crash, 2 missing package, 3 out of memory (the RESULT line carries "error" then).
"""
import argparse, gc, hashlib, importlib.metadata, json, os, shlex, subprocess, sys, tempfile, time, traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEMM_CEILING_TFLOPS = 790.0  # measured bf16 8192^3 GEMM on the H200 the benchmarks run on (DESIGN.md, GPU protocol)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("eager", "inductor", "liger", "unsloth", "fxopt")

SHAPES = {  # random-weight configs shaped like public models ("tiny": CPU smoke tests of this script)
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False,
                 max_position_embeddings=2048),
    "1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,  # Llama-3.2-1B
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
               tie_word_embeddings=True, max_position_embeddings=8192),
    "8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,  # Llama-3-8B
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
               tie_word_embeddings=False, max_position_embeddings=8192),
    "gemma2-2b": dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000,
                      query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                      final_logit_softcapping=30.0, tie_word_embeddings=True, max_position_embeddings=8192),
    "qwen2-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,  # Qwen2.5-7B
                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0,
                     tie_word_embeddings=False, max_position_embeddings=8192),
}


def log(msg):
    print(f"[train_step] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- config and FLOPs (no CUDA needed)

def make_config(shape, seq):
    from transformers import AutoConfig
    kw = dict(SHAPES[shape])
    kw["max_position_embeddings"] = max(kw["max_position_embeddings"], seq)
    return AutoConfig.for_model(kw.pop("model_type"), **kw)


def head_dim(cfg):
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def matmul_params(cfg):
    """Weights that take part in a matmul per token: q,k,v,o + gate,up,down per layer, plus the LM head."""
    h, hd = cfg.hidden_size, head_dim(cfg)
    attn = h * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    mlp = 3 * h * cfg.intermediate_size
    return cfg.num_hidden_layers * (attn + mlp) + h * cfg.vocab_size


def step_flops(cfg, batch, seq, full):
    """Model FLOPs of one training step (recompute from checkpointing not counted, LoRA adapters ignored).

    forward = 2 * N_matmul * tokens + causal attention 2 * layers * batch * seq^2 * heads * head_dim
    (QK^T and PV are 2*b*s^2*h*d each; causality halves both). Backward: 2x forward when weights train
    (full), 1x when they are frozen (LoRA/QLoRA: input gradients only). Same method as the anchors.
    """
    fwd = 2 * matmul_params(cfg) * batch * seq
    fwd += 2 * cfg.num_hidden_layers * batch * seq * seq * cfg.num_attention_heads * head_dim(cfg)
    return fwd * (3 if full else 2)


def parse_variant(variant):
    """'fxopt:8GiB' -> ('fxopt', {'memory_budget': '8GiB'}); budget int bytes, float fraction, or str."""
    kind, _, budget = variant.partition(":")
    if kind not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}; choose from {VARIANTS} (fxopt:<budget> too)")
    opts = {}
    if budget and kind == "inductor":   # torch's own knob: a fraction of the save-everything activation memory
        try:
            frac = float(budget)
        except ValueError:
            frac = -1.0
        if not 0 < frac <= 1:
            raise SystemExit(f"inductor:<fraction> takes activation_memory_budget in (0, 1], got {variant!r}")
        return kind, {"activation_memory_budget": frac}
    if budget:
        if kind != "fxopt":
            raise SystemExit(f"only fxopt (memory_budget) and inductor (activation_memory_budget fraction) take a "
                             f"':<budget>' suffix, got {variant!r}")
        if budget.isdigit():
            opts["memory_budget"] = int(budget)
        else:
            try:
                opts["memory_budget"] = float(budget)
            except ValueError:
                opts["memory_budget"] = budget
    return kind, opts


# ---------------------------------------------------------------- environment facts for the record

def versions():
    out = {}
    for dist in ("torch", "transformers", "peft", "triton", "bitsandbytes", "liger-kernel", "unsloth", "fxopt"):
        try:
            out[dist.replace("-", "_")] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist.replace("-", "_")] = None
    out.update({k.lower(): os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "FXOPT_PAIRED_WITH") if k in os.environ})  # gpu_pair.sh
    # experiment knobs that change fxopt's plan or kernels
    knobs = ("FXOPT_OFFLOAD_DEPTH", "FXOPT_OFFLOAD_BW", "FXOPT_OFFLOAD_CAPACITY", "FXOPT_LORA_DY_CONFIG",
             "FXOPT_LORA_GROUP", "FXOPT_LORA_GROUP_DX", "FXOPT_NORM_ADD")
    out.update({k.lower(): os.environ[k] for k in knobs if k in os.environ})
    return out


def git_sha():
    if os.environ.get("FXOPT_GIT_SHA"):
        return os.environ["FXOPT_GIT_SHA"]
    try:
        return subprocess.run(["git", "-C", REPO, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except Exception:
        return None


def fxopt_source_hash():
    """Hash of fxopt/**/*.py in this tree: identifies the code even where .git did not travel."""
    root, digest, found = os.path.join(REPO, "fxopt"), hashlib.sha1(), False
    for dirpath, dirnames, files in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(dirpath, name)
            digest.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as fh:
                digest.update(fh.read())
            found = True
    return digest.hexdigest()[:12] if found else None


def base_record(a):
    return dict(shape=a.shape, mode=a.mode, variant=a.variant, gc=a.gc, batch=a.batch, seq=a.seq,
                steps=a.steps, warmup=a.warmup, git_sha=git_sha(), fxopt_src=fxopt_source_hash(),
                command=" ".join(shlex.quote(x) for x in [os.path.basename(sys.executable)] + sys.argv),
                **versions())


# ---------------------------------------------------------------- model building

def quantize_linears_nf4(model, device):
    """Swap every nn.Linear except the LM head for a bitsandbytes NF4 Linear4bit (double quant, bf16 compute)."""
    import torch, bitsandbytes as bnb
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and name != "lm_head":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, q.to(device))  # .to() quantizes
                del child
    if device == "cuda":
        torch.cuda.empty_cache()
    return model


def build_hf_model(a, cfg, kind):
    import torch
    from transformers import AutoModelForCausalLM
    if kind == "liger":
        import liger_kernel.transformers as lk
        getattr(lk, f"apply_liger_kernel_to_{cfg.model_type}")()  # its defaults: rope, rms_norm, swiglu/geglu, FLCE
    attn = "eager" if cfg.model_type == "gemma2" else "sdpa"  # soft-capping needs eager attention
    with torch.device(a.device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.bfloat16)
    model.config.use_cache = False
    if a.mode == "qlora":
        model = quantize_linears_nf4(model, a.device)
    if a.mode in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none",
                                                 target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    if a.gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def save_random_checkpoint(cfg, folder):
    """unsloth loads only from a folder: write the random model and a tiny byte-level BPE tokenizer there."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 0
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    text = [" ".join(sorted(SHAPES)) + " benchmark of one fine-tuning step with random weights"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=260, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)


def build_unsloth_model(a, cfg, folder):
    import torch
    from unsloth import FastLanguageModel
    save_random_checkpoint(cfg, folder)
    gc = "unsloth" if a.gc else False
    model, _ = FastLanguageModel.from_pretrained(
        model_name=folder, max_seq_length=a.seq, dtype=torch.bfloat16, load_in_4bit=(a.mode == "qlora"),
        full_finetuning=(a.mode == "full"), use_gradient_checkpointing=gc, local_files_only=True)
    if a.mode != "full":
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                                 target_modules=LORA_TARGETS, use_gradient_checkpointing=gc,
                                                 random_state=0)
    return model


def resolve_fxopt_backend():
    """The 'fxopt' entry point when fxopt is pip-installed; else the callable itself (PYTHONPATH checkout)."""
    from torch._dynamo.backends.registry import lookup_backend
    try:
        lookup_backend("fxopt")
        return "fxopt", "entry_point"
    except Exception:
        import fxopt
        return fxopt.backend, "fxopt.backend"


# ---------------------------------------------------------------- the measurement

def _allocator_counts(cuda):
    """The CUDA caching allocator's cumulative device calls (cudaMalloc / cudaFree, retries after a failed malloc,
    which free cached blocks and synchronize)."""
    import torch
    if not cuda:
        return {}
    st = torch.cuda.memory_stats()
    return {k: int(st.get(k, 0)) for k in ("num_device_alloc", "num_device_free", "num_alloc_retries")}


def time_steps(step, a, rec):
    """Warm-up steps (wall clock, compilation included), then timed steps (CUDA events). Returns (median s, loss)."""
    import torch
    cuda = a.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
    mem = a.mem_peak and cuda
    if mem:   # the allocator's history over the warm-up (the peak under CUDA graphs is there: replays allocate nothing)
        import mem_peak
        baseline = torch.cuda.memory_allocated()
        mem_peak.start()
    log(f"warm-up {a.warmup} steps (compiles here)")
    t0, loss = time.time(), None
    for i in range(a.warmup):
        loss = step()
        if i == 0:
            sync()
            rec["first_step_s"] = round(time.time() - t0, 1)
    sync()
    rec["warm_s"] = round(time.time() - t0, 1)
    peak_warm = torch.cuda.max_memory_allocated() if cuda else 0
    if mem:
        rec["mem_peak"] = mem_peak.summarize(torch.cuda.memory._snapshot(), baseline)
        mem_peak.stop()
        log(f"memory peak: {rec['mem_peak']['peak_mib']} MiB; max_memory_allocated {peak_warm / 2**20:.0f} MiB")
    if cuda:   # between steps: weights, optimizer state, nothing of the step (grads are set to None)
        rec["resident_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        torch.cuda.reset_peak_memory_stats()
    log(f"warm-up done in {rec['warm_s']} s; timing {a.steps} steps")
    times = []
    # what else happens during each timed step (the 8B step without graphs spread 0.36-0.45 s while its host issue
    # time was 317 ms): Python garbage collections per generation, and the CUDA allocator's device calls
    gc_steps, alloc0 = [], _allocator_counts(cuda)
    for _ in range(a.steps):
        gc0 = [g["collections"] for g in gc.get_stats()]
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step()
            end.record()
            sync()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t1 = time.perf_counter()
            loss = step()
            times.append(time.perf_counter() - t1)
        gc_steps.append([g["collections"] - c for g, c in zip(gc.get_stats(), gc0)])
    rec["timed_gc_collections"] = gc_steps   # per timed step: [gen0, gen1, gen2]
    rec["timed_allocator"] = {k: v - alloc0[k] for k, v in _allocator_counts(cuda).items()}
    peak_timed = torch.cuda.max_memory_allocated() if cuda else 0
    rec.update(peak_gib=round(max(peak_warm, peak_timed) / 2**30, 2), peak_timed_gib=round(peak_timed / 2**30, 2),
               reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else 0.0,
               step_times_s=[round(t, 4) for t in times])
    return sorted(times)[len(times) // 2], loss


def graphs_replayed(fx_opts: dict) -> bool:
    """fxopt replays CUDA graphs: its option `cudagraphs` or env FXOPT_CUDAGRAPHS=1, as fxopt.config resolves them."""
    from fxopt.config import parse
    return parse(fx_opts).cudagraphs


def measure(a):
    kind, fx_opts = parse_variant(a.variant)
    fx_opts.update(json.loads(a.fxopt_options) if a.fxopt_options else {})
    if kind == "unsloth":  # must be imported before transformers
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
        os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", os.path.join(tempfile.gettempdir(), "unsloth_compiled_cache"))
        import unsloth  # noqa: F401  (patches transformers on import)
    import torch
    rec = base_record(a)
    rec["gpu"] = torch.cuda.get_device_name() if a.device == "cuda" else a.device
    torch.manual_seed(0)
    cfg = make_config(a.shape, a.seq)

    log(f"build {a.shape} {a.mode} {a.variant}{' +gc' if a.gc else ''} b{a.batch}x{a.seq}")
    t0 = time.time()
    if kind == "unsloth":
        import atexit, shutil
        folder = tempfile.mkdtemp(prefix="fxopt_bench_model_")
        atexit.register(shutil.rmtree, folder, True)  # 16 GB for the 8B shape: never leave it behind
        model = build_unsloth_model(a, cfg, folder)
    else:
        model = build_hf_model(a, cfg, kind)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    run_model = model
    if a.loss_only:   # the step uses only .loss: compile a function that returns only it (logits become dead,
        # so the lm_head + loss can fuse); applied to every compiled variant alike
        from transformers.modeling_outputs import CausalLMOutput

        def loss_only(**batch):
            return CausalLMOutput(loss=model(**batch).loss)
        run_model = loss_only
        rec["loss_only"] = True
    if kind == "inductor":
        if fx_opts.get("activation_memory_budget") is not None:
            import torch._functorch.config as fconfig
            if not hasattr(fconfig, "activation_memory_budget"):
                raise SystemExit("this torch has no torch._functorch.config.activation_memory_budget")
            fconfig.activation_memory_budget = fx_opts["activation_memory_budget"]
            rec["activation_memory_budget"] = fx_opts["activation_memory_budget"]
        run_model = torch.compile(run_model)
    elif kind == "fxopt":
        backend, rec["fxopt_backend"] = resolve_fxopt_backend()
        rec["fxopt_options"] = fx_opts
        run_model = torch.compile(run_model, backend=backend, options=fx_opts or None)
    rec["build_s"] = round(time.time() - t0, 1)
    rec["trainable"] = sum(p.numel() for p in params)
    log(f"build done in {rec['build_s']} s, {rec['trainable']:,} trainable params")

    gen = torch.Generator(device=a.device).manual_seed(1)

    def step():
        ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), device=a.device, generator=gen)
        loss = run_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        # a copy: under CUDA graphs (fxopt option "cudagraphs") the graph's output buffer is rewritten by the next step
        return loss.detach().clone()

    if kind == "fxopt" and graphs_replayed(fx_opts) and a.warmup < 2:
        # cudagraph trees run the first call as a warm-up and record on the second: a timed second call is the
        # recording (8B at 65,536 tokens: 15.5 s recording vs 13.9 s replay), not the steady step
        rec["warmup_raised"] = f"{a.warmup} -> 2 (CUDA graphs record on the second call)"
        a.warmup = rec["warmup"] = 2
    med, loss = time_steps(step, a, rec)
    if a.profile and a.device == "cuda":
        from benchmarks.step_profile import host_profile, profile_step
        rec["profile"] = profile_step(step)
        rec["profile"]["host"] = host_profile(step)
    tflops = step_flops(cfg, a.batch, a.seq, a.mode == "full") / med / 1e12
    rec.update(step_s=round(med, 4), tok_per_s=round(a.batch * a.seq / med), tflops=round(tflops, 1),
               mfu=round(tflops / GEMM_CEILING_TFLOPS, 3), loss=round(float(loss), 4))
    log(f"median step {med:.4f} s, {rec['tok_per_s']:,} tok/s, {rec['tflops']} TFLOP/s, peak {rec['peak_gib']} GiB")
    if kind in ("inductor", "fxopt"):
        try:
            from torch._dynamo.utils import counters
            rec["graph_breaks"] = sum(counters["graph_break"].values())
            rec["unique_graphs"] = counters["stats"]["unique_graphs"]
        except Exception:
            pass
    if kind == "fxopt":
        try:
            import fxopt
            rec["fxopt_report"] = fxopt.last_report().to_dict()
            from fxopt.kernels.registry import TUNING_LOG
            rec["tuning"] = TUNING_LOG   # the first-call choices: which candidate won, each one's ms
            try:   # Triton launches through JITFunction vs the compiled kernel's launcher (fxopt.kernels.launch)
                from fxopt.kernels import launch as fl
                rec["fast_launch"] = dict(fl.STATS, broken=fl._state["broken"])
            except ImportError:
                pass
        except Exception as e:  # the package is under construction: record why there is no report
            rec["fxopt_report_error"] = f"{type(e).__name__}: {e}"[:300]
    if kind == "unsloth":
        rec["unsloth"] = getattr(sys.modules.get("unsloth"), "__version__", rec.get("unsloth"))
    return rec


def is_oom(exc):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def run_one(a):
    """Measure, or fail with a RESULT row that says why. Returns the exit code."""
    try:
        rec, code = measure(a), 0
    except ImportError as e:
        rec, code = dict(base_record(a), error=f"missing package: {e}"), 2
    except Exception as e:
        oom = is_oom(e)
        traceback.print_exc()
        rec = dict(base_record(a), error=("OOM: " if oom else "") + f"{type(e).__name__}: {e}"[:600], oom=oom)
        code = 3 if oom else 1
    print("RESULT " + json.dumps(rec, default=str), flush=True)
    return code


def dry_run(a):
    parse_variant(a.variant)
    cfg = make_config(a.shape, a.seq)
    n_mm = matmul_params(cfg)
    try:  # cross-check the analytic count against the real module tree, built on the meta device
        import torch
        from transformers import AutoModelForCausalLM
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(cfg)
        counted = sum(x.weight.numel() for x in m.modules() if isinstance(x, torch.nn.Linear))
    except Exception as e:
        counted = f"n/a ({type(e).__name__})"
    flops = step_flops(cfg, a.batch, a.seq, a.mode == "full")
    tokens = a.batch * a.seq
    print(f"shape {a.shape}: {cfg.model_type}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"heads {cfg.num_attention_heads}/{cfg.num_key_value_heads} x {head_dim(cfg)}, ffn {cfg.intermediate_size}, "
          f"vocab {cfg.vocab_size}")
    print(f"matmul params N = {n_mm:,} (nn.Linear weights on meta device: {counted if isinstance(counted, str) else f'{counted:,}'})")
    print(f"step FLOPs = ({'3' if a.mode == 'full' else '2'}) x [2*N*T + 2*L*b*s^2*H*d] with T = {a.batch}x{a.seq} = "
          f"{tokens:,} tokens -> {flops / 1e12:.2f} TFLOP per step")
    print(f"at {GEMM_CEILING_TFLOPS:.0f} TFLOP/s (MFU 1.0): {flops / GEMM_CEILING_TFLOPS / 1e12:.4f} s/step, "
          f"{tokens * GEMM_CEILING_TFLOPS * 1e12 / flops:,.0f} tok/s")
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    p.add_argument("--mode", default="lora", choices=["lora", "qlora", "full"])
    p.add_argument("--variant", default="eager", help="eager | inductor | liger | unsloth | fxopt[:memory_budget]")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=8, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--gc", action="store_true", help="gradient checkpointing (HF non-reentrant; unsloth's own)")
    p.add_argument("--profile", action="store_true", help="after timing, profile one step (top GPU kernels)")
    p.add_argument("--mem-peak", action="store_true",
                   help="record the allocator's history over the warm-up; the blocks live at the peak (mem_peak.py)")
    p.add_argument("--loss-only", action="store_true",
                   help="compile a function returning only the loss (no logits output), for every compiled variant")
    p.add_argument("--fxopt-options", default=None, help="extra fxopt options as JSON, e.g. '{\"disable\":[\"rope\"]}'")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test this script (shape tiny)")
    p.add_argument("--dry-run", action="store_true", help="print config and FLOPs formula; no CUDA")
    p.add_argument("--max-seq-search", action="store_true",
                   help="find the largest seq that fits (start at --seq, double, bisect at 1024)")
    p.add_argument("--time-limit", type=float, default=520, help="seconds for --max-seq-search in all")
    p.add_argument("--seq-cap", type=int, default=262144, help="largest seq --max-seq-search tries")
    return p.parse_args(argv)


def main():
    a = parse_args()
    if a.dry_run:
        return dry_run(a)
    if a.max_seq_search:
        sys.path.insert(0, REPO)
        from benchmarks import seq_search
        return seq_search.search(a, base_record(a))
    return run_one(a)


if __name__ == "__main__":
    sys.exit(main())
