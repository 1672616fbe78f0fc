"""The match report (API.md): what each compilation matched, rejected and fell back on; `last_report()`."""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import threading
import warnings

log = logging.getLogger("fxopt")


@dataclasses.dataclass
class Rejected:
    pattern: str
    where: str      # "graph <compile id>: <node name>"
    reason: str


@dataclasses.dataclass
class Fallback:
    what: str       # pattern or pass name
    error: str


class GraphReport:
    """What happened to one dynamo graph (one backend call)."""

    def __init__(self, name: str):
        self.name = name
        self.matched = collections.Counter()
        self.rejected: list[Rejected] = []
        self.fallbacks: list[Fallback] = []
        self.compiled = collections.Counter()   # "forward"/"backward"/"inference" graphs handed to the compiler
        self.ops_in_compiled = collections.Counter()  # fxopt op calls in the aten graphs the hand-off compiled
        self.grouped = collections.Counter()   # matches run as one call with others reading the same input
        self.fused = collections.Counter()     # matches whose partitioned-graph op also does the add next to it
        self.memory = None


class Report:
    """All FX graphs of one torch.compile call's latest compile (graph breaks give several dynamo graphs)."""

    def __init__(self, key, patterns):
        self._owner = _weak(key)        # the torch.compile wrapper object (weak: an id could be reused)
        self.patterns = sorted(patterns)
        self._frames: dict = {}         # frame id -> (frame compile id, [GraphReport])
        self.runtime_fallbacks: list[Fallback] = []

    def stale(self, compile_id, ctx) -> bool:
        """Whether this compile's (frame, compile count) is already here from another dynamo compile. Without a
        dynamo reset, frame ids are unique and counts grow; torch._dynamo.reset() restarts them, and does not reach
        fxopt when a user's backend calls fxopt.backend (its reset hook is on the backend torch.compile got): the
        colliding entry then belongs to a finished compilation, and this report to it."""
        old = self._frames.get(getattr(compile_id, "frame_id", None))
        if old is None or ctx is None or old[0] != getattr(compile_id, "frame_compile_id", None):
            return False
        return old[1]() is not ctx

    def new_graph(self, compile_id, ctx=None) -> GraphReport:
        frame = getattr(compile_id, "frame_id", None)
        count = getattr(compile_id, "frame_compile_id", None)
        g = GraphReport(str(compile_id) if compile_id is not None else f"graph{len(self._all())}")
        old = self._frames.get(frame)
        if old is None or old[0] != count:   # a recompile of a frame replaces its earlier graphs
            self._frames[frame] = (count, _weak(ctx), [g])   # (another compile context: report_for's `stale`)
        else:
            old[2].append(g)
        return g

    def discard(self, g: GraphReport) -> None:
        for frame, (count, _, gs) in list(self._frames.items()):
            if g in gs:
                gs.remove(g)
                if not gs:
                    del self._frames[frame]

    def _all(self) -> list[GraphReport]:
        return [g for _, _, gs in self._frames.values() for g in gs]

    @property
    def matched(self) -> dict[str, int]:
        out = {p: 0 for p in self.patterns}
        for g in self._all():
            for k, v in g.matched.items():
                out[k] = out.get(k, 0) + v
        return out

    @property
    def rejected(self) -> list[Rejected]:
        return [r for g in self._all() for r in g.rejected]

    @property
    def fallbacks(self) -> list[Fallback]:
        return [f for g in self._all() for f in g.fallbacks] + list(self.runtime_fallbacks)

    @property
    def graphs(self) -> int:
        """FX graphs fxopt compiled (dynamo graphs; graph breaks give several)."""
        return len(self._all())

    @property
    def dynamo_graphs(self) -> int:
        return len(self._all())

    def _total(self, counts: str) -> dict[str, int]:
        """One GraphReport counter summed over every graph."""
        c = collections.Counter()
        for g in self._all():
            c.update(getattr(g, counts))
        return dict(c)

    def compiled(self) -> dict[str, int]:
        """forward/backward/inference graphs seen by the hand-off compiler (fxopt turns AOTAutograd's cache off, so
        every graph reaches it; Inductor's own cache may still serve its code)."""
        return self._total("compiled")

    @property
    def memory(self):
        mems = [g.memory for g in self._all() if g.memory is not None]
        if not mems:
            return None
        if len(mems) == 1:
            return mems[0]
        return {"budget": mems[0]["budget"], "predicted_peak": max(m["predicted_peak"] for m in mems),
                "saved": [s for m in mems for s in m["saved"]],
                "recomputed": [s for m in mems for s in m["recomputed"]],
                "offloaded": [s for m in mems for s in m.get("offloaded", [])],
                "offload_bytes": sum(m.get("offload_bytes", 0) for m in mems)}

    def ops_in_compiled(self) -> dict[str, int]:
        return self._total("ops_in_compiled")

    @property
    def grouped(self) -> dict[str, int]:
        """pattern -> matches that run inside a group call (lora/lora_nf4 reading one input: patterns/lora_group.py)."""
        return self._total("grouped")

    @property
    def fused(self) -> dict[str, int]:
        """pattern -> op calls in the compiled graphs that also do an add next to them (rms_norm: the residual add
        before it in the forward, the gradient add after it in the backward; patterns/rms_norm_add.py)."""
        return self._total("fused")

    def to_dict(self) -> dict:
        return {"matched": self.matched, "rejected": [dataclasses.asdict(r) for r in self.rejected],
                "fallbacks": [dataclasses.asdict(f) for f in self.fallbacks], "graphs": self.graphs,
                "compiled": self.compiled(), "ops_in_compiled": self.ops_in_compiled(),
                "grouped": self.grouped, "fused": self.fused, "memory": self.memory}

    def __str__(self) -> str:
        comp = ", ".join(f"{v} {k}" for k, v in sorted(self.compiled().items())) or "none seen"
        lines = [f"fxopt report: {self.graphs} graph(s); hand-off compiled: {comp}",
                 f"{'pattern':<22}{'matched':>8}{'rejected':>10}"]
        rej = collections.Counter(r.pattern for r in self.rejected)
        for p, n in sorted(self.matched.items()):
            lines.append(f"{p:<22}{n:>8}{rej.get(p, 0):>10}")
        for p, n in sorted(self.grouped.items()):
            lines.append(f"  {n} {p} matches run in group calls (one input shared)")
        for p, n in sorted(self.fused.items()):
            lines.append(f"  {n} {p} calls in the compiled graphs also do the add next to them")
        reasons = collections.Counter((r.pattern, r.reason) for r in self.rejected)
        for (p, why), n in reasons.most_common():
            lines.append(f"  rejected {p} x{n}: {why}")
        for f in self.fallbacks:
            lines.append(f"  FALLBACK {f.what}: {f.error}")
        if self.memory:
            m = self.memory
            lines.append(f"memory: budget {m['budget']} B, predicted peak {m['predicted_peak']} B, "
                         f"{len(m['saved'])} saved, {len(m['recomputed'])} recomputed"
                         + (f", {len(m['offloaded'])} offloaded ({m['offload_bytes']} B)"
                            if m.get("offloaded") else ""))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Report({json.dumps(self.matched)})"


_lock = threading.Lock()
_current: Report | None = None
_fresh = False          # set by torch._dynamo.reset(): the next compilation starts a new report
_warned: set = set()


def _weak(obj):
    """A callable returning obj while it lives (a weak reference when obj allows one)."""
    import weakref
    if obj is None:
        return lambda: None
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


def report_for(key, patterns, compile_id=None, ctx=None) -> Report:
    """The report of the torch.compile call `key` (its wrapper object, or None); another key, a dynamo reset, or a
    compile id already
    seen under another dynamo compile context (a reset fxopt was not told of) starts a new report."""
    global _current, _fresh
    with _lock:
        if _current is None or _current._owner() is not key or _fresh or _current.stale(compile_id, ctx):
            _current = Report(key, patterns)
            _fresh = False
        return _current


def start_new() -> None:
    global _fresh
    _fresh = True


def last_report() -> Report | None:
    """The report of the most recent fxopt compilation, or None before any."""
    return _current


def warn_once(what: str, error: str) -> None:
    msg = f"fxopt: {what} failed, keeping the original computation: {error}"
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        log.warning(msg)


RUNTIME_FALLBACKS: list[Fallback] = []   # every kernel failure of the process (tests assert it stays empty)


_running: Report | None = None   # the report of the compiled graph that ran last (set on each call of the graph)


def set_running(report: Report | None) -> None:
    global _running
    _running = report


def record_runtime_fallback(what: str, error: str) -> None:
    """A kernel that failed at run time: one warning, and an entry in the report of the graph that was running."""
    warn_once(what, error)
    RUNTIME_FALLBACKS.append(Fallback(what, error))
    target = _running if _running is not None else _current
    if target is not None:
        target.runtime_fallbacks.append(Fallback(what, error))
