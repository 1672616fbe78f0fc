"""Triton launches without `JITFunction.run`'s per-call work, for CUDA steps that wait on the host.

`kernel[grid](*args, **kw)` binds the arguments, specializes each one (dtype, 16-byte alignment, int == 1,
divisibility by 16, width), hashes a cache key and builds launch metadata before the compiled kernel's own launcher
runs. On the H200 host that costs 25-34 us per launch against 7.7-8.9 us for the launcher alone
(benchmarks/results/host_overhead_h200.json); the 8B QLoRA step without CUDA graphs issues ~2,700 Triton launches
and waits on the host (626 ms of host work per 501 ms step, of which the GPU is busy 235).

`fast_launch(kernel, grid, *args, **kw)` launches through `JITFunction` the first time it sees a call key, keeps the
compiled kernel it returns, and afterwards calls that kernel's launcher directly. The call key is finer than
Triton's specialization, so a key never maps to a kernel compiled for other arguments:
  tensors  (dtype, data_ptr % 16 == 0)     ints  their exact value     other values  (type, value)
  plus the keyword arguments (constexprs, num_warps, ...) and the current device.
The launcher takes every kernel parameter in signature order, constexprs included (Triton 3.6: what
`JITFunction.run` passes it); positional arguments first, then the keyword ones by parameter name.

Falls back to `kernel[grid]` for good when the compiled kernel lacks the attributes used here or its launcher
raises (another Triton's calling convention raises on the argument count before anything launches), while a launch
hook is installed (profilers), under the interpreter, and with FXOPT_FAST_LAUNCH=0 (read at import; `FAST`).
"""
from __future__ import annotations

import os

import torch

FAST = os.environ.get("FXOPT_FAST_LAUNCH", "1") != "0"
MAX_ENTRIES = 8192          # compiled kernels kept per process (dynamic shapes add keys; then the table restarts)
_CACHE: dict = {}
_PARAMS: dict = {}          # id(kernel) -> (parameter names, {name: default})
STATS = {"fast": 0, "jit": 0}
_state = {"broken": None}   # the reason the direct path was turned off, once it was


def _knobs():
    try:
        from triton import knobs
        return knobs.runtime
    except Exception:  # noqa: BLE001 - a Triton without knobs: no direct path
        return None


_RUNTIME = None


def _runtime():
    global _RUNTIME
    if _RUNTIME is None:
        _RUNTIME = _knobs() or False
    return _RUNTIME


def _raw_stream():
    get = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if get is not None:
        return lambda dev: get(dev)
    return lambda dev: torch.cuda.current_stream(dev).cuda_stream


_STREAM = None


def _params(kernel):
    p = _PARAMS.get(id(kernel))
    if p is None:
        names = list(getattr(kernel, "arg_names", None) or [])
        defaults = {}
        for par in getattr(kernel, "params", []) or []:
            if getattr(par, "has_default", False):
                defaults[par.name] = par.default
        p = _PARAMS[id(kernel)] = (names, defaults)
    return p


def _arg_key(a):
    t = type(a)
    if t is int:
        return a
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    return (t, a)


def _full_args(kernel, args, kw):
    """Every kernel parameter's value in signature order; None when one is neither given nor defaulted."""
    names, defaults = _params(kernel)
    if not names or len(args) > len(names):
        return None
    out = list(args)
    for name in names[len(args):]:
        if name in kw:
            out.append(kw[name])
        elif name in defaults:
            out.append(defaults[name])
        else:
            return None
    return out


def _hooked(hook) -> bool:
    """A launch hook is installed: a function (older Triton), or a HookChain holding calls (Triton 3.5+ always has
    the chain, empty unless a profiler adds to it)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _on_cuda(args) -> bool:
    """The launch is a compiled CUDA one (the first argument is a CUDA tensor; the interpreter runs on CPU ones)."""
    return bool(args) and isinstance(args[0], torch.Tensor) and args[0].device.type == "cuda"


def disable(reason: str) -> None:
    """Turn the direct path off for this process (the first failure does)."""
    _state["broken"] = reason
    _CACHE.clear()


def fast_launch(kernel, grid, *args, **kw):
    """`kernel[grid](*args, **kw)`, through the compiled kernel's own launcher after the first call per key."""
    rt = _runtime() if FAST and _state["broken"] is None else False
    if not rt or _hooked(rt.launch_enter_hook) or not _on_cuda(args):
        STATS["jit"] += 1
        return kernel[grid](*args, **kw)
    global _STREAM
    if _STREAM is None:
        _STREAM = _raw_stream()
    dev = torch.cuda.current_device()
    key = (id(kernel), dev, tuple(map(_arg_key, args)), tuple(kw.items()))
    ck = _CACHE.get(key)
    if ck is not None:
        full = _full_args(kernel, args, kw)
        g = tuple(grid) + (1, 1)
        try:
            ck.run(g[0], g[1], g[2], _STREAM(dev), ck.function, ck.packed_metadata, None, None, None, *full)
            STATS["fast"] += 1
            return ck
        except Exception as e:  # noqa: BLE001 - another launcher convention: use JITFunction from now on
            disable(f"{type(e).__name__}: {e}")
    STATS["jit"] += 1
    ck = kernel[grid](*args, **kw)
    if _usable(ck) and _full_args(kernel, args, kw) is not None:
        if len(_CACHE) >= MAX_ENTRIES:
            _CACHE.clear()
        _CACHE[key] = ck
    return ck


def _usable(ck) -> bool:
    try:
        return ck is not None and callable(ck.run) and ck.function is not None and hasattr(ck, "packed_metadata")
    except Exception:  # noqa: BLE001 - attribute access may load the binary; any failure: not usable
        return False
