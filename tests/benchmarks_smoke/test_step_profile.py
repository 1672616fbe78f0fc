"""benchmarks/step_profile.py: per-stream busy time from profiler events (fake events; the real ones need CUDA)."""
from types import SimpleNamespace as NS

from benchmarks.step_profile import _union_ms, stream_summary


def ev(stream, start_ms, dur_ms, name="kernel", dev="DeviceType.CUDA"):
    return NS(device_type=lambda: dev, device_resource_id=lambda: stream, start_ns=lambda: int(start_ms * 1e6),
              duration_ns=lambda: int(dur_ms * 1e6), name=lambda: name)


def test_union_merges_overlaps():
    assert _union_ms([(0, 10e6), (5e6, 20e6), (30e6, 40e6)]) == 30.0
    assert _union_ms([(0, 10e6), (2e6, 3e6)]) == 10.0


def test_stream_summary_idle_and_copies():
    evs = [ev(7, 0, 4), ev(7, 6, 4), ev(9, 3, 2, "Memcpy DtoH (Device -> Pinned)"), ev(1, 0, 100, dev="DeviceType.CPU")]
    prof = NS(profiler=NS(kineto_results=NS(events=lambda: evs)))
    s = stream_summary(prof)
    assert s["span_ms"] == 10.0 and s["main_stream"] == "7" and s["main_idle_ms"] == 2.0 and s["idle_ms"] == 1.0
    assert s["per_stream"]["9"]["copies_ms"] == {"Memcpy DtoH (Device -> Pinned)": 2.0}
    assert stream_summary(NS()) is None


def test_gap_summary_splits_small_and_large_gaps():
    """Events 0-1, 1.004-2 (a 4 us gap), 5-6 (3 ms after 'b'), overlapping 5.5-7 on another stream: one small gap,
    one large one named by its neighbours, no gap inside the overlap."""
    evs = [ev(7, 0, 1, "a"), ev(7, 1.004, 0.996, "b"), ev(7, 5, 1, "c"), ev(9, 5.5, 1.5, "d")]
    from benchmarks.step_profile import gap_summary
    g = gap_summary(evs)
    assert g["small_count"] == 1 and abs(g["small_ms"] - 0.0) < 0.01
    assert g["large_count"] == 1 and g["large_ms"] == 3.0
    assert g["largest"] == [dict(us=3000.0, after="b", before="c")]
