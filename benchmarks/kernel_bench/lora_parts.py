"""Where the time of fxopt's LoRA layer goes, part by part, next to what peft eager and cuBLAS do with the same inputs.

H200, 8B shapes, 4096 tokens, r=16, dense bf16 base, fp32 adapters: fxopt::lora fwd+bwd 2.19 ms vs peft eager 1.30
and Inductor 1.36 at 4096->4096 (2.12-2.26 vs ~1.97 at 4096<->14336; benchmarks/results/kernels_lora_h200.json),
with the base GEMM already on cuBLAS. Per shape (K, N), M tokens, adapters fp32 (peft's default) and bf16:
  skinny  the four rank-r products with the operands, views and strides fxopt.kernels.lora passes to `_mm`:
          x A^T (x [M,K], A^T a [K,r] view), dy B (dy [M,N], B [N,r]), dy^T xa (dy^T an [N,M] view, strides (1,N)),
          x^T dxa (x^T a [K,M] view). fp32: skinny_mm (split-K partials, then .sum(0)) vs peft's torch form (the fp32
          cast of the big operand is timed; peft makes it once per layer and shares it) vs bf16 cuBLAS (small
          rounded to bf16, fp32 by .float(); by torch.mm(out_dtype=fp32) where torch has it) vs a hi/lo split
          bf16 cuBLAS product (small = hi + lo, 2r columns, fp32 accumulate: fp32-level accuracy). bf16: `_mm`.
  base    the big GEMM: lora._cublas (cuBLAS + the rank-r addmm_ epilogue), the same without the rank-r term,
          nf4.fused_matmul on the dense weight, plain x @ W^T (fwd) and dy @ W (dx).
  op      fxopt::lora forward (autograd on, no_grad, and the raw _forward without custom-op dispatch), backward
          (the fxopt::lora_backward op, raw _backward, autograd.grad with retain_graph), fwd+bwd (leaf grads reset
          each run); peft's math in eager torch for the same.
  nf4     bitsandbytes NF4 base (double quant, bf16 compute): fused_matmul, nf4_chunked.chunked_matmul (when fxopt
          has it), bnb dequantize_4bit + torch.mm, the dequantizations alone; fxopt::lora_nf4 and peft + bnb.
Row: ms = triton do_bench median (warmup 10, rep 30); gpu_ms = GPU kernel + memcpy/memset time per call under
torch.profiler (5 calls) and kernels = the top kernels in us per call; cpu_ms = host time to enqueue one call (5
calls, no sync). ms well above gpu_ms: the GPU waits on the host (dispatch). rel_err: vs fp64 on the same inputs.
Env: FXOPT_LORA_PARTS=skinny,base,op,nf4  FXOPT_LORA_PARTS_ADAPTERS=fp32,bf16  FXOPT_LORA_PARTS_SHAPES=4096x4096,..
FXOPT_LORA_PARTS_NF4_ADAPTERS=fp32 (NF4 rows; add bf16 for the second variant, ~+30 s)
FXOPT_LORA_PARTS_TUNE=1 (let fused_matmul tune instead of the pinned H200 configs)  FXOPT_LORA_PARTS_PROFILE=0.
CPU smoke (tiny shapes, Triton interpreter): python -m benchmarks.kernel_bench.lora_parts --cpu-smoke
"""
import json
import os
import time

import torch

from benchmarks.kernel_bench.common import do_bench, rel

M, R, SCALE = 4096, 16, 2.0                                # tokens, rank, lora_alpha / r = 32 / 16
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]      # (in_features K, out_features N)
BF = torch.bfloat16
# fused_matmul configs tuned on the H200 (kernels_lora_h200.json): pinned so the run compiles ~1 config per kernel
# variant instead of 8 (set_config pins both fwd/bwd for dense and NF4: the op's dense cuBLAS-vs-fused check uses them)
DENSE_CFG = (128, 256, 64, 8, 8, 3, 0)
NF4_CFG = {"fwd": (256, 128, 64, 8, 8, 3, 1), "bwd": (128, 128, 64, 8, 8, 3, 1)}


def kernel_table(events, device_type, iters, top=8):
    """(ms per call summed over events of device_type, {name[:80]: us per call} of the top ones, events per call)."""
    per = {}
    count = 0
    for e in events:
        if e.device_type == device_type:
            per[e.name[:80]] = per.get(e.name[:80], 0.0) + e.time_range.elapsed_us()
            count += 1
    best = sorted(per.items(), key=lambda kv: -kv[1])[:top]
    return (round(sum(per.values()) / iters / 1e3, 4), {k: round(v / iters, 1) for k, v in best},
            round(count / iters, 1))


class Clock:
    """do_bench on CUDA (a single timed call on CPU), host enqueue time, profiler GPU time."""

    def __init__(self, device, profile=True, iters=5):
        self.cuda = device.type == "cuda"
        self.profile = profile and self.cuda
        self.iters = iters if self.cuda else 1
        self.profile_error = None

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def bench(self, fn):
        if self.cuda:
            return do_bench(fn, warmup=10, rep=30)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    def host(self, fn):
        self.sync()
        t = time.perf_counter()
        for _ in range(self.iters):
            fn()
        ms = (time.perf_counter() - t) * 1e3 / self.iters
        self.sync()
        return ms

    def gpu(self, fn):
        if not self.profile:
            return None, None, None
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile
        try:
            self.sync()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(self.iters):
                    fn()
                self.sync()
            return kernel_table(prof.events(), DeviceType.CUDA, self.iters)
        except Exception as e:  # noqa: BLE001 - no profiler (CUPTI) here: keep timing without it
            self.profile, self.profile_error = False, f"{type(e).__name__}: {e}"[:300]
            return None, None, None


def _rel(got, ref):
    assert tuple(got.shape) == tuple(ref.shape), f"shape {tuple(got.shape)} vs reference {tuple(ref.shape)}"
    return float(f"{rel(got, ref):.3g}")


def measure(clock, rows, fields, fn, ref=None, pick=None, flops=None, nbytes=None):
    """Run fn once (its error vs ref), then time it; one row, printed at once (partial results survive a timeout)."""
    row = dict(op="lora_parts", **fields)
    try:
        out = fn()
        if ref is not None:
            got = pick(out) if pick is not None else out
            if isinstance(ref, dict):
                row["rel_errs"] = {name: _rel(got[name], r) for name, r in ref.items()}
                row["rel_err"] = max(row["rel_errs"].values())
            else:
                row["rel_err"] = _rel(got, ref)
        del out
        ms = clock.bench(fn)
        row["ms"] = round(ms, 4)
        row["cpu_ms"] = round(clock.host(fn), 4)
        row["gpu_ms"], row["kernels"], row["n_kernels"] = clock.gpu(fn)
        if flops:
            row["tflops"] = round(flops / ms / 1e9, 1)
        if nbytes:
            row["tbps"] = round(nbytes / ms / 1e9, 3)
    except Exception as e:  # noqa: BLE001 - one failing path must not lose the others
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    rows.append(row)
    print("ROW " + json.dumps(row), flush=True)
    return row


def nograd(fn):
    def run():
        with torch.no_grad():
            return fn()
    return run


def refs(x2, w, a, b, dy2, s):
    """fp64 forward and gradients of y = x W^T + s (x A^T) B^T (xa, dxa: the exact rank-r intermediates)."""
    xd, wd, ad, bd, dyd = (t.detach().double() for t in (x2, w, a, b, dy2))
    xa = xd @ ad.t()
    dxa = s * (dyd @ bd)
    y_base, dx_base = xd @ wd.t(), dyd @ wd
    return dict(xa=xa, dxa=dxa, y_base=y_base, dx_base=dx_base, y=y_base + s * (xa @ bd.t()),
                dx=dx_base + dxa @ ad, dA=dxa.t() @ xd, dB=s * (dyd.t() @ xa))


def mm_out_dtype_ok(device):
    """torch.mm(bf16, bf16, out_dtype=fp32) (cuBLAS with fp32 output; CUDA only, recent torch)."""
    try:
        a = torch.ones(4, 8, device=device, dtype=BF)
        return torch.mm(a, a.t(), out_dtype=torch.float32).dtype == torch.float32
    except Exception:  # noqa: BLE001
        return False


def hilo_mm(big, small):
    """fp32-accurate big @ small for fp32 small from bf16 cuBLAS: small = hi + lo (both bf16), one [Q, 2r] GEMM."""
    hi = small.to(BF)
    lo = (small - hi.float()).to(BF)
    out = torch.mm(big, torch.cat([hi, lo], 1), out_dtype=torch.float32)
    r = small.shape[1]
    return out[:, :r] + out[:, r:]


def part_skinny(clock, rows, tag, x2, dy2, a, b, xa, dxa):
    from fxopt.kernels.lora import _mm, skinny_mm
    fp32 = a.dtype == torch.float32
    # (product, big, small, peft's fp32 form): operands as fxopt.kernels.lora._forward / _backward pass them to _mm
    prods = [("x@A^T", x2, a.t(), lambda: x2.float() @ a.t()),
             ("dy@B", dy2, b, lambda: dy2.float() @ b),
             ("dy^T@xa", dy2.t(), xa.to(b.dtype), lambda: dy2.float().t() @ xa),
             ("x^T@dxa", x2.t(), dxa, lambda: (dxa.t() @ x2.float()).t())]
    f32out = fp32 and mm_out_dtype_ok(x2.device)
    for name, big, small, peft in prods:
        ref = big.double() @ small.double()
        p, q = big.shape
        fields = dict(tag, part="skinny", product=name, shape=[p, q, small.shape[1]],
                      big_strides=list(big.stride()), small_strides=list(small.stride()))
        nbytes = big.numel() * big.element_size() + small.numel() * small.element_size() + p * small.shape[1] * 4
        impls = {"skinny_mm": lambda: skinny_mm(big, small), "peft_fp32": peft,
                 "cublas_bf16": lambda: (big @ small.to(BF)).float()} if fp32 else \
            {"fxopt_mm": lambda: _mm(big, small, True, x2.shape[0])}
        if f32out:
            impls["cublas_bf16_f32out"] = lambda: torch.mm(big, small.to(BF), out_dtype=torch.float32)
            impls["cublas_hilo"] = lambda: hilo_mm(big, small)
        for impl, fn in impls.items():
            measure(clock, rows, dict(fields, impl=impl), fn, ref=ref, flops=2 * p * q * small.shape[1],
                    nbytes=nbytes)
        del ref
    if fp32:   # the backward's two products of dy: one pass over dy (lora_dy.dy_pass) vs two skinny_mm calls
        from fxopt.kernels.lora_dy import dy_pass
        m, n = dy2.shape
        ref = dict(dxa=SCALE * (dy2.double() @ b.double()), dB=SCALE * (dy2.double().t() @ xa.double()))
        fields = dict(tag, part="skinny", product="dy@B + dy^T@xa", shape=[m, n, b.shape[1]])
        nbytes = dy2.numel() * dy2.element_size()   # dy once: the bytes both forms must read at least
        impls = {"dy_pass": lambda: dy_pass(dy2, b, xa, SCALE, low=BF),
                 "two_skinny": lambda: (skinny_mm(dy2, b, scale=SCALE, low=BF), None,
                                        skinny_mm(dy2.t(), xa, scale=SCALE))}
        for impl, fn in impls.items():
            measure(clock, rows, dict(fields, impl=impl), fn, ref=ref,
                    pick=lambda o: dict(dxa=o[0][0] if isinstance(o[0], tuple) else o[0], dB=o[2]),
                    flops=4 * m * n * b.shape[1], nbytes=nbytes)
        del ref


def base_cases(x2, dy2, w, a, b, xa, dxa, rf):
    """(direction, input, trans, left, right, scale, fp64 ref with the rank-r term, fp64 ref without): the big GEMM
    as lora._forward (left xa, right B^T) and lora._backward (dx: left dxa, right A, scale 1) call it."""
    fwd_full = rf["y_base"] + SCALE * (xa.double() @ b.t().double())
    dx_full = rf["dx_base"] + dxa.double() @ a.double()
    return [("fwd", x2, True, xa, b.t(), SCALE, fwd_full, rf["y_base"]),
            ("dx", dy2, False, dxa, a, 1.0, dx_full, rf["dx_base"])]


def part_base(clock, rows, tag, x2, dy2, w, a, b, xa, dxa, rf, cfg):
    from fxopt.kernels.lora import _cublas
    from fxopt.kernels.nf4 import fused_matmul
    flops = 2 * x2.shape[0] * w.shape[0] * w.shape[1]
    for direction, inp, trans, left, right, sc, ref, ref_base in base_cases(x2, dy2, w, a, b, xa, dxa, rf):
        fields = dict(tag, part="base", base="bf16", direction=direction)
        wt = w.t() if trans else w
        for impl, fn, r in [
                ("cublas", lambda: _cublas(inp, w, trans, left, right, sc, None, BF, BF), ref),
                ("cublas_nolora", lambda: _cublas(inp, w, trans, None, None, 1.0, None, BF, BF), ref_base),
                ("fused", lambda: fused_matmul(inp, w, trans, left, right, sc, None, BF, BF, config=cfg), ref),
                ("torch_mm", lambda: inp @ wt, ref_base)]:
            measure(clock, rows, dict(fields, impl=impl), fn, ref=r, flops=flops)
        del ref


def grad_step(f, leaves, dy2):
    """fwd+bwd with the leaves' .grad reset each run; returns the gradients."""
    def step():
        for t in leaves:
            t.grad = None
        f()[0].backward(dy2)
        return [t.grad for t in leaves]
    return step


def peft_forward(base, a, b):
    """peft LoRA Linear: result = base(x); result + lora_B(lora_A(x.to(A.dtype))) * scaling, back to result's dtype."""
    def fwd(x):
        res = base(x)
        return (res + torch.nn.functional.linear(torch.nn.functional.linear(x.to(a.dtype), a), b) * SCALE).to(res.dtype)
    return fwd


def part_op(clock, rows, fields, rf, dy2, leaves, op_fwd, op_bwd, raw_fwd, raw_bwd, peft):
    """Forward alone, backward alone, fwd+bwd of the fxopt op and of peft's math; leaves = (x, A, B)."""
    g3 = lambda o: dict(dx=o[0], dA=o[1], dB=o[2])   # noqa: E731
    gref = dict(dx=rf["dx"], dA=rf["dA"], dB=rf["dB"])
    k, n = leaves[0].shape[1], leaves[2].shape[0]
    m, r = leaves[0].shape[0], leaves[1].shape[0]
    f_fwd = 2 * m * n * k + 2 * m * r * (n + k)
    f_bwd = 2 * m * n * k + 4 * m * r * (n + k)
    y0 = lambda o: o[0]   # noqa: E731
    measure(clock, rows, dict(fields, direction="fwd", impl="fxopt_op"), op_fwd, rf["y"], y0, f_fwd)
    measure(clock, rows, dict(fields, direction="fwd", impl="fxopt_op_nograd"), nograd(op_fwd), rf["y"], y0, f_fwd)
    measure(clock, rows, dict(fields, direction="fwd", impl="fxopt_raw"), nograd(raw_fwd), rf["y"], y0, f_fwd)
    y, xa = op_fwd()
    measure(clock, rows, dict(fields, direction="bwd", impl="fxopt_op"), lambda: op_bwd(xa.detach()), gref, g3, f_bwd)
    measure(clock, rows, dict(fields, direction="bwd", impl="fxopt_raw"), nograd(lambda: raw_bwd(xa.detach())), gref,
            g3, f_bwd)
    measure(clock, rows, dict(fields, direction="bwd", impl="fxopt_autograd"),
            lambda: torch.autograd.grad(y, leaves, dy2, retain_graph=True), gref, g3, f_bwd)
    del y, xa
    measure(clock, rows, dict(fields, direction="fwd_bwd", impl="fxopt_op"), grad_step(op_fwd, leaves, dy2), gref, g3,
            f_fwd + f_bwd)
    x = leaves[0]
    measure(clock, rows, dict(fields, direction="fwd", impl="peft"), lambda: peft(x), rf["y"], None, f_fwd)
    yp = peft(x)
    measure(clock, rows, dict(fields, direction="bwd", impl="peft"),
            lambda: torch.autograd.grad(yp, leaves, dy2, retain_graph=True), gref, g3, f_bwd)
    del yp
    measure(clock, rows, dict(fields, direction="fwd_bwd", impl="peft"), grad_step(lambda: (peft(x),), leaves, dy2),
            gref, g3, f_fwd + f_bwd)


def dense_op(clock, rows, tag, x2, dy2, w, a, b, rf):
    from fxopt.kernels.lora import _backward, _forward
    leaves = tuple(t.detach().clone().requires_grad_() for t in (x2, a, b))
    xl, al, bl = leaves
    part_op(clock, rows, dict(tag, part="op", base="bf16"), rf, dy2, leaves,
            op_fwd=lambda: torch.ops.fxopt.lora(xl, w, None, al, bl, SCALE, BF),
            op_bwd=lambda xa: torch.ops.fxopt.lora_backward(dy2, xl.detach(), w, al.detach(), bl.detach(), xa, SCALE,
                                                            True, True, True, False, False),
            raw_fwd=lambda: _forward(xl, w, None, al, bl, SCALE, w.dtype, BF, True),
            raw_bwd=lambda xa: _backward(dy2, xl, w, al, bl, xa, SCALE, w.dtype, True, True, True, False, False,
                                         True),
            peft=peft_forward(lambda x: torch.nn.functional.linear(x, w), al, bl))


def chunked_fn():
    from fxopt.kernels import nf4
    if hasattr(nf4, "chunked_matmul"):
        return nf4.chunked_matmul
    try:
        from fxopt.kernels import nf4_chunked
    except ImportError:
        return None
    return getattr(nf4_chunked, "chunked_matmul", None)


def nf4_layer(w):
    """bitsandbytes Linear4bit holding w (NF4, double quant, bf16 compute), its NF4Weight and the op's arguments."""
    import bitsandbytes as bnb

    from fxopt.kernels.nf4 import NF4Weight
    n, k = w.shape
    q = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=BF, compress_statistics=True, quant_type="nf4",
                          quant_storage=torch.uint8)
    q.weight = bnb.nn.Params4bit(w.detach().cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True,
                                 blocksize=64)
    q = q.to(w.device)
    st = q.weight.quant_state
    packed = q.weight.data
    bs2 = getattr(st.state2, "blocksize", 256) if st.nested else 256
    nested = (st.state2.absmax, st.state2.code, st.offset) if st.nested else (None, None, None)
    w4 = NF4Weight(packed, st.absmax, *nested, st.blocksize, bs2, n, k)
    return q, w4, (packed, st.absmax, *nested), (st.blocksize, bs2, n, k)


def part_nf4(clock, rows, tag, x2, dy2, a, b, xa, dxa, q, w4, qargs, state, w_deq, rf, parts, cfg, dequant_rows):
    import bitsandbytes as bnb

    from fxopt.kernels.nf4 import fused_matmul
    chunked = chunked_fn()
    st = q.weight.quant_state
    deq = lambda: bnb.functional.dequantize_4bit(q.weight, st)   # noqa: E731
    m, (n, k) = x2.shape[0], w_deq.shape
    if "base" in parts and dequant_rows:
        nk = n * k
        measure(clock, rows, dict(tag, part="nf4_dequant", base="nf4", impl="bnb_dequantize_4bit"), deq, w_deq,
                nbytes=nk // 2 + nk * 2)
        if chunked is not None:
            from fxopt.kernels.nf4_chunked import dequantize_chunk
            measure(clock, rows, dict(tag, part="nf4_dequant", base="nf4", impl="fxopt_dequantize_chunk"),
                    lambda: dequantize_chunk(w4, 0, n, 0, k, BF), w_deq, nbytes=nk // 2 + nk * 2)
    if "base" in parts:
        for direction, inp, trans, left, right, sc, ref, ref_base in base_cases(x2, dy2, w_deq, a, b, xa, dxa, rf):
            fields = dict(tag, part="base", base="nf4", direction=direction)
            c = cfg["fwd" if trans else "bwd"] if cfg else None
            impls = [("fused", lambda: fused_matmul(inp, w4, trans, left, right, sc, None, BF, BF, config=c), ref),
                     ("fused_nolora", lambda: fused_matmul(inp, w4, trans, config=c, out_dtype=BF, compute_dtype=BF),
                      ref_base),
                     ("bnb_dequant_mm", lambda: inp @ (deq().t() if trans else deq()), ref_base)]
            if chunked is not None:
                impls += [("chunked", lambda: chunked(inp, w4, trans, left, right, sc, None, BF, BF), ref),
                          ("chunked_nolora", lambda: chunked(inp, w4, trans, None, None, 1.0, None, BF, BF), ref_base)]
            for impl, fn, r in impls:
                measure(clock, rows, dict(fields, impl=impl), fn, ref=r, flops=2 * m * n * k)
            del ref
    if "op" in parts:
        leaves = tuple(t.detach().clone().requires_grad_() for t in (x2, a, b))
        xl, al, bl = leaves
        part_op(clock, rows, dict(tag, part="op", base="nf4"), rf, dy2, leaves,
                op_fwd=lambda: torch.ops.fxopt.lora_nf4(xl, *qargs, None, al, bl, SCALE, *state, BF, BF),
                op_bwd=lambda xa_: torch.ops.fxopt.lora_nf4_backward(dy2, xl.detach(), *qargs, al.detach(),
                                                                     bl.detach(), xa_, SCALE, *state, BF, True, True,
                                                                     True, False),
                raw_fwd=lambda: _nf4_raw_fwd(xl, w4, al, bl),
                raw_bwd=lambda xa_: _nf4_raw_bwd(dy2, xl, w4, al, bl, xa_),
                peft=peft_forward(q, al, bl))


def _nf4_raw_fwd(x, w4, a, b):
    from fxopt.kernels.lora import _forward
    return _forward(x, w4, None, a, b, SCALE, BF, BF, True)


def _nf4_raw_bwd(dy, x, w4, a, b, xa):
    from fxopt.kernels.lora import _backward
    return _backward(dy, x, w4, a, b, xa, SCALE, BF, True, True, True, False, False, True)


def _env_list(name, default):
    return [v.strip() for v in os.environ.get(name, default).split(",") if v.strip()]


def run_parts(device, shapes, m, r, parts, adapters, nf4_adapters, pin, profile=True):
    import fxopt  # noqa: F401
    from fxopt.kernels import lora as lora_kernels
    from fxopt.kernels import nf4
    from fxopt.report import RUNTIME_FALLBACKS
    clock = Clock(device, profile)
    rows, check = [], {}
    n_fallbacks = len(RUNTIME_FALLBACKS)
    saved = dict(nf4._CONFIGS)
    have_bnb = True
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # noqa: BLE001
        have_bnb, check["nf4_skipped"] = False, f"bitsandbytes unavailable: {e!r}"[:200]
    try:
        if pin:
            nf4.set_config("fwd", NF4_CFG["fwd"])
            nf4.set_config("bwd", NF4_CFG["bwd"])
        for k, n in shapes:
            x2 = torch.randn(m, k, device=device).to(BF)
            w = (torch.randn(n, k, device=device) / k ** 0.5).to(BF)
            dy2 = torch.randn(m, n, device=device).to(BF)
            a32 = torch.randn(r, k, device=device) / k ** 0.5
            b32 = torch.randn(n, r, device=device) * 0.3
            q = w4 = w_deq = None
            if "nf4" in parts and have_bnb:
                q, w4, qargs, state = nf4_layer(w)
                import bitsandbytes as bnb
                w_deq = bnb.functional.dequantize_4bit(q.weight, q.weight.quant_state)
                check[f"nf4_dequant_bit_exact_{k}x{n}"] = bool(torch.equal(
                    w_deq, nf4.nf4_dequantize_reference(w4, BF)))
            for adt_name in adapters:
                adt = torch.float32 if adt_name == "fp32" else BF
                a, b = a32.to(adt), b32.to(adt)
                tag = dict(k=k, n=n, m=m, r=r, adapters=adt_name)
                rf = refs(x2, w, a, b, dy2, SCALE)
                # rank-r intermediates as fxopt holds them: xa [M, r] and dxa = s dy B [M, r] in the adapter dtype
                xa, dxa = rf["xa"].to(adt), rf["dxa"].to(adt)
                if "skinny" in parts:
                    part_skinny(clock, rows, tag, x2, dy2, a, b, xa, dxa)
                if "base" in parts:
                    part_base(clock, rows, tag, x2, dy2, w, a, b, xa, dxa, rf, DENSE_CFG if pin else None)
                if "op" in parts:
                    dense_op(clock, rows, tag, x2, dy2, w, a, b, rf)
                del rf
                if w4 is not None and adt_name in nf4_adapters:
                    rf4 = refs(x2, w_deq, a, b, dy2, SCALE)
                    part_nf4(clock, rows, tag, x2, dy2, a, b, xa, dxa, q, w4, qargs, state, w_deq, rf4, parts,
                             NF4_CFG if pin else None, dequant_rows=adt_name == nf4_adapters[0])
                    del rf4
            del x2, w, dy2, q, w4, w_deq
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        check["fused_configs"] = {str(kk): v for kk, v in nf4._TUNED.items()}
        check["pinned_configs"] = dict(dense=DENSE_CFG, **NF4_CFG) if pin else None
        for kind, cfg in saved.items():
            nf4.set_config(kind, cfg)
    check["dense_gemm_choice"] = {str(kk): v for kk, v in lora_kernels._DENSE_CHOICE.items()}
    check["chunked_matmul"] = chunked_fn() is not None
    check["mm_out_dtype"] = mm_out_dtype_ok(device)
    check["profiler_error"] = clock.profile_error
    check["errors"] = sum("error" in row for row in rows)
    check["runtime_fallbacks"] = [str(f) for f in RUNTIME_FALLBACKS[n_fallbacks:]]   # must be empty
    return rows, check


def run(ceiling_tbps):
    shapes = [tuple(int(v) for v in s.split("x")) for s in _env_list("FXOPT_LORA_PARTS_SHAPES", "")] or SHAPES
    return run_parts(torch.device("cuda"), shapes, M, R,
                     parts=set(_env_list("FXOPT_LORA_PARTS", "skinny,base,op,nf4")),
                     adapters=_env_list("FXOPT_LORA_PARTS_ADAPTERS", "fp32,bf16"),
                     nf4_adapters=_env_list("FXOPT_LORA_PARTS_NF4_ADAPTERS", "fp32"),
                     pin=os.environ.get("FXOPT_LORA_PARTS_TUNE") != "1",
                     profile=os.environ.get("FXOPT_LORA_PARTS_PROFILE", "1") != "0")


def cpu_smoke(shapes=((64, 96),), m=40, r=4):
    """Every path at tiny shapes on CPU (Triton interpreter when TRITON_INTERPRET=1 was set before fxopt's import)."""
    return run_parts(torch.device("cpu"), list(shapes), m, r, parts={"skinny", "base", "op", "nf4"},
                     adapters=["fp32", "bf16"], nf4_adapters=["fp32", "bf16"], pin=False, profile=False)


if __name__ == "__main__":
    import sys
    if "--cpu-smoke" in sys.argv:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        torch.set_num_threads(2)
        _, chk = cpu_smoke()
        print(json.dumps(chk, indent=1, default=str))
