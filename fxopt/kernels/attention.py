"""Attention: out = softmax(mask(cap(scale * q k^T))) v, with the row logsumexp saved for backward.

q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] (any strides with unit last stride; Hq % Hkv == 0: q head h reads kv head
h // (Hq / Hkv), so grouped-query attention never materializes repeated k/v).
  s      = scale * q k^T                         (fp32 accumulation)
  cap    : s -> c * tanh(s / c)                  (soft-capping, c = softcap > 0; applied before masking)
  mask   : k index j allowed for q index i iff   [causal] j <= i  and  [window W > 0] i - j < W
           and the optional tensor mask allows it (bool: True = attend; float: added to s, a value <= -1e4 masks:
           exp(-1e4) = 0 in fp32 next to any kept key), broadcast [B|1, Hq|1, Sq, Sk]. A row with no allowed key
           gives 0 (as SDPA does) under a bool mask, and eager's uniform average of V under an additive one
           (attention_masks.uniform_rows_*: the kernels give 0, the op then writes those rows)
  p      = exp(s - lse),  lse = log sum_j exp(s_ij)  (online softmax in base 2; a row with nothing allowed: out 0,
           lse -inf)
Forward (FlashAttention-2 order): one program per (q block, batch*head) loops over k blocks; blocks entirely outside
causal/window are skipped, blocks entirely inside need no index mask (three loop phases: masked, full, masked).
Backward recomputes p from lse (fxopt/kernels/attention_bwd.py):
  delta = rowsum(dO * O);  dS = p * (dO v^T - delta);  with a cap dS *= 1 - tanh^2
  dq = scale * dS k;  dk = scale * dS^T q;  dv = p^T dO   (dk, dv summed over the q heads of a group, in-program)
Output `out` is laid out [B, Sq, Hq, D] in memory (returned as the [B, Hq, Sq, D] view): HF's following
transpose(1, 2).reshape(B, S, Hq * D) is then free, and so is the transpose of the incoming gradient.

Measured (H200, torch 2.11, triton 3.6, bf16, benchmarks/kernel_bench/attention.py, dq 'separate'):
  causal GQA 32/8 d128 s2048 b8: fwd 368 TFLOP/s (SDPA 492), fwd+bwd 285 (SDPA 386, Inductor-eager 109): 0.74x SDPA
  causal GQA 32/8 d128 s8192 b2: fwd 435 (SDPA 547), fwd+bwd 342 (SDPA 494): 0.69x SDPA
  Gemma2-like d256 8/4 cap 50 s2048 b4: fwd 197 (2.9x Inductor-eager), fwd+bwd 114 (1.0x Inductor-eager); with
  CONFIGS_D256 (672d3aa): fwd 217 (0.317 ms, 2.3x Inductor-eager's 0.726), fwd+bwd 137 (1.75 ms, 0.98x its 1.71)
  rel error vs SDPA: out 1.0e-3, dq/dk/dv 2.7-3.7e-3; vs fp32 math 2.0-2.5e-3.
The backward is the gap: the separate dq kernel makes it 7 GEMMs instead of FA2's 5 (dq mode 'atomic' in
attention_bwd.py is the 5-GEMM variant; at d256 it was slower, see CONFIGS_D256).
"""
from __future__ import annotations

import collections
import os
from typing import Optional

import torch

from fxopt.kernels.attention_masks import (MASKED_BELOW, allowed_mask, doc_allowed, doc_bounds, empty_rows,
                                           is_doc_ids, mask_args, uniform_rows_forward)
from fxopt.kernels.launch import fast_launch
from fxopt.kernels.registry import (bench_ms, capturing, interpreting, log_choice, next_pow2, register_cost,
                                    run_kernel, triton_available, tuning, use_triton)

LOG2E = 1.4426950408889634
RUNS = collections.Counter()    # which implementation ran: "triton", "reference" (read by benchmarks / reports)
TUNED: dict = {}                # (kernel, key) -> chosen config, filled by `launch_tuned`

# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates per kernel, timed once per shape key on the GPU; those over the
# shared memory / accumulator register estimates (`fits`) are skipped (the small ones are for head dim 256). The first
# fitting one is used without timing when FXOPT_ATTN_AUTOTUNE=0 (or FXOPT_TUNE=0);
# FXOPT_ATTN_<FWD|DKDV|DQ>_CONFIG="bm,bn,w,s" forces one. The interpreter uses INTERPRET_CONFIG.
CONFIGS = {
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2)],
    "dkdv": [(64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 4, 3), (64, 64, 8, 2), (32, 64, 4, 2)],
    "dq": [(128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
}
# Head dim 256 (padded): of the lists above only 1-3 per kernel fit (`fits`); dk/dv had one, (64, 64, 8, 2). H200,
# Gemma2-like case (b4 s2048 8/4 heads, soft-cap, causal), 672d3aa, bench_ms per kernel (attention_d256_h200.json):
#   fwd  (128, 64, 8, 2) 0.319 ms; (128, 32, 8, 3) 0.347; (64, 32, 4, 2) 0.348; (64, 64, 4, 2) 0.447; 3 more slower
#   dkdv (64, 32, 4, 2) 0.923; (32, 32, 4, 2) 0.962; (64, 32, 8, 2) 0.967; (64, 64, 8, 2) 1.230; 2 more slower
#   dq   (128, 32, 8, 2) 0.443; (32, 64, 4, 2) 0.521; (64, 32, 4, 2) 0.576; (64, 64, 8, 2) 0.657; 2 more slower
# (dq 'atomic': its dk/dv kernel's best, (32, 32, 4, 2), took 1.572 ms, more than dk/dv + dq separate). The three
# fastest of each are timed per shape, the first is the untimed default. dk and dv by two launches of this kernel,
# one accumulator each (5 GEMMs of recompute instead of 4), were tried and removed (61520fc): dk 0.600 ms at
# (32, 128, 8, 2) + dv 0.403 at (32, 64, 4, 2) against 0.925 fused; fwd+bwd 1.836 vs 1.759 ms
# (attention_dkdv_split_h200.json).
CONFIGS_D256 = {
    "fwd": [(128, 64, 8, 2), (128, 32, 8, 3), (64, 32, 4, 2)],
    "dkdv": [(64, 32, 4, 2), (32, 32, 4, 2), (64, 32, 8, 2)],
    "dq": [(128, 32, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2)],
}
SMEM_LIMIT = 220 * 1024
ACC_REGS_LIMIT = 128            # fp32 accumulator registers per thread (more spills)
INTERPRET_CONFIG = (32, 32, 4, 1)   # tests set 16 to cover multi-block phases

if triton_available():
    import triton
    import triton.language as tl
    try:
        from triton.language.extra import libdevice
        _HAS_LIBDEVICE = True
    except Exception:  # noqa: BLE001 - older/other builds: the exp formula below
        libdevice, _HAS_LIBDEVICE = None, False

    @triton.jit
    def _tanh(x, LIBDEVICE: tl.constexpr):
        if LIBDEVICE:
            t = libdevice.tanh(x)
        else:   # interpreter (libdevice is not interpreted): tanh|x| = (1 - e) / (1 + e), e = exp(-2|x|)
            e = tl.exp(-2.0 * tl.abs(x))
            t = (1.0 - e) / (1.0 + e)
            t = tl.where(x < 0, -t, t)
        return t

    @triton.jit
    def _dot(a, b, acc, IEEE: tl.constexpr):
        """a @ b (+ acc), fp32 accumulation; fp32 inputs in full precision (no tf32)."""
        if IEEE:
            r = tl.dot(a, b, acc, input_precision="ieee")
        else:
            r = tl.dot(a, b, acc)
        return r

    @triton.jit
    def _load_rows(ptrs, offs, n, d_ok, CHECK: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr):
        """[rows, D_PAD] tile; CHECK: rows may reach past n (else only the head-dim padding is masked)."""
        if CHECK:
            x = tl.load(ptrs, mask=(offs < n)[:, None] & d_ok[None, :], other=0.0)
        elif EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _logits(qk, qi, ki, mptrs, mload, Mb, smm, Sq, Sk, window, qk_scale2, cap_x, cap2, CAUSAL: tl.constexpr,
                WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr, INDEX_MASK: tl.constexpr,
                LIBDEVICE: tl.constexpr):
        """Scores in base 2 (s * log2 e) with -inf where not allowed; t = tanh(.) of the cap (else qk)."""
        if SOFTCAP:
            t = _tanh(qk * cap_x, LIBDEVICE)          # cap_x = scale / c, cap2 = c * log2 e
            s = t * cap2
        else:
            t = qk
            s = qk * qk_scale2                        # qk_scale2 = scale * log2 e
        if MASK_KIND == 1:
            mv = tl.load(mptrs, mask=mload, other=0)
            s = tl.where(mv != 0, s, float("-inf"))
        elif MASK_KIND == 2:
            mv = tl.load(mptrs, mask=mload, other=0.0).to(tl.float32)
            s = tl.where(mv > -1.0e4, s + tl.maximum(mv, -1.0e4) * 1.4426950408889634, float("-inf"))  # <= -1e4: masked
        elif MASK_KIND == 3:   # document ids doc[b, s] (packed sequences): q attends k only inside its document
            dq_ = tl.load(Mb + qi * smm, mask=qi < Sq, other=-1)       # [BM, 1] or [1, BM]: one id per row
            dk_ = tl.load(Mb + ki * smm, mask=ki < Sk, other=-2)
            s = tl.where(dq_ == dk_, s, float("-inf"))
        if INDEX_MASK:
            ok = ki < Sk
            if CAUSAL:
                ok = ok & (ki <= qi)
            if WINDOW:
                ok = ok & (qi - ki < window)
            s = tl.where(ok, s, float("-inf"))
        return s, t

    @triton.jit
    def _phases(start, S_other, span_self, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                BLOCK_SELF: tl.constexpr, BLOCK: tl.constexpr, Q_SIDE: tl.constexpr):
        """Loop bounds lo <= f_lo <= f_hi <= hi (multiples of BLOCK from lo) over the other axis for the block
        [start, start + BLOCK_SELF) of this axis: [lo, f_lo) and [f_hi, hi) need index masks, [f_lo, f_hi) not.
        Q_SIDE: this axis is q (loop over k: forward, dq); else it is k (loop over q: dk/dv)."""
        end = start + BLOCK_SELF
        lo = 0
        hi = S_other
        f_lo = 0
        f_hi = (S_other // BLOCK) * BLOCK
        if Q_SIDE:
            if CAUSAL:           # k <= q
                hi = tl.minimum(hi, end)
                f_hi = tl.minimum(f_hi, ((start + 1) // BLOCK) * BLOCK)
            if WINDOW:           # k > q - W
                lo = (tl.maximum(start - window + 1, 0) // BLOCK) * BLOCK
                f_lo = tl.cdiv(tl.maximum(end - window, 0), BLOCK) * BLOCK
        else:
            if CAUSAL:           # q >= k
                lo = (start // BLOCK) * BLOCK
                f_lo = tl.cdiv(end - 1, BLOCK) * BLOCK
            if WINDOW:           # q < k + W
                hi = tl.minimum(hi, end - 1 + window)
                f_hi = tl.minimum(f_hi, ((start + window) // BLOCK) * BLOCK)
        f_lo = tl.minimum(tl.maximum(f_lo, lo), hi)
        f_hi = tl.minimum(tl.maximum(f_hi, f_lo), hi)
        return lo, f_lo, f_hi, hi

    @triton.jit
    def _doc_clip(lo, f_lo, f_hi, hi, DS, DE, start, S, BLOCK_SELF: tl.constexpr, BLOCK: tl.constexpr):
        """Narrow the phases to the documents of rows [start, start + BLOCK_SELF): with nondecreasing document ids,
        the other axis only matters in [doc start of the first row, doc end of the last row). Block-aligned, so the
        phases never overlap; keys/queries inside the range but of another document are masked by MASK_KIND 3."""
        first = tl.minimum(start, S - 1)
        last = tl.minimum(start + BLOCK_SELF, S) - 1
        lo2 = tl.maximum(lo, (tl.load(DS + first) // BLOCK) * BLOCK)
        hi2 = tl.minimum(hi, tl.load(DE + last))
        f_lo = tl.maximum(f_lo, lo2)
        f_hi = tl.maximum(tl.minimum(f_hi, tl.cdiv(hi2, BLOCK) * BLOCK), f_lo)
        return lo2, f_lo, f_hi, hi2

    @triton.jit
    def _fwd_loop(acc, l_i, m_i, q, Kb, Vb, Mb, offs_m, offs_d, lo, hi, skn, svn, smm, smn, Sq, Sk, D, window,
                  qk_scale2, cap_x, cap2, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
                  MASK_KIND: tl.constexpr, INDEX_MASK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                  LIBDEVICE: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr):
        d_ok = offs_d < D
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k = _load_rows(Kb + offs_n[:, None] * skn + offs_d[None, :], offs_n, Sk, d_ok, INDEX_MASK, EVEN_D,
                           UPCAST)
            v = _load_rows(Vb + offs_n[:, None] * svn + offs_d[None, :], offs_n, Sk, d_ok, INDEX_MASK, EVEN_D,
                           UPCAST)
            qk = _dot(q, tl.trans(k), None, IEEE)
            mptrs = Mb + offs_m[:, None].to(tl.int64) * smm + offs_n[None, :].to(tl.int64) * smn
            mload = (offs_m < Sq)[:, None] & (offs_n < Sk)[None, :]
            s, _t = _logits(qk, offs_m[:, None], offs_n[None, :], mptrs, mload, Mb, smm, Sq, Sk, window, qk_scale2,
                            cap_x, cap2,
                            CAUSAL, WINDOW, SOFTCAP, MASK_KIND, INDEX_MASK, LIBDEVICE)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            if INDEX_MASK or MASK_KIND != 0:   # a row with nothing allowed so far keeps m = -inf: shift by 0
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                m_use = m_new
            p = tl.math.exp2(s - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _attn_fwd(Q, K, V, O, LSE, MASK, DS, DE, sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                  smb, smh, smm, smn, H, G, Sq, Sk, D, window, qk_scale2, cap_x, cap2,
                  CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr,
                  UPCAST: tl.constexpr, IEEE: tl.constexpr, LIBDEVICE: tl.constexpr, EVEN_D: tl.constexpr,
                  D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        if CAUSAL:   # the longest rows first (better tail balance)
            pid_m = tl.num_programs(0) - 1 - pid_m
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)   # int64 head offsets: h x head stride passes 2^31 for long sequences
        hk = h // G
        start_m = pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D_PAD)
        row_mask = (offs_m < Sq)[:, None] & (offs_d < D)[None, :]
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=row_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        Kb = K + b * skb + hk * skh
        Vb = V + b * svb + hk * svh
        Mb = MASK + b * smb + h * smh
        acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        lo, f_lo, f_hi, hi = _phases(start_m, Sk, BLOCK_M, window, CAUSAL, WINDOW, BLOCK_M, BLOCK_N, True)
        if MASK_KIND == 3:
            lo, f_lo, f_hi, hi = _doc_clip(lo, f_lo, f_hi, hi, DS + b * Sq, DE + b * Sq, start_m, Sq, BLOCK_M,
                                           BLOCK_N)
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, Kb, Vb, Mb, offs_m, offs_d, lo, f_lo, skn, svn, smm, smn, Sq,
                                  Sk, D, window, qk_scale2, cap_x, cap2, CAUSAL, WINDOW, SOFTCAP, MASK_KIND, True,
                                  UPCAST, IEEE, LIBDEVICE, EVEN_D, BLOCK_N)
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, Kb, Vb, Mb, offs_m, offs_d, f_lo, f_hi, skn, svn, smm, smn, Sq,
                                  Sk, D, window, qk_scale2, cap_x, cap2, CAUSAL, WINDOW, SOFTCAP, MASK_KIND, False,
                                  UPCAST, IEEE, LIBDEVICE, EVEN_D, BLOCK_N)
        acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, Kb, Vb, Mb, offs_m, offs_d, f_hi, hi, skn, svn, smm, smn, Sq,
                                  Sk, D, window, qk_scale2, cap_x, cap2, CAUSAL, WINDOW, SOFTCAP, MASK_KIND, True,
                                  UPCAST, IEEE, LIBDEVICE, EVEN_D, BLOCK_N)
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        # lse (natural log) = (m + log2 l) * ln 2; -inf when nothing was allowed (l = 0)
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=row_mask)
        tl.store(LSE + (b * H + h) * Sq + offs_m, lse, mask=offs_m < Sq)


# ---- launching: config choice per shape ----

def _env_config(kind):
    s = os.environ.get(f"FXOPT_ATTN_{kind.upper()}_CONFIG")   # "BLOCK_M,BLOCK_N,warps,stages"
    return tuple(int(x) for x in s.split(",")) if s else None


def smem_bytes(kind, cfg, d_pad, elem=2):
    """Rough shared memory of a config: the resident tile plus `stages` buffers of the streamed tiles."""
    bm, bn, _w, stages = cfg
    resident, streamed = {"fwd": (bm, 2 * bn), "dkdv": (2 * bn, 2 * bm), "dq": (2 * bm, 2 * bn)}[kind]
    return (resident + max(1, stages) * streamed) * d_pad * elem


def fits(kind, cfg, d_pad):
    bm, bn, warps, _s = cfg
    acc = {"fwd": bm, "dkdv": 2 * bn, "dq": bm}[kind] * d_pad // (32 * warps)
    return smem_bytes(kind, cfg, d_pad) <= SMEM_LIMIT and acc <= ACC_REGS_LIMIT


def candidates(kind, d_pad):
    """The configs listed for this kernel and padded head dim (before the `fits` filter)."""
    return (CONFIGS_D256 if d_pad >= 256 else CONFIGS)[kind]


def smallest(kind, cfgs, d_pad):
    return min(cfgs, key=lambda c: smem_bytes(kind, c, d_pad))


def fitting(kind, d_pad):
    """The configs launch_tuned times: the listed ones within the estimates, else the smallest listed one."""
    listed = candidates(kind, d_pad)
    return [c for c in listed if fits(kind, c, d_pad)] or [smallest(kind, listed, d_pad)]


def launch_tuned(kind: str, key: tuple, launch, d_pad: int, tune: bool = True) -> None:
    """Run `launch(cfg)` with the config chosen for (kind, key): timed once per key on the GPU over
    fitting(kind, d_pad) (configs that fail to compile are skipped); the interpreter uses one config.
    tune=False (fp32's IEEE dots): the smallest fitting config, untimed; in an fp32 fine-tune test on the H200
    (head dim 64) the candidates' builds ran past 100 s, and so did the first config's (128x64) alone."""
    if interpreting():
        return launch(INTERPRET_CONFIG)
    cfg = _env_config(kind) or TUNED.get((kind, key))
    if cfg is not None:
        return launch(cfg)
    cands = fitting(kind, d_pad)
    if capturing():   # recording a CUDA graph: no timing now (the choice is made on a later, uncaptured call)
        return launch(cands[0])
    if not tune:   # the smallest tiles: the least for the compiler (fp32 builds are the slow ones)
        cands = [smallest(kind, cands, d_pad)]
    elif os.environ.get("FXOPT_ATTN_AUTOTUNE", "1") == "0" or not tuning():
        cands = cands[:1]
    best, best_ms, err, times = None, float("inf"), None, {}
    for c in cands:
        try:
            if len(cands) == 1:
                launch(c)
                best = c
                break
            ms = times[c] = bench_ms(lambda c=c: launch(c))
        except Exception as e:  # noqa: BLE001 - e.g. OutOfResources for big tiles at d=256
            err = e
            continue
        if ms < best_ms:
            best, best_ms = c, ms
    if best is None:
        raise RuntimeError(f"no attention {kind} config compiled: {err}")
    TUNED[(kind, key)] = best
    if len(cands) > 1:
        log_choice(f"attention_{kind}", key, best, times)
        launch(best)


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def kernel_flags(q, D, causal, window, softcap):
    return dict(CAUSAL=bool(causal), WINDOW=window > 0, SOFTCAP=softcap > 0, UPCAST=interpreting(),
                IEEE=q.dtype == torch.float32, LIBDEVICE=_HAS_LIBDEVICE and q.is_cuda,
                EVEN_D=next_pow2(D) == D, D_PAD=max(16, next_pow2(D)))


def cap_scalars(scale, softcap):
    """(qk_scale2, cap_x, cap2) of _logits."""
    c = softcap if softcap > 0 else 1.0
    return scale * LOG2E, scale / c, c * LOG2E


def _fwd_triton(q, k, v, mask, scale, causal, window, softcap):
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    out = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    m, kind, ms = mask_args(mask, B, H, Sq, Sk, q)
    ds, de = doc_bounds(mask, kind, B, Sq, lse)
    fl = kernel_flags(q, D, causal, window, softcap)
    scal = cap_scalars(scale, softcap)

    def launch(cfg):
        bm, bn, warps, stages = cfg
        fast_launch(_attn_fwd, (triton.cdiv(Sq, bm), B * H), q, k, v, out, lse, m, ds, de, *q.stride()[:3],
                    *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *ms, H, H // Hkv, Sq, Sk, D, int(window),
                    *scal, MASK_KIND=kind, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **fl)

    key = (fl["D_PAD"], next_pow2(Sq), next_pow2(Sk), H // Hkv > 1, kind, fl["CAUSAL"], fl["WINDOW"],
           fl["SOFTCAP"], q.dtype)
    launch_tuned("fwd", key, launch, fl["D_PAD"], tune=not fl["IEEE"])
    return out, lse


# ---- PyTorch reference (fp32 math) ----

def reference_logits(q, k, mask, scale, causal, window, softcap):
    """(s, t): fp32 scores with -inf where not allowed, and tanh of the cap (None without cap); k repeated per group."""
    if is_doc_ids(mask):
        mask = doc_allowed(mask)
    g = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(g, dim=1)
    s = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    t = None
    if softcap > 0:
        t = torch.tanh(s / softcap)
        s = softcap * t
    if mask is not None and mask.dtype != torch.bool:   # values <= -1e4 mask (see the module doc)
        mf = mask.float()
        s = torch.where(mf > MASKED_BELOW, s + mf, torch.full_like(s, float("-inf")))
    allowed = allowed_mask(q.shape[2], k.shape[2], causal, window, mask, q.device)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return s, t


def safe_lse(lse):
    """lse with -inf (rows with nothing allowed) replaced by +inf, so exp(s - lse) = 0 there."""
    return torch.where(lse == float("-inf"), torch.full_like(lse, float("inf")), lse)


def attention_reference(q, k, v, mask, scale, causal, window, softcap):
    s, _ = reference_logits(q, k, mask, scale, causal, window, softcap)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - safe_lse(lse).unsqueeze(-1))
    vf = v.float().repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    B, H, Sq, D = q.shape
    out = torch.empty((B, Sq, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    out.copy_(torch.matmul(p, vf))
    return out, lse


# ---- ops ----

def _check(q, k, v, mask):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("attention expects q, k, v of shape [B, H, S, D]")
    if is_doc_ids(mask) and (mask.dim() != 2 or mask.shape[-1] != q.shape[2] or q.shape[2] != k.shape[2]
                             or mask.shape[0] not in (1, q.shape[0])):
        raise ValueError(f"an integer attention mask is document ids [B, S] with Sq = Sk; got {tuple(mask.shape)} "
                         f"for q {tuple(q.shape)}, k {tuple(k.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"attention shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)} "
                         "(need k = v, same batch/head dim, q heads a multiple of kv heads)")


@torch.library.custom_op("fxopt::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
              causal: bool, window: int, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out [B, Hq, Sq, D] in [B, Sq, Hq, D] memory, lse [B, Hq, Sq] fp32). window 0 / softcap 0 = off.
    mask: None, bool (True = attend), additive float, or integer document ids [B, S] (no dense mask)."""
    _check(q, k, v, mask)
    ref = lambda: (RUNS.update(["reference"]), attention_reference(q, k, v, mask, scale, causal, window,
                                                                     softcap))[1]
    if q.numel() == 0 or k.shape[2] == 0:
        return ref()
    if use_triton(q, k, v, mask):
        def kernel():
            r = _fwd_triton(q, k, v, mask, scale, causal, window, softcap)
            RUNS.update(["triton"])
            return r
        out, lse = run_kernel("attention", kernel, ref)
    else:
        out, lse = ref()
    dead = empty_rows(mask, lse)
    if dead is not None:    # additive mask: a row with no allowed key gives eager's uniform average (attention_masks)
        uniform_rows_forward(out, v, dead)
    return out, lse


@attention.register_fake
def _(q, k, v, mask, scale, causal, window, softcap):
    B, H, Sq, D = q.shape
    return q.new_empty((B, Sq, H, D)).transpose(1, 2), q.new_empty((B, H, Sq), dtype=torch.float32)


def _setup(ctx, inputs, output):
    q, k, v, mask, scale, causal, window, softcap = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], mask)
    ctx.args = (scale, causal, window, softcap)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, mask = ctx.saved_tensors
    if ctx.needs_input_grad[3]:
        raise NotImplementedError("fxopt::attention: gradient of the attention mask is not supported")
    dq, dk, dv = torch.ops.fxopt.attention_backward(dout, q, k, v, out, lse, mask, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


attention.register_autograd(_backward, setup_context=_setup)


@register_cost("attention")
def attention_cost(q_shape, k_shape, dtype_bytes, causal=False, window=0):
    """(flops, bytes) of the forward: 2 matmuls of 2*Sq*Sk*D per head, halved by causal (window: ~W/Sk)."""
    B, H, Sq, D = q_shape
    Sk = k_shape[2]
    frac = 0.5 if causal else 1.0
    if window > 0:
        frac = min(frac, window / max(Sk, 1))
    flops = int(4 * B * H * Sq * Sk * D * frac)
    nbytes = (2 * B * H * Sq * D + 2 * k_shape[0] * k_shape[1] * Sk * D) * dtype_bytes + 4 * B * H * Sq
    return flops, nbytes


from fxopt.kernels import attention_bwd  # noqa: E402,F401  (registers fxopt::attention_backward)

