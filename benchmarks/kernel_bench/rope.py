"""RoPE on q [8, 32, 2048, 128] and k [8, 8, 2048, 128] bf16, fwd+bwd: eager, Inductor, Liger, fxopt.

Layouts: "bhsd" = contiguous leaf q/k with cos/sin [1, 1, S, D] (the anchor's setup); "hf" = leaves [B, S, H*D] (the
projection outputs) viewed and transposed to [B, H, S, D] inside the timed function, as HF does, with per-batch
cos/sin [B, 1, S, D]. (Passing the transposed views themselves into a compiled function makes AOT copy their grads,
0.47 ms, for Inductor and fxopt alike: a benchmark artifact, not a cost models see.)
Minimal bytes: fwd reads q, k and writes q', k'; bwd reads dq', dk' and writes dq, dk (cos/sin, 1 MB, not counted).
Two times per row: `ms` wall (do_bench median; at this size every impl is partly bound by its CPU launch overhead)
and `gpu_ms`, the GPU kernel time per iteration from the profiler (what a GPU-bound training step pays).
Liger's `liger_rotary_pos_emb(q, k, cos, sin)` wants q/k [B, H, S, D] and cos/sin [1 or B, S, D] (no head dim).

H200 (copy 4.22 TB/s), before the last two kernel changes: gpu_ms bhsd / hf: Inductor 0.174 / 0.179, fxopt 0.170 /
0.253 (the hf grads then came out [B, H, S, D] and needed a 0.2 ms copy: now written in q's layout), Liger 0.87 /
0.40; wall ms (CPU-bound, grads not accumulated): Inductor 0.58 / 0.60, fxopt 0.93 / 1.08, Liger 0.87 / 0.41.
Kernel alone after them (eager-exact bf16 rounding by PTX cvt.rn): fwd 0.097 + bwd 0.097 ms = 82% of copy.
"""
import torch

from benchmarks.kernel_bench.common import do_bench, fwd_bwd, rel

B, H, KV, S, D = 8, 32, 8, 2048, 128


def rot(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), -1)


def eager(q, k, cos, sin):
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def fxopt_rope(q, k, cos, sin):
    return torch.ops.fxopt.rope(q, k, cos, sin, False, q.dtype, q.dtype, q.dtype)


def hf_views(f):
    """f on [B, S, H*D] projection outputs, made [B, H, S, D] as HF's attention does."""
    def g(ql, kl, cos, sin):
        return f(ql.view(B, S, H, D).transpose(1, 2), kl.view(B, S, KV, D).transpose(1, 2), cos, sin)
    return g


def inputs(layout, dt=torch.bfloat16):
    if layout == "bhsd":
        q = torch.randn(B, H, S, D, device="cuda", dtype=dt, requires_grad=True)
        k = torch.randn(B, KV, S, D, device="cuda", dtype=dt, requires_grad=True)
    else:
        q = torch.randn(B, S, H * D, device="cuda", dtype=dt, requires_grad=True)
        k = torch.randn(B, S, KV * D, device="cuda", dtype=dt, requires_grad=True)
    nb = B if layout == "hf" else 1
    pos = torch.arange(S, device="cuda").expand(nb, S) + torch.arange(nb, device="cuda")[:, None] * 7
    inv = 1.0 / (500000 ** (torch.arange(0, D, 2, device="cuda").float() / D))
    fr = pos[..., None].float() * inv
    emb = torch.cat((fr, fr), -1)
    return q, k, emb.cos().to(dt)[:, None], emb.sin().to(dt)[:, None]


def check(f_ref, f, q, k, cos, sin):
    gq, gk = [torch.randn(o.shape, device="cuda").to(o.dtype) for o in f_ref(q, k, cos, sin)]
    ref, out = f_ref(q, k, cos, sin), f(q, k, cos, sin)
    g_ref = torch.autograd.grad(ref, (q, k), (gq, gk))
    g = torch.autograd.grad(out, (q, k), (gq, gk))
    return dict(q=rel(out[0], ref[0]), k=rel(out[1], ref[1]), q_bitexact=bool(torch.equal(out[0], ref[0])),
                k_bitexact=bool(torch.equal(out[1], ref[1])), dq=rel(g[0], g_ref[0]), dk=rel(g[1], g_ref[1]),
                dq_bitexact=bool(torch.equal(g[0], g_ref[0])), out_dtype=str(out[0].dtype))


def gpu_ms(fn, iters=10):
    """GPU kernel time per call of fn (profiler, CUDA activity only)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    cuda = torch.autograd.DeviceType.CUDA
    return sum(e.time_range.elapsed_us() for e in p.events() if e.device_type == cuda) / iters / 1e3


def run(ceiling_tbps):
    import fxopt
    nbytes = 4 * (B * H * S * D + B * KV * S * D) * 2
    tb = lambda ms: dict(ms=round(ms, 4), tbps=round(nbytes / ms / 1e9, 3),
                         frac_of_copy=round(nbytes / ms / 1e9 / ceiling_tbps, 3))
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
        liger = lambda q, k, c, s: liger_rotary_pos_emb(q, k, c[:, 0], s[:, 0])
    except Exception as e:  # noqa: BLE001
        print("liger unavailable:", repr(e)[:120])
        liger = None
    rows, correctness = [], {}
    for layout in ("bhsd", "hf"):
        wrap = (lambda f: f) if layout == "bhsd" else hf_views
        # "fxopt": the eager function compiled by the fxopt backend (rope pattern + Inductor), as models use it;
        # "fxopt_op": the op called directly under eager autograd (pays torch's custom-op autograd CPU overhead).
        impls = {"eager": wrap(eager), "inductor": torch.compile(wrap(eager)),
                 "fxopt": torch.compile(wrap(eager), backend=fxopt.backend), "fxopt_op": wrap(fxopt_rope)}
        if liger is not None:
            impls["liger"] = wrap(liger)
        q, k, cos, sin = inputs(layout)
        correctness[layout] = check(impls["eager"], impls["fxopt_op"], q, k, cos, sin)
        correctness[layout]["compiled"] = check(impls["eager"], impls["fxopt"], q, k, cos, sin)
        correctness[layout]["compiled"]["rope_matches"] = fxopt.last_report().matched["rope"]
        gq, gk = [torch.randn(o.shape, device="cuda").to(o.dtype) for o in impls["eager"](q, k, cos, sin)]
        for name, f in impls.items():
            def step():
                q.grad = k.grad = None
                torch.autograd.backward(f(q, k, cos, sin), (gq, gk))
            try:
                wall = {acc: fwd_bwd(f, (q, k, cos, sin), (gq, gk), leaves=[q, k], accumulate=acc)
                        for acc in (True, False)}
                gpu = gpu_ms(step)
            except Exception as e:  # noqa: BLE001
                print("rope", name, layout, "failed:", repr(e)[:200])
                continue
            for acc, ms in wall.items():
                rows.append(dict(op="rope", impl=name, layout=layout, shape=[[B, H, S, D], [B, KV, S, D]],
                                 dtype="bf16", leaf_grad_accumulation=acc, **tb(ms)))
            rows.append(dict(op="rope", impl=name, layout=layout, timing="gpu_kernels", leaf_grad_accumulation=False,
                             **tb(gpu)))
        with torch.no_grad():   # forward alone (half the minimal bytes)
            for name in ("inductor", "fxopt", "fxopt_op"):
                ms = do_bench(lambda: impls[name](q, k, cos, sin))
                rows.append(dict(op="rope_fwd", impl=name, layout=layout, ms=round(ms, 4),
                                 tbps=round(nbytes / 2 / ms / 1e9, 3),
                                 frac_of_copy=round(nbytes / 2 / ms / 1e9 / ceiling_tbps, 3)))
        # the forward kernel alone: one rounding (default) vs eager's roundings (FXOPT_ROPE_EXACT=1)
        from fxopt.kernels import rope as R
        qd, kd = q.detach(), k.detach()
        if layout == "hf":
            qd, kd = qd.view(B, S, H, D).transpose(1, 2), kd.view(B, S, KV, D).transpose(1, 2)
        yq, yk = torch.empty_like(qd), torch.empty_like(kd)
        for mode, rnd in (("round_once", torch.float32), ("eager_exact", qd.dtype)):
            ms = do_bench(lambda: R._launch(qd, kd, cos, sin, yq, yk, False, rnd, False))
            rows.append(dict(op="rope_fwd_kernel", impl=mode, layout=layout, ms=round(ms, 4),
                             tbps=round(nbytes / 2 / ms / 1e9, 3),
                             frac_of_copy=round(nbytes / 2 / ms / 1e9 / ceiling_tbps, 3)))
    from fxopt.report import RUNTIME_FALLBACKS
    correctness["runtime_fallbacks"] = [f"{f.what}: {f.error}" for f in RUNTIME_FALLBACKS]
    return rows, correctness


def sweep(configs=tuple((t, h, w) for t in (1, 2, 4, 8) for h in (1, 2, 4, 8, 16) for w in (4, 8)
                         if 64 * t * h <= 4096)):
    """Forward kernel time per (BLOCK_T, BLOCK_H, num_warps) on both layouts (for choosing fxopt's defaults), and
    the default's; Inductor's forward on the same inputs."""
    import fxopt  # noqa: F401
    from fxopt.kernels import rope as R
    out = []
    for layout in ("bhsd", "hf"):
        q, k, cos, sin = inputs(layout)
        q, k = q.detach(), k.detach()
        if layout == "hf":
            q, k = q.view(B, S, H, D).transpose(1, 2), k.view(B, S, KV, D).transpose(1, 2)
        yq, yk = torch.empty_like(q), torch.empty_like(k)
        default = R._blocks(S, H, D // 2, q.device)
        for cfg in (None,) + tuple(configs):
            ms = do_bench(lambda: R._launch(q, k, cos, sin, yq, yk, False, q.dtype, False, blocks=cfg))
            out.append(dict(layout=layout, blocks=cfg or default, default=cfg is None, ms=round(ms, 4)))
        fwd = torch.compile(eager)
        out.append(dict(layout=layout, impl="inductor", ms=round(do_bench(lambda: fwd(q, k, cos, sin)), 4)))
    return out


if __name__ == "__main__":
    import json
    import sys
    from benchmarks.kernel_bench.common import copy_ceiling_tbps
    if "--sweep" in sys.argv:
        for r in sweep():
            print("SWEEP " + json.dumps(r))
    c = copy_ceiling_tbps()
    rows, corr = run(c)
    print("ceiling", round(c, 3))
    for r in rows:
        print("ROW " + json.dumps(r))
    print("correctness", corr)
