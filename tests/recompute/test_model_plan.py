"""`fxopt plan`: a plan for a transformers config (meta device, never run) and the largest sequence that fits."""
import json

import pytest
import torch

from fxopt.recompute.plan import MARGIN
from fxopt.recompute.model_plan import _trace, plan_for_config
from tests.helpers import tiny_config


def _cfg():
    return tiny_config("llama", vocab_size=512)


def test_plan_for_config_and_largest_seq(fresh_dynamo):
    r = plan_for_config(_cfg(), 2, 64, 0.8, dtype=torch.float32)
    assert r["feasible"] and r["predicted_peak"] <= r["budget"] == int(0.8 * r["save_all_peak"])
    assert r["matched"]["rms_norm"] == 5 and r["recomputed"]
    assert r["smallest_peak"] <= r["predicted_peak"] < r["save_all_peak"]
    assert r["max_seq_with_plan"] >= 64 and r["max_seq"] >= r["max_seq_with_plan"]
    assert "seq" in r["peak_expr"]
    # check the size formula (fitted on traces at 64, 128, 192) on a fresh trace at the answer and one past it
    from fxopt.recompute import smallest_peak
    best = smallest_peak(r["joint"])                    # the plan max_seq was solved for (sizes at seq 64)
    s = r["max_seq"]
    at, _, _ = _trace(_cfg(), 2, s, torch.float32, 0, None)
    past, _, _ = _trace(_cfg(), 2, s + 1, torch.float32, 0, None)
    aim = int(r["budget"] * (1 - MARGIN))                # the planner's aim under the budget
    assert at.simulate(best.recompute).peak <= aim < past.simulate(best.recompute).peak


def test_infeasible_config_budget_reports_smallest(fresh_dynamo):
    r = plan_for_config(_cfg(), 2, 32, 1000, dtype=torch.float32, fit=False)
    assert not r["feasible"] and f"({r['smallest_peak']} B)" in r["error"]


def test_cli_plan(tmp_path, capsys, fresh_dynamo):
    from fxopt.cli import main
    d = _cfg().to_dict()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(SystemExit) as e:
        main(["plan", str(path), "--batch", "2", "--seq", "32", "--budget", "0.9", "--dtype", "float32",
              "--no-fit", "--set", "num_hidden_layers=1"])
    out = capsys.readouterr().out
    assert e.value.code == 0, out
    assert "predicted peak" in out and "save everything" in out


def test_causal_mask_past_2_30_elements_is_not_saved(fresh_dynamo):
    """At S = 65536 HF's causal mask has 2^32 elements, too many to evaluate at compile time. It must still be
    classified causal (no mask tensor for the kernel), or the plan saves it: a 4 GiB bool per step, as on the H200
    (transformers 5.17 builds it from index comparisons; 5.24 from position ids). Traced on the meta device."""
    S = 65536
    r = plan_for_config(tiny_config("llama", vocab_size=512, max_position_embeddings=2 * S), 1, S, 1.0,
                        fit=False)
    assert r["matched"]["attention"] == 2
    assert r["save_all_peak"] < S * S // 4, r["save_all_peak"]   # a [S, S] bool alone would be S * S bytes
