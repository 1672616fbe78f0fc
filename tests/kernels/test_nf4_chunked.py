"""Chunked NF4 GEMM (fxopt/kernels/nf4_chunked.py): the chunk dequantization is bit-exact with the reference, the
chunked product matches fused_matmul_reference over several chunks, and the lora_nf4 op runs through it when forced
(Triton interpreter + torch.mm on CPU, natively on GPU)."""
import pytest
import torch

import fxopt  # noqa: F401
from fxopt.kernels import nf4 as K
from fxopt.kernels import nf4_chunked as C
from tests.helpers import rel
from tests.kernels.test_nf4 import DEV, quantize

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1.5e-2}


@pytest.mark.parametrize("n,k,blocksize,nested", [(300, 512, 64, True), (257, 768, 128, False),
                                                  (40, 96, 64, True), (33, 100, 64, False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_chunk_bit_exact(n, k, blocksize, nested, dtype):
    nw = quantize(torch.randn(n, k, device=DEV), blocksize, nested)[0]
    full = K.nf4_dequantize_reference(nw, dtype)
    aligned = k % blocksize == 0
    for r0, r1, c0, c1 in [(0, n, 0, k), (n // 3, n - 1, 0, k), (0, n, 256 if k > 256 else 0, k),
                           (1, 2, 0, min(k, 256))] + ([] if aligned else [(0, n, 7, k - 3)]):
        out = torch.full((r1 - r0, c1 - c0), float("nan"), dtype=dtype, device=DEV)
        got = C.dequantize_chunk(nw, r0, r1, c0, c1, dtype, out=out)
        assert torch.equal(got, full[r0:r1, c0:c1]), (r0, r1, c0, c1)


@pytest.mark.parametrize("blocksize,nested", [(64, True), (128, False), (4096, True)])
def test_flat_kernel_taken_and_exact(blocksize, nested, monkeypatch):
    """Whole-row 16-bit chunks take the flat kernel (one word per packed byte), bit-exact; partial rows, fp32,
    an odd element count or a start off a block boundary take the tile kernel."""
    n, k = 96, 4096 if blocksize == 4096 else 640
    nw = quantize(torch.randn(n, k, device=DEV), blocksize, nested)[0]
    calls = []
    flat = C._dequantize_flat
    monkeypatch.setattr(C, "_dequantize_flat", lambda *a: calls.append(a[1:3]) or flat(*a))
    for dtype in (torch.bfloat16, torch.float16):
        full = K.nf4_dequantize_reference(nw, dtype)
        for r0, r1 in [(0, n), (32, 95)]:
            got = C.dequantize_chunk(nw, r0, r1, 0, k, dtype,
                                     out=torch.full((r1 - r0, k), float("nan"), dtype=dtype, device=DEV))
            assert torch.equal(got, full[r0:r1])
    assert len(calls) == 4 and calls[1] == (32, 95)
    calls.clear()
    C.dequantize_chunk(nw, 0, n, 0, 256, torch.bfloat16)            # not whole rows
    C.dequantize_chunk(nw, 0, n, 0, k, torch.float32)               # 32-bit output
    odd = quantize(torch.randn(3, 65, device=DEV), 64, nested)[0]   # 195 elements
    assert torch.equal(C.dequantize_chunk(odd, 0, 3, 0, 65, torch.bfloat16),
                       K.nf4_dequantize_reference(odd, torch.bfloat16))
    assert calls == []


@pytest.mark.parametrize("trans", [True, False])
@pytest.mark.parametrize("lora,bias", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_matches_reference(trans, lora, bias, dtype):
    m, n, k, r = 37, 600, 512, 4                      # 600 output rows / 512 columns: several 256-wide chunks
    nw = quantize(torch.randn(n, k, device=DEV), 64, True)[0]
    q, p = (k, n) if trans else (n, k)
    x = torch.randn(m, q, device=DEV).to(dtype)
    left = torch.randn(m, r, device=DEV) if lora else None          # fp32 adapters over a half base (peft default)
    right = torch.randn(r, p, device=DEV) * 0.3 if lora else None
    b = torch.randn(p, device=DEV).to(dtype) if bias else None
    ref = K.fused_matmul_reference(x, nw, trans, left, right, 1.7, b, dtype, dtype)
    got = C.chunked_matmul(x, nw, trans, left, right, 1.7, b, dtype, dtype, chunk_bytes=256 * q * 2)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert torch.isfinite(got).all()
    assert rel(got, ref) <= TOL[dtype], rel(got, ref)


def test_chunk_size_rule():
    mib = 2 ** 20
    assert C.chunk_size(4096, 14336, 2, 32 * mib) == 4096   # 32 MiB / (4096 * 2 B) = 4096 rows
    assert C.chunk_size(14336, 4096, 2, 32 * mib) == 1024   # 1170 -> a multiple of 256
    assert C.chunk_size(10 ** 6, 5000, 2) == 256            # never below 256
    assert C.chunk_size(64, 100, 2) == 100                  # capped at the total
    # the default bound holds each 8B weight whole: one chunk per call
    assert C.chunk_size(4096, 14336, 2) == 14336 and C.chunk_size(14336, 4096, 2) == 4096


def test_lora_nf4_op_through_chunked_path(monkeypatch, no_fallback):
    from tests.kernels.test_lora import adapter, check_grads, nf4_args, nf4_linear, peft_math
    monkeypatch.setenv("FXOPT_NF4_GEMM", "chunked")
    calls = []
    real = C.chunked_matmul
    monkeypatch.setattr("fxopt.kernels.lora.chunked_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    q = nf4_linear(64, 96, True, True, torch.float32)
    x = torch.randn(3, 7, 64, device=DEV, requires_grad=True)
    a, b = adapter(64, 96, 4, torch.float32)
    qargs, state = nf4_args(q)
    y, _ = torch.ops.fxopt.lora_nf4(x, *qargs, q.bias, a, b, 2.0, *state, torch.float32, torch.float32)
    check_grads(y, peft_math(q(x), x, a, b, 2.0), (x, a, b), torch.float32)
    assert len(calls) == 2   # forward and input gradient


def test_lora_nf4_bf16_chunked_path_takes_the_rounded_rank_operand(monkeypatch, no_fallback):
    """bf16 base, fp32 adapters through the chunked path: the forward and the input gradient get the rank-r term's
    left operand (xa, dxa) already in bf16 from the skinny product's sum kernel, and the result is peft's."""
    from tests.kernels.test_lora import adapter, check_grads, nf4_args, nf4_linear, peft_math
    monkeypatch.setenv("FXOPT_NF4_GEMM", "chunked")
    lows = []
    real = C.chunked_matmul
    monkeypatch.setattr("fxopt.kernels.lora.chunked_matmul",
                        lambda *a, **k: lows.append(k.get("lora_left_low")) or real(*a, **k))
    q = nf4_linear(64, 96, False, True, torch.bfloat16)
    x = torch.randn(3, 7, 64, device=DEV).bfloat16().requires_grad_()
    a, b = adapter(64, 96, 4, torch.float32)
    qargs, state = nf4_args(q)
    y, _ = torch.ops.fxopt.lora_nf4(x, *qargs, None, a, b, 2.0, *state, torch.bfloat16, torch.bfloat16)
    check_grads(y, peft_math(q(x), x, a, b, 2.0).bfloat16(), (x, a, b), torch.bfloat16)
    assert len(lows) == 2 and all(t is not None and t.dtype == torch.bfloat16 and t.shape == (21, 4) for t in lows)


def test_chunked_rounded_rank_operand_equals_rounding_inside():
    nw = quantize(torch.randn(300, 256, device=DEV), 64, True)[0]
    x = torch.randn(9, 256, device=DEV).bfloat16()
    left, right = torch.randn(9, 4, device=DEV), torch.randn(4, 300, device=DEV) * 0.3
    want = C.chunked_matmul(x, nw, True, left, right, 1.7, None, torch.bfloat16, torch.bfloat16)
    got = C.chunked_matmul(x, nw, True, left, right, 1.7, None, torch.bfloat16, torch.bfloat16,
                           lora_left_low=left.bfloat16())
    assert torch.equal(got, want)


def test_bad_forced_choice_is_a_clear_error(monkeypatch):
    from tests.kernels.test_lora import nf4_args, nf4_linear
    monkeypatch.setenv("FXOPT_NF4_GEMM", "fastest")
    q = nf4_linear(64, 32, False, False, torch.float32)
    qargs, state = nf4_args(q)
    x = torch.randn(2, 64, device=DEV)
    with pytest.raises(Exception, match="FXOPT_NF4_GEMM must be"):
        from fxopt.kernels.registry import set_strict
        set_strict(True)
        try:
            torch.ops.fxopt.lora_nf4(x, *qargs, None, None, None, 1.0, *state, torch.float32, torch.float32)
        finally:
            set_strict(False)


def test_measured_choice_picks_fastest_once(monkeypatch):
    from fxopt.kernels import lora as L
    times = {"fused": 3.0, "chunked": 1.0}
    ran = []
    monkeypatch.setattr(L, "bench_ms", lambda fn: times[fn()])
    table = {}
    cands = {name: (lambda name=name: ran.append(name) or name) for name in times}
    assert L._measure_choice(table, "k", cands) == "chunked"
    assert L._measure_choice(table, "k", cands) == "chunked" and len(ran) == 2   # cached: measured once
