"""train_step.time_steps records, per timed step, the Python garbage collections by generation (and on CUDA the
allocator's device calls over the timed steps): what else ran during a step whose time spread."""
import gc
import types

from benchmarks import train_step


def test_timed_steps_record_garbage_collections_per_step():
    made = []

    def step():   # the second timed step forces a full collection
        made.append(len(made))
        if len(made) == 3:
            gc.collect()
        return 0.0

    args = types.SimpleNamespace(device="cpu", mem_peak=False, warmup=1, steps=3)
    rec = {}
    train_step.time_steps(step, args, rec)
    per_step = rec["timed_gc_collections"]
    assert len(per_step) == 3 and all(len(g) == len(gc.get_stats()) for g in per_step)
    assert per_step[1][-1] >= 1            # the oldest generation was collected in that step
    assert rec["timed_allocator"] == {}    # no CUDA allocator on CPU
