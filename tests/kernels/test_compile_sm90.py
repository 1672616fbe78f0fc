"""Every kernel fxopt launches, built for the GPU (sm_90, Triton's own compiler down to cubin) on a CPU machine, in
the dtypes and with the constexprs of the CUDA launch paths: the interpreter runs Python, so code the compiler
rejects passes every interpreter test. Found this way after the H200 run: lora's `_lowp` returned fp16 from one
branch and bf16 from another (fp16 training fell back to the reference). A build over sm_90's 227 KiB of shared
memory per block fails too (the launch would raise OutOfResources).

One subprocess per kernel family (without TRITON_INTERPRET: conftest sets it before fxopt is imported, and then
kernels are interpreted functions) builds the family's cases on one forked worker per core and reports each one; a
failure names the kernel, the mode, the dtype and the constexprs. Block sizes and warps come from the launchers'
own CUDA choices where those are functions (attention.fits, gated_mlp._config, layer_norm._config,
rms_norm._block_m, rope._blocks, nf4's candidates and num_stages); the CUDA bf16 rounding code is
rounding._BF16_ROUNDING (rounding_code() gives the interpreter's in this process). Triton caches builds
(~/.triton/cache): a warm run takes ~20 s, a cold one ~95 s on 2 cores; fp32 attention backward is `slow`.
"""
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]

triton = pytest.importorskip("triton")

CUDA = torch.device("cuda")     # the launchers' config helpers only read device.type
DTYPES = ("bf16", "fp16", "fp32")
WORKERS = max(1, min(4, os.cpu_count() or 1))
TORCH_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

SCRIPT = textwrap.dedent('''
    import importlib, json, multiprocessing, sys, time
    import triton
    from triton.backends.compiler import GPUTarget

    def build(case):
        mod, name = case["kernel"].rsplit(".", 1)
        fn = getattr(importlib.import_module("fxopt.kernels." + mod), name)
        sig, consts = case["sig"], case["constexprs"]
        unknown = sorted((set(sig) | set(consts)) - set(fn.arg_names))
        if unknown:
            raise KeyError(f"{case['kernel']} has no parameters {unknown}; its parameters: {fn.arg_names}")
        both = sorted(set(sig) & set(consts))
        if both:
            raise KeyError(f"{both} given both a type and a constexpr value")
        # a parameter not named is an i32 (a new int argument needs no edit here; a new pointer fails to compile)
        full = {n: "constexpr" if n in consts else sig.get(n, "i32") for n in fn.arg_names}
        # pointers 16-byte aligned, as torch allocations are (the launch specializes on it)
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if full[n].startswith("*")}
        src = triton.compiler.ASTSource(fn=fn, signature=full, constexprs=consts, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=case["options"])
        assert "cubin" in k.asm, list(k.asm)
        # the launch raises OutOfResources above the opt-in shared memory per block (H100/H200: 227 KiB)
        if k.metadata.shared > 232448:
            raise RuntimeError(f"shared memory {k.metadata.shared} B > 232448 B, the sm_90 limit per block")
        return k.metadata.shared

    def describe(e):
        """The error (Triton's names the source line) and the root of its cause chain (the compiler's reason)."""
        root = e
        while (root.__cause__ or root.__context__) is not None:
            root = root.__cause__ or root.__context__
        text = f"{type(e).__name__}: {e}"[-1500:]
        return text if root is e else text + f"\\n    caused by {type(root).__name__}: {str(root)[-1000:]}"

    def run(case):
        t0 = time.time()
        try:
            res = dict(label=case["label"], ok=True, shared=build(case))
        except Exception as e:  # noqa: BLE001 - every failure is reported with its case
            res = dict(label=case["label"], ok=False, error=describe(e))
        res["seconds"] = round(time.time() - t0, 2)
        return res

    cases = json.load(sys.stdin)
    for mod in {c["kernel"].rsplit(".", 1)[0] for c in cases}:
        importlib.import_module("fxopt.kernels." + mod)
    # the compiler is single-threaded: one forked worker per core (imports paid once, before the fork)
    with multiprocessing.get_context("fork").Pool(int(sys.argv[1])) as pool:
        for res in pool.imap_unordered(run, cases):
            print("RESULT " + json.dumps(res), flush=True)
''')


def case(kernel, mode, dt, ptrs, constexprs, options, floats=(), i64=(), ones=()):
    """One compile: `ptrs` pointer dtypes by name, `floats` fp32 scalars, `i64` ints the launcher may pass at >= 2^31,
    `ones` ints the common launch passes as 1 (Triton specializes them to constexpr 1); other non-constexpr params
    are i32."""
    sig = {n: "*" + t for n, t in ptrs.items()}
    sig.update({n: "fp32" for n in floats})
    sig.update({n: "i64" for n in i64})
    consts = dict(constexprs)
    consts.update({n: 1 for n in ones})
    return dict(kernel=kernel, label=f"{kernel} [{mode}, {dt}]", dt=dt, sig=sig, constexprs=consts, options=options)


def bf16_code(dt):
    """rounding_code() of the CUDA path (the test process interprets, where bf16 gets the interpreter's code)."""
    from fxopt.kernels import rounding
    return {"bf16": rounding._BF16_ROUNDING, "fp16": 1, "fp32": 0}[dt]


# ---- attention (forward, backward) ----

ATTN_MODES = {   # name: (head dim, CAUSAL, WINDOW, SOFTCAP, MASK_KIND, mask strides i64, GQA), dtypes
    "causal-gqa": ((128, True, False, False, 0, False, True), ("bf16", "fp16", "fp32")),
    "causal-gqa-d64": ((64, True, False, False, 0, False, True), ("bf16",)),
    "bool-mask": ((128, False, False, False, 1, False, False), ("bf16", "fp16")),
    "bool-mask-2^31": ((128, True, False, False, 1, True, True), ("bf16",)),
    "additive-mask": ((128, True, False, False, 2, False, True), ("bf16", "fp16", "fp32")),
    "doc-ids": ((128, True, False, False, 3, False, True), ("bf16", "fp16")),
    "softcap-window-d256": ((256, True, True, True, 0, False, True), ("bf16", "fp16")),
    "d80-window": ((80, True, True, False, 0, False, False), ("bf16",)),
}


def _attn_cfg(kind, d_pad, fp32):
    """The config launch_tuned runs untimed (FXOPT_TUNE=0, a capture, fp32): the first that fits, fp32 the smallest
    in shared memory. Tuning also builds the other fitting configs (one that fails to compile is skipped there)."""
    from fxopt.kernels import attention as A
    fit = A.fitting(kind, d_pad)
    return A.smallest(kind, fit, d_pad) if fp32 else fit[0]


def _attn_modes(dts):
    """(mode, dt, flags, pointer dtypes shared by all three kernels, i64 ints, ones) of each mode in dts."""
    for mode, ((d, causal, window, softcap, kind, big, gqa), mode_dts) in ATTN_MODES.items():
        for dt in (t for t in dts if t in mode_dts):
            d_pad = max(16, 1 << (d - 1).bit_length())
            flags = dict(CAUSAL=causal, WINDOW=window, SOFTCAP=softcap, MASK_KIND=kind, UPCAST=False,
                         IEEE=dt == "fp32", LIBDEVICE=True, EVEN_D=d == d_pad, D_PAD=d_pad)
            # mask: kind 0 q itself, 1 the bool mask viewed as uint8, 2 the additive mask, 3 int64 document ids;
            # DS/DE: int32 document bounds, else lse/delta as placeholders
            ptrs = dict(Q=dt, K=dt, V=dt, LSE="fp32", MASK={0: dt, 1: "u8", 2: dt, 3: "i64"}[kind],
                        DS="i32" if kind == 3 else "fp32", DE="i32" if kind == 3 else "fp32")
            # unit ints the launch specializes: G without GQA, a dense mask's key stride, the ids' position stride
            ones = ("G",) * (not gqa) + {0: (), 1: ("smn",), 2: ("smn",), 3: ("smm",)}[kind]
            yield mode, dt, flags, ptrs, ("smb", "smh") if big else (), ones


def attention_fwd_cases(dts=("bf16", "fp16", "fp32")):
    out = []
    for mode, dt, flags, ptrs, i64, ones in _attn_modes(dts):
        bm, bn, w, s = _attn_cfg("fwd", flags["D_PAD"], dt == "fp32")
        out.append(case("attention._attn_fwd", mode, dt, dict(ptrs, O=dt), dict(flags, BLOCK_M=bm, BLOCK_N=bn),
                        dict(num_warps=w, num_stages=s), ("qk_scale2", "cap_x", "cap2"), i64, ones))
    return out


def attention_bwd_cases(dts=("bf16", "fp16")):
    out = [case("attention_bwd._attn_bwd_delta", f"d{d_pad}", dt, dict(O=dt, DO=dt, DELTA="fp32"),
                dict(D_PAD=d_pad, BLOCK_M=16 if d_pad >= 256 else 64), dict(num_warps=4))
           for dt in dts for d_pad in (64, 128, 256)]
    floats = ("scale", "qk_scale2", "cap_x", "cap2")
    for mode, dt, flags, ptrs, i64, ones in _attn_modes(dts):
        ptrs = dict(ptrs, DO=dt, DELTA="fp32")
        fp32 = dt == "fp32"
        # DQ_ATOMIC (FXOPT_ATTN_DQ=atomic): dq into an fp32 buffer; else DQ is delta, a placeholder
        for atomic in (False, True) if mode == "causal-gqa" and dt == "bf16" else (False,):
            bm, bn, w, s = _attn_cfg("dkdv", flags["D_PAD"], fp32)
            out.append(case("attention_bwd._attn_bwd_dkdv", mode + " atomic-dq" * atomic, dt,
                            dict(ptrs, DK=dt, DV=dt, DQ="fp32"), dict(flags, DQ_ATOMIC=atomic, BLOCK_M=bm, BLOCK_N=bn),
                            dict(num_warps=w, num_stages=s), floats, i64, ones))
        bm, bn, w, s = _attn_cfg("dq", flags["D_PAD"], fp32)
        out.append(case("attention_bwd._attn_bwd_dq", mode, dt, dict(ptrs, DQ=dt), dict(flags, BLOCK_M=bm, BLOCK_N=bn),
                        dict(num_warps=w, num_stages=s), floats, i64, ones))
    return out


# ---- elementwise / row kernels ----

def gated_mlp_cases(dts=DTYPES):
    from fxopt.kernels import gated_mlp as G
    out = []
    for dt in dts:
        # (rows, intermediate, I64, out dtype): 14336 = 14 tiles of 1024 (EVEN), 11008 is not
        shapes = [(8192, 14336, False, dt), (8192, 11008, True, dt)] + [(8192, 14336, False, "fp32")] * (dt != "fp32")
        for act, code in G.ACTS.items():
            for rows, cols, i64, odt in shapes if act == "silu" else shapes[:1]:
                br, bc, w = G._config(rows, cols, CUDA)
                cx = dict(ACT=code, BLOCK_R=br, BLOCK_C=bc, EVEN=rows % br == 0 and cols % bc == 0, I64=i64)
                mode = f"{act} C={cols} I64={i64} out {odt}"
                out.append(case("gated_mlp._gated_fwd", mode, dt, dict(G=dt, U=dt, Y=odt), cx, dict(num_warps=w)))
                if odt == dt:   # backward grads in the dtypes of gate and up
                    out.append(case("gated_mlp._gated_bwd", mode, dt, dict(DY=dt, G=dt, U=dt, DG=dt, DU=dt), cx,
                                    dict(num_warps=w)))
    return out


def norm_cases(dts=DTYPES, hidden=4096):
    from fxopt.kernels import layer_norm as LN, rms_norm as RN
    out = []
    for dt in dts:
        mid = bf16_code(dt)
        bm, w, _ = LN._config(hidden, CUDA, backward=False)
        for has_w, has_b, m, wdt in ((True, True, 0, dt), (True, True, mid, dt), (False, False, 0, dt),
                                     (True, True, 0, "fp32")):
            # no weight / bias: x is passed in their place; fp32 weights (master weights) give an fp32 output
            odt = "fp32" if wdt == "fp32" else dt
            out.append(case("layer_norm._layer_norm_fwd", f"w={has_w} b={has_b} MID={m} w/out {wdt}", dt,
                            dict(X=dt, W=wdt if has_w else dt, B=wdt if has_b else dt, Y=odt, MEAN="fp32",
                                 RSTD="fp32"),
                            dict(HAS_W=has_w, HAS_B=has_b, MID=m, OUT_RND=0, BLOCK_M=bm, BLOCK_N=hidden),
                            dict(num_warps=w), ("eps",)))
        bm, w, _ = LN._config(hidden, CUDA, backward=True)
        for has_w, m, dw, db in ((True, mid, True, True), (True, 0, False, False), (False, 0, False, True)):
            # dw/db partials fp32 when computed, else dx as a placeholder
            out.append(case("layer_norm._layer_norm_bwd", f"w={has_w} MID={m} dw={dw} db={db}", dt,
                            dict(DY=dt, X=dt, W=dt, MEAN="fp32", RSTD="fp32", DX=dt, DW_PART="fp32" if dw else dt,
                                 DB_PART="fp32" if db else dt),
                            dict(HAS_W=has_w, MID=m, DX_RND=0, COMPUTE_DW=dw, COMPUTE_DB=db, BLOCK_M=bm,
                                 BLOCK_N=hidden, STAGES=1), dict(num_warps=w)))
        # the sweep's pipelined variant (STAGES 2)
        out.append(case("layer_norm._layer_norm_bwd", "STAGES=2", dt,
                        dict(DY=dt, X=dt, W=dt, MEAN="fp32", RSTD="fp32", DX=dt, DW_PART="fp32", DB_PART="fp32"),
                        dict(HAS_W=True, MID=mid, DX_RND=0, COMPUTE_DW=True, COMPUTE_DB=True, BLOCK_M=bm,
                             BLOCK_N=hidden, STAGES=2), dict(num_warps=w)))
        bm = RN._block_m(hidden, CUDA)
        # Llama (round, then w), Gemma (1 + w), none, fp32 weight (x rounded to its dtype, then an fp32 product)
        # ... each also with the residual add fused in (add_rms_norm: b read, s = a + b rounded to x's dtype, stored)
        for has_w, m, wdt in ((True, mid, dt), (True, 0, dt), (False, 0, dt), (True, mid, "fp32")):
            for res in (False, True):
                out.append(case("rms_norm._rms_norm_fwd", f"w={has_w} MID={m} w/out {wdt} res={res}", dt,
                                dict(X=dt, W=wdt, Y=wdt, RSTD="fp32", B=dt, S=dt),
                                dict(HAS_W=has_w, MID=m, HAS_RES=res, RES=mid if res else 0, BLOCK_M=bm,
                                     BLOCK_N=hidden),
                                dict(num_warps=RN._num_warps(bm * hidden)), ("eps", "offset")))
        bm = RN._block_m(hidden, CUDA, target=16384)
        for has_w, m, dw, wdt in ((True, mid, True, dt), (True, 0, False, dt), (False, 0, False, dt),
                                  (True, mid, True, "fp32")):
            for dres in (False, True):   # rms_norm_backward_add: the gradient from s's other readers added to dx
                out.append(case("rms_norm._rms_norm_bwd", f"w={has_w} MID={m} dw={dw} w/dy {wdt} dres={dres}", dt,
                                dict(DY=wdt, X=dt, W=wdt, RSTD="fp32", DX=dt, DW_PART="fp32" if dw else dt, DRES=dt),
                                dict(HAS_W=has_w, MID=m, COMPUTE_DW=dw, HAS_DRES=dres, BLOCK_M=bm, BLOCK_N=hidden),
                                dict(num_warps=RN._num_warps(bm * hidden)), ("offset",)))
    return out


def rope_cases(dts=DTYPES):
    from fxopt.kernels import rope as R
    out = []
    unit = ("sqd", "sod", "skd", "sld", "scd", "ssd")   # last-dim strides of q, q', k, k', cos, sin
    for dt in dts:
        code = bf16_code(dt)
        # (mode, cos/sin dtype, out dtype, BWD, HAS_K, INTERLEAVED, rot of head dim 128, RND, OUT)
        modes = [("default", dt, dt, False, True, False, 128, 0, code),       # fp32 math, rounded at the store
                 ("default bwd", dt, dt, True, True, False, 128, 0, code),
                 ("exact interleaved", dt, dt, False, True, True, 128, code, 0),   # FXOPT_ROPE_EXACT=1
                 ("exact bwd partial", dt, dt, True, True, False, 64, code, 0),
                 ("q only partial", dt, dt, False, False, True, 64, 0, code)]
        if dt != "fp32":   # cos/sin fp32: q * cos promotes, q' is fp32
            modes.append(("cos fp32", "fp32", "fp32", False, True, False, 128, 0, 0))
        for mode, cdt, odt, bwd, has_k, inter, rot, rnd, oc in modes:
            bt, bh, w = R._blocks(2048, 32, rot // 2, CUDA)
            cx = dict(BWD=bwd, HAS_K=has_k, HAS_PASS=rot < 128, INTERLEAVED=inter, RND=rnd, OUT_Q=oc, OUT_K=oc,
                      BLOCK_T=bt, BLOCK_R=rot // 2, BLOCK_P=max(1, 128 - rot), BLOCK_H=bh)
            out.append(case("rope._rope_kernel", mode, dt, dict(Q=dt, QO=odt, K=dt, KO=odt, COS=cdt, SIN=cdt), cx,
                            dict(num_warps=w), ones=unit))
    return out


def lce_cases(dts=DTYPES):
    from fxopt.kernels import linear_cross_entropy as L
    t = L.GPU_TILE
    out = []
    for dt in dts:
        for tanh, grad in ((False, True), (True, True), (False, False)):
            out.append(case("linear_cross_entropy._lce_chunk", f"TANH={tanh} GRAD={grad}", dt,
                            dict(Z=dt, LABELS="i64", LOSS="fp32", INV_D="fp32"),
                            dict(TANH=tanh, GRAD=grad, BLOCK_M=t["block_m"], BLOCK_V=min(t["block_v"], 1 << 17)),
                            # 1 << 17: next_pow2 of Llama 3's vocab 128256
                            dict(num_warps=t["warps"]), ("pre", "post")))
        for i64 in (False, True):   # n = numel of dx / dW; [N, H] dx passes 2^31 for long batches
            out.append(case("linear_cross_entropy._scale", f"n {'i64' if i64 else 'i32'}", dt,
                            dict(OUT=dt, IN=dt, G="fp32"), dict(BLOCK=4096), dict(num_warps=8),
                            i64=("n",) * i64))
    return out


# ---- LoRA / NF4 GEMMs ----

def lora_skinny_cases(dts=("bf16", "fp16")):
    out = []
    for dt in dts:
        # big @ small: x A^T (x [M, K] row-major, A^T a view) and x^T dxa (x^T a view, dxa [M, r] row-major)
        for mode, ones, rb in (("x A^T r16", ("s_bq", "s_sq", "s_or"), 16),
                               ("x^T dxa r64", ("s_bp", "s_sr", "s_or"), 64)):
            out.append(case("lora._skinny_kernel", mode, dt, dict(BIG=dt, SMALL="fp32", OUT="fp32"),
                            dict(HALF=int(dt == "fp16"), INTERP=False, BP=64, BQ=64, RB=rb), dict(num_warps=4),
                            floats=("scale",), ones=ones))
        # the split partials' sum and its rounded copy (x A^T, dy B), or the sum alone (dA, dB)
        for has_low in (True, False):
            out.append(case("split_reduce._split_sum_kernel", f"sum{' + low' if has_low else ''}", dt,
                            dict(PART="fp32", OUT="fp32", LOW=dt if has_low else "fp32"),
                            dict(HAS_LOW=has_low, HALF=int(dt == "fp16"), INTERP=False, BLOCK=1024),
                            dict(num_warps=4)))
        # lora_dy: dxa and dB from one pass over dy, at each rank's rows per program
        for rb, bm in ((16, 256), (64, 128), (128, 64)):
            out.append(case("lora_dy._dy_pass_kernel", f"dy pass r{rb}", dt,
                            dict(DY=dt, BW="fp32", XA="fp32", DXA_P="fp32", DB_P="fp32"),
                            dict(HALF=int(dt == "fp16"), INTERP=False, BM=bm, BN=64, RB=rb),
                            dict(num_warps=8), floats=("scale",), ones=("s_dn", "s_br", "s_xr")))
    return out


NF4_MODES = {   # name: (NF4, TRANS, NESTED, FAST, HAS_LORA, HAS_BIAS, fp32 adapters, fp32 x/out/bias, candidate)
    "nf4 fwd lora": (True, True, False, True, True, False, False, False, 0),
    "nf4 fwd nested bias fp32-lora swap": (True, True, True, True, True, True, True, False, 3),
    "nf4 fwd BQ=128 swap": (True, True, False, True, True, False, False, False, 7),
    # fp32 activations into a bf16/fp16-compute layer (peft's prepare_model_for_kbit_training upcasts the rest)
    "nf4 fwd fp32 x/bias/out": (True, True, True, True, True, True, True, True, 0),
    "nf4 bwd nested lora": (True, False, True, True, True, False, False, False, 0),
    "nf4 bwd swap": (True, False, False, True, False, False, False, False, 3),
    "nf4 fwd K%64!=0": (True, True, False, False, False, False, False, False, 0),
    "nf4 bwd nested K%64!=0": (True, False, True, False, True, False, False, False, 0),
    "dense fwd lora bias": (False, True, False, False, True, True, False, False, 0),
    "dense bwd fp32-lora swap": (False, False, False, False, True, False, True, False, 3),
}


def nf4_matmul_cases(dts=DTYPES):
    from fxopt.kernels import nf4 as N
    out = []
    for dt in dts:
        for mode, (nf4, trans, nested, fast, lora, bias, f32lora, f32x, ci) in NF4_MODES.items():
            if dt == "fp32" and (f32x or ci == 7):   # fp32 x is the compute dtype; BQ=128 fp32 takes ~7 s
                continue
            bm, bp, bq, gm, w, s, swap = N._CUDA_CANDIDATES[ci]
            ldt = "fp32" if f32lora else dt
            o = "fp32" if f32x else dt   # x and the output; dt is the compute dtype
            # placeholders are the output: the dense weight under NF4, the NF4 operands under a dense weight, lora /
            # bias when absent; absmax for the double-quantization operands without it
            q = "fp32" if nf4 else o
            ptrs = dict(X=o, WD=o if nf4 else dt, WQ="u8" if nf4 else o, ABS=("u8" if nested else "fp32") if nf4 else o,
                        ABS2=q, CODE2=q, OFF=q, CODE=q, LF=ldt if lora else o, RT=ldt if lora else o, BIAS=o, C=o)
            cx = dict(NF4=nf4, TRANS=trans, NESTED=nested, FAST=fast, BS=64, BS2=256, HAS_LORA=lora, HAS_BIAS=bias,
                      DT=N._DT[TORCH_DT[dt]], LDT=N._DT[TORCH_DT[ldt]], F32DOT=dt == "fp32", LF32DOT=ldt == "fp32",
                      INTERP=False, SWAP=bool(swap), BM=bm, BP=bp, BQ=bq, RB=16, GROUP_M=gm)
            # row-major x, out, dense W, lora_left; lora_right is B^T (forward) or A (backward)
            ones = ("s_xq", "s_cp", "s_wk" * (not nf4), "s_lr" * lora, ("s_rr" if trans else "s_rp") * lora)
            out.append(case("nf4._fused_matmul_kernel", mode, dt, ptrs, cx,
                            dict(num_warps=w, num_stages=N.num_stages(s, cx)),
                            ("scale",), ones=tuple(u for u in ones if u)))
    return out


def nf4_dequant_cases(dts=DTYPES):
    out = []
    for dt in dts:
        # (blocksize, NESTED, FAST); launcher tiles 64 x 128, BK = blocksize when FAST and 128 % blocksize != 0
        for bs, nested, fast in ((64, False, True), (64, True, True), (256, True, True), (64, False, False)):
            ptrs = dict(WQ="u8", ABS="u8" if nested else "fp32", ABS2="fp32", CODE2="fp32", OFF="fp32", CODE="fp32",
                        D=dt)
            out.append(case("nf4_chunked._dequant_kernel", f"bs={bs} nested={nested} fast={fast}", dt, ptrs,
                            dict(BS=bs, BS2=256, NESTED=nested, FAST=fast, RND=0, BN=64, BK=128),
                            dict(num_warps=4)))
    from fxopt.kernels import nf4_chunked as C
    block, warps = C.FLAT_CONFIG
    for dt in (d for d in dts if d != "fp32"):      # whole-row 16-bit chunks: the flat kernel (one word per byte)
        for bs, nested in ((64, True), (64, False), (4096, True)):
            ptrs = dict(WQ="u8", ABS="u8" if nested else "fp32", ABS2="fp32", CODE2="fp32", OFF="fp32", CODE="fp32",
                        D32="i32")
            out.append(case("nf4_chunked._dequant_flat_kernel", f"flat bs={bs} nested={nested}", dt, ptrs,
                            dict(BS=bs, BS2=256, NESTED=nested, DT=1 if dt == "fp16" else 2, RND=0,
                                 BLOCK=max(block, bs // 2)), dict(num_warps=warps),
                            i64=("b0",) * (bs == 4096)))   # (a chunk start past 2^31 bytes: an i64 launch)
    return out


# family -> cases. Slow (run with -m slow or FXOPT_SLOW=1): fp32 attention backward, IEEE fp32 dots, ~25 s per
# dk/dv build on a 2-core CPU (the default run compiles fp32 attention forward only).
FAMILIES = {
    "attention_fwd": attention_fwd_cases,
    "attention_bwd": attention_bwd_cases,
    "gated_mlp": gated_mlp_cases,
    "norms": norm_cases,
    "rope": rope_cases,
    "linear_cross_entropy": lce_cases,
    "lora_skinny": lora_skinny_cases,
    "nf4_matmul": nf4_matmul_cases,
    "nf4_dequant": nf4_dequant_cases,
    "attention_bwd_fp32": lambda: attention_bwd_cases(("fp32",)),
}
SLOW = {"attention_bwd_fp32"}


@pytest.mark.parametrize("family", [pytest.param(f, marks=[pytest.mark.slow] * (f in SLOW)) for f in FAMILIES])
def test_kernels_compile_for_sm90(family):
    unique = {json.dumps([c["kernel"], c["sig"], c["constexprs"], c["options"]], sort_keys=True): c
              for c in FAMILIES[family]()}   # modes that coincide in a dtype (fp32 has no rounding code) once
    cases = sorted(unique.values(), key=lambda c: c["dt"] != "fp32")   # fp32 (IEEE dots) compiles longest: first
    assert len({c["label"] for c in cases}) == len(cases), "two different cases share a label"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(WORKERS)], input=json.dumps(cases), env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=1800)
    results = [json.loads(line[7:]) for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    errors = [res["error"] for res in results if not res["ok"]]
    if errors and all("ptxas" in e and "not found" in e.lower() for e in errors):
        pytest.skip("no ptxas in this Triton install")
    by_label = {c["label"]: c for c in cases}
    for res in results:
        print(f"{res['seconds']:6.2f}s {'ok  ' if res['ok'] else 'FAIL'} {res['label']}")
    failed = [f"{res['label']} constexprs={by_label[res['label']]['constexprs']}\n    {res['error']}"
              for res in results if not res["ok"]]
    assert r.returncode == 0 and len(results) == len(cases), \
        f"compile subprocess exited {r.returncode} after {len(results)}/{len(cases)} cases:\n{r.stderr[-3000:]}"
    assert not failed, f"{len(failed)}/{len(cases)} {family} kernels failed the sm_90 build (compile or shared " \
        "memory):\n" + "\n".join(failed)


def test_every_launched_kernel_is_compiled():
    """A @triton.jit function of fxopt/kernels that no jit code calls is a launched kernel: it needs cases above."""
    sources = {p.stem: p.read_text() for p in (ROOT / "fxopt" / "kernels").glob("*.py")}
    every = "\n".join(sources.values())
    kernels = {f"{mod}.{name}" for mod, src in sources.items()
               for name in re.findall(r"@triton\.jit\s+def (\w+)", src)
               if len(re.findall(rf"\b{name}\(", every)) == 1}   # its def only
    covered = {c["kernel"] for build in FAMILIES.values() for c in build()}
    assert kernels, "no kernels found"
    assert kernels <= covered, f"kernels without sm_90 compile cases: {sorted(kernels - covered)}"
