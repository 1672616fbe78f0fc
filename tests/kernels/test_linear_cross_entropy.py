"""fxopt::linear_cross_entropy vs the eager math (linear -> scale/softcap -> fp32 -> cross_entropy), under the Triton
interpreter on CPU (natively on GPU with -m gpu)."""
import pytest
import torch

import fxopt  # noqa: F401
from fxopt.kernels import linear_cross_entropy as K
from tests.helpers import rel

DEV = "cuda" if torch.cuda.is_available() else "cpu"
OP = torch.ops.fxopt.linear_cross_entropy


def _inputs(n, h, v, dtype, ignore_every=3, seed=None, w_grad=True):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    x = torch.randn(n, h, generator=g).to(DEV, dtype).requires_grad_()
    w = (torch.randn(v, h, generator=g) * h ** -0.5 * 2).to(DEV, dtype).requires_grad_(w_grad)
    labels = torch.randint(0, v, (n,), generator=g).to(DEV)
    if ignore_every:
        labels[::ignore_every] = -100
    return x, w, labels


def _fused(x, w, labels, divisor=None, reduction="mean", divisor_value=1.0, pre=1.0, post=1.0, tanh=False, chunk=0):
    return K.linear_cross_entropy(x, w, labels, divisor, -100, reduction, divisor_value, pre, post, tanh,
                                  x.requires_grad, w.requires_grad, chunk)[0]


def _check(x, w, labels, tol, scale=1.0, **kw):
    ref = K.linear_cross_entropy_reference(x, w, labels, **{k: v for k, v in kw.items() if k != "chunk"})
    leaves = [t for t in (x, w) if t.requires_grad]
    ref_g = torch.autograd.grad(ref * scale, leaves)
    out = _fused(x, w, labels, **kw)
    out_g = torch.autograd.grad(out * scale, leaves)
    assert out.dtype == torch.float32 and out.shape == ()
    assert rel(out, ref) <= tol, (float(out), float(ref))
    for a, b in zip(out_g, ref_g):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert rel(a, b) <= tol, rel(a, b)


@pytest.mark.parametrize("chunk", [0, 8, 37])
@pytest.mark.parametrize("logit", ["plain", "scale", "softcap"])
def test_fp32_parity(no_fallback, chunk, logit):
    kw = dict(plain={}, scale=dict(pre=0.37), softcap=dict(pre=1 / 3.0, post=3.0, tanh=True))[logit]
    x, w, labels = _inputs(37, 24, 333, torch.float32)
    _check(x, w, labels, 1e-5, chunk=chunk, **kw)


def test_odd_vocab_several_tiles(no_fallback):
    # V = 1100: two 1024-column tiles on the interpreter (three 4096 tiles never needed), last one partial
    x, w, labels = _inputs(19, 16, 1100, torch.float32)
    _check(x, w, labels, 1e-5, chunk=7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parity(no_fallback, dtype):
    x, w, labels = _inputs(40, 32, 257, dtype)
    _check(x, w, labels, 2e-2, chunk=16)
    _check(x, w, labels, 2e-2, chunk=16, pre=1 / 5.0, post=5.0, tanh=True)


def test_ignored_rows_all(no_fallback):
    x, w, labels = _inputs(12, 16, 50, torch.float32, ignore_every=0)
    labels[:] = -100
    ref = K.linear_cross_entropy_reference(x, w, labels)
    rgx, rgw = torch.autograd.grad(ref, (x, w))
    out = _fused(x, w, labels, chunk=5)
    gx, gw = torch.autograd.grad(out, (x, w))
    assert torch.isnan(ref) and torch.isnan(out)          # mean over zero items, as eager
    assert torch.equal(gx, rgx) and torch.equal(gw, rgw)  # eager's grads are exact zeros
    assert not gx.any() and not gw.any()


def test_ignored_rows_sum_reduction(no_fallback):
    x, w, labels = _inputs(12, 16, 50, torch.float32, ignore_every=0)
    labels[:] = -100
    with torch.no_grad():
        out = _fused(x, w, labels, reduction="sum", divisor_value=4.0)
    assert out.item() == 0.0


def test_sum_with_divisor_and_grad_scale(no_fallback):
    x, w, labels = _inputs(21, 16, 97, torch.float32, ignore_every=4)
    d = torch.tensor(13, device=DEV)
    _check(x, w, labels, 1e-5, scale=2.5, reduction="sum", divisor=d, chunk=6)
    _check(x, w, labels, 1e-5, scale=0.5, reduction="sum", divisor_value=7.0, chunk=6)


def test_frozen_weight(no_fallback):
    x, w, labels = _inputs(17, 16, 70, torch.float32, w_grad=False)
    _check(x, w, labels, 1e-5, chunk=4)
    loss, dx, dw = OP(x.detach(), w, labels, None, -100, "mean", 1.0, 1.0, 1.0, False, True, False, 4)
    assert dw.numel() == 0 and dx.shape == x.shape


def test_weight_only_grad(no_fallback):
    x, w, labels = _inputs(17, 16, 70, torch.float32)
    x = x.detach()
    _check(x, w, labels, 1e-5, chunk=4)


def test_strided_3d_input_and_one_row(no_fallback):
    base = torch.randn(3, 9, 40, device=DEV)
    x = base[:, 1:, 4:28].detach().requires_grad_()    # [3, 8, 24], non-contiguous
    w = torch.randn(61, 24, device=DEV, requires_grad=True)
    labels = torch.randint(0, 61, (24,), device=DEV)
    labels[5] = -100
    _check(x, w, labels, 1e-5, chunk=5)
    x1, w1, l1 = _inputs(1, 16, 33, torch.float32, ignore_every=0)
    _check(x1, w1, l1, 1e-5)


def test_label_out_of_range_gives_nan(no_fallback):
    x, w, labels = _inputs(6, 8, 20, torch.float32, ignore_every=0)
    labels[2] = 25
    with torch.no_grad():
        out = OP(x, w, labels, None, -100, "mean", 1.0, 1.0, 1.0, False, False, False, 0)[0]
    assert torch.isnan(out)


def test_mixed_ignored_rows_under_compile(no_fallback, fresh_dynamo):
    """The mean's denominator is a device value: a chunk of only ignored rows and a compiled caller stay exact."""
    x, w, labels = _inputs(30, 16, 90, torch.float32, ignore_every=0)
    labels[:10] = -100          # the whole first chunk
    labels[17::3] = -100

    def f(x, w, labels):
        return _fused(x, w, labels, chunk=10) * 1.0

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = cf(x, w, labels)
    gx, gw = torch.autograd.grad(out, (x, w))
    ref = K.linear_cross_entropy_reference(x, w, labels)
    rgx, rgw = torch.autograd.grad(ref, (x, w))
    assert rel(out, ref) <= 1e-5 and rel(gx, rgx) <= 1e-5 and rel(gw, rgw) <= 1e-5
    labels2 = labels.clone()
    labels2[:25] = -100         # new count, same compiled graph (no recompile needed, no host sync)
    out2 = cf(x, w, labels2)
    assert rel(out2, K.linear_cross_entropy_reference(x, w, labels2)) <= 1e-5


def test_tied_weight_grads_add(no_fallback):
    """The lm_head weight also feeds an embedding: autograd adds the op's dW to the embedding's."""
    x, w, labels = _inputs(14, 16, 40, torch.float32)
    ids = torch.randint(0, 40, (5,), device=DEV)

    def total(fused):
        emb = torch.nn.functional.embedding(ids, w).sum() * 0.1
        loss = _fused(x, w, labels, chunk=4) if fused else K.linear_cross_entropy_reference(x, w, labels)
        return torch.autograd.grad(loss + emb, (x, w))

    for a, b in zip(total(True), total(False)):
        assert rel(a, b) <= 1e-5


def test_opcheck(no_fallback):
    x, w, labels = _inputs(9, 8, 30, torch.float32)
    torch.library.opcheck(OP, (x, w, labels, None, -100, "mean", 1.0, 1.0, 1.0, False, True, True, 4))
    torch.library.opcheck(OP, (x, w.detach(), labels, torch.tensor(5.0, device=DEV), -100, "sum", 1.0, 0.5, 2.0,
                               True, True, False, 0))
    g = torch.tensor(0.3, device=DEV)
    torch.library.opcheck(torch.ops.fxopt.linear_cross_entropy_backward, (g, x.detach(), w.detach().to(torch.bfloat16)))


def test_chunk_rule():
    # default: chunk logits ~ the weight's size (rows = H rounded down to a power of two)
    assert K.chunk_rows(8192, 2048, 128256, 2) == 2048
    assert K.chunk_rows(8192, 3584, 152064, 2) == 2048
    assert K.chunk_rows(100, 4096, 128256, 2) == 100
    # a budget caps the chunk's bytes
    assert K.chunk_rows(8192, 2048, 128256, 2, budget_bytes=64 << 20) == 256
    assert K.chunk_rows(8192, 2048, 128256, 2, budget_bytes=1) == 16
    ws = K.workspace_bytes(8192, 2048, 128256, 2)
    assert ws == 2048 * 128256 * 2 + 4 * 128256 * 2048 + 8 * 8192
    flops, nbytes = K.linear_cross_entropy_cost((8, 1024, 2048), 128256, 2)
    assert flops >= 6 * 8192 * 2048 * 128256 and nbytes > 0


@pytest.mark.gpu
def test_gpu_bf16_large_vocab(no_fallback):
    x, w, labels = _inputs(1000, 256, 50000, torch.bfloat16, ignore_every=5)
    _check(x, w, labels, 1e-2, chunk=256)
    _check(x, w, labels, 1e-2, pre=1 / 30.0, post=30.0, tanh=True)
