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
