"""benchmarks/mem_peak.py: replaying an allocator history finds the peak and the blocks live at it."""
import random

from benchmarks import mem_peak


def frames(fn, line):
    return [{"filename": "/x/torch/_ops.py", "line": 1, "name": "__call__"},   # plumbing: skipped
            {"filename": f"/tmp/gen/{fn}.py", "line": line, "name": "call"}]


def test_peak_and_live_blocks_match_a_brute_force_replay():
    rng = random.Random()
    events, live, addr = [], {}, 0
    for _ in range(300):
        if live and rng.random() < 0.45:
            a = rng.choice(sorted(live))
            events.append({"action": "free_requested", "addr": a, "size": live.pop(a)})
            events.append({"action": "free_completed", "addr": a, "size": 0})
        else:
            addr += 1
            size = rng.randrange(1, 1 << 20)
            live[addr] = size
            events.append({"action": "alloc", "addr": addr, "size": size, "frames": frames(f"f{addr % 3}", addr)})
    events.append({"action": "segment_alloc", "addr": 0, "size": 1 << 30})   # not an allocation of a tensor
    base = rng.randrange(1 << 20)
    # brute force: the live bytes after every event
    cur, best, best_i, alive = base, base, -1, {}
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            alive[e["addr"]] = e["size"]
        elif e["action"] == "free_requested":
            alive.pop(e["addr"])
        total = base + sum(alive.values())
        if total > best:
            best, best_i = total, i
    peak, idx, at_peak = mem_peak.peak_blocks(events, base)
    assert (peak, idx) == (best, best_i)
    assert base + sum(s for s, _ in at_peak.values()) == peak
    out = mem_peak.summarize({"device_traces": [events]}, base, top=5)
    assert out["peak_mib"] == round(peak / 2**20, 2) and out["live_blocks"] == len(at_peak)
    assert len(out["largest"]) == min(5, len(at_peak))
    assert all("_ops.py" not in r["where"] and r["where"].startswith("gen/f") for r in out["sites"])
    assert sum(r["mib"] for r in out["sites"]) <= out["live_at_peak_mib"] + 0.01 * len(out["sites"])


def test_empty_history():
    out = mem_peak.summarize({"device_traces": []}, 123)
    assert out["peak_mib"] == round(123 / 2**20, 2) and out["largest"] == [] and out["peak_alloc"] is None
