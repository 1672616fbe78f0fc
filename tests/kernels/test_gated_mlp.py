"""fxopt::gated_mlp(_packed) kernels vs eager PyTorch (Triton interpreter on CPU, natively with -m gpu)."""
import pytest
import torch
import torch.nn.functional as F

import fxopt  # noqa: F401
from fxopt.kernels import gated_mlp as K
from tests.helpers import rel

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter's numpy exp overflows to inf for saturated sigmoids (1 / (1 + inf) = 0, the right value)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
EAGER = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _eager(gate, up, act):
    """Eager act(gate) * up in fp32 (the op rounds once, at the end)."""
    return EAGER[act](gate.float()) * up.float()


def _check(gate, up, act, y, dy, dg, du, tol):
    gf = gate.detach().float().requires_grad_()
    uf = up.detach().float().requires_grad_()
    ref = _eager(gf, uf, act)
    assert y.shape == ref.shape and torch.isfinite(y).all()
    assert rel(y, ref) <= tol
    dg_ref, du_ref = torch.autograd.grad(ref, (gf, uf), dy.float())
    assert dg.dtype == gate.dtype and du.dtype == up.dtype
    assert dg.shape == gate.shape and du.shape == up.shape
    assert rel(dg, dg_ref) <= tol and rel(du, du_ref) <= tol


@pytest.fixture
def poisoned(monkeypatch):
    """Kernel outputs start as NaN: an element a kernel forgets to write fails the comparison."""
    monkeypatch.setattr(K, "_empty", lambda *a, **k: torch.full(*a, float("nan"), **k))


def _layout(kind, shape, dtype):
    """gate, up leaves of `shape` in a given memory layout."""
    if kind == "contiguous":
        g, u = torch.randn(shape, dtype=dtype, device=DEV), torch.randn(shape, dtype=dtype, device=DEV)
    elif kind == "chunk":        # halves of a fused projection: row stride 2C
        g, u = torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype, device=DEV).chunk(2, -1)
    elif kind == "transposed":   # no unit column stride: copied to rows
        g = torch.randn(tuple(reversed(shape)), dtype=dtype, device=DEV).t()
        u = torch.randn(shape, dtype=dtype, device=DEV)
    else:                        # row slice of a larger tensor: row stride != C, column stride 1
        g = torch.randn(shape[0], 3, shape[-1], dtype=dtype, device=DEV)[:, 1]
        u = torch.randn(shape[0], shape[-1] + 5, dtype=dtype, device=DEV)[:, 2:-3]
    return (3 * g).detach().requires_grad_(), u.detach().requires_grad_()


@pytest.mark.parametrize("act", list(K.ACTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_backward_vs_eager(act, dtype, no_fallback, poisoned):
    for shape in [(3, 7, 53), (1, 37)]:          # odd sizes, one row
        g, u = _layout("contiguous", shape, dtype)
        y = torch.ops.fxopt.gated_mlp(g, u, act, dtype)
        assert y.dtype == dtype
        dy = torch.randn_like(y)
        dg, du = torch.autograd.grad(y, (g, u), dy)
        _check(g, u, act, y, dy, dg, du, TOL[dtype])


@pytest.mark.parametrize("kind", ["chunk", "transposed", "row_slice"])
@pytest.mark.parametrize("act", list(K.ACTS))
def test_non_contiguous_inputs(kind, act, no_fallback, poisoned):
    g, u = _layout(kind, (6, 40), torch.float32)
    y = torch.ops.fxopt.gated_mlp(g, u, act, torch.float32)
    dy = torch.randn(6, 40, device=DEV).t().contiguous().t()   # strided incoming grad too
    dg, du = torch.autograd.grad(y, (g, u), dy)
    _check(g, u, act, y, dy, dg, du, TOL[torch.float32])


@pytest.mark.parametrize("act", list(K.ACTS))
@pytest.mark.parametrize("gate_first", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_vs_chunk(act, gate_first, dtype, no_fallback, poisoned):
    gu = torch.randn(2, 9, 2 * 45, dtype=dtype, device=DEV, requires_grad=True)
    y = torch.ops.fxopt.gated_mlp_packed(gu, act, gate_first, dtype)
    assert y.shape == (2, 9, 45) and y.dtype == dtype
    dy = torch.randn_like(y)
    (dgu,) = torch.autograd.grad(y, gu, dy)
    assert dgu.shape == gu.shape and dgu.is_contiguous()
    guf = gu.detach().float().requires_grad_()
    a, b = guf.chunk(2, -1)
    gate, up = (a, b) if gate_first else (b, a)
    ref = _eager(gate, up, act)
    (dgu_ref,) = torch.autograd.grad(ref, guf, dy.float())
    assert rel(y, ref) <= TOL[dtype] and rel(dgu, dgu_ref) <= TOL[dtype]


def test_mixed_dtypes_promote_like_eager(no_fallback):
    g = torch.randn(5, 24, dtype=torch.bfloat16, device=DEV, requires_grad=True)
    u = torch.randn(5, 24, dtype=torch.float32, device=DEV, requires_grad=True)
    y = torch.ops.fxopt.gated_mlp(g, u, "silu", torch.float32)
    assert y.dtype == (F.silu(g) * u).dtype == torch.float32
    dy = torch.randn_like(y)
    dg, du = torch.autograd.grad(y, (g, u), dy)
    _check(g, u, "silu", y, dy, dg, du, 1e-2)


def test_int64_offsets_path(monkeypatch, no_fallback, poisoned):
    monkeypatch.setattr(K, "_I64_FROM", 0)
    g, u = _layout("chunk", (4, 33), torch.float32)
    y = torch.ops.fxopt.gated_mlp(g, u, "gelu_tanh", torch.float32)
    dy = torch.randn_like(y)
    dg, du = torch.autograd.grad(y, (g, u), dy)
    _check(g, u, "gelu_tanh", y, dy, dg, du, TOL[torch.float32])


def test_even_tiles_path(no_fallback, poisoned):
    # shapes that the launcher tiles without masks (EVEN) on this device
    R, C = (64, 1024) if DEV == "cuda" else (16, 1024)
    br, bc, _ = K._config(R, C, torch.device(DEV))
    assert R % br == 0 and C % bc == 0
    g, u = _layout("contiguous", (R, C), torch.float32)
    y = torch.ops.fxopt.gated_mlp(g, u, "silu", torch.float32)
    dy = torch.randn_like(y)
    dg, du = torch.autograd.grad(y, (g, u), dy)
    _check(g, u, "silu", y, dy, dg, du, TOL[torch.float32])


def test_empty_and_saturated_values(no_fallback):
    e = torch.randn(0, 16, device=DEV, requires_grad=True)
    y = torch.ops.fxopt.gated_mlp(e, e, "silu", torch.float32)
    assert y.shape == (0, 16)
    # large |g|: sigmoid saturates; no inf/nan in fwd or bwd (eager gives finite values too)
    g = torch.tensor([[-120.0, -30.0, -1e-4, 0.0, 1e-4, 30.0, 120.0]], device=DEV).repeat(3, 1).requires_grad_()
    u = torch.randn_like(g).requires_grad_()
    for act in K.ACTS:
        y = torch.ops.fxopt.gated_mlp(g, u, act, torch.float32)
        dy = torch.randn_like(y)
        dg, du = torch.autograd.grad(y, (g, u), dy)
        _check(g, u, act, y, dy, dg, du, TOL[torch.float32])


def test_act_reference_derivatives():
    g = torch.linspace(-9, 9, 301, dtype=torch.float64, requires_grad=True)
    for act, f in EAGER.items():
        a, da = K.act_reference(g.detach(), act)
        (da_ref,) = torch.autograd.grad(f(g).sum(), g)
        assert rel(a, f(g)) <= 1e-12 and rel(da, da_ref) <= 1e-12


@pytest.mark.parametrize("act", list(K.ACTS))
def test_opcheck(act):
    g = torch.randn(2, 3, 20, device=DEV, requires_grad=True)
    u = torch.randn(2, 3, 20, device=DEV, requires_grad=True)
    torch.library.opcheck(torch.ops.fxopt.gated_mlp.default, (g, u, act, torch.float32))
    torch.library.opcheck(torch.ops.fxopt.gated_mlp_backward.default,
                          (torch.randn(2, 3, 20, device=DEV), g.detach(), u.detach(), act))
    gu = torch.randn(3, 40, device=DEV, requires_grad=True)
    torch.library.opcheck(torch.ops.fxopt.gated_mlp_packed.default, (gu, act, act != "gelu", torch.float32))
    torch.library.opcheck(torch.ops.fxopt.gated_mlp_packed_backward.default,
                          (torch.randn(3, 20, device=DEV), gu.detach(), act, True))


def test_cost_declared():
    from fxopt.kernels.registry import COSTS
    flops, nbytes = COSTS["gated_mlp"]((16384, 14336), 2)
    assert nbytes == 3 * 16384 * 14336 * 2 and flops > 0


@pytest.mark.gpu
@pytest.mark.parametrize("act", list(K.ACTS))
def test_gpu_large_bf16(act, no_fallback):
    g, u = _layout("contiguous", (4096, 14336), torch.bfloat16)
    y = torch.ops.fxopt.gated_mlp(g, u, act, torch.bfloat16)
    dy = torch.randn_like(y)
    dg, du = torch.autograd.grad(y, (g, u), dy)
    _check(g, u, act, y, dy, dg, du, 1e-2)
    gu = torch.randn(4096, 2 * 8192 + 2 * 11, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.ops.fxopt.gated_mlp_packed(gu, act, True, torch.bfloat16)
    (dgu,) = torch.autograd.grad(y, gu, torch.ones_like(y))
    gate, up = gu.detach().float().requires_grad_().chunk(2, -1)
    assert rel(y, _eager(gate, up, act)) <= 1e-2 and torch.isfinite(dgu).all()
