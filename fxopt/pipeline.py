"""The pass pipeline on dynamo's FX graph: normalize, then each enabled pattern; a failing pass is undone."""
from __future__ import annotations

import logging

import torch.fx as fx

from fxopt.errors import FxoptError
from fxopt.normalize import normalize
from fxopt.patterns import PATTERNS, lora_group
from fxopt.patterns.match import apply_pattern
from fxopt.report import Fallback, warn_once

log = logging.getLogger("fxopt.pipeline")


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A structural copy (node metadata shared shallowly), used to undo a failed pass."""
    new = fx.Graph(owning_module=graph.owning_module, tracer_cls=graph._tracer_cls)
    val_map: dict = {}
    new.output(new.graph_copy(graph, val_map))
    for old, copied in val_map.items():   # attributes dynamo/AOT attach to nodes (e.g. _dynamo_source)
        for k, v in vars(old).items():
            if k not in vars(copied):
                setattr(copied, k, v)
    return new


def run(gm: fx.GraphModule, config, graph_report, where: str) -> fx.GraphModule:
    """1. normalize  2. every enabled pattern, in PATTERNS order  3. LoRA calls on one input grouped. Mutates `gm`.

    Bodies of activation-checkpoint regions get the same passes, so a checkpointed layer is matched like a plain one.
    Other higher-order-op bodies (e.g. an autograd.Function's forward, whose backward body is separate) are left alone.
    """
    bodies = [(name, getattr(gm, name)) for name in _checkpoint_bodies(gm)]
    for name, mod in [("", gm)] + bodies:
        _run_graph(mod, config, graph_report, f"{where}/{name}" if name else where)
    if bodies:
        gm.recompile()
    return gm


_CHECKPOINT_HOPS = ("tag_activation_checkpoint", "wrap_activation_checkpoint")


def _checkpoint_bodies(gm: fx.GraphModule) -> list:
    names = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and getattr(n.target, "__name__", str(n.target)) in _CHECKPOINT_HOPS and n.args \
                and isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr":
            body = getattr(gm, n.args[0].target, None)
            if isinstance(body, fx.GraphModule) and n.args[0].target not in names:
                names.append(n.args[0].target)
    return names


def _run_graph(gm: fx.GraphModule, config, graph_report, where: str) -> None:
    counts = normalize(gm)
    log.info("%s: normalize %s", where, counts)
    for pattern in PATTERNS:
        if config.enabled(pattern.name):
            n = _undoable(gm, pattern.name, lambda: apply_pattern(gm, pattern, graph_report, where), config,
                          graph_report, where)
            graph_report.matched[pattern.name] += n or 0
            log.info("%s: %s matched %d", where, pattern.name, n or 0)
    if lora_group.enabled() and (graph_report.matched["lora"] or graph_report.matched["lora_nf4"]):
        grouped = _undoable(gm, "lora_group", lambda: lora_group.group_lora(gm), config, graph_report, where)
        graph_report.grouped.update(grouped or {})
        log.info("%s: lora_group %s", where, grouped)


def _undoable(gm: fx.GraphModule, name: str, rewrite, config, graph_report, where: str):
    """rewrite()'s result; if it raises, the graph as before, one warning and a report entry (strict: raise)."""
    before = copy_graph(gm.graph)
    try:
        out = rewrite()
        gm.graph.lint()
        gm.recompile()
        return out
    except Exception as e:  # noqa: BLE001 - a broken rewrite must never break training
        if config.strict:
            raise FxoptError(f"fxopt pattern {name!r} failed on {where}: {type(e).__name__}: {e}") from e
        gm.graph = before
        gm.recompile()
        err = f"{type(e).__name__}: {e}"
        graph_report.fallbacks.append(Fallback(name, err))
        warn_once(f"pattern {name}", err)
        return None
