"""fast_launch: the first call per key goes through JITFunction, later ones through the compiled kernel's launcher
with every parameter in signature order; keys separate what Triton specializes on; any launcher failure turns the
direct path off. CPU: a fake kernel records the calls. GPU: real kernels, outputs checked."""
import inspect

import pytest
import torch

from fxopt.kernels import launch as L


class _Param:
    def __init__(self, p):
        self.name = p.name
        self.has_default = p.default is not inspect.Parameter.empty
        self.default = p.default


class _Compiled:
    def __init__(self, log, fail=False):
        self.log, self.fail = log, fail
        self.function, self.packed_metadata = "fn", "meta"

    def run(self, *a):
        if self.fail:
            raise TypeError("function takes exactly 12 arguments (14 given)")
        self.log.append(("direct", a))


class _Kernel:
    """Stands for a JITFunction of def k(X, n, scale, BLOCK: constexpr, FLAG: constexpr = True)."""
    def __init__(self, fail=False):
        def k(X, n, scale, BLOCK, FLAG=True):
            pass
        sig = inspect.signature(k)
        self.params = [_Param(p) for p in sig.parameters.values()]
        self.arg_names = [p.name for p in self.params]
        self.log, self.fail = [], fail

    def __getitem__(self, grid):
        def runner(*args, **kw):
            self.log.append(("jit", grid, args, kw))
            return _Compiled(self.log, self.fail)
        return runner


class _Chain:
    """Triton 3.5+'s HookChain: always present, empty unless a profiler adds a call."""
    def __init__(self, calls=()):
        self.calls = list(calls)


class _Runtime:
    launch_enter_hook = _Chain()


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(L, "FAST", True)
    monkeypatch.setattr(L, "_RUNTIME", _Runtime())
    monkeypatch.setattr(L, "_on_cuda", lambda args: True)
    monkeypatch.setattr(L, "_STREAM", lambda dev: 77)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setitem(L._state, "broken", None)
    L._CACHE.clear()
    yield
    L._CACHE.clear()


def test_second_call_is_direct_with_all_parameters_in_order(fake_cuda):
    k = _Kernel()
    x = torch.zeros(64)
    L.fast_launch(k, (3,), x, 5, 1.5, BLOCK=32)
    L.fast_launch(k, (3,), x, 5, 1.5, BLOCK=32, num_warps=4)   # other options: another key, through JIT
    L.fast_launch(k, (4, 2), x, 5, 1.5, BLOCK=32, num_warps=4)
    kinds = [e[0] for e in k.log]
    assert kinds == ["jit", "jit", "direct"]
    # grid padded to 3 dims, the stream, the launcher's handles, no launch metadata or hooks, then X, n, scale,
    # BLOCK from the keywords and FLAG from its default
    assert k.log[2][1] == (4, 2, 1, 77, "fn", "meta", None, None, None, x, 5, 1.5, 32, True)


@pytest.mark.parametrize("change", ["alignment", "dtype", "int_value", "bool_for_int", "float_value", "constexpr"])
def test_what_triton_specializes_on_makes_a_new_key(fake_cuda, change):
    k = _Kernel()
    buf = torch.zeros(64, dtype=torch.uint8)
    base = dict(X=buf[:32], n=5, scale=1.5, BLOCK=32)
    other = dict(base)
    if change == "alignment":
        assert buf.data_ptr() % 16 == 0
        other["X"] = buf[1:33]
    elif change == "dtype":
        other["X"] = buf[:32].view(torch.int8)
    elif change == "int_value":
        other["n"] = 16
    elif change == "bool_for_int":
        base["n"], other["n"] = 1, True
    elif change == "float_value":
        other["scale"] = 2.5
    else:
        other["BLOCK"] = 64
    for d in (base, other):
        L.fast_launch(k, (1,), d["X"], d["n"], d["scale"], BLOCK=d["BLOCK"])
    assert [e[0] for e in k.log] == ["jit", "jit"]
    L.fast_launch(k, (1,), other["X"], other["n"], other["scale"], BLOCK=other["BLOCK"])
    assert [e[0] for e in k.log] == ["jit", "jit", "direct"]


def test_a_launcher_that_raises_turns_the_direct_path_off(fake_cuda):
    k = _Kernel(fail=True)
    x = torch.zeros(16)
    for _ in range(3):
        L.fast_launch(k, (1,), x, 5, 1.5, BLOCK=32)
    # the failing direct call launched nothing and fell back; from then on every call goes through JIT
    assert [e[0] for e in k.log] == ["jit", "jit", "jit"]
    assert L._state["broken"].startswith("TypeError")


def test_launch_hooks_and_missing_parameters_use_jit(fake_cuda, monkeypatch):
    k = _Kernel()
    x = torch.zeros(16)
    for _ in range(2):   # BLOCK neither given nor defaulted: the call is never cached
        L.fast_launch(k, (1,), x, 5, 1.5)
    for hook in (print, _Chain([print])):   # a profiler's launch hook (older Triton's function, or a chain's call)
        hooked = _Runtime()
        hooked.launch_enter_hook = hook
        monkeypatch.setattr(L, "_RUNTIME", hooked)
        for _ in range(2):   # JIT, which calls it
            L.fast_launch(k, (1,), x, 5, 1.5, BLOCK=32)
    assert [e[0] for e in k.log] == ["jit"] * 6
    old = _Runtime()
    old.launch_enter_hook = None   # older Triton without a hook: direct
    monkeypatch.setattr(L, "_RUNTIME", old)
    for _ in range(2):
        L.fast_launch(k, (1,), x, 5, 1.5, BLOCK=32)
    assert [e[0] for e in k.log[-2:]] == ["jit", "direct"]


def test_cpu_tensors_and_fast_off_use_jit(monkeypatch):
    k = _Kernel()
    monkeypatch.setattr(L, "_RUNTIME", _Runtime())
    for _ in range(2):
        L.fast_launch(k, (1,), torch.zeros(4), 5, 1.5, BLOCK=32)
    monkeypatch.setattr(L, "FAST", False)
    assert [e[0] for e in k.log] == ["jit", "jit"]


@pytest.mark.gpu
def test_gpu_direct_launches_match_jit():
    """Real kernels through the direct path: the split sum of skinny_mm and an NF4 dequantization, several calls with
    fresh inputs and an unaligned view, each checked against torch."""
    from fxopt.kernels.lora import skinny_mm
    assert L.FAST and L._state["broken"] is None
    before = L.STATS["fast"]
    for rows in (4096, 4096, 4097, 4096):
        big = torch.randn(rows, 256, device="cuda").to(torch.bfloat16)
        small = torch.randn(256, 16, device="cuda")
        out, low = skinny_mm(big, small, low=torch.bfloat16)
        ref = big.double() @ small.double()
        assert (out.double() - ref).abs().max() <= 1e-4 * ref.abs().max()
        assert torch.equal(low, out.to(torch.bfloat16))
    unaligned = torch.randn(4096 * 256 + 1, device="cuda").to(torch.bfloat16)[1:].view(4096, 256)
    out = skinny_mm(unaligned, small)
    ref = unaligned.double() @ small.double()
    assert (out.double() - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert L.STATS["fast"] > before and L._state["broken"] is None
