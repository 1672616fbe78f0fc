"""Gated MLP fwd+bwd at gate/up [16384, 14336] bf16: eager, Inductor, Liger, fxopt (swiglu, packed swiglu, geglu tanh).

Minimal bytes: fwd reads g, u, writes y; bwd reads dy, g, u, writes dg, du -> 8 * T * F * 2 bytes.
`leaf_grad_accumulation=True` rows also pay autograd's `.grad += new` on the two leaves (6 more T*F passes: the
anchors' 1.512 ms Inductor / 1.529 ms Liger were measured that way); `False` rows time the kernels' own traffic.
Liger's backward writes the grads into its saved inputs, so every implementation gets its own copies of g and u.

usage (GPU): python benchmarks/kernels.py --ops gated_mlp;  tile sweep: python -m benchmarks.kernel_bench.gated_mlp
"""
import torch
import torch.nn.functional as F

from benchmarks.kernel_bench.common import do_bench, fwd_bwd, rel

T, FF = 16384, 14336
NBYTES = 8 * T * FF * 2


def swiglu_eager(g, u):
    return F.silu(g) * u


def geglu_eager(g, u):
    return F.gelu(g, approximate="tanh") * u


def packed_eager(gu):          # Phi3: gate, up = gate_up(x).chunk(2, -1); up * silu(gate)
    gate, up = gu.chunk(2, dim=-1)
    return up * F.silu(gate)


def _fxopt(act):
    return lambda g, u: torch.ops.fxopt.gated_mlp(g, u, act, g.dtype)


def fxopt_packed(gu):
    return torch.ops.fxopt.gated_mlp_packed(gu, "silu", True, gu.dtype)


def _liger(name):
    try:
        if name == "swiglu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction
            return LigerSiLUMulFunction.apply
        from liger_kernel.ops.geglu import LigerGELUMulFunction   # tanh-approximated gelu
        return LigerGELUMulFunction.apply
    except Exception as e:  # noqa: BLE001
        print(f"liger {name} unavailable:", repr(e)[:120])
        return None


def _leaves(*shapes, dt=torch.bfloat16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(s, device="cuda", dtype=dt, generator=gen).requires_grad_() for s in shapes]


def _row(op, impl, ms, ceiling, acc, **kw):
    tbps = NBYTES / ms / 1e9
    return dict(op=op, impl=impl, shape=[T, FF], dtype="bf16", leaf_grad_accumulation=acc, ms=round(ms, 4),
                tbps=round(tbps, 3), frac_of_copy=round(tbps / ceiling, 3), **kw)


def _check(fn, ref_fn, inputs, gy):
    """rel of fxopt vs the fp32 eager math on the same bf16 inputs (y and every input grad)."""
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    xf = [t.detach().float().requires_grad_() for t in inputs]
    y, y_ref = fn(*xs), ref_fn(*xf)
    got, exp = torch.autograd.grad(y, xs, gy), torch.autograd.grad(y_ref, xf, gy.float())
    out = dict(y=rel(y, y_ref))
    for i, (a, b) in enumerate(zip(got, exp)):
        out[f"d{i}"] = rel(a, b)
    return {k: round(v, 6) for k, v in out.items()}


def _time_all(op, impls, make_inputs, gy, ceiling, rows):
    for name, f in impls.items():
        if f is None:
            continue
        inputs = make_inputs()
        for acc in (True, False):
            for t in inputs:
                t.grad = None
            ms = fwd_bwd(f, inputs, gy, accumulate=acc)
            rows.append(_row(op, name, ms, ceiling, acc))
        del inputs


def run(ceiling_tbps):
    import fxopt  # noqa: F401
    rows, check = [], {}
    gy = torch.randn(T, FF, device="cuda", dtype=torch.bfloat16)
    for op, eager, act in (("swiglu", swiglu_eager, "silu"), ("geglu_tanh", geglu_eager, "gelu_tanh")):
        g, u = _leaves((T, FF), (T, FF), seed=1)
        check[op] = _check(_fxopt(act), eager, (g, u), gy)
        del g, u
        impls = {"eager": eager, "inductor": torch.compile(eager), "liger": _liger(op.split("_")[0]),
                 "fxopt": _fxopt(act)}
        _time_all(op, impls, lambda: _leaves((T, FF), (T, FF), seed=1), gy, ceiling_tbps, rows)
    # fused gate_up projection output [T, 2F]: fxopt reads both halves in place and returns d(gu) whole
    (gu,) = _leaves((T, 2 * FF), seed=2)
    check["swiglu_packed"] = _check(fxopt_packed, packed_eager, (gu,), gy)
    del gu
    impls = {"eager": packed_eager, "inductor": torch.compile(packed_eager), "fxopt": fxopt_packed}
    _time_all("swiglu_packed", impls, lambda: _leaves((T, 2 * FF), seed=2), gy, ceiling_tbps, rows)
    return rows, check


def sweep(configs=((1, 1024, 4), (2, 1024, 4), (4, 1024, 8), (8, 1024, 8), (2, 2048, 8), (4, 2048, 16),
                   (1, 4096, 8), (16, 512, 8), (8, 512, 4), (1, 2048, 4), (2, 2048, 4), (4, 1024, 4),
                   (1, 1024, 2), (2, 512, 4), (4, 512, 4), (8, 1024, 16), (1, 8192, 16))):
    """Time fwd and bwd kernels alone per (BLOCK_R, BLOCK_C, num_warps) tile; prints one line each."""
    import fxopt  # noqa: F401
    from fxopt.kernels import gated_mlp as K
    default = K._config
    g, u, dy = (torch.randn(T, FF, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dg, du = torch.empty_like(g), torch.empty_like(u)
    gu = torch.randn(T, 2 * FF, device="cuda", dtype=torch.bfloat16)
    dgu = torch.empty_like(gu)
    rows = []
    try:
        for cfg in (None,) + tuple(configs):
            K._config = default if cfg is None else (lambda R, C, dev, cfg=cfg: cfg)
            for act in ("silu", "gelu_tanh"):
                fwd = do_bench(lambda: K._fwd_triton(g, u, act, torch.bfloat16))
                bwd = do_bench(lambda: K._bwd_triton(dy, g, u, dg, du, act))
                pk = do_bench(lambda: K._bwd_triton(dy, gu[:, :FF], gu[:, FF:], dgu[:, :FF], dgu[:, FF:], act))
                print(f"tile {cfg or default(T, FF, g.device)} {act:9s} fwd {fwd:.4f} ms "
                      f"({3 * T * FF * 2 / fwd / 1e9:.2f} TB/s)  bwd {bwd:.4f} ms ({5 * T * FF * 2 / bwd / 1e9:.2f} "
                      f"TB/s)  packed bwd {pk:.4f} ms", flush=True)
                rows.append(dict(tile=cfg or default(T, FF, g.device), default=cfg is None, act=act,
                                 fwd_ms=round(fwd, 4), bwd_ms=round(bwd, 4), packed_bwd_ms=round(pk, 4),
                                 total_ms=round(fwd + bwd, 4)))
    finally:
        K._config = default
    return rows


if __name__ == "__main__":
    sweep()
