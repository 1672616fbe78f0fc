"""LoRA backward's two products of dy in one pass over dy (peft's fp32 adapters over a half-precision base):

    dxa = s * dy B      [M, r]   (a reduction over N)
    dB  = s * dy^T xa   [N, r]   (a reduction over M)

dy [M, N] half is the largest tensor the rank-r products read (117 MB at the 8B step's 4096 x 14336). Two skinny
GEMMs read it twice; here each program loads a [BM, BN] tile of dy once and feeds both dots. Each reduction still
needs partial sums across programs: dxa over the programs that split N ([split, M, r] fp32), dB over the row blocks
([M / BM, N, r] fp32; with BM = 256 that is 1/8 of dy's bytes at r = 16). Both are summed in order by
split_reduce.sum_splits, so the result is deterministic. The fp32 operands (B, xa) enter the tensor-core dots as
hi + lo half values (two dots each, as lora's skinny kernel): ~2^-17 relative accuracy without an fp32 copy of dy.
"""
from __future__ import annotations

from typing import Optional

import torch

from fxopt.kernels.launch import fast_launch
from fxopt.kernels.split_reduce import split_grid, sum_splits
from fxopt.kernels.registry import next_pow2, num_sms, triton_available

if triton_available():
    import triton
    import triton.language as tl

    from fxopt.kernels.split_reduce import _dot_pair, _lowp

    @triton.jit
    def _dy_pass_kernel(DY, BW, XA, DXA_P, DB_P, M, N, RANK, scale, s_dm, s_dn, s_bn, s_br, s_xm, s_xr,
                        s_ps, s_pm, s_qb, s_qn, HALF: tl.constexpr, INTERP: tl.constexpr, BM: tl.constexpr,
                        BN: tl.constexpr, RB: tl.constexpr):
        """Program (i, j): rows i*BM.. of dy, its j-th share of the columns. DXA_P[j, rows, :r] = scale * the
        share's dy @ B; DB_P[i, cols, :r] = scale * dy[rows, cols]^T @ xa[rows] for each column tile of the share.
        DXA_P is [split, M, r] with strides (s_ps, s_pm, 1); DB_P is [M / BM, N, r] with strides (s_qb, s_qn, 1).
        dB's tile is computed as (xa^T dy)^T: the transpose on the xa tile, once per program. (dy^T xa, a transpose
        of every dy tile, was slower in the H200 sweep and was removed: lora_dy_sweep_h200*.json, configs with a
        leading 0.)"""
        pid_m = tl.program_id(0)
        pid_s = tl.program_id(1)
        per = tl.cdiv(tl.cdiv(N, tl.num_programs(1)), BN) * BN
        m = pid_m * BM + tl.arange(0, BM)
        r = tl.arange(0, RB)
        m_ok = m < M
        r_ok = r < RANK
        m64 = m.to(tl.int64)
        xa = tl.load(XA + m64[:, None] * s_xm + r[None, :] * s_xr, mask=m_ok[:, None] & r_ok[None, :],
                     other=0.0).to(tl.float32)
        xa_hi = _lowp(xa, HALF, INTERP)
        xa_lo = _lowp(xa - xa_hi.to(tl.float32), HALF, INTERP)
        xa_hi_t = tl.trans(xa_hi)
        xa_lo_t = tl.trans(xa_lo)
        acc = tl.zeros((BM, RB), dtype=tl.float32)
        for n0 in range(pid_s * per, tl.minimum(N, pid_s * per + per), BN):
            n = n0 + tl.arange(0, BN)
            n_ok = n < N
            n64 = n.to(tl.int64)
            d = tl.load(DY + m64[:, None] * s_dm + n64[None, :] * s_dn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            b = tl.load(BW + n64[:, None] * s_bn + r[None, :] * s_br, mask=n_ok[:, None] & r_ok[None, :],
                        other=0.0).to(tl.float32)
            b_hi = _lowp(b, HALF, INTERP)
            b_lo = _lowp(b - b_hi.to(tl.float32), HALF, INTERP)
            if INTERP:
                d = d.to(tl.float32)
            acc = _dot_pair(d, b_hi, d, b_lo, acc, INTERP)
            dbt = _dot_pair(xa_hi_t, d, xa_lo_t, d, tl.zeros((RB, BN), dtype=tl.float32), INTERP)   # [RB, BN]
            tl.store(DB_P + pid_m * s_qb + n64[None, :] * s_qn + r[:, None], dbt * scale,
                     mask=n_ok[None, :] & r_ok[:, None])
        tl.store(DXA_P + pid_s * s_ps + m64[:, None] * s_pm + r[None, :], acc * scale,
                 mask=m_ok[:, None] & r_ok[None, :])


def dy_pass_reference(dy: torch.Tensor, lora_b: torch.Tensor, xa: torch.Tensor, scale: float):
    """(s * dy B, s * dy^T xa) in fp32."""
    d = dy.float()
    return (d @ lora_b.float()) * scale, (d.t() @ xa.float()) * scale


def _block_rows(rb: int) -> int:
    """Rows per program: fewer for a wide rank (the [BM, r] fp32 accumulator and the xa tile live in registers)."""
    return 256 if rb <= 16 else (128 if rb <= 64 else 64)


def dy_pass_workspace(m: int, n: int, rank: int, sms: Optional[int] = None) -> int:
    """Bytes dy_pass holds beyond what it returns, at its default config: the fp32 partials of dxa [split, m, r]
    and of dB [m / BM, n, r] (8B step, N 14336: 4.5 + 14.7 MB). sms: the current CUDA device's, else 132 (H100 /
    H200)."""
    if rank <= 0 or m <= 0 or n <= 0:
        return 0
    if sms is None:
        sms = num_sms(torch.device("cuda")) if torch.cuda.is_available() else 132
    n_m, split = split_grid(m, n, _block_rows(max(16, next_pow2(rank))), 64, 0, sms)
    return 4 * rank * (split * m + n_m * n)


def _env_config():
    """FXOPT_LORA_DY_CONFIG="BM,BN,warps,stages,sum BLOCK" (an experiment knob: a config picked by the sweep)."""
    import os
    v = os.environ.get("FXOPT_LORA_DY_CONFIG")
    if not v:
        return None
    try:
        cfg = tuple(int(t) for t in v.split(","))
    except ValueError:
        cfg = ()
    if len(cfg) != 5:
        raise ValueError(f"FXOPT_LORA_DY_CONFIG must be five integers BM,BN,warps,stages,block; got {v!r}")
    return cfg


def dy_pass(dy: torch.Tensor, lora_b: torch.Tensor, xa: torch.Tensor, scale: float,
            low: Optional[torch.dtype] = None, split: int = 0, config: Optional[tuple] = None):
    """(dxa, dxa rounded to `low` or None, dB) for dy [M, N] half (any strides), lora_b [N, r] and xa [M, r] fp32.
    config (a launch-config sweep): (BM, BN, num_warps, num_stages, split-sum BLOCK)."""
    M, N = dy.shape
    rank = lora_b.shape[1]
    rb = max(16, next_pow2(rank))
    interp = dy.device.type != "cuda"
    config = config or _env_config()
    # H200 (stage s18c; "(1, 256, 64, 8, 3, 256)" in the sweep files, whose first field was the removed dB form):
    # this config ran in the 8B step, where the op's tuner chose it over the two skinny kernels at every shape (GPU
    # us per call: 17.3 vs 21.2 at N 1024, 30.0 vs 33.4 at 4096, 69.4 vs 83.5 at 14336)
    bm, bn, warps, stages, sum_block = config or (_block_rows(rb), 64, 8, 3, 256)
    if interp:
        bm, bn, warps = max(16, min(64, next_pow2(M))), max(16, min(64, next_pow2(N))), 4
    n_m, split = split_grid(M, N, bm, bn, split, None if interp else num_sms(dy.device))
    dev = dy.device
    dxa_p = torch.empty((split, M, rank), dtype=torch.float32, device=dev)
    db_p = torch.empty((n_m, N, rank), dtype=torch.float32, device=dev)
    fast_launch(_dy_pass_kernel, (n_m, split), dy, lora_b, xa, dxa_p, db_p, M, N, rank, float(scale), dy.stride(0),
                dy.stride(1), lora_b.stride(0), lora_b.stride(1), xa.stride(0), xa.stride(1), dxa_p.stride(0),
                dxa_p.stride(1), db_p.stride(0), db_p.stride(1), HALF=int(dy.dtype == torch.float16),
                INTERP=interp, BM=bm, BN=bn, RB=rb, num_warps=warps, num_stages=stages)
    dxa, dxa_low = sum_splits(dxa_p, low, sum_block)
    db, _ = sum_splits(db_p, None, sum_block)
    return dxa, dxa_low, db


# The one pass's partials grow with the rows (1/8 of dy's bytes at r 16): 19 MB at the 8B step's 4096 x 14336, but
# 235 MB at 65,536 tokens, where the memory plan is tight and the separate products hold < 1 MB. Above this the
# separate products run.
MAX_WORKSPACE = 64 << 20


def applies(triton_gemm: bool, dy2: torch.Tensor, lora_b: torch.Tensor, xa: torch.Tensor) -> bool:
    """dy_pass's inputs: half dy, fp32 B and xa (peft's fp32 adapters), rank <= 128, nothing empty, and partials of
    at most MAX_WORKSPACE bytes."""
    return (triton_gemm and dy2.dtype in (torch.float16, torch.bfloat16) and lora_b.dtype == torch.float32
            and xa.dtype == torch.float32 and lora_b.shape[1] <= 128 and dy2.shape[0] > 0 and dy2.shape[1] > 0
            and _small_enough(dy2.shape[0], dy2.shape[1], lora_b.shape[1], dy2.device))


def _small_enough(m: int, n: int, rank: int, device=None) -> bool:
    sms = num_sms(device) if device is not None and device.type == "cuda" else None
    return dy_pass_workspace(m, n, rank, sms) <= MAX_WORKSPACE


def products(dy2, lora_b, xa, scale, low):
    """lora._backward's (dxa, dxa in `low` or None, dB) through dy_pass (its rounded copy when `low` is half)."""
    half = low if low in (torch.float16, torch.bfloat16) else None
    dxa, dxa_low, db = dy_pass(dy2, lora_b, xa, scale, low=half)
    return dxa, (dxa_low if half is not None else (dxa.to(low) if low is not None else None)), db


def rank_scratch(m: int, n: int, rank: int, dy_bytes: int = 2) -> int:
    """lora's backward rank-r transients: dxa in fp32 and in half (6 m r bytes) and, while they are made, the one-pass
    dy products' partials when dy is half and they fit MAX_WORKSPACE (the separate products' partials are smaller).
    An upper bound for half adapters, where the one pass does not run (the cost model does not see their dtype)."""
    if not rank:
        return 0
    one_pass = dy_pass_workspace(m, n, rank) if dy_bytes == 2 and _small_enough(m, n, rank) else 0
    return 6 * m * rank + one_pass

