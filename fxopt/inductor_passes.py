"""Keeps Inductor's caches honest about fxopt: a post-grad custom pass whose uuid() hashes fxopt's source files.

Inductor's FX graph cache and AOTAutograd's cache key a compiled graph by the graph and Inductor's config, not by
what `torch.ops.fxopt.*` do. Without this, a cache written by an older fxopt is replayed after an upgrade (seen:
"fxopt::rope_backward() is missing value for argument 'q_order'" after the op's schema changed). Custom passes in
the config contribute their uuid() to both keys.
"""
from __future__ import annotations

import functools
import hashlib
import pathlib


@functools.lru_cache(None)
def source_hash() -> str:
    root = pathlib.Path(__file__).parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _base():
    from torch._inductor.custom_graph_pass import CustomGraphPass
    return CustomGraphPass


class _SourceKeyedPass:
    """Runs the pass the user configured (if any); its uuid adds fxopt's source hash to the cache key."""

    def __init__(self, inner=None):
        self.inner = inner

    def __call__(self, graph):
        if self.inner is not None:
            self.inner(graph)

    def uuid(self):
        inner = self.inner.uuid() if hasattr(self.inner, "uuid") else None
        return f"fxopt-{source_hash()}-{inner}"


def config_patches() -> dict:
    """Inductor config patches for every fxopt hand-off (empty if this torch has no custom-pass hook)."""
    try:
        import torch._inductor.config as ic
        base = _base()
    except (ImportError, AttributeError):
        return {}
    cls = type("FxoptSourceKeyedPass", (_SourceKeyedPass, base), {})
    return {"post_grad_custom_post_pass": cls(getattr(ic, "post_grad_custom_post_pass", None))}
