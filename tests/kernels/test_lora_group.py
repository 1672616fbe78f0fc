"""fxopt::lora_group / fxopt::lora_nf4_group (LoRA linears over one input as one op) vs peft's math over torch /
bitsandbytes eager (Triton interpreter on CPU, natively on GPU): every output, the gradients of x, every A and B (and
bias / dense W when they require grad), either dx path, opcheck, what is saved for backward."""
import pytest
import torch

import fxopt  # noqa: F401
from fxopt.kernels import lora_group
from tests.helpers import rel
from tests.kernels.test_lora import DEV, TOL, adapter, nf4_args, nf4_linear, peft_math

pytest.importorskip("bitsandbytes")


def _nf4_members(k, ns, ranks, bias, nested, dtype, adt):
    qs = [nf4_linear(k, n, bias, nested, dtype) for n in ns]
    ads = [adapter(k, n, r, adt) for n, r in zip(ns, ranks)]
    return qs, ads


def _nf4_group_args(x, qs, ads, scales, dtype):
    args = [nf4_args(q) for q in qs]
    quant = [[a[0][i] for a in args] for i in range(5)]
    state = [[a[1][i] for a in args] for i in range(3)]
    return (x, *quant, [q.bias for q in qs], [a for a, _ in ads], [b for _, b in ads], scales, *state,
            qs[0].in_features, dtype, dtype)


def _check(ys, refs, inputs, dtype):
    assert len(ys) == len(refs)
    for y, r in zip(ys, refs):
        assert y.shape == r.shape and y.dtype == r.dtype
        assert rel(y, r) <= TOL[dtype]
    dys = [torch.randn_like(r) for r in refs]
    got = torch.autograd.grad(ys, inputs, dys)
    exp = torch.autograd.grad(refs, inputs, dys)
    for g, e in zip(got, exp):
        assert g.shape == e.shape and g.dtype == e.dtype
        assert rel(g, e) <= 2 * TOL[dtype]


NF4_CASES = [  # shape of x, out features, ranks, nested, bias, dtype, adapter dtype
    ((3, 7, 64), (96, 32, 32), (4, 4, 8), True, False, torch.float32, torch.float32),
    ((37, 128), (48, 80), (8, 2), False, True, torch.float32, torch.float32),
    ((2, 9, 64), (80, 16, 16), (4, 4, 4), True, True, torch.float16, torch.float32),   # fp32 adapters, half base
    ((1, 64), (33, 40), (1, 3), True, False, torch.bfloat16, torch.float32),
]


@pytest.mark.parametrize("dx_path", ["accumulate", "separate"])
@pytest.mark.parametrize("shape,ns,ranks,nested,bias,dtype,adt", NF4_CASES)
def test_lora_nf4_group_vs_bitsandbytes(shape, ns, ranks, nested, bias, dtype, adt, dx_path, monkeypatch,
                                        no_fallback):
    monkeypatch.setenv("FXOPT_LORA_GROUP_DX", dx_path)
    k = shape[-1]
    qs, ads = _nf4_members(k, ns, ranks, bias, nested, dtype, adt)
    scales = [2.0, 0.5, 1.25][:len(ns)]
    x = torch.randn(shape, device=DEV, dtype=dtype, requires_grad=True)
    out = torch.ops.fxopt.lora_nf4_group(*_nf4_group_args(x, qs, ads, scales, dtype))
    assert len(out) == len(ns) + 1 and out[-1].shape == (x.numel() // k, sum(ranks))
    refs = [peft_math(q(x), x, a, b, s).to(dtype) for q, (a, b), s in zip(qs, ads, scales)]
    _check(out[:-1], refs, (x, *[t for ab in ads for t in ab]), dtype)


DENSE_CASES = [  # shape of x, out features, ranks, bias, dtype, adapter dtype
    ((3, 7, 64), (96, 32, 32), (4, 4, 8), True, torch.float32, torch.float32),
    ((2, 9, 48), (80, 24), (8, 8), False, torch.float16, torch.float32),
    ((5, 40), (24, 24, 8), (2, 4, 1), True, torch.bfloat16, torch.bfloat16),
]


@pytest.mark.parametrize("dx_path", ["accumulate", "separate"])
@pytest.mark.parametrize("shape,ns,ranks,bias,dtype,adt", DENSE_CASES)
def test_lora_group_dense_vs_eager(shape, ns, ranks, bias, dtype, adt, dx_path, monkeypatch, no_fallback):
    monkeypatch.setenv("FXOPT_LORA_GROUP_DX", dx_path)
    k = shape[-1]
    ws = [(torch.randn(n, k, device=DEV) / k ** 0.5).to(dtype) for n in ns]
    bs = [torch.randn(n, device=DEV, dtype=dtype) if bias else None for n in ns]
    ads = [adapter(k, n, r, adt) for n, r in zip(ns, ranks)]
    scales = [2.0, 0.5, 1.25][:len(ns)]
    x = torch.randn(shape, device=DEV, dtype=dtype, requires_grad=True)
    out_dtype = torch.promote_types(dtype, adt)
    out = torch.ops.fxopt.lora_group(x, ws, bs, [a for a, _ in ads], [b for _, b in ads], scales, out_dtype)
    refs = [peft_math(torch.nn.functional.linear(x, w, bb), x, a, b, s)
            for w, bb, (a, b), s in zip(ws, bs, ads, scales)]
    _check(out[:-1], refs, (x, *[t for ab in ads for t in ab]), dtype)


def test_dense_weight_bias_grads_and_no_input_grad(no_fallback):
    """Grads of dense weights and biases when they require them; x without grad (the first layer's input)."""
    ws = [torch.randn(n, 64, device=DEV, requires_grad=True) for n in (32, 16)]
    bs = [torch.randn(n, device=DEV, requires_grad=True) for n in (32, 16)]
    ads = [adapter(64, n, 4, torch.float32) for n in (32, 16)]
    for x in (torch.randn(3, 5, 64, device=DEV, requires_grad=True), torch.randn(3, 5, 64, device=DEV)):
        out = torch.ops.fxopt.lora_group(x, ws, bs, [a for a, _ in ads], [b for _, b in ads], [0.5, 2.0],
                                         torch.float32)
        refs = [peft_math(torch.nn.functional.linear(x, w, bb), x, a, b, s)
                for w, bb, (a, b), s in zip(ws, bs, ads, (0.5, 2.0))]
        inputs = ([x] if x.requires_grad else []) + ws + bs + [t for ab in ads for t in ab]
        _check(out[:-1], refs, inputs, torch.float32)


def test_only_some_members_need_adapter_grads(no_fallback):
    """A frozen adapter among trainable ones gets no gradient; the others are unchanged by it."""
    qs, ads = _nf4_members(64, (48, 32), (4, 4), False, True, torch.float32, torch.float32)
    ads[1][0].requires_grad_(False)
    ads[1][1].requires_grad_(False)
    x = torch.randn(2, 6, 64, device=DEV, requires_grad=True)
    out = torch.ops.fxopt.lora_nf4_group(*_nf4_group_args(x, qs, ads, [2.0, 1.0], torch.float32))
    refs = [peft_math(q(x), x, a, b, s) for q, (a, b), s in zip(qs, ads, (2.0, 1.0))]
    _check(out[:-1], refs, (x, *ads[0]), torch.float32)


def test_saves_only_x_and_xa():
    """Backward keeps x and XA [M, R] beside the (already resident) weights: nothing of weight size."""
    qs, ads = _nf4_members(128, (96, 64, 64), (4, 4, 8), False, True, torch.float32, torch.float32)
    x = torch.randn(2, 16, 128, device=DEV, requires_grad=True)
    args = _nf4_group_args(x, qs, ads, [2.0, 2.0, 2.0], torch.float32)
    resident = {t.data_ptr() for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)}
    resident.add(x.data_ptr())
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.ops.fxopt.lora_nf4_group(*args)
    new = [tuple(t.shape) for t in saved if t.data_ptr() not in resident]
    assert new == [(32, 16)], new   # only XA


def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                                "test_aot_dispatch_dynamic"))


def test_opcheck(no_fallback):
    qs, ads = _nf4_members(64, (48, 32), (4, 4), True, True, torch.float32, torch.float32)
    x = torch.randn(2, 3, 64, device=DEV, requires_grad=True)
    args = _nf4_group_args(x, qs, ads, [2.0, 1.0], torch.float32)
    _opcheck(torch.ops.fxopt.lora_nf4_group.default, args)
    ws = [torch.randn(n, 64, device=DEV) for n in (48, 32)]
    _opcheck(torch.ops.fxopt.lora_group.default, (x, ws, [None, None], args[7], args[8], [2.0, 1.0], torch.float32))
    a = [t.detach() for t in args[7]]
    b = [t.detach() for t in args[8]]
    xa = x.detach().reshape(-1, 64) @ torch.cat(a).t()
    dys = [torch.randn(2, 3, n, device=DEV) for n in (48, 32)]
    _opcheck(torch.ops.fxopt.lora_group_backward.default, (dys, x.detach(), ws, a, b, xa, [2.0, 1.0], True, True,
                                                           True, False, False))
    _opcheck(torch.ops.fxopt.lora_nf4_group_backward.default, (dys, x.detach(), *args[1:6], a, b, xa, [2.0, 1.0],
                                                               *args[10:13], 64, torch.float32, True, True, True,
                                                               True))


def test_bad_dx_choice_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FXOPT_LORA_GROUP_DX", "fast")
    monkeypatch.setenv("FXOPT_STRICT", "1")   # else the kernel's failure falls back to the reference, with a warning
    qs, ads = _nf4_members(64, (48, 32), (4, 4), False, False, torch.float32, torch.float32)
    x = torch.randn(4, 64, device=DEV, requires_grad=True)
    out = torch.ops.fxopt.lora_nf4_group(*_nf4_group_args(x, qs, ads, [1.0, 1.0], torch.float32))
    with pytest.raises(fxopt.FxoptError, match="FXOPT_LORA_GROUP_DX must be"):
        torch.autograd.grad(out[:-1], x, [torch.ones_like(y) for y in out[:-1]])


def test_workspace_counts_the_largest_chunk_and_the_rank_terms():
    """8B q/k/v at 4096 tokens: the largest dequantized chunk (32 MiB, q's) + 12 m R outweighs the dy products'
    partials (<= 19 MB) + 6 m R."""
    m, r = 4096, 16
    ws = lora_group.lora_nf4_group_backward_workspace(m, [4096, 1024, 1024], 4096, torch.bfloat16,
                                                      [torch.empty(r, 4096, device="meta")] * 3)
    assert ws == 4096 * 4096 * 2 + 12 * m * 3 * r
    dense = lora_group.lora_group_backward_workspace(m, [torch.empty(n, 4096, device="meta") for n in (14336,) * 2],
                                                     [torch.empty(r, 4096, device="meta")] * 2)
    assert dense == 6 * m * 2 * r + lora_group.lora_dy.rank_scratch(m, 14336, r, 2) > 12 * m * 2 * r
    assert lora_group.lora_nf4_group_workspace(m, [14336, 14336], 4096, torch.bfloat16) == 14336 * 4096 * 2
