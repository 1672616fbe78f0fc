"""What is live at a step's memory peak: CUDA allocator history -> the blocks alive at the peak, with where each was
allocated (Python frames), grouped and largest first.

    mem_peak.start()                  # torch.cuda.memory._record_memory_history under the hood
    run warm-up steps
    summary = mem_peak.summarize(torch.cuda.memory._snapshot(), baseline=bytes allocated before recording)
    mem_peak.stop()

The history only holds blocks allocated while it records: `baseline` (weights, optimizer state) is added as one
entry. Frees count when requested (torch's memory_allocated counts them then as well).
"""
from __future__ import annotations

import os
from collections import defaultdict

SKIP = ("torch/utils/_", "torch/_ops.py", "torch/_library", "torch/autograd/function.py", "contextlib.py",
        "torch/_compile.py", "torch/_dynamo/eval_frame.py", "torch/_tensor.py")


def _where(frames, depth=4):
    """The first `depth` frames worth reading (generated Inductor code and fxopt kept; torch plumbing skipped)."""
    out = []
    for f in frames or ():
        name = f.get("filename", "?")
        if any(s in name for s in SKIP):
            continue
        out.append(f"{'/'.join(name.split('/')[-2:])}:{f.get('line', 0)} {f.get('name', '')}")
        if len(out) == depth:
            break
    return " <- ".join(out) or "?"


def peak_blocks(events, baseline=0):
    """Replay alloc / free_requested events. Returns (peak bytes, event index, {addr: (size, frames)} live at peak)."""
    live, cur, best, best_i, best_live = {}, baseline, baseline, -1, {}
    for i, e in enumerate(events):
        act = e.get("action")
        if act == "alloc":
            live[e["addr"]] = (e["size"], e.get("frames"))
            cur += e["size"]
            if cur > best:
                best, best_i, best_live = cur, i, dict(live)
        elif act == "free_requested" and e["addr"] in live:
            cur -= live.pop(e["addr"])[0]
    return best, best_i, best_live


def summarize(snapshot, baseline=0, top=40, device=0):
    """JSON-able summary of the peak: totals, the largest live blocks and the bytes per allocation site."""
    traces = snapshot.get("device_traces", [])
    events = traces[device] if device < len(traces) else []
    peak, idx, live = peak_blocks(events, baseline)
    sites = defaultdict(lambda: [0, 0])
    for size, frames in live.values():
        s = sites[_where(frames)]
        s[0] += size
        s[1] += 1
    blocks = sorted(live.values(), key=lambda b: -b[0])[:top]
    mib = lambda b: round(b / 2**20, 2)
    return {"events": len(events), "baseline_mib": mib(baseline), "peak_mib": mib(peak), "peak_event": idx,
            "live_at_peak_mib": mib(peak - baseline), "live_blocks": len(live),
            "peak_alloc": _where(events[idx].get("frames"), 8) if idx >= 0 else None,
            "largest": [{"mib": mib(s), "where": _where(f)} for s, f in blocks],
            "sites": sorted(({"mib": mib(b), "n": n, "where": w} for w, (b, n) in sites.items()),
                            key=lambda r: -r["mib"])[:top]}


def start(max_entries=int(os.environ.get("FXOPT_MEM_ENTRIES", "400000"))):
    """Record the CUDA allocator's history (Python stacks) from now on; take the snapshot, then stop()."""
    import torch
    torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks="python")


def stop():
    import torch
    torch.cuda.memory._record_memory_history(enabled=None)
