"""Timing helpers shared by the per-op kernel benchmarks (GPU only).

Method (DESIGN.md, GPU protocol): triton.testing.do_bench median after warm-up, random inputs, the reference
compared on the same run, bandwidth against the copy ceiling measured in the same process.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import torch


def do_bench(fn, warmup=50, rep=200):
    from triton.testing import do_bench as _db
    return _db(fn, warmup=warmup, rep=rep, return_mode="median")


def fwd_bwd_step(fn, args, grads, leaves=None, accumulate=True):
    """One fn(*args) + backward(grads) as a no-argument callable; accumulate=False sets the leaves' .grad to None
    first (leaves: the args that require grad, unless given)."""
    leaves = leaves if leaves is not None else [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    def run():
        if not accumulate:
            for t in leaves:
                t.grad = None
        torch.autograd.backward(fn(*args), grads)
    return run


def fwd_bwd(fn, args, grads, leaves=None, accumulate=True):
    """ms of fn(*args) + backward(grads). accumulate=True keeps leaf .grad accumulation (as the anchors measured);
    False sets the leaves' .grad to None before each run (kernel bytes only)."""
    return do_bench(fwd_bwd_step(fn, args, grads, leaves, accumulate))


def fwd_bwd_gpu_ms(fn, args, grads, leaves=None):
    """GPU kernel time (gpu_busy_ms) of one fn(*args) + backward(grads), the leaves' .grad reset before each."""
    return gpu_busy_ms(fwd_bwd_step(fn, args, grads, leaves, accumulate=False))


def gpu_busy_ms(step, n=20, warmup=3):
    """Sum of the GPU kernels' durations per call of `step` (torch.profiler, CUDA activity): the device's work
    without the host's launch and dispatch time, which do_bench's wall time includes when the host is slower."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    us = sum(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
             for e in prof.key_averages())
    return us / n / 1e3


def cprofile_calls(fn, n=50, top=25, unit="us", name=None):
    """cProfile over n calls of fn (the GPU runs ahead; the host's Python is what cProfile sees): the top functions
    by own and by cumulative time per call in `unit` ("us" or "ms"), and the summed own time. name(path, line,
    function) labels a function (default: file name:line:function)."""
    import cProfile
    import pstats
    scale, digits = {"us": (1e6, 1), "ms": (1e3, 2)}[unit]
    name = name or (lambda path, line, func: f"{os.path.basename(path)}:{line}:{func}")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    rows = [(name(*key), calls / n, tt / n * scale, ct / n * scale)
            for key, (_, calls, tt, ct, _) in pstats.Stats(prof).stats.items()]
    fmt = lambda r: {"fn": r[0], "calls": round(r[1], 2), f"own_{unit}": round(r[2], digits),  # noqa: E731
                     f"cum_{unit}": round(r[3], digits)}
    return {f"total_{unit}": round(sum(r[2] for r in rows), 1),
            "by_own": [fmt(r) for r in sorted(rows, key=lambda r: -r[2])[:top]],
            "by_cum": [fmt(r) for r in sorted(rows, key=lambda r: -r[3])[:top]]}


def copy_ceiling_tbps(nbytes=2 * 2**30):
    """Device-to-device copy bandwidth (read + write bytes / time), TB/s."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a))
    return 2 * a.numel() / ms / 1e9


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def environment(command=None):
    def ver(name):
        import importlib.metadata as md
        try:
            return md.version(name.replace("_", "-"))
        except Exception:
            return None
    sha = os.environ.get("FXOPT_GIT_SHA")
    if not sha:
        try:
            sha = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
        except Exception:
            sha = None
    return dict(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                torch=torch.__version__, triton=ver("triton"), transformers=ver("transformers"),
                liger_kernel=ver("liger_kernel"), python=platform.python_version(), git_sha=sha,
                command=command or " ".join([sys.executable.split("/")[-1]] + sys.argv),
                **{k.lower(): os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "FXOPT_PAIRED_WITH") if k in os.environ})  # gpu_pair.sh


def write_json(path, payload):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
