"""Shared helpers of the op files: where kernels run, runtime fallback, and each op's cost for the cost model."""
from __future__ import annotations

import functools
import os
import time
from typing import Callable

import torch

from fxopt.errors import FxoptError
from fxopt.report import record_runtime_fallback

_strict = False
COSTS: dict[str, Callable] = {}   # op name -> fn(*op args) -> (flops, bytes moved)
WORKSPACES: dict[str, Callable] = {}   # op name -> fn(*op args) -> bytes the op allocates and frees while it runs


def set_strict(flag: bool) -> None:
    """Kernel failures at run time raise instead of falling back (set from the compile's `strict`)."""
    global _strict
    _strict = bool(flag) or os.environ.get("FXOPT_STRICT", "") == "1"


@functools.lru_cache(None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
        return True
    except Exception:
        return False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Triton on CUDA tensors; on CPU tensors only under TRITON_INTERPRET=1 (else the PyTorch reference runs)."""
    if not triton_available():
        return False
    devs = {t.device.type for t in tensors if t is not None}
    if devs == {"cuda"}:
        return True
    return devs == {"cpu"} and interpreting()


def run_kernel(what: str, kernel: Callable, reference: Callable):
    """Run `kernel()`; if it raises, run `reference()` with one warning and a report entry (strict: raise)."""
    try:
        return kernel()
    except Exception as e:  # noqa: BLE001 - any kernel failure must not break training
        if _strict or os.environ.get("FXOPT_STRICT", "") == "1":
            raise FxoptError(f"fxopt kernel {what} failed: {type(e).__name__}: {e}") from e
        record_runtime_fallback(f"kernel {what}", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return reference()


def capturing() -> bool:
    """A CUDA graph is being recorded on the current stream (the `cudagraphs` option): no timing, no sync, no
    first-call tuning may run now; tuners take their first candidate and leave the choice for a later call."""
    try:
        return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    except Exception:  # noqa: BLE001 - a torch without it captures nothing fxopt must know of
        return False


def tuning() -> bool:
    """Whether first-call tuners may time candidates (attention configs, NF4 block sizes, LoRA GEMM paths).
    FXOPT_TUNE=0: each takes its default without timing, for quick compiles (tests, smoke runs); the kernels stay
    correct, possibly slower."""
    return os.environ.get("FXOPT_TUNE", "1") != "0"


def register_cost(name: str):
    def deco(fn):
        COSTS[name] = fn
        return fn
    return deco


def register_workspace(name: str):
    """Temporary bytes an op holds while it runs beyond its outputs (chunk buffers, accumulators): the memory cost
    model adds them at the op's place in the schedule. Arguments bound as for register_cost."""
    def deco(fn):
        WORKSPACES[name] = fn
        return fn
    return deco


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4


@functools.lru_cache(None)
def _cuda_sms(index: int) -> int:   # get_device_properties costs a few us of host time per call
    return torch.cuda.get_device_properties(index).multi_processor_count


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# Every measured first-call choice of this process: (tuner, key, choice, {candidate: ms}). A benchmark records it
# beside its numbers (two H200 runs of one configuration differed by 20%; which candidates won was not known).
TUNING_LOG: list = []


def log_choice(tuner: str, key, choice, times: dict) -> None:
    TUNING_LOG.append((tuner, str(key), str(choice), {str(k): round(float(v), 4) for k, v in times.items()}))


HOST_AHEAD_MAX_S = 0.05      # bench_ms: at most this long a GPU spin ahead of the timed runs
GPU_CYCLES_PER_S = 2e9        # torch.cuda._sleep counts cycles (H200 boost ~1.98 GHz; a slower clock spins longer)


def bench_ms(fn: Callable[[], object], warmup: int = 5, rep: int = 20) -> float:
    """Median milliseconds of `fn` over `rep` runs (CUDA events) after `warmup` runs, with no L2 flush between runs.
    The first-call tuners time with this, not triton's do_bench: do_bench allocates a 256 MiB buffer to flush L2,
    and a tuner runs inside the training step. On the H200 1B LoRA step with the smallest memory plan that buffer
    sat on top of the step's peak (3.83 GiB measured, benchmarks/mem_peak.py). The operands timed here are mostly
    larger than the 50 MiB L2, and every candidate sees the same warm cache."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    host_s = (time.perf_counter() - t0) / max(1, warmup)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rep)]
    # GPU time, not launch time: the GPU spins while the host queues every timed run, so no run waits on the host
    # (the 8B step's first-call tuners timed the rank-r products at 74 us each; they ran 21 us in its CUDA graph)
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is not None:
        torch.cuda.synchronize()
        sleep(int(min(HOST_AHEAD_MAX_S, 2 * host_s * rep + 1e-4) * GPU_CYCLES_PER_S))
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return times[len(times) // 2]


def tuning_key(t: torch.Tensor, rows: int) -> tuple:
    """A tensor's part of a measured-choice key: its shape with the token-row count `rows` (batch x sequence) rounded
    up to a power of 2, and which dim is unit-stride. Exact row counts made every step of a dynamic-length run
    (packing, variable padding) a new key, each timed again (do_bench of every candidate: tens of ms per op)."""
    return (tuple(next_pow2(d) if d == rows else d for d in t.shape), tuple(s == 1 for s in t.stride()))
