"""benchmarks/guard_cost.py on a 2-layer tiny QLoRA Llama (CPU): the guard tree is walked into dicts (tensor guards
for every parameter are found), the check passes on the step's own inputs and is timed."""
import pytest

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")


def test_guard_cost_counts_and_times(fresh_dynamo):
    from benchmarks.guard_cost import measure
    row = measure(2, reps=5)
    assert row["cache_entries"] == 1 and row["check_us"] > 0
    kinds = row["by_kind"]
    # the LoRA adapters alone: 2 layers x 7 linears x (A, B) trainable tensors, each under a TENSOR_MATCH guard
    assert kinds.get("TENSOR_MATCH", 0) >= 2 * 7 * 2
    assert row["leaf_guards"] == sum(kinds.values())
