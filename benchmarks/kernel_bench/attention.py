"""Attention fwd and fwd+bwd, bf16: fxopt (Triton flash) vs SDPA (flash) vs Inductor on the eager form.

Cases (anchors/RESULTS.md): causal GQA 32/8 heads, d128, seq 2048 x batch 8 and seq 8192 x batch 2 (SDPA anchors
388 and 504 TFLOP/s fwd+bwd); Gemma2-like d256, 8/4 heads, soft-cap 50, sliding window 4096, seq 2048 x batch 4
(SDPA cannot soft-cap: fxopt vs Inductor on the eager form). FLOPs: causal fwd 4*B*H*S*S*D/2, fwd+bwd 3.5x fwd.
Correctness on the same run: fxopt vs SDPA (bf16 both) and vs fp32 math on one batch element.
"""
import os

import torch
import torch.nn.functional as F

from benchmarks.kernel_bench.common import do_bench, fwd_bwd, rel

_IND = os.environ.get("FXOPT_BENCH_INDUCTOR", "")   # "0": no Inductor rows; "all": also at 8192 (slow compile)
CASES = [  # name, B, Hq, Hkv, S, D, window, softcap, Inductor on the eager form? (anchor at 8192: 54.1 ms)
    ("causal_gqa_s2048", 8, 32, 8, 2048, 128, 0, 0.0, _IND != "0"),
    ("causal_gqa_s8192", 2, 32, 8, 8192, 128, 0, 0.0, _IND == "all"),
    ("gemma2_softcap_s2048", 4, 8, 4, 2048, 256, 4096, 50.0, _IND != "0"),
]


def eager_form(q, k, v, window=0, softcap=0.0):
    """HF eager attention: repeat_kv, matmul, scale, [soft-cap], additive causal/window mask, fp32 softmax."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    S = q.shape[2]
    i = torch.arange(S, device=q.device)
    ok = i[None, :] <= i[:, None]
    if window:
        ok = ok & (i[:, None] - i[None, :] < window)
    s = s + torch.where(ok, 0.0, torch.finfo(s.dtype).min)
    return torch.softmax(s, -1, dtype=torch.float32).to(q.dtype) @ vv


def fxopt_attn(q, k, v, window=0, softcap=0.0):
    return torch.ops.fxopt.attention(q, k, v, None, q.shape[-1] ** -0.5, True, window, softcap)[0]


def fxopt_dq(mode):
    """fxopt with the backward's dq computed by `mode` ('atomic' / 'separate', fxopt.kernels.attention_bwd)."""
    def f(q, k, v, window=0, softcap=0.0):
        from fxopt.kernels import attention_bwd
        attention_bwd.DQ_MODE = mode
        return fxopt_attn(q, k, v, window, softcap)
    return f


def sdpa(q, k, v, window=0, softcap=0.0):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _check(name, q, k, v, go, window, softcap):
    """rel errors of fxopt (both dq modes) vs SDPA (bf16) and vs fp32 math on batch element 0."""
    out = {}
    q1, k1, v1 = (t[:1].detach().float().requires_grad_() for t in (q, k, v))
    ref1 = eager_form(q1, k1, v1, window, softcap)
    r1 = torch.autograd.grad(ref1, (q1, k1, v1), go[:1].float())
    if not softcap and not window:
        ref = sdpa(q, k, v)
        rs = torch.autograd.grad(ref, (q, k, v), go)
    for mode in ("separate", "atomic"):
        got = fxopt_dq(mode)(q, k, v, window, softcap)
        g = torch.autograd.grad(got, (q, k, v), go)
        out.update({f"{name}/{mode}/vs_fp32/{t}": round(rel(a[:1], b), 5) for t, a, b in
                    (("out", got, ref1), ("dq", g[0], r1[0]), ("dk", g[1], r1[1]), ("dv", g[2], r1[2]))})
        if not softcap and not window:
            out.update({f"{name}/{mode}/vs_sdpa/{t}": round(rel(a, b), 5) for t, a, b in
                        (("out", got, ref), ("dq", g[0], rs[0]), ("dk", g[1], rs[1]), ("dv", g[2], rs[2]))})
    from fxopt.kernels import attention_bwd
    attention_bwd.DQ_MODE = "separate"
    return out


def run(ceiling_tbps):
    import fxopt  # noqa: F401
    from fxopt.kernels import attention as K
    dt = torch.bfloat16
    rows, check = [], {}
    only = [c for c in os.environ.get("FXOPT_BENCH_CASES", "").split(",") if c]
    for name, B, H, KV, S, D, window, softcap, with_inductor in CASES:
        if only and name not in only:
            continue
        torch.manual_seed(0)
        q = torch.randn(B, H, S, D, device="cuda", dtype=dt, requires_grad=True)
        k = torch.randn(B, KV, S, D, device="cuda", dtype=dt, requires_grad=True)
        v = torch.randn(B, KV, S, D, device="cuda", dtype=dt, requires_grad=True)
        go = torch.randn(B, H, S, D, device="cuda", dtype=dt)
        frac = 0.5 if not window or window >= S else window / S
        fwd_flops = 4 * B * H * S * S * D * frac
        check.update(_check(name, q, k, v, go, window, softcap))
        impls = {"fxopt": fxopt_attn, "fxopt_dq_atomic": fxopt_dq("atomic"), "fxopt_dq_separate": fxopt_dq("separate")}
        if with_inductor:
            impls["inductor_eager"] = torch.compile(eager_form)
        if not softcap:
            impls["sdpa"] = sdpa
        base = {}
        for impl, f in impls.items():
            fn = (lambda q, k, v, f=f: f(q, k, v, window, softcap))
            for mode in ("fwd", "fwd+bwd"):
                try:
                    if mode == "fwd":
                        with torch.no_grad():
                            ms = do_bench(lambda: fn(q, k, v))
                    else:
                        ms = fwd_bwd(fn, (q, k, v), go)
                except Exception as e:  # noqa: BLE001 - e.g. OOM of the eager form at seq 8192
                    print(f"attention {name} {impl} {mode} failed: {type(e).__name__}: {str(e)[:200]}")
                    continue
                flops = fwd_flops * (1 if mode == "fwd" else 3.5)
                row = dict(op="attention", case=name, impl=impl, mode=mode, shape=[B, H, KV, S, D], window=window,
                           softcap=softcap, dtype="bf16", ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1))
                base[(impl, mode)] = ms
                rows.append(row)
        for r in rows:
            if r["case"] == name and r["impl"].startswith("fxopt"):
                for other in ("sdpa", "inductor_eager"):
                    if (other, r["mode"]) in base:
                        r[f"speedup_vs_{other}"] = round(base[(other, r["mode"])] / r["ms"], 3)
        torch.cuda.empty_cache()
    check["tuned_configs"] = {f"{k[0]}:{list(k[1][:3])}": list(v) for k, v in K.TUNED.items()}
    from fxopt.kernels.registry import TUNING_LOG   # every candidate's time per tuned key (bench_ms, ms)
    check["tuning_log"] = [e for e in TUNING_LOG if e[0].startswith("attention")]
    check["kernel_runs"] = dict(K.RUNS)
    return rows, check
