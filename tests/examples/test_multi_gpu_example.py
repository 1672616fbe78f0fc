"""examples/multi_gpu_lora.py on two CPU processes (gloo): DDP and FSDP2 follow the one-process loss curve."""
import datetime
import json
import os
import sys

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_ranks

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["--steps", "3", "--global-batch", "4", "--seq-len", "32", "--no-inductor"]
TIMEOUT_S = 240


def _worker(rank, world, store, out):
    os.environ.update(TRITON_INTERPRET="0", RANK=str(rank), WORLD_SIZE=str(world))
    sys.path.insert(0, os.path.join(REPO, "examples"))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    import multi_gpu_lora as ex
    try:
        rows = []
        for extra in ([], ["--fsdp2"]):
            torch._dynamo.reset()
            rows.append(ex.main(ARGS + extra))
        if rank == 0:
            with open(out, "w") as f:
                json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp2_follow_one_process(tmp_path, monkeypatch, fresh_dynamo):
    out = str(tmp_path / "two.json")
    run_ranks(_worker, (2, str(tmp_path / "store"), out), TIMEOUT_S, "two-rank example runs")
    ddp, fsdp2 = json.load(open(out))

    monkeypatch.syspath_prepend(os.path.join(REPO, "examples"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    import multi_gpu_lora as ex
    one = ex.main(ARGS)
    assert one["world"] == 1 and ddp["world"] == 2 and fsdp2["world"] == 2 and fsdp2["fsdp2"]
    for run in (ddp, fsdp2):   # same global batch, equal slices: same mean loss and averaged gradients
        assert max(abs(a - b) for a, b in zip(run["losses"], one["losses"])) < 1e-4, (run["losses"], one["losses"])
    assert ddp["matched"]["lora"] == one["matched"]["lora"] == 14   # DDP: one whole graph, every match kept
    assert fsdp2["matched"]["lora"] == 7                             # FSDP2: one graph per decoder layer
