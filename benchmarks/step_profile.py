"""One training step under torch.profiler: where its GPU time goes, per kernel and per CUDA stream."""
import time


def _sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profile_step(step, top=30):
    """One more step under torch.profiler: the GPU kernels that took the most time, how busy the GPU was, and the
    CPU ops with the most self time (where a step that waits on the CPU spends it; the profiler's own overhead
    inflates these, so they rank, they do not time)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    _sync()
    t0 = time.time()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step()
        _sync()
    wall_ms = (time.time() - t0) * 1e3
    # GPU events only (kernels, memcpy/memset): a CPU op's device time repeats its kernels' time
    from torch.autograd import DeviceType
    agg = {}
    for ev in prof.events():
        if getattr(ev, "device_type", None) != DeviceType.CUDA:
            continue
        us = getattr(ev, "device_time_total", None)
        if us is None:
            us = getattr(ev, "cuda_time_total", 0)
        c, t = agg.get(ev.name, (0, 0.0))
        agg[ev.name] = (c + 1, t + us)
    rows = [(k, c, us / 1e3) for k, (c, us) in agg.items() if us > 0]
    rows.sort(key=lambda r: -r[2])
    busy = sum(r[2] for r in rows)
    cpu = sorted(((e.key, e.count, e.self_cpu_time_total / 1e3) for e in prof.key_averages()
                  if e.self_cpu_time_total > 0), key=lambda r: -r[2])
    return dict(wall_ms=round(wall_ms, 1), gpu_busy_ms=round(busy, 1), streams=stream_summary(prof),
                top=[dict(name=k[:120], count=c, ms=round(ms, 2)) for k, c, ms in rows[:top]],
                cpu_self_ms=round(sum(r[2] for r in cpu), 1),
                cpu_top=[dict(name=k[:120], count=c, self_ms=round(ms, 2)) for k, c, ms in cpu[:top]])


def _union_ms(iv):
    """Total length of the union of (start, end) ns intervals, in ms."""
    total, end = 0, None
    for a, b in sorted(iv):
        if end is None or a > end:
            total, end = total + (b - a), b
        elif b > end:
            total, end = total + (b - end), b
    return total / 1e6


def stream_summary(prof):
    """Per CUDA stream: busy time (union of its kernels and copies), copies' time by kind; over the step: the
    span from the first GPU event to the last, the busiest stream's idle time in it, and the time no stream was busy
    (a GPU that waits on the host, or on copies, shows it). Under CUDA graph replay the streams are the replay's:
    one graph's branches may appear on another graph's stream. None when this torch's profiler does not expose
    kineto events."""
    try:
        evs = [e for e in prof.profiler.kineto_results.events() if "cuda" in str(e.device_type()).lower()]
    except Exception:  # noqa: BLE001  (private API; feature-detected)
        return None
    if not evs:
        return None
    by = {}
    for e in evs:
        s = by.setdefault(int(e.device_resource_id()), dict(iv=[], copies={}, n=0))
        a, d = int(e.start_ns()), int(e.duration_ns())
        s["iv"].append((a, a + d))
        s["n"] += 1
        name = e.name()
        if name.lower().startswith("memcpy") or name.lower().startswith("memset"):
            s["copies"][name[:40]] = s["copies"].get(name[:40], 0.0) + d / 1e6
    t0 = min(a for s in by.values() for a, _ in s["iv"])
    t1 = max(b for s in by.values() for _, b in s["iv"])
    out = {str(k): dict(events=s["n"], busy_ms=round(_union_ms(s["iv"]), 2),
                        copies_ms={n: round(v, 2) for n, v in s["copies"].items()}) for k, s in by.items()}
    main = max(out, key=lambda k: out[k]["busy_ms"])
    union = _union_ms([iv for s in by.values() for iv in s["iv"]])
    return dict(span_ms=round((t1 - t0) / 1e6, 2), main_stream=main,
                main_idle_ms=round((t1 - t0) / 1e6 - out[main]["busy_ms"], 2),
                idle_ms=round((t1 - t0) / 1e6 - union, 2), per_stream=out, gaps=gap_summary(evs))


def gap_summary(evs, small_ns=10_000, largest=8):
    """Where the GPU idles: gaps between consecutive GPU events (all streams merged) shorter than `small_ns` (the
    launch-to-launch cost of many small kernels, also inside a CUDA graph) and longer ones, and the `largest`
    gaps with the events on either side (a wait on the host, on a copy, or a graph boundary)."""
    iv = sorted((int(e.start_ns()), int(e.start_ns()) + int(e.duration_ns()), e.name()[:60]) for e in evs)
    gaps, end, before = [], iv[0][1], iv[0][2]
    for a, b, name in iv[1:]:
        if a > end:
            gaps.append((a - end, before, name))
        if b >= end:
            end, before = b, name
    small = [g for g, _, _ in gaps if g < small_ns]
    big = sorted((g for g in gaps if g[0] >= small_ns), key=lambda g: -g[0])
    return dict(small_count=len(small), small_ms=round(sum(small) / 1e6, 2), large_count=len(big),
                large_ms=round(sum(g for g, _, _ in big) / 1e6, 2),
                largest=[dict(us=round(g / 1e3, 1), after=b, before=n) for g, b, n in big[:largest]])


def host_profile(step, top=40):
    """One more step under cProfile: the Python functions with the most own time, and the host time of the step.
    cProfile slows Python ~1.5-2x, so these rank where a host-bound step spends its time; they do not time it.
    `enqueue_ms` is the step's host time without a profiler and without waiting for the GPU at its end."""
    from benchmarks.kernel_bench.common import cprofile_calls

    _sync()
    t0 = time.perf_counter()
    step()
    enqueue_ms = (time.perf_counter() - t0) * 1e3
    _sync()
    t0 = time.perf_counter()
    prof = cprofile_calls(step, 1, top, unit="ms",
                          name=lambda path, line, fn: f"{'/'.join(path.split('/')[-2:])}:{line}:{fn}"[:120])
    wall_ms = (time.perf_counter() - t0) * 1e3
    return dict(enqueue_ms=round(enqueue_ms, 1), profiled_wall_ms=round(wall_ms, 1), own_ms=prof["total_ms"],
                by_own=prof["by_own"], by_cum=prof["by_cum"])
