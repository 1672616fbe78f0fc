"""benchmarks/seq_search.py (train_step.py --max-seq-search): the doubling + bisection finds the largest fitting seq
at 1024-token granularity, and each probe is the same step as the search's (grad ckpt, loss-only forward)."""
import argparse
import json

from benchmarks import seq_search


def _args(**kw):
    base = dict(shape="8b", mode="qlora", variant="fxopt:0.2", batch=1, seq=16384, gc=False, loss_only=True,
                fxopt_options=None, device="cuda", time_limit=10_000, seq_cap=262144)
    return argparse.Namespace(**{**base, **kw})


def test_search_finds_the_largest_fit(monkeypatch, capsys):
    limit, seen = 45 * 1024 + 100, []

    def fake_child(argv, timeout, cold=False):
        seq = int(argv[argv.index("--seq") + 1])
        seen.append(argv)
        return ("ok", {"tok_per_s": 1000, "peak_gib": seq / 1e4}, 1.0) if seq <= limit else ("oom", {}, 1.0)
    monkeypatch.setattr(seq_search, "run_child", fake_child)
    assert seq_search.search(_args(), {"variant": "fxopt:0.2"}) == 0
    rec = json.loads(capsys.readouterr().out.strip().split("RESULT ", 1)[1])
    assert rec["max_seq_fit"] == 45 * 1024 and rec["min_seq_oom"] == 46 * 1024 and rec["complete"]
    assert [p["seq"] for p in rec["probes"]][:3] == [16384, 32768, 65536]
    assert all("--loss-only" in a and "--gc" not in a for a in seen)


def test_probe_forwards_grad_ckpt_and_not_loss_only():
    argv = seq_search.probe_argv(_args(variant="eager", gc=True, loss_only=False), 4096)
    assert "--gc" in argv and "--loss-only" not in argv and argv[argv.index("--seq") + 1] == "4096"


def test_single_probe_at_the_cap_is_reported_as_a_lower_bound(monkeypatch, capsys):
    """--seq X --seq-cap X: one probe; when it fits, the table says ">= X" and "to the cap only", not "complete"."""
    from benchmarks import report
    monkeypatch.setattr(seq_search, "run_child", lambda argv, timeout, cold=False: ("ok", {"tok_per_s": 7,
                                                                                          "peak_gib": 1.0}, 1.0))
    assert seq_search.search(_args(seq=65536, seq_cap=65536), {"variant": "eager", "shape": "8b", "mode": "qlora",
                                                                "batch": 1}) == 0
    rec = json.loads(capsys.readouterr().out.strip().split("RESULT ", 1)[1])
    assert [p["seq"] for p in rec["probes"]] == [65536] and rec["granule"] == seq_search.GRANULE
    row = [line for line in report.search_table([rec]) if line.startswith("| 8b")][0]
    assert ">= 65,536" in row and "to the cap only" in row


def test_cuda_graph_probes_time_a_replay(monkeypatch, capsys):
    """fxopt with CUDA graphs records on its second call: train_step raises the warm-up to 2 (the probe's row says
    so) and the search's record carries the warm-up its probes ran."""
    from benchmarks import train_step
    assert train_step.graphs_replayed({"cudagraphs": True}) and not train_step.graphs_replayed({})
    monkeypatch.setenv("FXOPT_CUDAGRAPHS", "1")
    assert train_step.graphs_replayed({})
    monkeypatch.setattr(seq_search, "run_child", lambda argv, timeout, cold=False: ("ok", {"tok_per_s": 7,
                        "peak_gib": 1.0, "warmup": 2}, 1.0))
    assert seq_search.search(_args(seq=65536, seq_cap=65536), {"variant": "fxopt:16GiB"}) == 0
    assert json.loads(capsys.readouterr().out.strip().split("RESULT ", 1)[1])["warmup"] == 2
