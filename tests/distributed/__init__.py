"""Helpers for the multi-process (gloo) tests."""


def run_ranks(worker, args, timeout_s, what, nprocs=2):
    """worker(rank, *args) in `nprocs` spawned processes; kills them and fails the test after `timeout_s`."""
    import time

    import pytest
    import torch.multiprocessing as mp
    ctx = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.time() + timeout_s
    while not ctx.join(timeout=2):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{what} did not finish in {timeout_s} s")
