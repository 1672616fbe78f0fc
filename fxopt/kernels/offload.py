"""Saved activations kept in host memory: `fxopt::offload` in the forward, `fxopt::reload` in the backward.

The memory planner (fxopt/recompute/offload.py) rewrites the joint graph: a saved tensor x becomes
    tok_j = offload(x_j, tok_{j-1}, [x_{j-D}], key, slot, nslots, D)   forward, right after x_j is made
    x_j'  = reload(tok_j, key, slot, nslots, D, shape, dtype)          backward, where x_j was read
and the partition saves the 1-byte token instead of x_j. D: copies in flight (the planner's offload_depth()).
- Forward: x_j is copied device->host on a side stream into a pinned buffer of its slot. The copy overlaps the
  forward's compute until the D-th next offload, which makes the compute stream wait for it; x_{j-D} is an argument
  of that call, so the compiled graph keeps it alive (and its memory unreused) until its copy is done. The last
  offload of a forward waits for every copy and takes every tensor still in flight as an argument: all side-stream
  copies are joined before the forward graph ends (needed to record it as a CUDA graph).
- Backward: slots are numbered in the order the backward first reads them. reload(slot) takes the copy an earlier
  reload started for it (or copies now, on the compute stream) and starts the host->device copies of slots
  slot + 1 .. slot + D on the side stream: D tensors are fetched ahead while the backward computes.
- Host buffers: a *generation* is one forward's set of buffers (all slots of one compiled graph). A forward takes a
  generation whose copies were all reloaded; if the last forward's backward has not run (two forwards, then
  backwards), a new one is made, so nothing is overwritten. A generation used while a CUDA graph was being recorded
  belongs to that graph for good: its replays write the same addresses without running this Python, so its
  tokens' entries (by address) stay for the backward's later warm-ups and recordings.
- CPU tensors (tests) copy synchronously into ordinary memory.
H200 (benchmarks/results/pcie_h200.json): pinned copies 55 GB/s one way; d2h and h2d at once 20 GB/s each.
"""
from __future__ import annotations

import itertools
import math
import threading
import warnings
import weakref
from typing import Optional

import torch

from fxopt.errors import FxoptError
from fxopt.kernels.registry import capturing

_LOCK = threading.Lock()
_UID = itertools.count()


def join_call(j: int, n: int, depth: int) -> int:
    """The forward's offload call (0..n-1, in forward order) that waits for the copy of call j's tensor, with
    `depth` copies in flight: call j + depth, or the last call, which joins every copy still running."""
    return min(j + depth, n - 1)


def joined_by(j: int, n: int, depth: int) -> list:
    """The earlier calls whose copies call j joins (join_call(i) == j): its `prev` tensors, kept alive until it."""
    return [i for i in range(max(0, j - depth), j) if join_call(i, n, depth) == j]


class _Gen:
    def __init__(self, index: int):
        self.index = index
        self.bufs: dict = {}         # slot -> flat uint8 host tensor
        self.meta: dict = {}         # slot -> (shape, dtype) of the copy in it
        self.pending = 0             # slots written and not yet reloaded
        self.graph_owned = False     # written while a CUDA graph was recorded: never handed out again
        self.reloaded: set = set()   # slots the running backward has reloaded (not fetched again)

    def buffer(self, slot: int, nbytes: int, device: torch.device) -> torch.Tensor:
        b = self.bufs.get(slot)
        if b is None or b.numel() < nbytes:
            b = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
            self.bufs[slot] = b
        return b


class _Table:
    """The host state of one compiled graph's offloads (`key`)."""

    def __init__(self):
        self.gens: list[_Gen] = []
        self.cur: _Gen | None = None     # being filled by the running forward
        self.filled = 0
        self.copies: list = []           # outstanding device->host copies: (event, source tensor)
        self.prefetch: dict = {}         # (gen index, slot) -> (tensor, event)
        self.streams: dict = {}

    def side(self, device: torch.device):
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device=device)
        return self.streams[device]

    def take_gen(self, capturing: bool) -> _Gen:
        free = [g for g in self.gens if g.pending == 0 and not g.graph_owned]
        g = free[0] if free else _Gen(len(self.gens))
        if not free:
            self.gens.append(g)
        g.graph_owned = g.graph_owned or capturing
        return g


_TABLES: dict = {}
_TOKENS: dict = {}    # (key, token data_ptr) -> (uid, gen, slot)
_STATS = {"offload": 0, "reload": 0, "prefetched": 0, "last_depth": 0}   # calls (tests check the ops ran)


def _table(key: int) -> _Table:
    with _LOCK:
        if key not in _TABLES:
            _TABLES[key] = _Table()
        return _TABLES[key]


def _view(buf: torch.Tensor, shape, dtype) -> torch.Tensor:
    shape = tuple(int(s) for s in shape)
    return buf.view(dtype)[:math.prod(shape)].view(shape)


def _release(key, ptr, uid):
    """The token died without its reload (a forward whose backward never ran): its slot stops being pending."""
    with _LOCK:
        e = _TOKENS.get((key, ptr))
        if e is not None and e[0] == uid:
            del _TOKENS[(key, ptr)]
            e[1].pending -= 1


@torch.library.custom_op("fxopt::offload", mutates_args=())
def offload(x: torch.Tensor, prev_tok: Optional[torch.Tensor], prev: list[torch.Tensor], key: int, slot: int,
            nslots: int, depth: int) -> torch.Tensor:
    """Copy x into host slot `slot` of graph `key`; returns the token the backward's reload takes. prev_tok (the
    previous offload's token) orders the calls; prev (the tensors whose copies this call joins: the one offloaded
    `depth` calls before; at the forward's last call, every one still in flight) stay alive until this call."""
    t = _table(key)
    cap = x.device.type == "cuda" and capturing()
    if t.cur is None or t.filled >= nslots:
        t.cur, t.filled = t.take_gen(cap), 0
    g = t.cur
    nbytes = x.numel() * x.element_size()
    host = _view(g.buffer(slot, nbytes, x.device), x.shape, x.dtype)
    g.meta[slot] = (tuple(x.shape), x.dtype)
    tok = torch.empty(1, dtype=torch.uint8, device=x.device)
    if x.device.type == "cuda":
        main = torch.cuda.current_stream(x.device)
        side = t.side(x.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            host.copy_(x, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(side)
        t.copies.append((ev, x))
        keep = 0 if t.filled + 1 >= nslots else depth    # the last one of the forward joins every copy
        while len(t.copies) > keep:
            e, _ = t.copies.pop(0)
            main.wait_event(e)
    else:
        host.copy_(x)
    t.filled += 1
    uid = next(_UID)
    with _LOCK:
        if g.graph_owned:
            # a recorded graph's token lives at a fixed address that its replays reuse without running this code:
            # the entry stays for the backward's later recordings and warm-ups
            old = _TOKENS.get((key, tok.data_ptr()))
            if old is not None and old[1] is not g:
                warnings.warn("fxopt offload: a second CUDA graph was recorded for one forward at the same token "
                              "address; the backward of the first recording may read the second one's copies. "
                              "Run each forward's backward before the next forward, or compile without 'offload'")
        else:
            g.pending += 1
        _TOKENS[(key, tok.data_ptr())] = (uid, g, slot)
    if not g.graph_owned:
        weakref.finalize(tok, _release, key, tok.data_ptr(), uid)
    _STATS["offload"] += 1
    _STATS["last_depth"] = depth
    return tok


@offload.register_fake
def _(x, prev_tok, prev, key, slot, nslots, depth):
    return x.new_empty((1,), dtype=torch.uint8)


def _start_prefetch(t: _Table, g: _Gen, slot: int, device: torch.device):
    if (g.index, slot) in t.prefetch or slot in g.reloaded or slot not in g.meta or device.type != "cuda":
        return      # (a slot reloaded already: the compiled backward ran the reloads out of slot order)
    shape, dtype = g.meta[slot]
    main = torch.cuda.current_stream(device)
    y = torch.empty(shape, dtype=dtype, device=device)     # allocated in the compute stream's order
    side = t.side(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        y.copy_(_view(g.bufs[slot], shape, dtype), non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(side)
    t.prefetch[(g.index, slot)] = (y, ev)


@torch.library.custom_op("fxopt::reload", mutates_args=())
def reload(tok: torch.Tensor, key: int, slot: int, nslots: int, depth: int, shape: list[int],
           dtype: torch.dtype) -> torch.Tensor:
    """The tensor `offload` copied for this token, back on tok's device; starts fetching slots up to slot + depth."""
    t = _table(key)
    with _LOCK:
        e = _TOKENS.get((key, tok.data_ptr()))
        if e is not None and not e[1].graph_owned:
            del _TOKENS[(key, tok.data_ptr())]
    if e is None:
        raise FxoptError("fxopt offload: no host copy for a saved activation of this backward (its forward's copies "
                         "were released). Run each backward once, after its forward; or compile without "
                         "options={'offload': True}")
    _, g, s = e
    if s != slot:
        raise FxoptError(f"fxopt offload: token of slot {s} passed to the reload of slot {slot} (a bug in fxopt)")
    got = t.prefetch.pop((g.index, slot), None)
    if got is not None:
        y, ev = got
        torch.cuda.current_stream(tok.device).wait_event(ev)
        _STATS["prefetched"] += 1
    else:
        y = torch.empty(tuple(shape), dtype=dtype, device=tok.device)
        y.copy_(_view(g.bufs[slot], shape, dtype), non_blocking=tok.device.type == "cuda")
    if not g.graph_owned:
        with _LOCK:
            g.pending -= 1
    g.reloaded.add(slot)
    if len(g.reloaded) >= nslots:
        g.reloaded.clear()          # this backward is done
    else:
        for ahead in range(slot + 1, min(slot + depth, nslots - 1) + 1):
            _start_prefetch(t, g, ahead, tok.device)
    _STATS["reload"] += 1
    return y


@reload.register_fake
def _(tok, key, slot, nslots, depth, shape, dtype):
    return torch.empty(tuple(shape), dtype=dtype, device=tok.device)
