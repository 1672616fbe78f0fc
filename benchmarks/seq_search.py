"""Longest sequence one training step fits at (train_step.py --max-seq-search).

Each probe is a fresh `train_step.py` process (one warm-up step, one timed step) so an OOM cannot poison the
next probe. Start at --seq (rounded to 1024), double until a probe runs out of memory (or --seq-cap), then bisect
at 1024-token granularity. Stops starting probes when --time-limit is near; the RESULT says how far it got.
"""
import json, os, sys, time

from benchmarks.run_suite import run_child  # train_step.py puts the repo root on sys.path

# Bisection step. SEQ_GRANULE coarsens it: an 8B probe past 64k tokens takes minutes (load, compile, two steps),
# and a GPU session has 30; the RESULT says which granule bounded it (min_seq_oom - max_seq_fit).
GRANULE = int(os.environ.get("SEQ_GRANULE", "1024"))


def probe_argv(a, seq):
    argv = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_step.py"),
            "--shape", a.shape, "--mode", a.mode, "--variant", a.variant, "--batch", str(a.batch),
            "--seq", str(seq), "--steps", "1", "--warmup", "1", "--device", a.device]
    if a.gc:
        argv.append("--gc")
    if getattr(a, "loss_only", False):
        argv.append("--loss-only")
    if a.fxopt_options:
        argv += ["--fxopt-options", a.fxopt_options]
    return argv


def search(a, record):
    t_start, probes = time.time(), []

    def try_seq(seq):
        left = a.time_limit - (time.time() - t_start)
        if left < 30:
            return "time limit"
        status, row, wall = run_child(probe_argv(a, seq), left - 5, cold=False)
        probes.append(dict(seq=seq, status=status, wall_s=wall, tok_per_s=row.get("tok_per_s"),
                           peak_gib=row.get("peak_gib"), warmup=row.get("warmup", 1),
                           error=str(row.get("error", ""))[:300] or None))
        print(f"[seq_search] seq {seq}: {status} in {wall:.0f} s, peak {row.get('peak_gib')} GiB", file=sys.stderr,
              flush=True)
        return status

    fit, oom, stop = None, None, None
    seq = max(GRANULE, a.seq // GRANULE * GRANULE)
    while stop is None and oom is None and seq <= a.seq_cap:  # grow
        status = try_seq(seq)
        if status == "ok":
            fit, seq = seq, seq * 2
        elif status == "oom":
            oom = seq
        else:
            stop = status
    while stop is None and fit is None and oom is not None and oom > GRANULE:  # the start did not fit: shrink
        seq = max(GRANULE, oom // 2 // GRANULE * GRANULE)
        status = try_seq(seq)
        if status == "ok":
            fit = seq
        elif status == "oom":
            oom = seq
        else:
            stop = status
    while stop is None and fit is not None and oom is not None and oom - fit > GRANULE:  # bisect
        mid = (fit + oom) // 2 // GRANULE * GRANULE
        status = try_seq(mid)
        if status == "ok":
            fit = mid
        elif status == "oom":
            oom = mid
        else:
            stop = status
    rec = dict(record, steps=1, warmup=max([p["warmup"] for p in probes] or [1]), search="max_seq", granule=GRANULE,
               max_seq_fit=fit, min_seq_oom=oom, seq_cap=a.seq_cap,
               complete=stop is None and fit is not None and (oom is None or oom - fit <= GRANULE),
               stopped_by=stop, search_s=round(time.time() - t_start, 1), probes=probes)
    at_fit = [p for p in probes if p["status"] == "ok" and p["seq"] == fit]
    if at_fit:
        rec.update(seq=fit, tok_per_s=at_fit[0]["tok_per_s"], peak_gib=at_fit[0]["peak_gib"])
    print("RESULT " + json.dumps(rec, default=str), flush=True)
    return 0 if fit else 1
