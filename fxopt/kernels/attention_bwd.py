"""Attention backward (FlashAttention-2 style, p recomputed from the saved lse); math in fxopt/kernels/attention.py.

  delta_i = sum_d dO_id O_id                              (_attn_bwd_delta)
  p_ij    = exp2(s2_ij - lse_i * log2 e)                  (s2: base-2 scores from _logits, -inf where masked)
  dS_ij   = p_ij (dO_i . v_j - delta_i)  [* (1 - t_ij^2) with a soft-cap]
  dk_j = scale sum_{h in group, i} dS_ij q_i,  dv_j = sum_{h in group, i} p_ij dO_i    (_attn_bwd_dkdv: one program
         per (k block, batch * kv head) loops over the group's q heads and the q blocks that can see the k block)
  dq_i = scale sum_j dS_ij k_j                            (_attn_bwd_dq: one program per (q block, batch * head));
         or, with dq_mode() 'atomic', atomically added into an fp32 buffer by the dk/dv programs
Rows past Sq / keys past Sk need no index mask here: their loads are 0 and they are never stored.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from fxopt.kernels.attention import RUNS, cap_scalars, kernel_flags, launch_tuned, reference_logits, safe_lse
from fxopt.kernels.attention_masks import doc_bounds, empty_rows, mask_args, uniform_rows_backward
from fxopt.kernels.launch import fast_launch
from fxopt.kernels.registry import capturing, next_pow2, run_kernel, triton_available, use_triton

DQ_MODE = "separate"

if triton_available():
    import triton
    import triton.language as tl

    from fxopt.kernels.attention import _doc_clip, _dot, _load_rows, _logits, _phases

    @triton.jit
    def _attn_bwd_delta(O, DO, DELTA, sob, soh, som, sdb, sdh, sdm, H, Sq, D,
                        D_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)   # int64 head offsets: h x head stride passes 2^31 for long sequences
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D_PAD)
        msk = (offs_m < Sq)[:, None] & (offs_d < D)[None, :]
        o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], mask=msk, other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :], mask=msk, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + (b * H + h) * Sq + offs_m, delta, mask=offs_m < Sq)

    @triton.jit
    def _dkdv_loop(dk, dv, k, v, Qb, DOb, LSEb, DELTAb, Mb, DQb, offs_n, offs_d, lo, hi, sqm, sdm, smm, smn, Sq, Sk,
                   D, window, qk_scale2, cap_x, cap2, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                   SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr, INDEX_MASK: tl.constexpr, UPCAST: tl.constexpr,
                   IEEE: tl.constexpr, LIBDEVICE: tl.constexpr, EVEN_D: tl.constexpr, DQ_ATOMIC: tl.constexpr,
                   D_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
        d_ok = offs_d < D
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _load_rows(Qb + offs_m[:, None] * sqm + offs_d[None, :], offs_m, Sq, d_ok, INDEX_MASK, EVEN_D,
                           UPCAST)
            do = _load_rows(DOb + offs_m[:, None] * sdm + offs_d[None, :], offs_m, Sq, d_ok, INDEX_MASK, EVEN_D,
                            UPCAST)
            m_ok = offs_m < Sq
            lse2 = tl.load(LSEb + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
            lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
            delta = tl.load(DELTAb + offs_m, mask=m_ok, other=0.0)
            qkT = _dot(k, tl.trans(q), None, IEEE)                                  # [BLOCK_N, BLOCK_M]
            mptrs = Mb + offs_m[None, :].to(tl.int64) * smm + offs_n[:, None].to(tl.int64) * smn
            mload = m_ok[None, :] & (offs_n < Sk)[:, None]
            sT, tT = _logits(qkT, offs_m[None, :], offs_n[:, None], mptrs, mload, Mb, smm, Sq, Sk, window,
                             qk_scale2, cap_x, cap2, CAUSAL, WINDOW, SOFTCAP, MASK_KIND, INDEX_MASK, LIBDEVICE)
            pT = tl.math.exp2(sT - lse2[None, :])
            dv = _dot(pT.to(do.dtype), do, dv, IEEE)
            dpT = _dot(v, tl.trans(do), None, IEEE)
            dsT = pT * (dpT - delta[None, :])
            if SOFTCAP:
                dsT = dsT * (1.0 - tT * tT)
            dk = _dot(dsT.to(q.dtype), q, dk, IEEE)
            if DQ_ATOMIC:   # dq_i += sum_j dS_ij k_j into the fp32 buffer [.., Sq, D_PAD] (FA2: 5 GEMMs, not 7)
                dq = _dot(tl.trans(dsT).to(k.dtype), k, None, IEEE)
                tl.atomic_add(DQb + offs_m[:, None] * D_PAD + offs_d[None, :], dq,
                              mask=m_ok[:, None] & (offs_d < D_PAD)[None, :], sem="relaxed")
        return dk, dv

    @triton.jit
    def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, MASK, DS, DE, DQ, sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
                       sdb, sdh, sdm, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, smb, smh, smm, smn,
                       H, G, Sq, Sk, D, window, scale, qk_scale2, cap_x, cap2,
                       CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr,
                       UPCAST: tl.constexpr, IEEE: tl.constexpr, LIBDEVICE: tl.constexpr, EVEN_D: tl.constexpr,
                       DQ_ATOMIC: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        start_n = tl.program_id(0) * BLOCK_N
        bhk = tl.program_id(1)
        Hkv = H // G
        b = (bhk // Hkv).to(tl.int64)
        hk = (bhk % Hkv).to(tl.int64)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < D
        k = _load_rows(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :], offs_n, Sk, d_ok, True,
                       EVEN_D, UPCAST)
        v = _load_rows(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :], offs_n, Sk, d_ok, True,
                       EVEN_D, UPCAST)
        dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
        lo, f_lo, f_hi, hi = _phases(start_n, Sq, BLOCK_N, window, CAUSAL, WINDOW, BLOCK_N, BLOCK_M, False)
        if MASK_KIND == 3:   # queries of these keys' documents only (Sq = Sk)
            lo, f_lo, f_hi, hi = _doc_clip(lo, f_lo, f_hi, hi, DS + b * Sk, DE + b * Sk, start_n, Sk, BLOCK_N,
                                           BLOCK_M)
        for g in range(0, G):
            h = hk * G + g
            Qb = Q + b * sqb + h * sqh
            DOb = DO + b * sdb + h * sdh
            LSEb = LSE + (b * H + h) * Sq
            DELTAb = DELTA + (b * H + h) * Sq
            Mb = MASK + b * smb + h * smh
            DQb = DQ + (b * H + h) * Sq * D_PAD
            dk, dv = _dkdv_loop(dk, dv, k, v, Qb, DOb, LSEb, DELTAb, Mb, DQb, offs_n, offs_d, lo, f_lo, sqm, sdm,
                                smm, smn, Sq, Sk, D, window, qk_scale2, cap_x, cap2, CAUSAL, WINDOW, SOFTCAP, MASK_KIND,
                                True, UPCAST, IEEE, LIBDEVICE, EVEN_D, DQ_ATOMIC, D_PAD, BLOCK_M)
            dk, dv = _dkdv_loop(dk, dv, k, v, Qb, DOb, LSEb, DELTAb, Mb, DQb, offs_n, offs_d, f_lo, f_hi, sqm, sdm,
                                smm, smn, Sq, Sk, D, window, qk_scale2, cap_x, cap2, CAUSAL, WINDOW, SOFTCAP, MASK_KIND,
                                False, UPCAST, IEEE, LIBDEVICE, EVEN_D, DQ_ATOMIC, D_PAD, BLOCK_M)
            dk, dv = _dkdv_loop(dk, dv, k, v, Qb, DOb, LSEb, DELTAb, Mb, DQb, offs_n, offs_d, f_hi, hi, sqm, sdm,
                                smm, smn, Sq, Sk, D, window, qk_scale2, cap_x, cap2, CAUSAL, WINDOW, SOFTCAP, MASK_KIND,
                                True, UPCAST, IEEE, LIBDEVICE, EVEN_D, DQ_ATOMIC, D_PAD, BLOCK_M)
        st = (offs_n < Sk)[:, None] & d_ok[None, :]
        tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkn + offs_d[None, :],
                 (dk * scale).to(DK.dtype.element_ty), mask=st)
        tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvn + offs_d[None, :], dv.to(DV.dtype.element_ty),
                 mask=st)

    @triton.jit
    def _dq_loop(dq, q, do, lse2, delta, Kb, Vb, Mb, offs_m, offs_d, lo, hi, skn, svn, smm, smn, Sq, Sk, D, window,
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
            s, t = _logits(qk, offs_m[:, None], offs_n[None, :], mptrs, mload, Mb, smm, Sq, Sk, window, qk_scale2,
                           cap_x, cap2,
                           CAUSAL, WINDOW, SOFTCAP, MASK_KIND, INDEX_MASK, LIBDEVICE)
            p = tl.math.exp2(s - lse2[:, None])
            dp = _dot(do, tl.trans(v), None, IEEE)
            ds = p * (dp - delta[:, None])
            if SOFTCAP:
                ds = ds * (1.0 - t * t)
            dq = _dot(ds.to(k.dtype), k, dq, IEEE)
        return dq

    @triton.jit
    def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, MASK, DS, DE, sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
                     sdb, sdh, sdm, sdqb, sdqh, sdqm, smb, smh, smm, smn,
                     H, G, Sq, Sk, D, window, scale, qk_scale2, cap_x, cap2,
                     CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr,
                     UPCAST: tl.constexpr, IEEE: tl.constexpr, LIBDEVICE: tl.constexpr, EVEN_D: tl.constexpr,
                     D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        if CAUSAL:
            pid_m = tl.num_programs(0) - 1 - pid_m
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)   # int64 head offsets: h x head stride passes 2^31 for long sequences
        hk = h // G
        start_m = pid_m * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < D
        m_ok = offs_m < Sq
        q = _load_rows(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], offs_m, Sq, d_ok, True,
                       EVEN_D, UPCAST)
        do = _load_rows(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :], offs_m, Sq, d_ok, True,
                        EVEN_D, UPCAST)
        lse2 = tl.load(LSE + (b * H + h) * Sq + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)
        delta = tl.load(DELTA + (b * H + h) * Sq + offs_m, mask=m_ok, other=0.0)
        Kb = K + b * skb + hk * skh
        Vb = V + b * svb + hk * svh
        Mb = MASK + b * smb + h * smh
        dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
        lo, f_lo, f_hi, hi = _phases(start_m, Sk, BLOCK_M, window, CAUSAL, WINDOW, BLOCK_M, BLOCK_N, True)
        if MASK_KIND == 3:
            lo, f_lo, f_hi, hi = _doc_clip(lo, f_lo, f_hi, hi, DS + b * Sq, DE + b * Sq, start_m, Sq, BLOCK_M,
                                           BLOCK_N)
        dq = _dq_loop(dq, q, do, lse2, delta, Kb, Vb, Mb, offs_m, offs_d, lo, f_lo, skn, svn, smm, smn, Sq, Sk, D,
                      window, qk_scale2, cap_x, cap2, CAUSAL, WINDOW, SOFTCAP, MASK_KIND, True, UPCAST, IEEE,
                      LIBDEVICE, EVEN_D, BLOCK_N)
        dq = _dq_loop(dq, q, do, lse2, delta, Kb, Vb, Mb, offs_m, offs_d, f_lo, f_hi, skn, svn, smm, smn, Sq, Sk, D,
                      window, qk_scale2, cap_x, cap2, CAUSAL, WINDOW, SOFTCAP, MASK_KIND, False, UPCAST, IEEE,
                      LIBDEVICE, EVEN_D, BLOCK_N)
        dq = _dq_loop(dq, q, do, lse2, delta, Kb, Vb, Mb, offs_m, offs_d, f_hi, hi, skn, svn, smm, smn, Sq, Sk, D,
                      window, qk_scale2, cap_x, cap2, CAUSAL, WINDOW, SOFTCAP, MASK_KIND, True, UPCAST, IEEE,
                      LIBDEVICE, EVEN_D, BLOCK_N)
        tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :],
                 (dq * scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def dq_mode() -> str:
    """'atomic': the dk/dv kernel also adds dS k into an fp32 dq buffer (FA2; 5 GEMMs, dq not bitwise
    deterministic); 'separate': a dq kernel recomputes p and dp (7 GEMMs, deterministic). FXOPT_ATTN_DQ picks."""
    mode = os.environ.get("FXOPT_ATTN_DQ", DQ_MODE)
    if mode not in ("atomic", "separate"):
        raise ValueError(f"FXOPT_ATTN_DQ={mode!r}: use 'atomic' or 'separate'")
    return mode


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _grad_like(t):
    """Empty gradient with t's layout when t is dense (transposed HF projections stay transposed), else contiguous."""
    return torch.empty_like(t) if t.stride(-1) == 1 else torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _bwd_triton(do, q, k, v, out, lse, mask, scale, causal, window, softcap):
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    do, q, k, v, out = (_unit_last(t) for t in (do, q, k, v, out))
    dq, dk, dv = _grad_like(q), _grad_like(k), _grad_like(v)
    fl = kernel_flags(q, D, causal, window, softcap)
    d_pad = fl["D_PAD"]
    delta = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    bm = 16 if d_pad >= 256 else 64
    fast_launch(_attn_bwd_delta, (triton.cdiv(Sq, bm), B * H), out, do, delta, *out.stride()[:3], *do.stride()[:3], H,
                Sq, D, D_PAD=d_pad, BLOCK_M=bm, num_warps=4)
    m, kind, ms = mask_args(mask, B, H, Sq, Sk, q)
    ds, de = doc_bounds(mask, kind, B, Sq, delta)
    scal = cap_scalars(scale, softcap)
    common = (H, H // Hkv, Sq, Sk, D, int(window), float(scale), *scal)
    key = (d_pad, next_pow2(Sq), next_pow2(Sk), H // Hkv, kind, fl["CAUSAL"], fl["WINDOW"], fl["SOFTCAP"], q.dtype)

    atomic = dq_mode() == "atomic"
    dq_acc = torch.empty((B, H, Sq, d_pad), dtype=torch.float32, device=q.device) if atomic else delta

    def launch_dkdv(cfg):
        bm, bn, warps, stages = cfg
        if atomic:
            dq_acc.zero_()
        fast_launch(_attn_bwd_dkdv, (triton.cdiv(Sk, bn), B * Hkv), q, k, v, do, lse, delta, dk, dv, m, ds, de, dq_acc,
                    *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3],
                    *dv.stride()[:3], *ms, *common, MASK_KIND=kind, DQ_ATOMIC=atomic, BLOCK_M=bm, BLOCK_N=bn,
                    num_warps=warps, num_stages=stages, **fl)

    def launch_dq(cfg):
        bm, bn, warps, stages = cfg
        fast_launch(_attn_bwd_dq, (triton.cdiv(Sq, bm), B * H), q, k, v, do, lse, delta, dq, m, ds, de, *q.stride()[:3],
                    *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3], *ms, *common, MASK_KIND=kind,
                    BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **fl)

    launch_tuned("dkdv", key + (atomic,), launch_dkdv, d_pad, tune=not fl["IEEE"])
    if atomic:
        dq.copy_(dq_acc[..., :D].mul_(scale))
    else:
        launch_tuned("dq", key, launch_dq, d_pad, tune=not fl["IEEE"])
    return dq, dk, dv


# ---- PyTorch reference (fp32 math, explicit formulas) ----

def attention_backward_reference(do, q, k, v, out, lse, mask, scale, causal, window, softcap):
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    g = H // Hkv
    s, t = reference_logits(q, k, mask, scale, causal, window, softcap)
    p = torch.exp(s - safe_lse(lse.float()).unsqueeze(-1))
    dof = do.float()
    kf = k.float().repeat_interleave(g, dim=1)
    vf = v.float().repeat_interleave(g, dim=1)
    dp = torch.matmul(dof, vf.transpose(-1, -2))
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    if t is not None:
        ds = ds * (1 - t * t)
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.float()).view(B, Hkv, g, Sk, D).sum(2) * scale
    dv = torch.matmul(p.transpose(-1, -2), dof).view(B, Hkv, g, Sk, D).sum(2)
    res = []
    for grad, like in ((dq, q), (dk, k), (dv, v)):
        o = _grad_like(like)
        o.copy_(grad)
        res.append(o)
    return tuple(res)


@torch.library.custom_op("fxopt::attention_backward", mutates_args=())
def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, mask: Optional[torch.Tensor], scale: float, causal: bool, window: int,
                       softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv) in the layouts of q, k, v (dk, dv summed over each kv head's group of q heads)."""
    ref = lambda: (RUNS.update(["reference_backward"]),
                   attention_backward_reference(do, q, k, v, out, lse, mask, scale, causal, window, softcap))[1]
    if q.numel() == 0 or k.shape[2] == 0:
        return tuple(torch.zeros_like(_grad_like(t)) for t in (q, k, v))
    if use_triton(do, q, k, v, mask):
        def kernel():
            r = _bwd_triton(do, q, k, v, out, lse, mask, scale, causal, window, softcap)
            RUNS.update(["triton_backward"])
            return r
        dq, dk, dv = run_kernel("attention_backward", kernel, ref)
    else:
        dq, dk, dv = ref()
    dead = empty_rows(mask, lse)
    if dead is not None:   # additive mask: the rows with no allowed key were eager's uniform average (forward)
        uniform_rows_backward(do, q, k, v, dead, scale, softcap, dq, dk, dv, capturing())
    return dq, dk, dv


@attention_backward.register_fake
def _(do, q, k, v, out, lse, mask, scale, causal, window, softcap):
    return _grad_like(q), _grad_like(k), _grad_like(v)
