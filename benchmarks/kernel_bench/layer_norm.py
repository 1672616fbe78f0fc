"""LayerNorm fwd+bwd at 16384 x 4096 bf16: eager F.layer_norm, Inductor, Liger, fxopt (w+b trainable and frozen)."""
import torch
import torch.nn.functional as F

from benchmarks.kernel_bench.common import fwd_bwd, fwd_bwd_gpu_ms, rel

T, D = 16384, 4096
EPS = 1e-5


def eager(x, w, b):
    return F.layer_norm(x, (D,), w, b, EPS)


def fxopt_ln(x, w, b):
    return torch.ops.fxopt.layer_norm(x, w, b, EPS, None, x.dtype)[0]


def _check(impl, x, w, b, gy):
    """rel error of y, dx, dw, db against F.layer_norm in fp32 on the same inputs."""
    xf, wf, bf = (t.detach().float().requires_grad_() for t in (x, w, b))
    y_ref = F.layer_norm(xf, (D,), wf, bf, EPS)
    refs = (y_ref,) + torch.autograd.grad(y_ref, (xf, wf, bf), gy.float())
    y = impl(x, w, b)
    got = (y,) + torch.autograd.grad(y, (x, w, b), gy)
    return {k: round(rel(g, r), 6) for k, g, r in zip(("y", "dx", "dw", "db"), got, refs)}


def run(ceiling_tbps):
    import fxopt
    dt = torch.bfloat16
    x = (torch.randn(T, D, device="cuda", dtype=dt) * 2 + 0.5).requires_grad_()
    w = (1 + 0.1 * torch.randn(D, device="cuda", dtype=dt)).requires_grad_()
    b = (0.1 * torch.randn(D, device="cuda", dtype=dt)).requires_grad_()
    gy = torch.randn(T, D, device="cuda", dtype=dt)
    # minimal bytes: fwd reads x writes y; bwd reads dy, x writes dx (w, b, dw, db, mean, rstd negligible)
    nbytes = 5 * T * D * 2
    # fxopt: the op called eagerly; fxopt_compiled: F.layer_norm through the backend (the op inside an Inductor graph)
    impls = {"eager": eager, "inductor": torch.compile(eager), "fxopt": fxopt_ln,
             "fxopt_compiled": torch.compile(eager, backend=fxopt.backend)}
    try:
        from liger_kernel.transformers.functional import liger_layer_norm
        impls["liger"] = lambda x, w, b: liger_layer_norm(x, w, b, EPS)
    except Exception as e:  # noqa: BLE001
        print("liger unavailable:", repr(e)[:120])
    # correctness on this run, against fp32 math; eager bf16 (and Liger) on the same inputs for scale
    names = ("fxopt", "fxopt_compiled", "eager") + (("liger",) if "liger" in impls else ())
    check = {name: _check(impls[name], x, w, b, gy) for name in names}
    impls["fxopt_compiled"](x, w, b)
    check["fxopt_compiled_matched"] = fxopt.last_report().matched.get("layer_norm", 0)   # else it times Inductor
    rows = []

    def row(name, ms, grads, acc, kernel_ms=None):
        r = dict(op="layer_norm", impl=name, shape=[T, D], dtype="bf16", weight_grad=grads, bias_grad=grads,
                 leaf_grad_accumulation=acc, ms=round(ms, 4), tbps=round(nbytes / ms / 1e9, 3),
                 frac_of_copy=round(nbytes / ms / 1e9 / ceiling_tbps, 3))
        if kernel_ms is not None:
            r.update(gpu_ms=round(kernel_ms, 4), gpu_frac_of_copy=round(nbytes / kernel_ms / 1e9 / ceiling_tbps, 3))
        return r
    # GPU kernel time beside the wall time: at this size the host path is the larger cost (H200 host: ~0.75 ms CPU
    # per eager fwd+bwd step vs 0.20 ms of kernels; wall 0.63 ms eager op, 1.23 ms inside a compiled graph, where
    # Inductor's own graph takes 0.55 ms wall for 0.26 ms of kernels)
    for name, f in impls.items():
        for acc in (True, False):
            k = fwd_bwd_gpu_ms(f, (x, w, b), gy, [x, w, b]) if not acc else None
            rows.append(row(name, fwd_bwd(f, (x, w, b), gy, accumulate=acc), True, acc, k))
    # frozen weight and bias (LoRA): no dw/db work
    wf, bf = w.detach(), b.detach()
    for name in ("inductor", "fxopt", "fxopt_compiled") + (("liger",) if "liger" in impls else ()):
        rows.append(row(name, fwd_bwd(impls[name], (x, wf, bf), gy, leaves=[x], accumulate=False), False, False,
                        fwd_bwd_gpu_ms(impls[name], (x, wf, bf), gy, [x])))
    return rows, check


def sweep(widths=(2048, 4096), elems=T * D):
    """Launch-config sweep of the fxopt kernels alone (no autograd): forward (rows per program, warps) and backward
    (rows per program, warps, programs per SM; a few with 2-3 pipelined stages) separately, at [elems / H, H] bf16,
    weight and bias trainable.
    Returns rows sorted by H then ms; the default config of fxopt/kernels/layer_norm.py is marked."""
    import itertools

    import fxopt.kernels.layer_norm as K
    from benchmarks.kernel_bench.common import do_bench
    orig = K._config
    rows = []
    try:
        for h in widths:
            K._config = orig
            x = torch.randn(elems // h, h, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(h, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(h, device="cuda", dtype=torch.bfloat16)
            dy = torch.randn_like(x)
            nbytes = x.numel() * 2
            _, mean, rstd = K._fwd_triton(x, w, b, EPS, None, x.dtype)
            default = dict(fwd=orig(h, x.device, False), bwd=orig(h, x.device, True))
            for kind, space in (("fwd", itertools.product((1, 2, 4, 8), (4, 8, 16), (1,))),
                                ("bwd", itertools.product((1, 2, 4, 8), (4, 8, 16), (1, 2, 4, 8))),
                                ("bwd", [(bm, w, ps, st) for bm, w, ps in ((4, 16, 1), (2, 4, 2), (2, 4, 8), (2, 8, 2))
                                         for st in (2, 3)])):
                for cfg in space:
                    K._config = lambda n, dev, backward, cfg=cfg: cfg
                    if kind == "fwd":   # reads x, writes y
                        ms, moved = do_bench(lambda: K._fwd_triton(x, w, b, EPS, None, x.dtype)), 2 * nbytes
                    else:               # reads x, dy, writes dx (+ partial sums)
                        ms = do_bench(lambda: K._bwd_triton(dy, x, w, mean, rstd, None, True, torch.bfloat16))
                        moved = 3 * nbytes
                    rows.append(dict(h=h, kind=kind, block_m=cfg[0], warps=cfg[1], progs_per_sm=cfg[2],
                                     stages=cfg[3] if len(cfg) > 3 else 1,
                                     ms=round(ms, 4), tbps=round(moved / ms / 1e9, 3),
                                     default=tuple(default[kind]) == cfg))
    finally:
        K._config = orig
    rows.sort(key=lambda r: (r["h"], r["kind"], r["ms"]))
    return rows
