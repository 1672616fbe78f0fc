"""Architecture coverage: compile tiny random transformers models with fxopt and record what happened.

One case = (model_type, attention implementation, adapter in {"plain", "lora"}). For each case:
  1. build a tiny random config (the recipe of /work/shared/tools/check_models.py: a SMALL dict of sizes, dropouts
     zeroed) and two identical models (compiled, eager); LoRA = peft r=4, alpha=8, all-linear, random B
  2. count dynamo graphs with a plain counting backend (the graph count without fxopt)
  3. compile with fxopt (aot_eager hand-off by default), one forward + backward; compare loss and every grad with
     eager (max relative L2 difference); read fxopt.last_report(): matched, rejected, fallbacks, graphs
Nothing here knows an architecture: the model types, sizes and per-type config tweaks come from the caller
(tests/models/expectations.py holds them for the repo's matrix). `python -m fxopt coverage` renders docs/coverage.md.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import math
import re
import sys
import time

import torch

ADAPTERS = ("plain", "lora")


@dataclasses.dataclass
class Result:
    arch: str
    attn: str
    adapter: str
    graphs_plain: int = 0              # dynamo graphs without fxopt (counting backend)
    graphs: int = 0                    # dynamo graphs fxopt compiled (report.graphs)
    matched: dict = dataclasses.field(default_factory=dict)
    rejected: list = dataclasses.field(default_factory=list)     # [(pattern, reason)]
    fallbacks: list = dataclasses.field(default_factory=list)    # [(what, error)]
    ops_in_compiled: dict = dataclasses.field(default_factory=dict)
    grouped: dict = dataclasses.field(default_factory=dict)   # matches run inside a group call (patterns/lora_group)
    rel: float = float("nan")          # max relative L2 difference vs eager over the loss and every grad
    rel64: tuple | None = None         # when rel > TOL: (fxopt, fp32 eager) max rel difference vs an fp64 eager run
    n_grads: int = 0
    lora_layers: int = 0               # modules peft gave a LoRA adapter (all-linear)
    grad_mismatch: str | None = None   # a parameter whose grad presence differs from eager
    seconds: float = 0.0
    error: str | None = None           # the case could not run (unsupported attention, exception)

    @property
    def label(self) -> str:
        return f"{self.arch}:{self.attn}+{self.adapter}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rel"] = None if math.isnan(self.rel) else self.rel
        return d


def tiny_config(arch: str, small: dict, drop=(), **overrides):
    """AutoConfig.for_model(arch, **small) with `drop` keys removed, size fields forced, dropouts zeroed."""
    from transformers import AutoConfig
    kw = {k: v for k, v in small.items() if k not in drop}
    kw.update(overrides)
    try:
        cfg = AutoConfig.for_model(arch, **kw)
    except (AttributeError, TypeError):
        kw.pop("head_dim", None)
        cfg = AutoConfig.for_model(arch, **kw)
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        try:
            setattr(cfg, k, kw[k])
        except Exception:  # noqa: BLE001 - a config without that field (or a read-only alias)
            pass
    for k in list(vars(cfg)):   # dropout off: eager and compiled must compute the same function
        if (k.endswith("dropout") or k.endswith("pdrop") or k.endswith("dropout_prob")) and \
                isinstance(getattr(cfg, k), float):
            setattr(cfg, k, 0.0)
    return cfg


def build(cfg, attn: str, adapter: str, dtype=torch.float32):
    """(compiled-to-be, eager) identical models; LoRA as check_models.py builds it."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    a = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).to(dtype)
    b = copy.deepcopy(a)
    out = []
    for m in (a, b):
        m.config.use_cache = False
        if hasattr(m, "loss_type"):
            m.loss_type = "ForCausalLM"   # gpt2 & co. otherwise break the graph on a warning_once
        if adapter == "lora":
            from peft import LoraConfig, get_peft_model
            torch.manual_seed(1)
            m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                             init_lora_weights=False))
        elif adapter != "plain":
            raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")
        out.append(m.train())
    return out


def batch(vocab: int, b=2, s=24, seed=2, ignore_prefix=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, s), generator=g)
    labels = ids.clone()
    labels[0, :ignore_prefix] = -100
    return ids, labels


def count_dynamo_graphs(model, ids, labels) -> int:
    """Dynamo graphs of one training forward without fxopt (a graph break makes several), counted as fxopt's report
    counts them: per frame, the graphs of its latest compile (a recompile of a frame replaces its graphs)."""
    frames: dict = {}

    def counting(gm, example_inputs):
        try:
            from torch._guards import CompileContext
            cid = CompileContext.current_compile_id()
        except Exception:  # noqa: BLE001 - private API
            cid = None
        frame, count = getattr(cid, "frame_id", None), getattr(cid, "frame_compile_id", None)
        old = frames.get(frame)
        frames[frame] = [count, 1] if old is None or old[0] != count else [count, old[1] + 1]
        return gm.forward
    torch._dynamo.reset()
    torch.compile(model, backend=counting)(input_ids=ids, labels=labels)
    torch._dynamo.reset()
    return sum(n for _, n in frames.values())


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


GRAD_FLOOR = 1e-4   # x the largest reference grad norm of the model: the smallest norm a grad's difference is
#                     relative to. A grad that is zero by math (OPT/XGLM/BioGPT k_proj.bias: softmax ignores a constant
#                     added to every score) holds fp32 noise of ~1e-10 in both runs; relative to itself that noise
#                     differs by 100%, relative to 1e-4 x max norm it is ~1e-6.


TOL = 1e-4   # max relative difference vs fp32 eager


def _vs_fp64(ref, ids, labels, loss, ref_loss, comp) -> tuple:
    """(fxopt's, fp32 eager's) max relative difference from an fp64 copy of the eager model (same inputs)."""
    m64 = copy.deepcopy(ref).double()
    for p in m64.parameters():
        p.grad = None
    l64 = m64(input_ids=ids, labels=labels).loss
    l64.backward()
    truth = [p.grad for p in m64.parameters() if p.grad is not None]

    def worst(model, l):
        pairs = list(zip([p.grad for p in model.parameters() if p.grad is not None], truth))
        return max([_rel(l, l64)] + grad_diffs(pairs))
    return worst(comp, loss), worst(ref, ref_loss)


def grad_diffs(pairs) -> list[float]:
    """||a - b|| / max(||b||, GRAD_FLOOR * max ||b||) for each (compiled grad, eager grad)."""
    norms = [float(b.detach().double().norm()) for _, b in pairs]
    floor = GRAD_FLOOR * max(norms, default=0.0)
    return [float((a.detach().double() - b.detach().double()).norm()) / max(n, floor, 1e-30)
            for (a, b), n in zip(pairs, norms)]


@contextlib.contextmanager
def cpu_ops(mode: str | None):
    """How fxopt ops run on CPU tensors for the duration (fxopt reads TRITON_INTERPRET per call):
    "reference" = their PyTorch reference (what a CPU user and check_models.py get), "triton" = the Triton kernels
    under the interpreter (TRITON_INTERPRET=1 must have been set before triton was imported), None = as set."""
    import os
    if mode is None:
        yield
        return
    if mode not in ("reference", "triton"):
        raise ValueError(f"cpu ops mode must be 'reference' or 'triton', got {mode!r}")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if mode == "triton" else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def run_case(arch: str, attn: str, adapter: str, small: dict, drop=(), overrides=None,
             options=None, ops: str | None = None) -> Result:
    """One case, never raising: an exception is recorded in Result.error. `ops`: see cpu_ops."""
    with cpu_ops(ops):
        return _run_case(arch, attn, adapter, small, drop, overrides, options)


def _run_case(arch, attn, adapter, small, drop, overrides, options) -> Result:
    import fxopt
    r = Result(arch, attn, adapter)
    t0 = time.time()
    try:
        cfg = tiny_config(arch, small, drop, **(overrides or {}))
        comp, ref = build(cfg, attn, adapter)
        ids, labels = batch(small["vocab_size"])
        r.lora_layers = sum(1 for m in comp.modules() if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)
                            and len(m.lora_A))
        r.graphs_plain = count_dynamo_graphs(comp, ids, labels)
        cm = torch.compile(comp, backend="fxopt", options=dict({"inductor": False}, **(options or {})))
        out = cm(input_ids=ids, labels=labels)
        out.loss.backward()
        rout = ref(input_ids=ids, labels=labels)
        rout.loss.backward()
        rep = fxopt.last_report()
        r.graphs = rep.graphs
        r.matched = {k: v for k, v in rep.matched.items()}
        r.rejected = [(x.pattern, x.reason) for x in rep.rejected]
        r.fallbacks = [(f.what, f.error) for f in rep.fallbacks]
        r.ops_in_compiled = rep.ops_in_compiled()
        r.grouped = rep.grouped
        pairs = []
        for (na, pa), (_, pb) in zip(comp.named_parameters(), ref.named_parameters()):
            if (pa.grad is None) != (pb.grad is None):
                r.grad_mismatch = na
            elif pa.grad is not None:
                pairs.append((pa.grad, pb.grad))
        r.n_grads = len(pairs)
        r.rel = max([_rel(out.loss, rout.loss)] + grad_diffs(pairs))
        if r.rel > TOL:   # is fp32 eager itself that far from the math? ask an fp64 run of the same model
            try:
                r.rel64 = _vs_fp64(ref, ids, labels, out.loss, rout.loss, comp)
            except Exception:  # noqa: BLE001 - no fp64 arbiter for this model: the fp32 comparison stands
                r.rel64 = None
    except Exception as e:  # noqa: BLE001 - a case that cannot run is a result too
        msg = str(e).splitlines()[0] if str(e) else ""
        r.error = f"{type(e).__name__}: {msg[:200]}"
    finally:
        torch._dynamo.reset()
    r.seconds = time.time() - t0
    return r


def _fp64_clears(r: Result, tol: float = TOL) -> bool:
    """An fp64 run of the model puts fxopt no further from the math than fp32 eager (or within tol of it)."""
    return r.rel64 is not None and r.rel64[0] <= max(tol, r.rel64[1])


def problems(r: Result, tol: float = TOL) -> list[str]:
    """What is wrong with a case regardless of pattern expectations: error, graph break added, numerics, fallback.
    Beyond `tol` from fp32 eager passes only where an fp64 run says fxopt is no further from the math than fp32
    eager (a model whose fp32 gradients are that sensitive)."""
    out = []
    if r.error:
        return [f"error: {r.error}"]
    if r.graphs != r.graphs_plain:
        out.append(f"fxopt compiled {r.graphs} dynamo graph(s), plain dynamo {r.graphs_plain}")
    if not (r.rel <= tol) and not _fp64_clears(r, tol):
        vs64 = f" (vs fp64: fxopt {r.rel64[0]:.2e}, fp32 eager {r.rel64[1]:.2e})" if r.rel64 else ""
        out.append(f"max rel diff vs eager {r.rel:.2e} > {tol:g}{vs64}")
    if r.grad_mismatch:
        out.append(f"grad presence differs from eager for {r.grad_mismatch}")
    if r.fallbacks:
        out.append(f"fallbacks: {r.fallbacks}")
    # a group call runs several matches: counted by its members (report.grouped), not by its calls
    n_ops = sum(v for k, v in r.ops_in_compiled.items() if not k.endswith(("_backward", "_group"))) + \
        sum(r.grouped.values())
    if n_ops < sum(r.matched.values()):
        out.append(f"{sum(r.matched.values())} matches but only {n_ops} fxopt forward ops in the compiled graphs")
    return out


class Progress:
    """A one-line progress bar on stderr (no dependency)."""

    def __init__(self, total: int, width: int = 30, stream=None):
        self.total, self.width, self.n, self.t0 = total, width, 0, time.time()
        self.stream = stream or sys.stderr

    def step(self, label: str) -> None:
        self.n += 1
        done = int(self.width * self.n / max(1, self.total))
        el = time.time() - self.t0
        eta = el / self.n * (self.total - self.n)
        self.stream.write(f"\r[{'#' * done}{'.' * (self.width - done)}] {self.n}/{self.total} "
                          f"{el:5.0f}s eta {eta:4.0f}s  {label:<32}")
        if self.n == self.total:
            self.stream.write("\n")
        self.stream.flush()


def run_matrix(cases, small: dict, spec=lambda arch: {}, options=None, progress=True, ops=None) -> list[Result]:
    """cases: iterable of (arch, attn, adapter); spec(arch) -> {"drop": (...), "overrides": {...}}; ops: cpu_ops."""
    cases = list(cases)
    bar = Progress(len(cases)) if progress else None
    out = []
    for arch, attn, adapter in cases:
        s = spec(arch) or {}
        r = run_case(arch, attn, adapter, small, s.get("drop", ()), s.get("overrides"), options, ops)
        out.append(r)
        if bar:
            bar.step(r.label)
    return out


def load_expectations():
    """tests/models/expectations.py of this source tree (the matrix's architectures and declared counts), or None
    when fxopt runs from an installed copy without the tests."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "tests" / "models" / "expectations.py"
    if not path.exists():
        return None
    sp = importlib.util.spec_from_file_location("fxopt_coverage_expectations", path)
    mod = importlib.util.module_from_spec(sp)
    sys.modules[sp.name] = mod      # dataclasses resolve their module through sys.modules
    sp.loader.exec_module(mod)
    return mod


# ---- docs/coverage.md ----

def _short_reason(reason: str) -> str:
    """A rejection reason without node names / addresses, so equal reasons of different graphs group together."""
    s = re.sub(r"<built-in (?:method|function) (\w+)[^>]*>", r"\1", reason)
    s = re.sub(r"\b(?:l_args|l_self|l_)\w*|\b[a-z_][a-z0-9_]*_\d+\b", "·", s)
    keep = lambda w: len(w) <= 2 or hasattr(torch, w) or hasattr(torch.nn.functional, w)
    s = re.sub(r"\((\w+)\)", lambda m: m.group(0) if keep(m.group(1)) else "(·)", s)
    s = re.sub(r"\bof (\w+) is not\b", lambda m: m.group(0) if keep(m.group(1)) else "of · is not", s)
    return s[:220]


def render_markdown(results: list[Result], patterns, expected=None, command: str = "", header: str = "",
                    notes=()) -> str:
    """A table per adapter (rows arch:attn, columns patterns -> matched), then rejection reasons summarized.
    expected(arch, attn, adapter) -> {pattern: count} or None marks each differing cell `got (want N)`."""
    lines = ["# Architecture coverage", ""]
    if header:
        lines += [header, ""]
    if command:
        lines += [f"Generated by `{command}`.", ""]
    lines += ["Each row: a tiny random model (2 layers, hidden 64) of that `model_type`, one training step compiled "
              "with fxopt (aot_eager hand-off) vs eager in fp32. Cells: subgraphs replaced per pattern. "
              "`graphs`: dynamo graphs with fxopt / without (equal = fxopt adds no graph break). `rel`: max relative "
              "difference vs eager over the loss and every gradient. `a (want b)`: differs from the declared "
              "expectation in tests/models/expectations.py. `grouped` (LoRA): matches that run in a group call "
              "with others reading the same input (fxopt/patterns/lora_group.py).", ""]
    short = {"linear_cross_entropy": "lin_ce"}
    for adapter in ADAPTERS:
        rows = [r for r in results if r.adapter == adapter]
        if not rows:
            continue
        grouped = adapter == "lora"   # LoRA matches that run in group calls (one input shared: q/k/v, gate/up)
        lines += [f"## {adapter}", "", "| model | attn | " + " | ".join(short.get(p, p) for p in patterns)
                  + (" | grouped" if grouped else "") + " | graphs | rel | s |",
                  "|---|---|" + "---:|" * (len(patterns) + grouped) + "---|---|---:|"]
        for r in rows:
            want = expected(r.arch, r.attn, r.adapter) if expected else None
            if r.error:
                lines.append(f"| {r.arch} | {r.attn} | " + " | ".join("" for _ in patterns) + (" |" if grouped else "")
                             + f" | — | error: {r.error[:80]} | {r.seconds:.0f} |")
                continue
            cells = []
            for p in patterns:
                got = r.matched.get(p, 0)
                w = None if want is None else want.get(p, 0)
                cells.append(f"{got}" if w is None or w == got else f"**{got}** (want {w})")
            g = f"{r.graphs}/{r.graphs_plain}" + ("" if r.graphs == r.graphs_plain else " **break**")
            bad = "" if r.rel <= TOL else (f" (fp64: fxopt {r.rel64[0]:.1e}, eager {r.rel64[1]:.1e})"
                                            if _fp64_clears(r) else " **>1e-4**")
            if grouped:
                cells.append(str(sum(r.grouped.values())))
            lines.append(f"| {r.arch} | {r.attn} | " + " | ".join(cells) + f" | {g} | {r.rel:.1e}{bad} | "
                         f"{r.seconds:.0f} |")
        lines.append("")
    lines += ["## Rejected candidates", "",
              "Why a candidate subgraph was not replaced (grouped; node names elided), with the models it occurred in.",
              ""]
    groups: dict = collections.defaultdict(set)
    counts: collections.Counter = collections.Counter()
    for r in results:
        for p, why in r.rejected:
            k = (p, _short_reason(why))
            groups[k].add(f"{r.arch}:{r.attn}" + ("+lora" if r.adapter == "lora" else ""))
            counts[k] += 1
    if not groups:
        lines.append("None.")
    for (p, why), n in sorted(counts.items(), key=lambda kv: (kv[0][0], -kv[1])):
        models = sorted(groups[(p, why)])
        shown = ", ".join(models[:8]) + (f" and {len(models) - 8} more" if len(models) > 8 else "")
        lines.append(f"- `{p}` x{n}: {why} — {shown}")
    if notes:
        lines += ["", "## Declared gaps", "", "Cells marked `(want N)` above: what the math should match but fxopt "
                  "does not yet (xfail(strict=True) in tests/models/test_coverage_matrix.py).", ""]
        lines += [f"- {n}" for n in notes]
    fb = [(r.label, w, e) for r in results for w, e in r.fallbacks]
    if fb:
        lines += ["", "## Fallbacks", ""] + [f"- {lab}: {w}: {e}" for lab, w, e in fb]
    return "\n".join(lines) + "\n"
