"""attention pattern: SDPA and eager spellings that must match (outputs and grads exact in fp32), the masks recognized
as causal / sliding window (no mask read), masks passed as tensors, near-misses rejected with their reason."""
import logging
import math

import pytest
import torch
import torch.nn.functional as F

import fxopt
from tests.helpers import rel

B, HQ, HKV, S, D = 2, 4, 2, 20, 16
OPTS = {"inductor": False, "patterns": ["attention"], "strict": True}


def _qkv(seed=0, hkv=HKV):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, HQ, D, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(B, S, hkv, D, generator=g).transpose(1, 2).requires_grad_()
    v = torch.randn(B, S, hkv, D, generator=g).transpose(1, 2).requires_grad_()
    return q, k, v


def repeat_kv(x, n):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def causal_bool(window=0):
    i = torch.arange(S)[:, None]
    j = torch.arange(S)[None, :]
    m = j <= i
    if window:
        m = m & (j > i - window)
    return m[None, None].expand(B, 1, S, S)


def _run(fn, *args, caplog=None):
    """(compiled outputs, eager outputs, grads rel diff, report, log text)."""
    torch._dynamo.reset()
    ins = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
    caplog.set_level(logging.INFO, logger="fxopt.patterns.attention")
    caplog.clear()
    out = torch.compile(fn, backend="fxopt", options=OPTS)(*ins)
    ref = fn(*args)
    g = torch.randn_like(ref)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    cleaves = [a for a in ins if isinstance(a, torch.Tensor) and a.requires_grad]
    want = torch.autograd.grad(ref, leaves, g)
    got = torch.autograd.grad(out, cleaves, g)
    worst = max([rel(out, ref)] + [rel(a, b) for a, b in zip(got, want)])
    return worst, fxopt.last_report(), caplog.text


def sdpa_causal_gqa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def sdpa_repeat_mask(q, k, v):
    i = torch.arange(S)
    mask = (i[None, :] <= i[:, None])[None, None].expand(B, -1, S, S)
    return F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=mask, scale=0.3)


def sdpa_window(q, k, v):
    i = torch.arange(S)
    d = i[:, None] - i[None, :]
    mask = (d >= 0) & (d < 6)
    return F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=mask)


def eager_masked_fill(q, k, v):
    s = torch.matmul(q, repeat_kv(k, 2).transpose(2, 3)) / math.sqrt(D)
    cm = torch.triu(torch.ones(S, S, dtype=torch.bool), diagonal=1)
    s = s.masked_fill(cm, float("-inf"))
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    p = F.dropout(p, p=0.0, training=True)
    return torch.matmul(p, repeat_kv(v, 2))


def eager_softcap_additive(q, k, v):
    """Gemma2 style: scale, soft-cap, additive -min window mask, softmax in fp32."""
    s = torch.matmul(q * 0.5, repeat_kv(k, 2).transpose(2, 3)) * (0.5 / math.sqrt(D))
    s = torch.tanh(s / 20.0) * 20.0
    i = torch.arange(S)
    d = i[:, None] - i[None, :]
    allowed = (d >= 0) & (d < 8)
    mask = torch.where(allowed, torch.zeros(()), torch.finfo(torch.float32).min)
    p = torch.softmax(s + mask, dim=-1)
    return torch.matmul(p, repeat_kv(v, 2))


def eager_padding(q, k, v, pad):
    """HF eager: additive where(causal & key padding, 0, min): depends on an input -> read, with the causal flag."""
    i = torch.arange(S)
    allowed = (i[None, :] <= i[:, None])[None, None] & pad[:, None, None, :]
    mask = torch.where(allowed, torch.zeros(()), torch.finfo(torch.float32).min)
    s = torch.matmul(q, repeat_kv(k, 2).transpose(-1, -2)) * D ** -0.5 + mask
    return torch.matmul(s.softmax(-1), repeat_kv(v, 2))


def sdpa_padding(q, k, v, pad):
    """HF sdpa: bool causal & key padding -> read, and the constant causal conjunct still skips blocks."""
    i = torch.arange(S)
    allowed = (i[None, :] <= i[:, None])[None, None] & pad[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.expand(B, 1, S, S), enable_gqa=True)


def sdpa_alibi(q, k, v):
    i = torch.arange(S)
    bias = -(i[:, None] - i[None, :]).abs().float() * torch.linspace(0.1, 0.8, HQ)[:, None, None]
    return F.scaled_dot_product_attention(q, repeat_kv(k, 2), repeat_kv(v, 2), attn_mask=bias[None])


@pytest.mark.parametrize("fn,expect", [
    (sdpa_causal_gqa, "causal=True window=0 softcap=0.0 mask=none"),
    (sdpa_repeat_mask, "causal=True window=0 softcap=0.0 mask=none"),
    (sdpa_window, "causal=True window=6 softcap=0.0 mask=none"),
    (eager_masked_fill, "causal=True window=0 softcap=0.0 mask=none"),
    (eager_softcap_additive, "causal=True window=8 softcap=20.0 mask=none"),
    (sdpa_alibi, "mask=tensor"),
])
def test_matches_and_is_exact(fn, expect, caplog, no_fallback):
    worst, rep, text = _run(fn, *_qkv(), caplog=caplog)
    assert rep.matched["attention"] == 1, rep.rejected
    assert expect in text, text
    assert worst <= 1e-5


@pytest.mark.parametrize("fn", [eager_padding, sdpa_padding])
def test_padding_mask_is_read_with_causal_skip(fn, caplog, no_fallback):
    pad = torch.ones(B, S, dtype=torch.bool)
    pad[1, :5] = False           # left padding of sample 1: its first 5 query rows see no key
    pad[0, -3:] = False
    worst, rep, text = _run(lambda q, k, v: fn(q, k, v, pad)[:, :, 5:], *_qkv(1), caplog=caplog)
    assert rep.matched["attention"] == 1 and "causal=True window=0 softcap=0.0 mask=tensor" in text, text
    assert worst <= 1e-5         # rows that see no key: 0 here and in SDPA, eager's uniform average (not compared)


def test_scale_default_and_no_gqa(caplog, no_fallback):
    q, k, v = _qkv(2, hkv=HQ)
    worst, rep, _ = _run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), q, k, v, caplog=caplog)
    assert rep.matched["attention"] == 1 and worst <= 1e-5


def test_dynamic_shapes(no_fallback):
    """Symbolic batch/sequence/heads (dynamic=True): matched with the flags of is_causal; HF's scale is explicit
    (a default scale with a symbolic head dim is rejected)."""
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    torch._dynamo.reset()
    cf = torch.compile(fn, backend="fxopt", options=OPTS, dynamic=True)
    for s in (S, S + 13):
        q, k, v = torch.randn(1, HQ, s, D), torch.randn(1, HKV, s, D), torch.randn(1, HKV, s, D)
        assert rel(cf(q, k, v), fn(q, k, v)) <= 1e-5
        assert fxopt.last_report().matched["attention"] == 1
    torch._dynamo.reset()
    fn2 = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.compile(fn2, backend="fxopt", options=OPTS, dynamic=True)(q, k, v)
    assert "default scale with a symbolic head dim" in _reasons(fxopt.last_report())


def _reasons(rep):
    return " | ".join(r.reason for r in rep.rejected if r.pattern == "attention")


def test_dropout_in_training_rejected(caplog):
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, enable_gqa=True)
    torch._dynamo.reset()
    torch.compile(fn, backend="fxopt", options=OPTS)(*_qkv())
    rep = fxopt.last_report()
    assert rep.matched["attention"] == 0 and "dropout p=0.1 in training is not fused" in _reasons(rep)


def test_eager_dropout_rejected_but_eval_matches(caplog, no_fallback):
    def fn(q, k, v, training):
        p = torch.softmax(q @ k.transpose(-1, -2) * 0.25, dim=-1)
        return F.dropout(p, p=0.2, training=training) @ v
    q, k, v = _qkv(3, hkv=HQ)
    torch._dynamo.reset()
    torch.compile(fn, backend="fxopt", options=OPTS)(q, k, v, True)
    assert "dropout p=0.2 in training is not fused" in _reasons(fxopt.last_report())
    worst, rep, _ = _run(lambda q, k, v: fn(q, k, v, False), q, k, v, caplog=caplog)
    assert rep.matched["attention"] == 1 and worst <= 1e-5


def test_probabilities_used_elsewhere_rejected():
    def fn(q, k, v):
        p = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        return p @ v, p
    torch._dynamo.reset()
    torch.compile(fn, backend="fxopt", options=OPTS)(*_qkv(hkv=HQ))
    rep = fxopt.last_report()
    assert rep.matched["attention"] == 0 and "several users" in _reasons(rep)


def test_non_attention_softmax_rejected():
    torch._dynamo.reset()
    torch.compile(lambda x: torch.softmax(x, -1) * 2, backend="fxopt", options=OPTS)(torch.randn(3, 5))
    rep = fxopt.last_report()
    assert rep.matched["attention"] == 0 and "not 3-D or 4-D scores" in _reasons(rep)


def test_mask_requiring_grad_rejected():
    bias = torch.zeros(1, HQ, S, S, requires_grad=True)
    torch._dynamo.reset()
    fn = lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    torch.compile(fn, backend="fxopt", options=OPTS)(*_qkv(hkv=HQ), bias)
    assert "mask requires grad" in _reasons(fxopt.last_report())


# ---- two mask steps (ALiBi bias + causal fill; a mask buffer + the causal mask), upcast q/k ----

def _alibi(slopes_from=0.1):
    """mpt-style ALiBi [H, 1, S]: -slope * distance to the last key (the causal fill makes it relative per row)."""
    j = torch.arange(S)
    return (j - (S - 1)).float()[None, None, :] * torch.linspace(slopes_from, 0.8, HQ)[:, None, None]


def eager_alibi_fill(q, k, v, slopes_from=0.1):
    s = torch.matmul(q, repeat_kv(k, 2).transpose(-1, -2)) * 0.25 + _alibi(slopes_from)
    cm = torch.triu(torch.ones(S, S, dtype=torch.bool), diagonal=1)
    s = s.masked_fill(cm, torch.finfo(s.dtype).min)
    return torch.matmul(torch.softmax(s.float(), dim=-1).to(q.dtype), repeat_kv(v, 2))


def eager_buffer_then_mask(q, k, v, buf):
    """gpt_neo-style: fp32 scores of upcast q/k, where(bool buffer slice, s, torch.tensor(min)), + additive causal."""
    s = torch.matmul(q.to(torch.float32), repeat_kv(k, 2).to(torch.float32).transpose(-1, -2))
    s = torch.where(buf[:, :, :S, :S], s, torch.tensor(torch.finfo(torch.float32).min))
    i = torch.arange(S)
    s = s + torch.where(i[None, :] <= i[:, None], 0.0, torch.finfo(torch.float32).min)
    return torch.matmul(torch.softmax(s, dim=-1).to(v.dtype), repeat_kv(v, 2))


def _local_buffer(window=5, n=32):
    """A registered-buffer-like bool [1, 1, n, n]: causal local attention (gpt_neo's local layers), a graph input."""
    i = torch.arange(n)
    return ((i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window))[None, None]


def test_bias_plus_causal_fill_is_one_op(caplog, no_fallback):
    """ALiBi (a constant bias, read by the kernel) then masked_fill(causal) (exact: flags): one op, as eager."""
    worst, rep, text = _run(eager_alibi_fill, *_qkv(), caplog=caplog)
    assert rep.matched["attention"] == 1, rep.rejected
    assert "causal=True window=0 softcap=0.0 mask=tensor" in text and "non-binary" in text, text
    assert worst <= 1e-5


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_mask_buffer_then_causal_mask_with_upcast_qk(dt, caplog, no_fallback):
    """A bool mask from a graph input (read) and a constant causal mask (flags) in two steps, a torch.tensor(min)
    fill, and q/k upcast to fp32 (the op takes them before the cast: q, k and v share a dtype)."""
    q, k, v = (t.detach().to(dt).requires_grad_() for t in _qkv())
    worst, rep, text = _run(eager_buffer_then_mask, q, k, v, _local_buffer(), caplog=caplog)
    assert rep.matched["attention"] == 1, rep.rejected
    assert "causal=True window=0 softcap=0.0 mask=tensor" in text, text
    assert worst <= (1e-5 if dt == torch.float32 else 2e-2)


def test_two_tensor_masks_rejected():
    def fn(q, k, v, m1, m2):
        s = (q @ k.transpose(-1, -2)).masked_fill(m1, -1e9) + m2
        return torch.softmax(s, -1) @ v
    m1 = torch.rand(B, 1, S, S) < 0.2
    m2 = torch.where(torch.rand(B, 1, S, S) < 0.2, -1e9, 0.0)
    torch._dynamo.reset()
    torch.compile(fn, backend="fxopt", options=OPTS)(*_qkv(hkv=HQ), m1, m2)
    rep = fxopt.last_report()
    assert rep.matched["attention"] == 0 and "both have to be read as tensors" in _reasons(rep)


def test_bias_at_or_below_the_mask_threshold_over_a_row_rejected():
    """A constant bias whose first causal row is <= -1e4 (ALiBi with large slopes/lengths): the kernel would read
    that row as empty where eager weights it; rejected with the reason, and still computed as eager."""
    fn = lambda q, k, v: eager_alibi_fill(q, k, v, slopes_from=1e3)
    torch._dynamo.reset()
    out = torch.compile(fn, backend="fxopt", options=OPTS)(*_qkv())
    rep = fxopt.last_report()
    assert rep.matched["attention"] == 0 and "read the row as empty" in _reasons(rep)
    assert rel(out, fn(*_qkv())) <= 1e-6


# ---- 3-D bmm forms: scores [B * H, S, S] viewed 4-D around the mask (xglm), baddbmm(ALiBi, q, k^T) (bloom) ----

def _causal_additive():
    i = torch.arange(S)
    return torch.where(i[None, :] <= i[:, None], 0.0, torch.finfo(torch.float32).min)[None, None].expand(B, 1, S, S)


def eager_bmm_3d(q, k, v):
    k, v = repeat_kv(k, 2), repeat_kv(v, 2)
    q3, k3, v3 = (t.reshape(B * HQ, S, D) for t in (q * 0.25, k, v))
    s = torch.bmm(q3, k3.transpose(1, 2)).view(B, HQ, S, S) + _causal_additive()
    s = torch.max(s, torch.tensor(torch.finfo(s.dtype).min)).view(B * HQ, S, S)
    p = torch.softmax(s, dim=-1).view(B, HQ, S, S).view(B * HQ, S, S)
    return torch.bmm(F.dropout(p, p=0.0, training=True), v3).view(B, HQ, S, D)


def eager_baddbmm_alibi(q, k, v, beta=1.0):
    k, v = repeat_kv(k, 2), repeat_kv(v, 2)
    q3, k3, v3 = (t.reshape(B * HQ, S, D) for t in (q, k, v))
    slopes = torch.linspace(0.1, 0.8, HQ).repeat(B)[:, None, None]
    alibi = slopes * torch.arange(S).float()[None, None, :]                      # [B * H, 1, S]
    s = alibi.baddbmm(batch1=q3, batch2=k3.transpose(-1, -2), beta=beta, alpha=0.25).view(B, HQ, S, S)
    p = torch.softmax(s + _causal_additive(), dim=-1).to(q.dtype).view(B * HQ, S, S)
    return torch.bmm(p, v3).view(B, HQ, S, D)


@pytest.mark.parametrize("fn,expect", [(eager_bmm_3d, "mask=none"), (eager_baddbmm_alibi, "mask=tensor")])
def test_3d_bmm_forms_are_one_op(fn, expect, caplog, no_fallback):
    worst, rep, text = _run(fn, *_qkv(), caplog=caplog)
    assert rep.matched["attention"] == 1, rep.rejected
    assert f"causal=True window=0 softcap=0.0 {expect}" in text, text
    assert worst <= 1e-5


def test_baddbmm_with_scaled_bias_rejected():
    torch._dynamo.reset()
    torch.compile(lambda q, k, v: eager_baddbmm_alibi(q, k, v, beta=0.5), backend="fxopt", options=OPTS)(*_qkv())
    rep = fxopt.last_report()
    assert rep.matched["attention"] == 0 and "baddbmm with beta=0.5" in _reasons(rep)
