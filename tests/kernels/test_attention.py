"""fxopt::attention (+ backward) vs float64 softmax attention (Triton interpreter on CPU, natively with -m gpu)."""
import math

import pytest
import torch

import fxopt  # noqa: F401
from fxopt.kernels import attention as K
from tests.helpers import rel

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """16x16 blocks under the interpreter so that a tiny sequence spans several blocks (all three loop phases)."""
    monkeypatch.setattr(K, "INTERPRET_CONFIG", (16, 16, 4, 1))


def _err(a, b):
    """rel(a, b) with a floor on |b| (dq is exactly 0 for a single key)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), 0.1 * math.sqrt(b.numel())))


def _truth(q, k, v, mask, scale, causal, window, softcap):
    """float64 eager math (softmax, repeat_interleave for GQA) with autograd for the gradients."""
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    g = q.shape[1] // k.shape[1]
    s = qd @ kd.repeat_interleave(g, 1).transpose(-1, -2) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    Sq, Sk = q.shape[2], k.shape[2]
    i, j = torch.arange(Sq, device=q.device)[:, None], torch.arange(Sk, device=q.device)[None, :]
    ok = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
    if causal:
        ok &= j <= i
    if window:
        ok &= i - j < window
    if mask is not None and not mask.dtype.is_floating_point and mask.dtype != torch.bool:   # document ids [B, S]
        ok = ok & (mask[:, None, :, None] == mask[:, None, None, :])
    elif mask is not None and mask.dtype == torch.bool:
        ok = ok & mask
    elif mask is not None:      # additive, as eager adds it: a finfo.min row is uniform (min absorbs s in fp64 too)
        s = s + mask.double()
    s = s.masked_fill(~ok, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)        # fully masked rows: 0 (the op's convention)
    out = p @ vd.repeat_interleave(g, 1)
    return out, (qd, kd, vd)


def _inputs(B, Hq, Hkv, S, D, dtype, strided=False, Sk=None):
    Sk = Sk or S
    if strided:   # HF layout: [B, S, H, D] projections viewed as [B, H, S, D]
        q = torch.randn(B, S, Hq, D, device=DEV, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, Sk, Hkv, D, device=DEV, dtype=dtype).transpose(1, 2)
        v = torch.randn(B, Sk, Hkv, D, device=DEV, dtype=dtype).transpose(1, 2)
    else:
        q, k, v = (torch.randn(B, h, s, D, device=DEV, dtype=dtype) for h, s in ((Hq, S), (Hkv, Sk), (Hkv, Sk)))
    return tuple(t.requires_grad_() for t in (q, k, v))


CASES = [  # (B, Hq, Hkv, S, D, causal, window, softcap, mask, dtype, strided)
    (2, 4, 2, 40, 16, True, 0, 0.0, None, torch.float32, False),
    (1, 2, 2, 37, 16, False, 0, 0.0, None, torch.float32, True),
    (1, 4, 1, 45, 16, True, 7, 0.0, None, torch.float32, False),
    (1, 2, 1, 33, 16, True, 9, 4.0, None, torch.float32, True),
    (1, 2, 2, 20, 16, False, 0, 3.0, None, torch.float32, False),
    (1, 2, 1, 33, 64, True, 0, 0.0, None, torch.float32, False),
    (1, 2, 1, 21, 80, True, 0, 0.0, None, torch.float32, True),
    (1, 2, 1, 35, 16, False, 0, 0.0, "bool", torch.float32, False),
    (2, 2, 1, 30, 16, True, 0, 0.0, "additive", torch.float32, False),
    (1, 1, 1, 1, 16, True, 0, 0.0, None, torch.float32, False),
    (1, 4, 2, 40, 16, True, 0, 0.0, None, torch.float16, True),
    (1, 2, 1, 36, 80, True, 11, 5.0, "bool", torch.float16, False),
    (3, 4, 2, 45, 16, True, 0, 0.0, "docs", torch.float32, True),      # packed sequences: document ids [B, S]
    (2, 2, 1, 37, 16, True, 9, 3.0, "docs", torch.float16, False),
    (2, 2, 2, 33, 16, False, 0, 0.0, "docs", torch.float32, False),    # bidirectional inside each document
]


def _mask(kind, B, Hq, S, Sk, dtype):
    if kind == "bool":   # [B, 1, S, Sk], every row keeps key 0 -> no fully masked row
        m = torch.rand(B, 1, S, Sk, device=DEV) > 0.4
        m[..., 0] = True
        return m
    if kind == "additive":
        return torch.randn(1, Hq, S, Sk, device=DEV, dtype=dtype)
    if kind == "docs":   # nondecreasing ids as packing makes them (cumsum of document starts), random lengths
        starts = torch.rand(B, S, device=DEV) < 0.15
        starts[:, 0] = True
        return starts.long().cumsum(-1)
    return None


@pytest.mark.parametrize("B,Hq,Hkv,S,D,causal,window,softcap,mask,dtype,strided", CASES)
def test_forward_backward(B, Hq, Hkv, S, D, causal, window, softcap, mask, dtype, strided, no_fallback):
    q, k, v = _inputs(B, Hq, Hkv, S, D, dtype, strided)
    m = _mask(mask, B, Hq, S, S, dtype)
    scale = 1.0 / math.sqrt(D)
    out, lse = torch.ops.fxopt.attention(q, k, v, m, scale, causal, window, softcap)
    ref, leaves = _truth(q, k, v, m, scale, causal, window, softcap)
    assert out.shape == ref.shape and out.dtype == dtype and lse.dtype == torch.float32
    assert out.transpose(1, 2).is_contiguous()   # [B, S, H, D] memory
    assert rel(out, ref) <= TOL[dtype]
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, leaves, dout.double())
    for name, a, b, like in zip("qkv", got, want, (q, k, v)):
        assert a.shape == like.shape and a.dtype == dtype, name
        assert _err(a, b) <= TOL[dtype] * 2, (name, _err(a, b))


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[7], CASES[11], CASES[12]],
                         ids=["gqa", "window-cap", "bool", "fp16", "docs"])
def test_dq_atomic_mode(case, monkeypatch, no_fallback):
    """dq added atomically by the dk/dv kernel (fp32 buffer) instead of the separate dq kernel."""
    monkeypatch.setattr("fxopt.kernels.attention_bwd.DQ_MODE", "atomic")
    test_forward_backward(*case, no_fallback=None)


@pytest.mark.parametrize("additive", [False, True])
def test_fully_masked_rows(additive, no_fallback):
    q, k, v = _inputs(1, 2, 1, 20, 16, torch.float32)
    m = torch.rand(1, 1, 20, 20, device=DEV) > 0.5
    m[0, 0, 3] = False                      # row 3 sees nothing
    m[0, 0, 5, 0] = True
    if additive:                            # HF eager's form: where(allowed, 0, finfo.min)
        m = torch.where(m, 0.0, torch.finfo(torch.float32).min)
    out, lse = torch.ops.fxopt.attention(q, k, v, m, 0.25, False, 0, 0.0)
    assert torch.all(lse[:, :, 3] == float("-inf"))
    empty_row = v.mean(2).expand(1, 2, 16) if additive else 0   # eager's uniform row (additive), SDPA's 0 (bool)
    assert torch.allclose(out[:, :, 3], empty_row, atol=1e-6) if additive else torch.all(out[:, :, 3] == 0)
    ref, leaves = _truth(q, k, v, m, 0.25, False, 0, 0.0)
    assert rel(out, ref) <= 2e-5
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    want = torch.autograd.grad(ref.sum(), leaves)
    assert max(rel(a, b) for a, b in zip(grads, want)) <= 4e-5


@pytest.mark.parametrize("causal,mask", [(False, "bool"), (True, None)])
def test_cross_lengths(causal, mask, no_fallback):
    """Sq != Sk (causal is top-left aligned, j <= i, as SDPA's is_causal)."""
    q, _, _ = _inputs(1, 2, 1, 24, 16, torch.float32)
    _, k, v = _inputs(1, 2, 1, 41, 16, torch.float32)
    m = _mask(mask, 1, 2, 24, 41, torch.float32)
    out, _ = torch.ops.fxopt.attention(q, k, v, m, 0.25, causal, 0, 0.0)
    ref, leaves = _truth(q, k, v, m, 0.25, causal, 0, 0.0)
    assert rel(out, ref) <= 2e-5
    dout = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, leaves, dout.double())):
        assert _err(a, b) <= 4e-5


def test_reference_matches_truth(monkeypatch):
    """The PyTorch reference (CPU without the interpreter) is the same math."""
    monkeypatch.setattr(K, "use_triton", lambda *a: False)
    monkeypatch.setattr("fxopt.kernels.attention_bwd.use_triton", lambda *a: False)
    q, k, v = _inputs(2, 4, 2, 19, 16, torch.float32, strided=True)
    m = _mask("bool", 2, 4, 19, 19, torch.float32)
    out, _ = torch.ops.fxopt.attention(q, k, v, m, 0.3, True, 6, 2.5)
    ref, leaves = _truth(q, k, v, m, 0.3, True, 6, 2.5)
    assert rel(out, ref) <= 1e-6
    dout = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, leaves, dout.double())):
        assert rel(a, b) <= 1e-6


def test_unsorted_document_ids_are_still_exact(no_fallback):
    """Ids that are not nondecreasing (not what packing makes) get no block narrowing, and the same result."""
    q, k, v = _inputs(2, 2, 1, 40, 16, torch.float32)
    docs = torch.randint(0, 3, (2, 40), device=DEV)
    out, _ = torch.ops.fxopt.attention(q, k, v, docs, 0.25, True, 0, 0.0)
    ref, _ = _truth(q, k, v, docs, 0.25, True, 0, 0.0)
    assert rel(out, ref) <= TOL[torch.float32]
    start, end = K.doc_bounds(docs, 3, 2, 40, None)
    assert int(start.max()) == 0 and int(end.min()) == 40


def test_document_bounds():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]], device=DEV)
    start, end = K.doc_bounds(docs, 3, 2, 6, None)
    assert start.tolist() == [[0, 0, 0, 3, 3, 5], [0] * 6]
    assert end.tolist() == [[3, 3, 3, 5, 5, 6], [6] * 6]


def test_opcheck(no_fallback):
    q, k, v = _inputs(1, 2, 1, 20, 16, torch.float32, strided=True)
    m = _mask("bool", 1, 2, 20, 20, torch.float32)
    torch.library.opcheck(torch.ops.fxopt.attention.default, (q, k, v, None, 0.25, True, 5, 0.0))
    torch.library.opcheck(torch.ops.fxopt.attention.default, (q, k, v, m, 0.25, False, 0, 3.0))
    docs = _mask("docs", 1, 2, 20, 20, torch.float32)
    torch.library.opcheck(torch.ops.fxopt.attention.default, (q, k, v, docs, 0.25, True, 0, 0.0))
    out, lse = torch.ops.fxopt.attention(q, k, v, m, 0.25, False, 0, 3.0)
    do = torch.randn_like(out)
    torch.library.opcheck(torch.ops.fxopt.attention_backward.default,
                          (do, q.detach(), k.detach(), v.detach(), out.detach(), lse, m, 0.25, False, 0, 3.0))


GPU_CASES = [  # (D, dtype, causal, window, softcap, mask): every head dim, both half types, every mask kind
    (64, torch.bfloat16, True, 0, 0.0, None),
    (80, torch.bfloat16, True, 300, 30.0, None),
    (96, torch.float16, False, 0, 0.0, "bool"),
    (128, torch.bfloat16, True, 0, 0.0, "additive"),
    (256, torch.bfloat16, True, 300, 50.0, None),
    (128, torch.bfloat16, True, 0, 0.0, "docs"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("D,dtype,causal,window,softcap,mask", GPU_CASES)
def test_gpu_head_dims(D, dtype, causal, window, softcap, mask, no_fallback):
    q, k, v = _inputs(2, 8, 2, 1000, D, dtype, strided=True)
    m = _mask(mask, 2, 8, 1000, 1000, dtype)
    scale = 1.0 / math.sqrt(D)
    out, _ = torch.ops.fxopt.attention(q, k, v, m, scale, causal, window, softcap)
    ref, leaves = _truth(q, k, v, m, scale, causal, window, softcap)
    assert rel(out, ref) <= TOL[dtype]
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, leaves, dout.double())
    for name, a, b in zip("qkv", got, want):
        assert _err(a, b) <= 2 * TOL[dtype], (name, _err(a, b))


@pytest.mark.parametrize("softcap", [0.0, 5.0])
@pytest.mark.parametrize("triton_path", [False, True])
def test_additive_mask_rows_with_no_key_follow_eager(softcap, triton_path, monkeypatch):
    """Left padding under an additive finfo.min mask (HF eager): a row that sees no key is softmax of equal logits,
    the mean of V, with gradients through s + min. The op matches eager there, kernel and reference, with and
    without a cap (two backward paths: D x D sums without a cap, dense rows with one; with a cap the masked all-rows
    path taken while a CUDA graph records equals the gathered one)."""
    from fxopt.kernels import attention_masks as AM
    monkeypatch.setenv("TRITON_INTERPRET", "1" if triton_path else "0")
    B, H, Hkv, S, D, scale = 2, 4, 2, 9, 8, 0.3
    q, k, v = torch.randn(B, H, S, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[1, :4] = False
    allowed = torch.tril(torch.ones(S, S, dtype=torch.bool))[None, None] & keep[:, None, None, :]
    mask = torch.zeros(B, 1, S, S).masked_fill(~allowed, torch.finfo(torch.float32).min)

    def eager(q, k, v):
        s = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * scale
        s = softcap * torch.tanh(s / softcap) if softcap else s
        return torch.softmax(s + mask, -1) @ v.repeat_interleave(2, 1)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = eager(*leaves)
    g = torch.randn_like(ref)
    ref.backward(g)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = torch.ops.fxopt.attention(*ours, mask, scale, False, 0, softcap)
    out.backward(g)
    dead = lse == float("-inf")
    assert dead[1, :, :4].all() and dead.sum() == H * 4
    assert torch.allclose(out[1, :, :4], v[1].mean(1, keepdim=True).repeat_interleave(2, 0).expand(H, 4, D), atol=1e-6)
    assert torch.allclose(out, ref, atol=1e-5)
    for a, b in zip(ours, leaves):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), (a.grad - b.grad).abs().max()
    if softcap:   # the dense path (a cap): gathered dead rows == all rows masked (the CUDA-graph capture path)
        paths = []
        for capturing in (False, True):
            grads = [torch.zeros_like(t) for t in (q, k, v)]
            AM.uniform_rows_backward(g, q, k, v, dead, scale, softcap, *grads, capturing)
            paths.append(grads)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*paths)) and paths[0][0].abs().sum() > 0
    else:         # the D x D path leaves the rows that see a key alone
        grads = [torch.zeros_like(t) for t in (q, k, v)]
        AM.uniform_rows_backward(g, q, k, v, dead, scale, 0.0, *grads, False)
        assert grads[0][~dead].abs().max() == 0 and grads[0][dead].abs().sum() > 0


@pytest.mark.gpu
def test_gpu_dense_mask_past_int32_offsets(no_fallback):
    """A dense [S, S] bool mask at S = 65536 (2^32 elements: HF's causal mask at that length is read as a tensor) -
    row x stride passed 2^31 and the kernel read out of bounds (illegal memory access in the H200 max-seq search).
    Forward and backward against SDPA's own causal attention."""
    S, D = 65536, 64
    q, k, v = (torch.randn(1, 2, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = torch.ones(S, S, dtype=torch.bool, device="cuda").tril_()[None, None]
    out, _ = torch.ops.fxopt.attention(q, k, v, mask, D ** -0.5, False, 0, 0.0)
    del mask
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    assert rel(out, ref) <= TOL[torch.bfloat16]
    for name, a, b in zip("qkv", got, want):
        assert rel(a, b) <= 2 * TOL[torch.bfloat16], name
