"""RMSNorm fwd+bwd at 16384 x 4096 bf16: eager, Inductor, Liger, fxopt (weight trainable and frozen)."""
import torch

from benchmarks.kernel_bench.common import fwd_bwd, rel

T, D = 16384, 4096


def eager(x, w, eps=1e-6):
    v = x.float().pow(2).mean(-1, keepdim=True)
    return w * (x.float() * torch.rsqrt(v + eps)).to(x.dtype)


def fxopt_rms(x, w, eps=1e-6):
    return torch.ops.fxopt.rms_norm(x, w, eps, 0.0, x.dtype, x.dtype)[0]


def run(ceiling_tbps):
    import fxopt  # noqa: F401
    dt = torch.bfloat16
    x = torch.randn(T, D, device="cuda", dtype=dt, requires_grad=True)
    w = (1 + 0.1 * torch.randn(D, device="cuda", dtype=dt)).requires_grad_()
    gy = torch.randn(T, D, device="cuda", dtype=dt)
    # minimal bytes: fwd reads x writes y; bwd reads dy, x writes dx (w, dw, rstd negligible)
    nbytes = 5 * T * D * 2
    impls = {"eager": eager, "inductor": torch.compile(eager), "fxopt": fxopt_rms}
    try:
        from liger_kernel.transformers.functional import liger_rms_norm
        impls["liger"] = lambda x, w: liger_rms_norm(x, w, 1e-6)
    except Exception as e:  # noqa: BLE001
        print("liger unavailable:", repr(e)[:120])
    # correctness on this run: fxopt vs eager fp32 math
    y_ref = eager(x, w)
    y = fxopt_rms(x, w)
    dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, w), gy)
    dx, dw = torch.autograd.grad(y, (x, w), gy)
    check = dict(y=rel(y, y_ref), dx=rel(dx, dx_ref), dw=rel(dw, dw_ref))
    rows = []
    for name, f in impls.items():
        for acc in (True, False):
            ms = fwd_bwd(f, (x, w), gy, accumulate=acc)
            rows.append(dict(op="rms_norm", impl=name, shape=[T, D], dtype="bf16", weight_grad=True,
                             leaf_grad_accumulation=acc, ms=round(ms, 4), tbps=round(nbytes / ms / 1e9, 3),
                             frac_of_copy=round(nbytes / ms / 1e9 / ceiling_tbps, 3)))
    # frozen weight (LoRA): no dw work
    wf = w.detach()
    for name in ("inductor", "fxopt") + (("liger",) if "liger" in impls else ()):
        ms = fwd_bwd(impls[name], (x, wf), gy, leaves=[x], accumulate=False)
        rows.append(dict(op="rms_norm", impl=name, shape=[T, D], dtype="bf16", weight_grad=False,
                         leaf_grad_accumulation=False, ms=round(ms, 4), tbps=round(nbytes / ms / 1e9, 3),
                         frac_of_copy=round(nbytes / ms / 1e9 / ceiling_tbps, 3)))
    return rows, check
