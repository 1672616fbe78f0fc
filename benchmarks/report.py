"""Tables and a chart from train-step results (JSON lines written by run_suite.py / train_step.py).

  python benchmarks/report.py $OUT/train_step.jsonl [more.jsonl ...] [--out benchmarks/results] [--name train_step]

Writes <out>/<name>.md (one table per shape / mode / batch x seq, plus max-seq searches) and <out>/<name>.png
(tok/s against peak GiB, one panel per table, one point per variant; the anchor measurements from
anchors/RESULTS.md as hollow markers when that file is found). The markdown is printed too.
"""
import argparse, json, math, os, re, sys
from collections import OrderedDict

HERE = os.path.dirname(os.path.abspath(__file__))
GEMM_CEILING_TFLOPS = 790.0  # measured bf16 GEMM on the H200 (same constant as train_step.py)
ANCHOR_CANDIDATES = [os.path.join(HERE, "..", "shared", "anchors", "RESULTS.md"),
                     os.path.join(HERE, "..", "..", "shared", "anchors", "RESULTS.md"),
                     "/work/shared/anchors/RESULTS.md"]
ENV_KEYS = ["gpu", "torch", "transformers", "peft", "triton", "bitsandbytes", "liger_kernel", "unsloth", "git_sha",
            "fxopt_src"]


def load_rows(paths):
    """Rows of all files; for a repeated configuration the last row wins, except that a failed row never replaces a
    measured one (a later profiling run that timed out does not erase the measurement)."""
    rows = OrderedDict()
    for path in paths:
        with open(path) as fh:
            for n, line in enumerate(fh, 1):
                line = line.strip()
                if line.startswith("RESULT "):
                    line = line[len("RESULT "):]
                if not line.startswith("{"):
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    print(f"{path}:{n}: not JSON, skipped", file=sys.stderr)
                    continue
                key = (r.get("search"), r.get("shape"), r.get("mode"), r.get("variant"), bool(r.get("gc")),
                       r.get("batch"), r.get("seq") if not r.get("search") else None, bool(r.get("loss_only")),
                       r.get("tag", ""))
                if r.get("error") and key in rows and not rows[key].get("error"):
                    continue
                rows.pop(key, None)
                rows[key] = r
    return list(rows.values())


# ---------------------------------------------------------------- anchors (peer measurements)

def anchor_variant(label):
    s = label.lower()
    if "unsloth" in s:
        return "unsloth"
    if "liger" in s:
        return "liger+inductor" if "compile" in s or "inductor" in s else "liger"
    if "inductor" in s or "torch.compile" in s:
        return "inductor"
    return "eager" if "eager" in s else None


def parse_anchors(path):
    """Train-step rows of anchors/RESULTS.md: its '### Train step, ...' sections and their tables."""
    out, ctx, gc_default, header = [], None, False, None
    shapes = [("1b shape", "1b"), ("8b shape", "8b"), ("gemma-2-2b", "gemma2-2b"), ("qwen", "qwen2-7b")]
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if line.startswith("#"):
                ctx, gc_default, header = None, False, None
                low = line.lower()
                if "train step" in low:
                    shape = next((v for k, v in shapes if k in low), None)
                    mode = "qlora" if "qlora" in low else "lora" if "lora" in low else "full"
                    m = re.search(r"b(?:atch)?\s*(\d+)\s*x\s*(?:seq\s*)?(\d+)", low)
                    if shape and m:
                        ctx = dict(shape=shape, mode=mode, batch=int(m.group(1)), seq=int(m.group(2)))
                continue
            if ctx is None:
                continue
            if not line.startswith("|"):
                if "gradient checkpointing" in line.lower():
                    gc_default, header = True, None
                continue
            cells = [c.strip() for c in line.strip("|").split("|")]
            if header is None:
                header = [c.lower() for c in cells]
                continue
            if set("".join(cells)) <= set("-: "):
                continue
            col = {name: i for i, name in enumerate(header)}
            try:
                tok = float(cells[col["tok/s"]].replace(",", ""))
                peak = float(cells[col["peak gib"]])
            except (KeyError, ValueError, IndexError):
                continue
            gc = cells[col["grad ckpt"]].lower().startswith("yes") if "grad ckpt" in col else gc_default
            variant = anchor_variant(cells[0])
            if variant:
                out.append(dict(ctx, variant=variant, gc=gc, tok_per_s=tok, peak_gib=peak, label=cells[0]))
    return out


# ---------------------------------------------------------------- markdown

def fmt(x, spec):
    return "" if x is None else format(x, spec)


def notes(r):
    if r.get("error"):
        return "failed: " + str(r["error"]).replace("|", "/").replace("\n", " ")[:140]
    parts = ["loss-only forward"] if r.get("loss_only") else []
    if r.get("tag"):
        parts.append(r["tag"])
    if r.get("resident_gib") is not None and r.get("peak_gib"):
        parts.append(f"resident {r['resident_gib']:.2f} GiB (peak - resident = {r['peak_gib'] - r['resident_gib']:.2f})")
    rep = r.get("fxopt_report") or {}
    matched = {k: v for k, v in (rep.get("matched") or {}).items() if v}
    if matched:
        parts.append("matched " + ", ".join(f"{k} {v}" for k, v in sorted(matched.items())))
    elif r.get("variant", "").startswith("fxopt"):
        parts.append("no patterns matched" if rep else "no fxopt report")
    if rep.get("fallbacks"):
        parts.append(f"{len(rep['fallbacks'])} fallbacks")
    mem = rep.get("memory") or {}
    if mem.get("predicted_peak"):
        parts.append(f"predicted peak {mem['predicted_peak'] / 2**30:.1f} GiB")
        if mem.get("offload_bytes"):
            parts.append(f"offloaded {len(mem.get('offloaded') or [])} tensors, {mem['offload_bytes'] / 2**30:.2f} GiB "
                         f"per step")
    if r.get("graph_breaks"):
        parts.append(f"{r['graph_breaks']} graph breaks")
    return "; ".join(parts)


def group_key(r):
    return (r["shape"], r["mode"], r["batch"], r["seq"])


def order(rows):
    """No-GC rows first; in each, eager first, then fastest first, failures last."""
    return sorted(rows, key=lambda r: (bool(r.get("gc")), r.get("error") is not None,
                                       r["variant"] != "eager", -(r.get("tok_per_s") or 0)))


def step_tables(rows, anchors):
    groups = OrderedDict()
    for r in rows:
        groups.setdefault(group_key(r), []).append(r)
    md = []
    for (shape, mode, batch, seq), rs in groups.items():
        md += [f"### {shape}, {mode}, batch {batch} x seq {seq}", "",
               "| variant | grad ckpt | tok/s | vs eager | TFLOP/s | MFU | peak GiB | warm-up s | anchor tok/s | notes |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        for r in order(rs):
            base = next((e for e in rs if e["variant"] == "eager" and bool(e.get("gc")) == bool(r.get("gc"))
                         and e.get("tok_per_s")), None)
            tok = r.get("tok_per_s")
            ratio = f"{tok / base['tok_per_s']:.2f}" if tok and base else ""
            mfu = r.get("mfu", (r.get("tflops") or 0) / GEMM_CEILING_TFLOPS if r.get("tflops") else None)
            anc = next((x for x in anchors if (x["shape"], x["mode"], x["batch"], x["seq"]) == (shape, mode, batch, seq)
                        and x["variant"] == r["variant"] and x["gc"] == bool(r.get("gc"))), None)
            md.append(f"| {r['variant']} | {'yes' if r.get('gc') else 'no'} | {fmt(tok, ',')} | {ratio} | "
                      f"{fmt(r.get('tflops'), '.1f')} | {fmt(mfu, '.1%')} | {fmt(r.get('peak_gib'), '.2f')} | "
                      f"{fmt(r.get('warm_s'), '.1f')} | {fmt(anc and anc['tok_per_s'], ',.0f')} | {notes(r)} |")
        md.append("")
    return md, groups


def search_table(rows):
    if not rows:
        return []
    md = ["### Longest sequence that fits (one step per probe; doubling, then bisection to the granule)", "",
          "| shape | mode | variant | grad ckpt | batch | fits | OOM at | searched | tok/s there | peak GiB "
          "| search s |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fit, oom, cap = r.get("max_seq_fit"), r.get("min_seq_oom"), r.get("seq_cap")
        if fit is not None and oom is None and fit == cap:
            state = "to the cap only"   # a probe at the cap fit; longer was not tried
        elif r.get("complete"):
            state = f"yes ({r.get('granule', 1024)}-token granule)"
        else:
            state = "no: " + str(r.get("stopped_by"))
        md.append(f"| {r['shape']} | {r['mode']} | {r['variant']} | {'yes' if r.get('gc') else 'no'} | {r['batch']} | "
                  f"{'>= ' if oom is None and fit is not None else ''}{fmt(fit, ',')} | {fmt(oom, ',')} | {state} | "
                  f"{fmt(r.get('tok_per_s'), ',')} | {fmt(r.get('peak_gib'), '.2f')} | {fmt(r.get('search_s'), '.0f')} |")
    return md + [""]


def environment(rows):
    md = []
    for k in ENV_KEYS:
        vals = sorted({str(r[k]) for r in rows if r.get(k) is not None and not r.get("error")})
        if vals:
            md.append(f"- {k}: {', '.join(vals)}")
    return md


# ---------------------------------------------------------------- chart

def frontier(rows):
    """The rows no other row beats on both peak memory and tok/s, by increasing peak (the speed-memory frontier)."""
    front, best = [], -1.0
    for r in sorted(rows, key=lambda r: (r["peak_gib"], -r["tok_per_s"])):
        if r["tok_per_s"] > best:
            front.append(r)
            best = r["tok_per_s"]
    return front


def chart(groups, anchors, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(k, [r for r in rs if r.get("tok_per_s") and r.get("peak_gib") is not None]) for k, rs in groups.items()]
    panels = [(k, rs) for k, rs in panels if rs]
    if not panels:
        return False
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.5 * ncols, 5.2 * nrows), squeeze=False)
    variants = sorted({r["variant"] for _, rs in panels for r in rs} | {a["variant"] for a in anchors})
    cmap = plt.get_cmap("tab10")
    color = {v: cmap(i % 10) for i, v in enumerate(variants)}
    for ax, ((shape, mode, batch, seq), rs) in zip(axes.flat, panels):
        for r in rs:
            gc = bool(r.get("gc"))
            ax.scatter(r["peak_gib"], r["tok_per_s"], s=70, marker="^" if gc else "o", color=color[r["variant"]],
                       zorder=3)
            ax.annotate(r["variant"] + (" +gc" if gc else ""), (r["peak_gib"], r["tok_per_s"]),
                        textcoords="offset points", xytext=(6, 4), fontsize=8)
        front = frontier([r for r in rs if r["variant"].split(":")[0] == "fxopt"])
        if len(front) > 1:   # fxopt's speed-memory frontier (one point per memory_budget), as a step line
            ax.step([r["peak_gib"] for r in front], [r["tok_per_s"] for r in front], where="post", color="k",
                    lw=1.0, alpha=0.6, zorder=1, label="fxopt frontier")
        for x in anchors:
            if (x["shape"], x["mode"], x["batch"], x["seq"]) != (shape, mode, batch, seq):
                continue
            ax.scatter(x["peak_gib"], x["tok_per_s"], s=70, marker="^" if x["gc"] else "o", facecolors="none",
                       edgecolors=color[x["variant"]], linewidths=1.4, zorder=2)
            ax.annotate("anchor " + x["variant"] + (" +gc" if x["gc"] else ""), (x["peak_gib"], x["tok_per_s"]),
                        textcoords="offset points", xytext=(6, -10), fontsize=7, color="grey")
        ax.set_title(f"{shape} {mode}, batch {batch} x seq {seq}")
        ax.set_xlabel("peak GiB (torch.cuda.max_memory_allocated)")
        ax.set_ylabel("tokens / s")
        xs = [r["peak_gib"] for r in rs] + [x["peak_gib"] for x in anchors if x["shape"] == shape and x["mode"] == mode]
        ax.set_xlim(0, max(xs) * 1.25 + 0.5)  # room for the labels on the right
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], marker="o", ls="", color="k", label="this run, no grad ckpt"),
               plt.Line2D([], [], marker="^", ls="", color="k", label="this run, grad ckpt")]
    handles.append(plt.Line2D([], [], color="k", lw=1.0, alpha=0.6, label="fxopt frontier"))
    if anchors:
        handles.append(plt.Line2D([], [], marker="o", ls="", mfc="none", mec="grey", label="anchor (RESULTS.md)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle("Train step: throughput against peak memory (up and to the left is better)")
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="JSONL files (RESULT lines or run_suite rows)")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for <name>.md and <name>.png")
    p.add_argument("--name", default="train_step")
    p.add_argument("--anchors", default=None, help="anchors/RESULTS.md (default: found beside the repo, if there)")
    p.add_argument("--no-anchors", action="store_true")
    a = p.parse_args()

    rows = load_rows(a.results)
    anchor_path = None if a.no_anchors else a.anchors or next(
        (c for c in ANCHOR_CANDIDATES if os.path.exists(c)), None)
    anchors = parse_anchors(anchor_path) if anchor_path else []
    step_rows = [r for r in rows if not r.get("search") and r.get("shape")]
    md = [f"# Train-step benchmark ({len(step_rows)} runs)", "",
          f"tok/s: batch x seq / median step time (CUDA events) after warm-up. TFLOP/s: model FLOPs (2*N_matmul*T + "
          f"causal attention, x2 LoRA/QLoRA, x3 full) / step time. MFU: TFLOP/s / {GEMM_CEILING_TFLOPS:.0f} "
          f"(measured bf16 GEMM). peak GiB: torch.cuda.max_memory_allocated over warm-up and timed steps. warm-up s: "
          f"wall time of the warm-up steps (compilation included). vs eager: same grad-ckpt setting.", ""]
    md += environment(rows) + [""]
    tables, groups = step_tables(step_rows, anchors)
    md += tables + search_table([r for r in rows if r.get("search") == "max_seq"])
    if anchors:
        md.append(f"Anchor tok/s: {os.path.abspath(anchor_path)} (an earlier run on the same kind of machine).")
    os.makedirs(a.out, exist_ok=True)
    md_path = os.path.join(a.out, a.name + ".md")
    with open(md_path, "w") as fh:
        fh.write("\n".join(md) + "\n")
    print("\n".join(md))
    png_path = os.path.join(a.out, a.name + ".png")
    print(f"wrote {md_path}" + (f" and {png_path}" if chart(groups, anchors, png_path) else " (no chart: no rows "
                                                                                             "with tok/s)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
