"""Per-shape dispatch between fxopt's attention kernel and PyTorch's own SDPA, decided by measurement.

Measured on the H200 (benchmarks/results/attention_h200_first_run.json): fxopt's flash kernel runs causal GQA
fwd+bwd at 0.74x SDPA's throughput at seq 2048 and 0.69x at 8192. So when the graph already holds a mask-free
`scaled_dot_product_attention` on a CUDA device, the first compile of each shape times both, fwd+bwd, on random
inputs of that shape with batch 1 (time scales with the batch; batch 1 keeps the probe's memory small), and keeps
SDPA when it is faster: the report lists it under `rejected` with both times, so the report says which kernel runs.
fxopt's kernel is kept where SDPA has no equivalent: soft-capping, sliding windows, packed document ids, masks,
eager attention (those are never SDPA nodes without a mask here).
fp32 on CUDA keeps SDPA without measuring (the kernel's fp32 build compiles for minutes). Where SDPA is kept and the
graph repeats k/v (HF's repeat_kv), the probe also times SDPA's own GQA (`enable_gqa`, no repeat) and uses it when
it is no slower: no repeat copies, k/v saved un-repeated.
`FXOPT_ATTN_SDPA`: `auto` (default: measure), `never` (always fxopt's kernel), `always` (keep every eligible SDPA).
"""
from __future__ import annotations

import os

import torch

MARGIN = 0.97            # keep SDPA only when it takes < 97% of fxopt's time (ties go to fxopt: no repeat_kv copy)
_TIMES: dict = {}        # key -> (fxopt ms, sdpa ms, sdpa with enable_gqa and no repeat ms)
# In a kept-SDPA reason: the repeat_kv copies are dropped, SDPA runs with enable_gqa on the un-repeated k/v (no
# repeat copies; k/v saved un-repeated for backward: 48 MiB a layer less at the 1B LoRA shape)
GQA_NOTE = "; k/v not repeated"


def mode() -> str:
    m = os.environ.get("FXOPT_ATTN_SDPA", "auto") or "auto"
    if m not in ("auto", "never", "always"):
        raise ValueError(f"FXOPT_ATTN_SDPA must be 'auto', 'never' or 'always', not {m!r}")
    return m


def _measure(qs, ks, dtype, device, causal, scale, repeated):
    """(fxopt ms, sdpa ms, sdpa-gqa ms) of fwd+bwd at batch 1 on real tensors (outside any fake mode). sdpa-gqa:
    SDPA with enable_gqa on the un-repeated k/v (inf where the graph has no repeat, or it fails)."""
    from triton.testing import do_bench
    try:
        from torch._subclasses.fake_tensor import unset_fake_temporarily
    except ImportError:  # pragma: no cover
        import contextlib
        unset_fake_temporarily = contextlib.nullcontext
    with unset_fake_temporarily(), torch.enable_grad():
        _, H, S, D = qs
        Hkv, Sk = ks[1], ks[2]
        g = torch.Generator(device=device).manual_seed(0)   # a private generator: the user's RNG state is untouched
        rnd = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, generator=g)
        q = rnd(1, S, H, D).transpose(1, 2).requires_grad_()
        k = rnd(1, Sk, Hkv, D).transpose(1, 2).requires_grad_()
        v = rnd(1, Sk, Hkv, D).transpose(1, 2).requires_grad_()
        do = rnd(1, H, S, D)

        def ours():
            out, _ = torch.ops.fxopt.attention(q, k, v, None, scale, causal, 0, 0.0)
            torch.autograd.grad(out, (q, k, v), do)

        def sdpa():
            if repeated and H != Hkv:   # the graph's repeat_kv (expand + reshape: a copy) is part of its cost
                kk, vv = (t.repeat_interleave(H // Hkv, dim=1) for t in (k, v))
                out = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=causal, scale=scale)
            else:
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                                       enable_gqa=H != Hkv)
            torch.autograd.grad(out, (q, k, v), do)

        def sdpa_gqa():
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                                   enable_gqa=True)
            torch.autograd.grad(out, (q, k, v), do)
        t_gqa = float("inf")
        if repeated and H != Hkv:
            try:
                t_gqa = do_bench(sdpa_gqa, warmup=5, rep=25)
            except Exception:  # noqa: BLE001 - a backend without GQA: keep the repeat
                pass
        return do_bench(ours, warmup=5, rep=25), do_bench(sdpa, warmup=5, rep=25), t_gqa


def keep_sdpa(qs, ks, dtype, device, causal, scale, repeated) -> str | None:
    """A reason to keep the graph's SDPA node (SDPA measured faster, or forced), else None (use fxopt's kernel)."""
    m = mode()
    if m == "never" or torch.device(device).type != "cuda" or not all(isinstance(s, int) for s in (*qs, *ks)):
        return None
    if m == "always":
        return "kept SDPA (FXOPT_ATTN_SDPA=always)"
    if dtype == torch.float32:   # an fp32 fine-tune test on the H200: one fp32 build of the forward kernel (IEEE
        # dots, 128x64 tiles, head dim 64) was still in ptxas after 100 s
        return ("kept SDPA: fp32 on CUDA (fxopt's attention kernel is built for bf16/fp16; its fp32 build compiles "
                "for minutes); FXOPT_ATTN_SDPA=never forces fxopt's kernel")
    key = (tuple(qs[1:]), tuple(ks[1:]), dtype, str(device), bool(causal), float(scale), bool(repeated))
    if key not in _TIMES:
        try:
            _TIMES[key] = _measure(qs, ks, dtype, device, causal, scale, repeated)
        except Exception:  # noqa: BLE001 - a probe that fails (memory, compile) decides nothing: fxopt's kernel
            _TIMES[key] = (0.0, float("inf"), float("inf"))
    t_fx, t_sdpa, t_gqa = _TIMES[key]
    if t_sdpa < MARGIN * t_fx:
        why = (f"kept SDPA: measured faster at this shape (fwd+bwd, batch 1: SDPA {t_sdpa:.3f} ms, fxopt "
               f"{t_fx:.3f} ms); FXOPT_ATTN_SDPA=never forces fxopt's kernel")
        if repeated and t_gqa <= t_sdpa:   # SDPA GQA no slower than repeat + SDPA: the pattern drops the repeat
            why += f"{GQA_NOTE} (enable_gqa: {t_gqa:.3f} ms, with the repeat {t_sdpa:.3f} ms)"
        return why
    return None
