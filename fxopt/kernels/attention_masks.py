"""The masks the attention kernels take, in one place: how each kind is passed to the kernels (`mask_args`,
`doc_bounds`) and what it allows (`allowed_mask`, `doc_allowed`, used by the references and the pattern).

Kinds: none; bool [.., Sq, Sk] (True = attend); additive float (values <= MASKED_BELOW mask); integer document ids
[B, S] (packed sequences: q attends k only when doc[q] == doc[k]).
"""
from __future__ import annotations

import torch

MASKED_BELOW = -1.0e4           # additive mask values at or below this are -inf (finfo.min of fp32/bf16/fp16 masks)


def allowed_mask(Sq, Sk, causal, window, mask, device):
    """Bool [.., Sq, Sk] of the positions that may be attended (None: all), from the flags and a bool mask."""
    allowed = None
    if causal or window > 0:
        i = torch.arange(Sq, device=device)[:, None]
        j = torch.arange(Sk, device=device)[None, :]
        allowed = torch.ones(Sq, Sk, dtype=torch.bool, device=device)
        if causal:
            allowed = allowed & (j <= i)
        if window > 0:
            allowed = allowed & (i - j < window)
    if mask is not None and mask.dtype == torch.bool:
        allowed = mask if allowed is None else allowed & mask
    return allowed


def is_doc_ids(mask) -> bool:
    """An integer mask is document ids [B, S] (packed sequences): q attends k only when doc[q] == doc[k]."""
    return mask is not None and not mask.dtype.is_floating_point and mask.dtype != torch.bool


def doc_allowed(doc: torch.Tensor) -> torch.Tensor:
    """Bool [B, 1, S, S] of document ids [B, S]."""
    return doc[:, None, :, None] == doc[:, None, None, :]


def doc_bounds(mask, kind, B, S, dummy):
    """(start, end) int32 [B, S]: the index range of each token's document (kind 3), else (dummy, dummy).
    Rows whose ids are not nondecreasing (packing makes them so) get [0, S): no narrowing, still exact; decided on
    the device, no host sync."""
    if kind != 3:
        return dummy, dummy
    d = mask.expand(B, S).contiguous()
    sorted_rows = (d[:, 1:] >= d[:, :-1]).all(dim=1, keepdim=True)
    start = torch.where(sorted_rows, torch.searchsorted(d, d, right=False), 0)
    end = torch.where(sorted_rows, torch.searchsorted(d, d, right=True), S)
    return start.to(torch.int32), end.to(torch.int32)


def mask_args(mask, B, H, Sq, Sk, dummy):
    """(tensor, kind, strides): kind 0 none, 1 bool (uint8 view), 2 additive, 3 document ids [B, S] (strides: batch,
    -, position, -); broadcast dims get stride 0."""
    if mask is None:
        return dummy, 0, (0, 0, 0, 0)
    if is_doc_ids(mask):
        m = mask.expand(B, Sq)
        return m, 3, (m.stride(0), 0, m.stride(1), 0)
    m = mask.expand(B, H, Sq, Sk)
    if m.dtype == torch.bool:
        return m.view(torch.uint8), 1, m.stride()
    return m, 2, m.stride()


# ---- rows that see no key under an additive mask (eager attention with left padding) ----
# HF's eager attention adds finfo.min: for a query row where every key is masked, s + min rounds to min for every
# key, so softmax is uniform and the row's output is the mean of V over all Sk keys (a garbage value, but it enters
# the loss: with left padding the last pad position predicts the first real token). The kernels give such a row 0
# (lse -inf), as SDPA does with a bool mask. For additive masks the op follows eager instead:
#   forward   out_i = vbar = mean_j v_j
#   backward  (through s + min, d/ds = 1; with a cap times 1 - t^2):  P = 1/Sk,  dP_ij = dO_i . v_j,
#             dS_ij = (dP_ij - dO_i . vbar) / Sk,  dq_i = scale sum_j dS_ij k_j,  dk_j += scale sum_i dS_ij q_i,
#             dv_j += sum_i dO_i / Sk
# Exact for masks whose masked values absorb the logits (fp32/bf16 finfo.min); fp16's -65504 does not quite.

def empty_rows(mask, lse):
    """Bool [B, H, Sq] of the rows with no allowed key under an additive float mask, else None."""
    if mask is None or not mask.dtype.is_floating_point:
        return None
    return lse == float("-inf")


def uniform_rows_forward(out, v, dead):
    """out (in place) = mean of V over all keys on the dead rows."""
    g = out.shape[1] // v.shape[1]
    vbar = v.float().mean(2, keepdim=True).repeat_interleave(g, dim=1)     # [B, H, 1, D]
    out.copy_(torch.where(dead[..., None], vbar.to(out.dtype), out))


def uniform_rows_backward(do, q, k, v, dead, scale, softcap, dq, dk, dv, capturing):
    """Adds the dead rows' gradients (formulas above) to dq, dk, dv in place. Without a cap the sums factor through
    D x D matrices (no host sync, O(S D^2)); with a cap each (row, key) has its own 1 - t^2, so the dead rows are
    found (one host sync; nothing more when there are none) and computed densely; while a CUDA graph is recorded,
    every row is (masked, no sync)."""
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    g = H // Hkv
    dof = do.float() * dead.float()[..., None]                              # only dead rows contribute
    vbar = v.float().mean(2)                                                # [B, Hkv, D]
    dv += (dof.sum(2).view(B, Hkv, g, D).sum(2) / Sk)[:, :, None, :].to(dv.dtype)
    if softcap > 0:
        if capturing or bool(dead.any()):
            _dense_rows_backward(dof, q, k, v, dead, vbar, scale, softcap, dq, dk, capturing)
        return
    # dq_i = scale/Sk dO_i (V^T K) - scale (dO_i . vbar) kbar;  dk_j += scale/Sk (v_j A - c),
    # A = sum_i dO_i^T q_i,  c = sum_i (dO_i . vbar) q_i   (sums over the dead rows of the kv head's q heads)
    qf, kf, vf = q.float(), k.float(), v.float()
    rep = lambda t: t.repeat_interleave(g, dim=1)
    vk = torch.einsum("bksd,bkse->bkde", vf, kf)                          # [B, Hkv, D, D]
    dd = torch.einsum("bhsd,bhd->bhs", dof, rep(vbar))                    # dO_i . vbar
    dq += (scale / Sk * torch.einsum("bhsd,bhde->bhse", dof, rep(vk))
           - scale * dd[..., None] * rep(kf.mean(2))[:, :, None, :]).to(dq.dtype)
    a = torch.einsum("bhsd,bhse->bhde", dof, qf).view(B, Hkv, g, D, D).sum(2)
    c = torch.einsum("bhs,bhse->bhe", dd, qf).view(B, Hkv, g, D).sum(2)
    dk += (scale / Sk * (torch.einsum("bksd,bkde->bkse", vf, a) - c[:, :, None, :])).to(dk.dtype)


def _dense_rows_backward(dof, q, k, v, dead, vbar, scale, softcap, dq, dk, capturing):
    """dq, dk of the dead rows with a cap, per (batch, kv head): the rows gathered (or all, masked, in a capture)."""
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    g = H // Hkv
    for b in range(B):
        for kv in range(Hkv):
            hs = slice(kv * g, (kv + 1) * g)
            rows = None if capturing else dead[b, hs].any(0).nonzero().flatten()
            if rows is not None and rows.numel() == 0:
                continue
            pick = (lambda t: t) if rows is None else (lambda t: t.index_select(-2, rows))
            qf, dob = pick(q[b, hs].float()), pick(dof[b, hs])              # [g, R, D]
            kf, vf = k[b, kv].float(), v[b, kv].float()                     # [Sk, D]
            ds = (dob @ vf.T - (dob @ vbar[b, kv])[..., None]) / Sk        # [g, R, Sk]; 0 on live rows
            t = torch.tanh(scale * (qf @ kf.T) / softcap)
            ds = ds * (1 - t * t)
            dqr = (scale * ds @ kf).to(dq.dtype)
            if rows is None:
                dq[b, hs] += dqr
            else:
                dq[b, hs] = dq[b, hs].index_add(-2, rows, dqr)
            dk[b, kv] += (scale * (ds.transpose(-1, -2) @ qf).sum(0)).to(dk.dtype)
