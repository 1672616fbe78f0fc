"""benchmarks/report.py: the speed-memory frontier the chart draws for fxopt's budgets."""
from benchmarks.report import frontier


def test_frontier_keeps_points_no_other_point_beats():
    pts = [dict(peak_gib=g, tok_per_s=t, name=n) for g, t, n in
           [(18.3, 15225, "0.7"), (20.6, 15344, "15.1GiB"), (6.9, 11699, "1.15GiB"), (7.1, 10503, "1.35GiB"),
            (9.4, 11890, "0.2"), (19.4, 14594, "0.7 old"), (6.9, 11579, "1.15GiB old")]]
    assert [p["name"] for p in frontier(pts)] == ["1.15GiB", "0.2", "0.7", "15.1GiB"]
    assert frontier([]) == []
