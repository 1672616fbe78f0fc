"""Fine-tuning steps with fxopt on several GPUs: DDP, FSDP2 (fully_shard + torch.compile per decoder layer), or one.

  torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --wrap ddp   --mode lora --shape 1b --batch 2 --seq 2048
  torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --wrap fsdp2 --mode lora --shape 1b --batch 2 --seq 2048
  python benchmarks/multi_gpu.py --wrap single --mode lora --shape 1b --batch 4 --seq 2048   # same global batch
  torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --device cpu --shape tiny --seq 64 --wrap ddp  # gloo, CPU
  python benchmarks/multi_gpu.py --summary multi_gpu.jsonl                                         # table

Data: step i's global batch is `--batch x world` rows of random token ids drawn from seed 1000+i, whatever the
world size; rank r trains on rows [r*batch, (r+1)*batch). A 2-rank run with --batch 2 therefore sees exactly the
data of a 1-rank run with --batch 4, the averaged gradients are the same, and so is the loss curve (bf16 within
rounding, fp32 ~1e-6). Model weights come from seed 0 on every rank (shapes and builders: train_step.py).

DDP: torch.compile(DDP(model)), the order PyTorch documents. DDPOptimizer (dynamo's optimize_ddp) would cut the
graph at gradient-bucket boundaries so all-reduces overlap the backward, but every piece is a separate fxopt graph
and a cut inside a pattern loses that match (1B full fine-tuning: 2.5 GB of gradients, about 100 pieces). So the
default is one whole graph (--ddp-graph whole; all-reduce after the backward: LoRA/QLoRA adapter gradients are
small, 1B: 45 MB fp32); --ddp-graph split turns DDPOptimizer on.
FSDP2: fully_shard(layer) for each decoder layer (fxopt.hf.decoder_layers: the largest nn.ModuleList of one
class), then the root; layer.compile(backend=...) per layer as torchtitan does: FSDP2's all-gather hooks run outside the graph, each layer
is one graph, and identical layers share compiled code (a LoRA model compiles two: layer 0, whose input needs no
grad, and the rest). Embeddings, final norm, LM head and loss run eager.
QLoRA + FSDP2: bitsandbytes Params4bit cannot be sharded (a DTensor shard loses its quant_state), so the NF4
weights are passed as fully_shard(ignored_params=...): each rank keeps the whole 4-bit base, FSDP2 shards
the LoRA adapters (and bf16 norms/embeddings). DDP + QLoRA replicates the same way.

Multicast (NVLS) stays off: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 are set
here (setdefault) before the process group starts; the launcher (multi_gpu.sh) exports them too.
Rank 0 appends one JSON line per run to --out; exit codes: 0 ok, 1 crash, 2 missing package, 3 out of memory.
"""
import argparse, json, os, shlex, sys, time, traceback

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
for _k, _v in MULTICAST_OFF.items():
    os.environ.setdefault(_k, _v)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# run as a script, benchmarks/ is sys.path[0] and its kernels.py shadows the `kernels` package bitsandbytes probes
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
if REPO not in sys.path:
    sys.path.insert(0, REPO)
import torch  # noqa: E402  (after the multicast settings)
import torch.distributed as dist  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from benchmarks import train_step as ts  # noqa: E402  (shapes, model builders, versions, FLOPs)

DATA_SEED = 1000


def log(msg):
    print(f"[multi_gpu] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- process group

def world():
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(a):
    """Start the process group from torchrun's environment (nccl on CUDA, gloo on CPU); nothing for 1 process."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if a.device == "cuda":
        torch.cuda.set_device(local)
    if dist.is_initialized() or "RANK" not in os.environ:
        return
    dist.init_process_group("nccl" if a.device == "cuda" else "gloo")


def device(a):
    return torch.device("cuda", torch.cuda.current_device()) if a.device == "cuda" else torch.device("cpu")


# ---------------------------------------------------------------- model, backend, wrapping

def nf4_params(module):
    """bitsandbytes Params4bit weights (matched by class name: bitsandbytes is only needed for qlora)."""
    return {p for p in module.parameters() if type(p).__name__ == "Params4bit"}


def build_model(a):
    torch.manual_seed(0)
    cfg = ts.make_config(a.shape, a.seq)
    spec = argparse.Namespace(device=a.device, mode=a.mode, gc=a.gc)
    model = ts.build_hf_model(spec, cfg, "eager")   # on torch.device(a.device): the current CUDA device
    if a.dtype == "float32":
        if a.mode == "qlora":
            raise SystemExit("--dtype float32 is for lora/full; qlora keeps a bf16 compute dtype")
        model.float()
    if a.loss_only:
        model = LossOnly(model)
    return model.train(), cfg


class LossOnly(torch.nn.Module):
    """The model's output reduced to its loss: the logits stay inside the compiled graph, so fxopt can fuse the
    LM head with the cross-entropy (linear_cross_entropy). An nn.Module, so DDP and fully_shard can wrap it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **batch):
        from transformers.modeling_outputs import CausalLMOutput
        return CausalLMOutput(loss=self.model(**batch).loss)


class CollectReports:
    """fxopt as a callable backend that keeps every report: per-layer compiles are separate torch.compile calls,
    each with its own `fxopt.last_report()`; DDPOptimizer's pieces of one graph share one report."""

    def __init__(self):
        from torch._dynamo.backends.registry import lookup_backend
        try:
            self.fn, self.via = lookup_backend("fxopt"), "entry_point"
        except Exception:  # a PYTHONPATH checkout without the entry point
            import fxopt
            self.fn, self.via = fxopt.backend, "fxopt.backend"
        self.reports = {}
        self.calls = 0

    def __call__(self, gm, example_inputs, **kw):
        import fxopt
        out = self.fn(gm, example_inputs, **kw)
        self.calls += 1
        r = fxopt.last_report()
        if r is not None:
            self.reports[id(r)] = r
        return out

    def summary(self):
        matched, rejected, fallbacks, graphs = {}, [], [], 0
        for r in self.reports.values():
            for k, v in r.matched.items():
                matched[k] = matched.get(k, 0) + v
            rejected += sorted({f"{x.pattern}: {x.reason}"[:160] for x in r.rejected})
            fallbacks += [f"{f.what}: {f.error}"[:200] for f in r.fallbacks]
            graphs += r.graphs
        return dict(matched=matched, rejected=rejected, fallbacks=fallbacks, graphs=graphs,
                    backend_calls=self.calls, compile_calls=len(self.reports), backend_via=self.via)


def make_backend(a):
    """(backend for torch.compile or None for eager, its options, the fxopt report collector or None)."""
    if a.backend == "eager":
        return None, None, None
    if a.backend == "inductor":
        return "inductor", None, None
    opts = json.loads(a.fxopt_options) if a.fxopt_options else None
    col = CollectReports()
    return col, opts, col


def compiled(module, backend, opts):
    return module if backend is None else torch.compile(module, backend=backend, options=opts)


def wrap_ddp(a, model, backend, opts):
    """torch.compile(DDP(model)), the order PyTorch documents. DDP(torch.compile(model)) works as well (tested on
    torch 2.13/gloo: same losses, no graph break in DDP's Python forward): either way dynamo compiles the model's
    frames while DDP's forward is active, and that alone turns on DDPOptimizer when optimize_ddp is set."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    # ddp_graph "split": DDPOptimizer cuts the graph at bucket boundaries (first bucket 1 MB, then bucket_cap_mb)
    # so all-reduces overlap the backward; each piece is a separate fxopt graph, and a cut inside a pattern loses
    # that match (tiny model, forced 6 pieces: lora 9 of 14, swiglu 1 of 2). "whole": one graph; the gradients
    # are all-reduced after the backward. Read when dynamo first compiles, so set before the first step.
    torch._dynamo.config.optimize_ddp = a.ddp_graph == "split"
    dev = device(a)
    kw = {} if a.bucket_cap_mb is None else dict(bucket_cap_mb=a.bucket_cap_mb)
    ddp = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, **kw)
    return compiled(ddp, backend, opts), {}


def wrap_fsdp2(a, model, backend, opts):
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6 kept it private
        from torch.distributed._composable.fsdp import fully_shard
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device(a).type, (world()[1],))
    kw = dict(mesh=mesh)
    ignored = nf4_params(model)
    if ignored:   # QLoRA: sharded Params4bit lose their quant_state ("ValueError: quant_state is required")
        import inspect
        if "ignored_params" not in inspect.signature(fully_shard).parameters:
            raise SystemExit("FSDP2 + QLoRA needs fully_shard(ignored_params=...) (torch >= 2.7): bitsandbytes "
                             "Params4bit cannot be sharded. Use --wrap ddp for QLoRA.")
        kw["ignored_params"] = ignored   # each rank keeps the whole NF4 base; adapters and bf16 rest sharded
    from fxopt.hf import decoder_layers
    layers = list(decoder_layers(model))
    for layer in layers:
        fully_shard(layer, **kw)
        if backend is not None:   # in place, so FSDP2's hooks stay on the module and run outside the graph
            layer.compile(backend=backend, options=opts)
    fully_shard(model, **kw)
    return model, dict(compiled_layers=len(layers) if backend is not None else 0, nf4_replicated=len(ignored))


def wrap(a, model, backend, opts):
    """(the module a step calls, facts for the record)."""
    if a.wrap == "single":
        if world()[1] != 1:
            raise SystemExit("--wrap single runs one process (python, or torchrun --nproc-per-node 1)")
        return compiled(model, backend, opts), {}
    if a.wrap == "ddp":
        return wrap_ddp(a, model, backend, opts)
    return wrap_fsdp2(a, model, backend, opts)


# ---------------------------------------------------------------- the run

def global_batch(a, cfg, step, n_ranks):
    """Step `step`'s token ids for all ranks and micro-steps: rank r's micro-step j trains on rows
    [(r*accum + j)*batch, +batch), so the rows depend only on the global batch size, not on how it is split."""
    g = torch.Generator().manual_seed(DATA_SEED + (step % a.data_batches if a.data_batches else step))
    return torch.randint(3, cfg.vocab_size, (a.batch * a.accum * n_ranks, a.seq), generator=g)


def base_record(a):
    rank, n = world()
    return dict(wrap=a.wrap, mode=a.mode, shape=a.shape, backend=a.backend, world=n, batch_per_rank=a.batch,
                accum=a.accum, global_batch=a.batch * a.accum * n, seq=a.seq, data_batches=a.data_batches,
                lr=a.lr, steps=a.steps, warmup=a.warmup, gc=a.gc, dtype=a.dtype, loss_only=a.loss_only,
                **(dict(ddp_graph=a.ddp_graph, bucket_cap_mb=a.bucket_cap_mb) if a.wrap == "ddp" else {}),
                device=a.device, git_sha=ts.git_sha(), fxopt_src=ts.fxopt_source_hash(),
                command=" ".join(shlex.quote(x) for x in [os.path.basename(sys.executable)] + sys.argv),
                env={k: os.environ.get(k) for k in MULTICAST_OFF}, **ts.versions())


def gather(obj):
    _, n = world()
    if n == 1:
        return [obj]
    out = [None] * n
    dist.all_gather_object(out, obj)
    return out


def train(a):
    """Build, wrap, run warm-up + timed steps; returns the record (the same on every rank)."""
    rank, n = world()
    rec = base_record(a)
    dev = device(a)
    cuda = dev.type == "cuda"
    rec["gpu"] = torch.cuda.get_device_name() if cuda else "cpu"
    if a.backend == "fxopt":
        import fxopt  # noqa: F401  (fail early with exit code 2 when missing)
    t0 = time.time()
    model, cfg = build_model(a)
    backend, opts, col = make_backend(a)
    if opts:
        rec["fxopt_options"] = opts
    run_model, facts = wrap(a, model, backend, opts)
    rec.update(facts)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused AdamW on CUDA; FSDP2's DTensor parameters take the default (foreach) path, as torchtitan does
    opt = torch.optim.AdamW(params, lr=a.lr, fused=cuda and a.wrap != "fsdp2")
    rec["build_s"] = round(time.time() - t0, 1)
    rec["trainable"] = sum(p.numel() for p in params)  # DTensor numel is the global count under FSDP2
    counters.clear()
    log(f"rank {rank}/{n}: {a.wrap} {a.mode} {a.shape} {a.backend} b{a.batch}x{a.seq} built in {rec['build_s']} s")

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    losses, times = [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_warm = time.time()
    for i in range(a.warmup + a.steps):
        rows = global_batch(a, cfg, i, n)
        sync()
        t1 = time.perf_counter()
        step_loss = 0.0
        for j in range(a.accum):   # (no no_sync: every micro-step synchronizes gradients; correct, not fastest)
            lo = (rank * a.accum + j) * a.batch
            ids = rows[lo:lo + a.batch].to(dev)
            loss = run_model(input_ids=ids, labels=ids).loss
            (loss / a.accum).backward()
            step_loss = step_loss + loss.detach().float()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t1)
        losses.append(step_loss / a.accum)
        if i + 1 == a.warmup:
            rec["warm_s"] = round(time.time() - t_warm, 1)
    loss_t = torch.stack(losses)
    if n > 1:   # each rank's loss is the mean over its equal-sized slice: their mean is the global-batch loss
        dist.all_reduce(loss_t)
        loss_t /= n
    timed = torch.tensor(times[a.warmup:] or times, dtype=torch.float64, device=dev)   # NCCL: CUDA tensors only
    if n > 1:   # a step lasts as long as its slowest rank
        dist.all_reduce(timed, op=dist.ReduceOp.MAX)
    timed = timed.tolist()
    step_s = sorted(timed)[len(timed) // 2]   # as train_step.py
    tokens = a.batch * a.accum * n * a.seq
    rec.update(losses=loss_t.tolist(), loss=round(float(loss_t[-1]), 6),
               step_times_s=[round(x, 4) for x in timed], step_s=round(step_s, 4),
               tok_per_s=round(tokens / step_s), tok_per_s_per_gpu=round(tokens / step_s / n))
    if a.device == "cuda":
        tfl = ts.step_flops(cfg, a.batch * a.accum * n, a.seq, a.mode == "full") / step_s / 1e12
        rec["tflops_per_gpu"] = round(tfl / n, 1)
    peaks = gather((torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()) if cuda else (None, None))
    rec["peak_gib_per_rank"] = [None if p is None else round(p / 2**30, 2) for p, _ in peaks]
    rec["reserved_gib_per_rank"] = [None if r is None else round(r / 2**30, 2) for _, r in peaks]
    if col is not None:
        rec["fxopt_per_rank"] = gather(col.summary())
        rec["fxopt_matched"] = rec["fxopt_per_rank"][0]["matched"]
    rec["graph_breaks"] = sum(counters["graph_break"].values())   # DDP: its own Python forward breaks (3)
    rec["compile_cache"] = {f"{grp}.{k}": v for grp in ("inductor", "aot_autograd")
                            for k, v in counters[grp].items() if "cache" in k}
    return rec


def run_one(a):
    """Train, or record why not; rank 0 prints `RESULT {json}` and appends it to --out. Returns the exit code."""
    try:
        init_distributed(a)
        rec, code = train(a), 0
    except ImportError as e:
        rec, code = dict(base_record(a), error=f"missing package: {e}"), 2
    except SystemExit as e:
        if isinstance(e.code, int):
            raise
        rec, code = dict(base_record(a), error=str(e.code)), 1
    except Exception as e:
        oom = ts.is_oom(e)
        traceback.print_exc()
        rec = dict(base_record(a), error=("OOM: " if oom else "") + f"{type(e).__name__}: {e}"[:600], oom=oom)
        code = 3 if oom else 1
    rank, _ = world()
    if rank == 0:
        print("RESULT " + json.dumps(rec, default=str), flush=True)
        if a.out:
            with open(a.out, "a") as fh:
                fh.write(json.dumps(rec, default=str) + "\n")
    if "error" in rec:
        log(f"rank {rank}: {rec['error']}")
    return code


# ---------------------------------------------------------------- summary of a results file

def summarize(paths):
    """Markdown table: tok/s and its ratio to the single-process row with the same mode/shape/backend/global
    batch/seq, per-rank peak memory, warm-up (compile) time, largest loss difference from that row over all steps."""
    rows = [json.loads(l) for p in paths for l in open(p) if l.strip()]
    key = lambda r: (r.get("mode"), r.get("shape"), r.get("backend"), r.get("global_batch"), r.get("seq"))
    single = {key(r): r for r in rows if r.get("wrap") == "single" and "error" not in r}
    out = ["| wrap | mode | shape | backend | GPUs | batch/rank x seq | tok/s (all GPUs) | vs 1 GPU | "
           "peak GiB per rank | warm-up s | max loss diff vs 1 GPU | fxopt matched (rank 0) |", "|" + "---|" * 12]
    for r in rows:
        g = lambda k: "-" if r.get(k) is None else r[k]
        micro = f"{g('batch_per_rank')} x {g('seq')}" + (f" x{r['accum']} accum" if r.get("accum", 1) > 1 else "")
        head = f"| {g('wrap')} | {g('mode')} | {g('shape')} | {g('backend')} | {g('world')} | {micro} |"
        if "error" in r:
            out.append(head + f" error: {str(r['error'])[:160]} |" + " |" * 5)
            continue
        base = single.get(key(r))
        base = None if base is r else base
        scale = f"{r['tok_per_s'] / base['tok_per_s']:.2f}x" if base else "-"
        diff = max(abs(x - y) for x, y in zip(r["losses"], base["losses"])) if base else None
        m = {k: v for k, v in (r.get("fxopt_matched") or {}).items() if v}
        out.append(head + f" {r['tok_per_s']:,} | {scale} | {r['peak_gib_per_rank']} | {r.get('warm_s')} | "
                   f"{'-' if diff is None else f'{diff:.2e}'} | {m or '-'} |")
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wrap", default="ddp", choices=["ddp", "fsdp2", "single"])
    p.add_argument("--mode", default="lora", choices=["lora", "qlora", "full"])
    p.add_argument("--shape", default="1b", choices=["tiny", "1b", "8b"])
    p.add_argument("--backend", default="fxopt", choices=["fxopt", "inductor", "eager"])
    p.add_argument("--fxopt-options", default=None, help='JSON, e.g. \'{"inductor": false}\'')
    p.add_argument("--steps", type=int, default=8, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="first steps, untimed (compilation happens here)")
    p.add_argument("--batch", type=int, default=2, help="rows per rank and micro-step; global: batch x accum x world")
    p.add_argument("--accum", type=int, default=1,
                   help="micro-steps per step (gradient accumulation): 1 GPU with --batch 2 --accum 2 trains on the "
                        "rows 2 GPUs with --batch 2 do, with the same per-GPU shapes")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--data-batches", type=int, default=0,
                   help="cycle through this many global batches (1: the same batch every step, so the loss falls); "
                        "0: a new batch every step")
    p.add_argument("--loss-only", action="store_true",
                   help="the model returns only the loss (LM head + cross-entropy can fuse where it is compiled)")
    p.add_argument("--gc", action="store_true", help="Hugging Face gradient checkpointing (non-reentrant)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="float32: CPU parity")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: gloo, shape tiny")
    p.add_argument("--ddp-graph", default="whole", choices=["whole", "split"],
                   help="DDP: one graph, gradients all-reduced after the backward (default), or DDPOptimizer's "
                        "pieces cut at bucket boundaries (overlap, but a cut inside a pattern loses that match)")
    p.add_argument("--bucket-cap-mb", type=float, default=None, help="DDP bucket size (default DDP's 25 MB)")
    p.add_argument("--out", default=None, help="JSON lines file rank 0 appends the record to")
    p.add_argument("--summary", nargs="+", metavar="JSONL", help="print a markdown table of these files; no run")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    if a.summary:
        print(summarize(a.summary))
        return 0
    code = run_one(a)
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
