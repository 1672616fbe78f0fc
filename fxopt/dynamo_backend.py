"""The dynamo backend: config -> pipeline -> hand-off to Inductor (or aot_eager) -> report.

Never crashes where plain Inductor runs: a failing pass is undone (pipeline.py); if the rewritten graph fails to
compile, the original graph is compiled instead; `strict` turns each of these into an FxoptError.
"""
from __future__ import annotations

import logging
import sys

import torch
import torch.fx as fx

from fxopt import config as _config
from fxopt import report as _report
from fxopt.errors import FxoptError
from fxopt.kernels.registry import set_strict
from fxopt import pipeline
from fxopt.patterns import rms_norm_add

log = logging.getLogger("fxopt.backend")


def _compile_key():
    """The torch.compile call that owns this backend call: its dynamo wrapper object (held weakly by the report; its
    id alone can be reused once an old wrapper is freed)."""
    f = sys._getframe(2)
    for _ in range(40):
        if f is None:
            break
        s = f.f_locals.get("self")
        if s is not None and type(s).__name__ == "_TorchCompileWrapper":
            return s
        f = f.f_back
    return None


def _compile_id_and_context():
    """(compile id, dynamo compile context object: one per frame compile) of this backend call, or Nones."""
    try:
        from torch._guards import CompileContext
        return CompileContext.current_compile_id(), CompileContext.try_get()
    except Exception:  # noqa: BLE001 - private API, optional
        return None, None


def _count_ops(gm: fx.GraphModule, graph_report) -> None:
    for n in gm.graph.nodes:
        if n.op == "call_function" and str(getattr(n.target, "namespace", "")) == "fxopt":
            graph_report.ops_in_compiled[str(n.target.name()).split("::")[-1].split(".")[0]] += 1


def _counting(compiler, graph_report, kind=None, config=None):
    """The compiler of each partitioned graph, after the adds next to RMSNorm go into its kernels
    (patterns/rms_norm_add.py) and the fxopt ops are counted."""
    def inner(gm, example_inputs, *args, **kwargs):
        k = kind or ("backward" if kwargs.get("is_backward") else
                     "inference" if kwargs.get("is_inference") else "forward")
        graph_report.compiled[k] += 1
        if config is not None and graph_report.matched["rms_norm"] and rms_norm_add.enabled():
            fused = pipeline._undoable(gm, "rms_norm_add", lambda: rms_norm_add.fuse_norm_adds(gm), config,
                                       graph_report, f"{k} graph")
            graph_report.fused.update(fused or {})
        _count_ops(gm, graph_report)
        return compiler(gm, example_inputs, *args, **kwargs)
    return inner


def inductor_mode_patches(config) -> dict:
    """Inductor config for torch.compile's `mode` (as Inductor itself maps it) and the `cudagraphs` option. With CUDA
    graphs Inductor replays each compiled forward and backward as one graph launch: the per-op CPU cost (Python
    dispatch of every fxopt op, Triton launches) is paid once at capture. Inductor skips graphs it cannot capture
    (CPU tensors, dynamic shapes it has not seen, ...) and says why under TORCH_LOGS=perf_hints."""
    patches = {}
    if config.mode is not None:
        try:
            from torch._inductor import list_mode_options
            patches.update(list_mode_options(config.mode))
        except ImportError:  # pragma: no cover - private API; these are its values in torch 2.11-2.13
            patches.update({"reduce-overhead": {"triton.cudagraphs": True},
                            "max-autotune": {"max_autotune": True, "triton.cudagraphs": True,
                                             "coordinate_descent_tuning": True},
                            "max-autotune-no-cudagraphs": {"max_autotune": True, "coordinate_descent_tuning": True},
                            }.get(config.mode, {}))
    if config.cudagraphs:
        patches["triton.cudagraphs"] = True
    return patches


def _autograd_cache_off():
    """AOTAutograd's own cache off for fxopt's compiles: a hit hands back compiled graphs without calling the
    partitioner or the compilers, so the report would show no plan, no compiled graphs and no fxopt ops, and the
    norm-add pass would not run. Inductor's FX graph cache, inside the compilers and keyed by fxopt's sources and the
    partitioner's uuid, still serves repeated compiles."""
    from torch._functorch import config as fconfig
    return fconfig.patch({"enable_autograd_cache": False} if hasattr(fconfig, "enable_autograd_cache") else {})


def _compile(gm, example_inputs, config, graph_report):
    """Hand-off: Inductor (or aot_eager); with a memory budget, fxopt's recompute planner is the partitioner."""
    part, ctx = None, _autograd_cache_off()
    if config.memory_budget is not None:
        from fxopt.recompute import partition
        part = partition.partitioner(config, graph_report)
    with ctx:
        if config.inductor:
            from torch._inductor.compile_fx import compile_fx, compile_fx_inner

            from fxopt.inductor_passes import config_patches
            patches = config_patches()
            patches.update(inductor_mode_patches(config))
            if part is not None:
                patches["custom_partitioner_fn"] = part
            inner = _counting(compile_fx_inner, graph_report, config=config)
            return compile_fx(gm, example_inputs, inner_compile=inner,
                              config_patches=patches or None)
        from torch._dynamo.backends.common import aot_autograd
        from torch._dynamo.backends.debugging import boxed_nop
        from torch._functorch.partitioners import min_cut_rematerialization_partition
        return aot_autograd(fw_compiler=_counting(boxed_nop, graph_report, "forward", config),
                            bw_compiler=_counting(boxed_nop, graph_report, "backward", config),
                            inference_compiler=_counting(boxed_nop, graph_report, "inference", config),
                            partition_fn=part or min_cut_rematerialization_partition,
                            keep_inference_input_mutations=True)(gm, example_inputs)


def _control_flow(e: BaseException) -> bool:
    """Dynamo's own restart signals pass through untouched (they are not failures)."""
    try:
        from torch._dynamo.exc import RestartAnalysis
    except ImportError:  # pragma: no cover
        return False
    return isinstance(e, RestartAnalysis)


def backend(gm: fx.GraphModule, example_inputs, *, mode=None, options=None):
    """torch.compile(model, backend="fxopt", options={...}); options as in API.md."""
    config = _config.parse(options, mode)
    set_strict(config.strict)
    cid, ctx = _compile_id_and_context()
    report = _report.report_for(_compile_key(), config.patterns, cid, ctx)
    graph_report = report.new_graph(cid, ctx)
    try:
        compiled = _backend(gm, example_inputs, config, graph_report, cid)
    except BaseException as e:
        if _control_flow(e):   # dynamo restarts this compile: it will call us again for the same frame
            report.discard(graph_report)
        raise
    return _with_runtime_state(compiled, config.strict, report)


def _with_runtime_state(compiled, strict: bool, report):
    """Each call of a compiled graph first makes the kernels follow *this* compile's `strict` and send runtime
    fallbacks to *its* report (a process runs several compiled models; the backward runs right after the forward
    that built it, so it sees the same state)."""
    def run(*args, **kwargs):
        set_strict(strict)
        _report.set_running(report)
        return compiled(*args, **kwargs)
    run.__wrapped__ = compiled
    return run


def _backend(gm, example_inputs, config, graph_report, cid):
    where = f"graph {cid if cid is not None else graph_report.name}"
    original = pipeline.copy_graph(gm.graph)
    try:
        pipeline.run(gm, config, graph_report, where)
    except FxoptError:
        raise
    except Exception as e:  # noqa: BLE001
        if _control_flow(e):
            raise
        if config.strict:
            raise FxoptError(f"fxopt pipeline failed on {where}: {type(e).__name__}: {e}") from e
        _fall_back(gm, original, graph_report, "pipeline", e)
    if not any(graph_report.matched.values()):
        return _compile(gm, example_inputs, config, graph_report)
    try:
        return _compile(gm, example_inputs, config, graph_report)
    except FxoptError:   # e.g. an infeasible memory budget: the user must hear it, not get a silent fallback
        raise
    except Exception as e:  # noqa: BLE001
        if _control_flow(e):
            raise
        if config.strict:
            raise FxoptError(f"compiling the fxopt-rewritten {where} failed: {type(e).__name__}: {e}") from e
        _fall_back(gm, original, graph_report, "compile", e)
        for counts in (graph_report.matched, graph_report.grouped, graph_report.fused):
            counts.clear()
        return _compile(gm, example_inputs, config, graph_report)


def _fall_back(gm, original, graph_report, what, e):
    err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    gm.graph = original
    gm.recompile()
    graph_report.fallbacks.append(_report.Fallback(what, err))
    _report.warn_once(what, err)


def _reset():
    """Called by torch._dynamo.reset(): the next compilation starts a new report."""
    _report.start_new()


backend.reset = _reset
