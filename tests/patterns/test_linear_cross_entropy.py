"""linear_cross_entropy pattern: graphs that must match (with eager parity) and near-misses with their reasons."""
import pytest
import torch
import torch.nn.functional as F

import fxopt
from tests.helpers import rel

OPTS = {"inductor": False, "patterns": ["linear_cross_entropy"]}
B, S, H, V = 2, 7, 16, 53


def _data(dtype=torch.float32, w_grad=True):
    x = torch.randn(B, S, H, dtype=dtype, requires_grad=True)
    w = (torch.randn(V, H) * 0.5).to(dtype).requires_grad_(w_grad)
    labels = torch.randint(0, V, (B, S))
    labels[0, :3] = -100
    return x, w, labels


def hf_loss(x, w, labels):
    """transformers 5 ForCausalLMLoss after an lm_head, as dynamo records it."""
    logits = F.linear(x, w)
    logits = logits.float()
    labels = F.pad(labels, (0, 1), value=-100)
    shift = labels[..., 1:].contiguous()
    return F.cross_entropy(logits.view(-1, V), shift.view(-1).to(logits.device), ignore_index=-100,
                           reduction="mean")


def old_shift_loss(x, w, labels):
    logits = F.linear(x, w).float()
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    return F.cross_entropy(shift_logits.view(-1, V), shift_labels.view(-1))


def num_items_loss(x, w, labels, n):
    logits = F.linear(x, w).float()
    shift = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    loss = F.cross_entropy(logits.view(-1, V), shift.view(-1), ignore_index=-100, reduction="sum")
    return loss / n


def scaled_loss(x, w, labels):
    logits = F.linear(x, w) * 0.5 / 2.0
    return F.cross_entropy(logits.float().view(-1, V), labels.view(-1))


def softcap_loss(x, w, labels):
    logits = F.linear(x, w)
    logits = torch.tanh(logits / 5.0) * 5.0
    return F.cross_entropy(logits.float().view(-1, V), labels.view(-1))


def _run(fn, args, n_match, tol, fresh=True):
    if fresh:
        torch._dynamo.reset()
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    ref = fn(*args)
    ref_g = torch.autograd.grad(ref, leaves)
    out = torch.compile(fn, backend="fxopt", options=OPTS)(*args)
    out_g = torch.autograd.grad(out, leaves)
    rep = fxopt.last_report()
    assert rep.matched["linear_cross_entropy"] == n_match, (rep.matched, [r.reason for r in rep.rejected])
    assert rel(out, ref) <= tol
    for a, b in zip(out_g, ref_g):
        assert rel(a, b) <= tol
    return rep


@pytest.mark.parametrize("fn", [hf_loss, old_shift_loss, scaled_loss, softcap_loss])
def test_matches_fp32(fn):
    _run(fn, _data(), 1, 1e-5)


def test_matches_bf16():
    _run(hf_loss, _data(torch.bfloat16), 1, 2e-2)
    _run(softcap_loss, _data(torch.bfloat16), 1, 2e-2)


@pytest.mark.parametrize("n", [torch.tensor(9), 9, torch.tensor(9.0)])
def test_num_items_in_batch(n):
    x, w, labels = _data()
    _run(num_items_loss, (x, w, labels, n), 1, 1e-5)


def test_frozen_weight():
    x, w, labels = _data(w_grad=False)
    _run(hf_loss, (x, w, labels), 1, 1e-5)


def test_all_labels_ignored():
    x, w, labels = _data()
    labels[:] = -100
    torch._dynamo.reset()
    out = torch.compile(hf_loss, backend="fxopt", options=OPTS)(x, w, labels)
    assert fxopt.last_report().matched["linear_cross_entropy"] == 1
    assert torch.isnan(out) and torch.isnan(hf_loss(x, w, labels))


def _rejected(fn, args, reason):
    torch._dynamo.reset()
    ref = fn(*args)
    out = torch.compile(fn, backend="fxopt", options=OPTS)(*args)
    rep = fxopt.last_report()
    assert rep.matched["linear_cross_entropy"] == 0
    reasons = [r.reason for r in rep.rejected if r.pattern == "linear_cross_entropy"]
    assert any(reason in r for r in reasons), reasons
    for a, b in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
        assert rel(a, b) <= 1e-6
    return reasons


def test_logits_returned_is_not_fused():
    def f(x, w, labels):
        logits = F.linear(x, w)
        return F.cross_entropy(logits.float().view(-1, V), labels.view(-1)), logits
    _rejected(f, _data(), "are a graph output")


def test_logits_used_elsewhere():
    def f(x, w, labels):
        logits = F.linear(x, w).float()
        return F.cross_entropy(logits.view(-1, V), labels.view(-1)) + logits.mean()
    _rejected(f, _data(), "also used by")


@pytest.mark.parametrize("kw,reason", [(dict(label_smoothing=0.1), "label_smoothing"),
                                       (dict(weight=torch.rand(V)), "class weights"),
                                       (dict(reduction="none"), "reduction='none'")])
def test_cross_entropy_variants_rejected(kw, reason):
    def f(x, w, labels):
        return F.cross_entropy(F.linear(x, w).float().view(-1, V), labels.view(-1), **kw).sum()
    _rejected(f, _data(), reason)


def test_bias_rejected():
    b = torch.randn(V)

    def f(x, w, labels):
        return F.cross_entropy(F.linear(x, w, b).view(-1, V), labels.view(-1))
    _rejected(f, _data(), "has a bias")


def test_low_precision_loss_rejected():
    def f(x, w, labels):
        return F.cross_entropy(F.linear(x, w).view(-1, V), labels.view(-1)).float()
    _rejected(f, _data(torch.bfloat16), "no fp32 upcast")


def test_vocab_slice_rejected():
    def f(x, w, labels):
        return F.cross_entropy(F.linear(x, w)[..., :V - 1].reshape(-1, V - 1), labels.view(-1).clamp(max=V - 2))
    _rejected(f, _data(), "only slices of the leading dims")


def test_inductor_mixed_ignored_rows():
    """Inductor around the op (labels pad/shift compiled by Inductor), several chunks of which one is all ignored."""
    from fxopt.kernels import linear_cross_entropy as K
    x, w, labels = _data()
    labels[0, :4] = -100      # shifted: rows 0-2 ignored
    labels[1, 2:5] = -100
    torch._dynamo.reset()
    ref = hf_loss(x, w, labels)
    rg = torch.autograd.grad(ref, (x, w))
    old = K.chunk_rows
    K.chunk_rows = lambda n, *a, **k: 3   # chunks of 3 rows: rows 0-2 are all ignored
    try:
        out = torch.compile(hf_loss, backend="fxopt", options={"patterns": ["linear_cross_entropy"]})(x, w, labels)
        g = torch.autograd.grad(out, (x, w))
    finally:
        K.chunk_rows = old
    assert fxopt.last_report().matched["linear_cross_entropy"] == 1
    assert rel(out, ref) <= 1e-5 and rel(g[0], rg[0]) <= 1e-5 and rel(g[1], rg[1]) <= 1e-5
