"""fxopt::lora / fxopt::lora_nf4 vs peft's math over torch / bitsandbytes eager (Triton interpreter on CPU, natively
on GPU): forward, gradients of x, A, B (and bias / dense W when asked), opcheck, what is saved for backward."""
import pytest
import torch

import fxopt  # noqa: F401
from tests.helpers import rel

bnb = pytest.importorskip("bitsandbytes")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}   # fp32: grads measured up to 2.01e-5 over random draws


def nf4_linear(k, n, bias, nested, compute_dtype, blocksize=64):
    """A bitsandbytes Linear4bit (NF4) holding a random weight, quantized on DEV."""
    lin = torch.nn.Linear(k, n, bias=bias)
    q = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=compute_dtype, compress_statistics=nested,
                          quant_type="nf4", quant_storage=torch.uint8)
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=nested, blocksize=blocksize)
    if bias:
        q.bias = torch.nn.Parameter(lin.bias.data.to(compute_dtype), requires_grad=False)
    return q.to(DEV)


def nf4_args(q):
    """The op's quant-state arguments of a Linear4bit."""
    st = q.weight.quant_state
    n, k = st.shape
    if st.nested:
        return (q.weight, st.absmax, st.state2.absmax, st.state2.code, st.offset), (st.blocksize, 256, n, k)
    return (q.weight, st.absmax, None, None, None), (st.blocksize, 256, n, k)


def adapter(k, n, r, dtype):
    a = (torch.randn(r, k, device=DEV) / k ** 0.5).to(dtype).requires_grad_()
    b = (torch.randn(n, r, device=DEV) * 0.3).to(dtype).requires_grad_()
    return a, b


def peft_math(base_out, x, a, b, scale):
    """peft LoRA forward: result + lora_B(lora_A(x)) * scaling (dropout 0)."""
    return base_out + torch.nn.functional.linear(torch.nn.functional.linear(x.to(a.dtype), a), b) * scale


def check_grads(y, y_ref, inputs, dtype):
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    assert rel(y, y_ref) <= TOL[dtype]
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, inputs, dy)
    exp = torch.autograd.grad(y_ref, inputs, dy)
    for g, e in zip(got, exp):
        assert g.shape == e.shape and g.dtype == e.dtype
        assert rel(g, e) <= 2 * TOL[dtype]


NF4_CASES = [  # shape of x, n, r, nested, bias, dtype, scale
    ((3, 7, 64), 96, 4, True, False, torch.float32, 2.0),
    ((37, 128), 48, 8, False, True, torch.float32, 8 / 8 ** 0.5),   # rsLoRA scale alpha/sqrt(r)
    ((1, 64), 33, 1, True, True, torch.float32, 1.0),
    ((2, 9, 64), 80, 4, True, True, torch.float16, 2.0),
]


@pytest.mark.parametrize("shape,n,r,nested,bias,dtype,scale", NF4_CASES)
def test_lora_nf4_vs_bitsandbytes(shape, n, r, nested, bias, dtype, scale, no_fallback):
    k = shape[-1]
    q = nf4_linear(k, n, bias, nested, dtype)
    x = torch.randn(shape, device=DEV, dtype=dtype, requires_grad=True)
    a, b = adapter(k, n, r, dtype)
    qargs, state = nf4_args(q)
    y, xa = torch.ops.fxopt.lora_nf4(x, *qargs, q.bias, a, b, scale, *state, dtype, dtype)
    assert xa.shape == (x.numel() // k, r)
    check_grads(y, peft_math(q(x), x, a, b, scale), (x, a, b), dtype)


def test_frozen_nf4_linear_and_no_input_grad(no_fallback):
    q = nf4_linear(64, 40, True, True, torch.float32)
    qargs, state = nf4_args(q)
    x = torch.randn(5, 64, device=DEV, requires_grad=True)
    y, xa = torch.ops.fxopt.lora_nf4(x, *qargs, q.bias, None, None, 1.0, *state, torch.float32, torch.float32)
    assert xa.numel() == 0
    check_grads(y, q(x), (x,), torch.float32)
    # x needs no grad (bnb's direct gemm_4bit form): only A and B get gradients
    a, b = adapter(64, 40, 4, torch.float32)
    x0 = x.detach()
    y, _ = torch.ops.fxopt.lora_nf4(x0, *qargs, q.bias, a, b, 2.0, *state, torch.float32, torch.float32)
    check_grads(y, peft_math(q(x0), x0, a, b, 2.0), (a, b), torch.float32)


DENSE_CASES = [  # shape of x, n, r, bias, dtype, adapter dtype
    ((3, 7, 64), 96, 4, True, torch.float32, torch.float32),
    ((1, 40), 24, 2, False, torch.float32, torch.float32),
    ((2, 9, 48), 80, 8, True, torch.float16, torch.float16),
    ((2, 9, 48), 80, 8, False, torch.float16, torch.float32),   # peft's fp32 adapters over a half base
]


@pytest.mark.parametrize("shape,n,r,bias,dtype,adt", DENSE_CASES)
def test_lora_dense_vs_eager(shape, n, r, bias, dtype, adt, no_fallback):
    k = shape[-1]
    w = (torch.randn(n, k, device=DEV) / k ** 0.5).to(dtype)
    bb = torch.randn(n, device=DEV, dtype=dtype) if bias else None
    x = torch.randn(shape, device=DEV, dtype=dtype, requires_grad=True)
    a, b = adapter(k, n, r, adt)
    out_dtype = torch.promote_types(dtype, adt)
    y, _ = torch.ops.fxopt.lora(x, w, bb, a, b, 2.0, out_dtype)
    y_ref = peft_math(torch.nn.functional.linear(x, w, bb), x, a, b, 2.0)
    check_grads(y, y_ref, (x, a, b), dtype)


def test_dense_weight_and_bias_grads(no_fallback):
    w = torch.randn(32, 64, device=DEV, requires_grad=True)
    bb = torch.randn(32, device=DEV, requires_grad=True)
    x = torch.randn(3, 5, 64, device=DEV, requires_grad=True)
    a, b = adapter(64, 32, 4, torch.float32)
    y, _ = torch.ops.fxopt.lora(x, w, bb, a, b, 0.5, torch.float32)
    check_grads(y, peft_math(torch.nn.functional.linear(x, w, bb), x, a, b, 0.5), (x, w, bb, a, b), torch.float32)


def test_saves_only_x_and_xa():
    """Backward keeps x, xa [M, r] and the (already resident) weights: nothing of weight size is created."""
    q = nf4_linear(128, 96, False, True, torch.float32)
    qargs, state = nf4_args(q)
    x = torch.randn(2, 16, 128, device=DEV, requires_grad=True)
    a, b = adapter(128, 96, 4, torch.float32)
    resident = {t.data_ptr() for t in (x, a, b, *[t for t in qargs if t is not None])}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y, _ = torch.ops.fxopt.lora_nf4(x, *qargs, None, a, b, 2.0, *state, torch.float32, torch.float32)
    new = [tuple(t.shape) for t in saved if t.data_ptr() not in resident]
    assert new == [(32, 4)], new   # only xa


def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                                "test_aot_dispatch_dynamic"))


def test_opcheck(no_fallback):
    q = nf4_linear(64, 48, True, True, torch.float32)
    qargs, state = nf4_args(q)
    x = torch.randn(2, 3, 64, device=DEV, requires_grad=True)
    a, b = adapter(64, 48, 4, torch.float32)
    _opcheck(torch.ops.fxopt.lora_nf4.default, (x, *qargs, q.bias, a, b, 2.0, *state, torch.float32, torch.float32))
    _opcheck(torch.ops.fxopt.lora_nf4.default, (x, *qargs, None, None, None, 1.0, *state, torch.float32,
                                                torch.float32))
    w = torch.randn(48, 64, device=DEV)
    _opcheck(torch.ops.fxopt.lora.default, (x, w, torch.randn(48, device=DEV), a, b, 2.0, torch.float32))
    dy = torch.randn(2, 3, 48, device=DEV)
    xa = (x.detach().reshape(-1, 64) @ a.detach().t())
    _opcheck(torch.ops.fxopt.lora_backward.default, (dy, x.detach(), w, a.detach(), b.detach(), xa, 2.0, True, True,
                                                     True, True, False))
    _opcheck(torch.ops.fxopt.lora_nf4_backward.default, (dy, x.detach(), *qargs, a.detach(), b.detach(), xa, 2.0,
                                                         *state, torch.float32, True, True, True, False))


@pytest.mark.parametrize("split", [0, 1, 3])
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_skinny_mm_fp32_accuracy_from_half(half, split):
    """fp32 adapters over a half model: big (half) @ small (fp32) with hi/lo split dots, vs an fp32 matmul; the
    reduction split over programs (partials summed; split 0: 2 programs in the interpreter) and not; [r, P] stores."""
    from fxopt.kernels import lora
    big = torch.randn(70, 150, device=DEV).to(half)
    small = torch.randn(150, 5, device=DEV)
    for b in (big, big.t().contiguous().t(), torch.randn(150, 70, device=DEV).to(half).t()):
        for transpose in (False, True):
            out = lora.skinny_mm(b, small, split, transpose=transpose)
            assert out.dtype == torch.float32 and out.shape == ((5, 70) if transpose else (70, 5))
            assert out.is_contiguous() and rel(out.t() if transpose else out, b.float() @ small) <= 1e-5


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_skinny_mm_rounded_copy_from_the_split_sum(half, split):
    """low=half: the kernel that sums the split partials also writes the result rounded to half (the rank-r term's
    cuBLAS operand), equal to torch's rounding of the fp32 result, which matches the product without the copy."""
    from fxopt.kernels import lora
    big = torch.randn(70, 150, device=DEV).to(half)
    small = torch.randn(150, 5, device=DEV) * 100   # bf16 / fp16 ties and large values both occur
    for transpose in (False, True):
        out, low = lora.skinny_mm(big, small, split, scale=0.3, transpose=transpose, low=half)
        assert out.dtype == torch.float32 and low.dtype == half and low.shape == out.shape
        assert torch.equal(out, lora.skinny_mm(big, small, split, scale=0.3, transpose=transpose))
        assert torch.equal(low, out.to(half))
        assert rel(out.t() if transpose else out, 0.3 * (big.float() @ small)) <= 1e-5


@pytest.mark.parametrize("choice", ["fp32", "triton"])
@pytest.mark.parametrize("split", [0, 1])
def test_rank_products_scale_and_transpose_in_the_store(choice, split, monkeypatch):
    """_mm's scale and [r, P] layout (the backward's dxa/dB scale and dA's transpose, done by the kernel's store on
    the Triton path; after the product on peft's fp32 path): values of scale * big @ small, the result contiguous."""
    from fxopt.kernels import lora
    monkeypatch.setenv("FXOPT_LORA_SKINNY", choice)
    real = lora.skinny_mm
    monkeypatch.setattr(lora, "skinny_mm", lambda big, small, **k: real(big, small, split, **k))
    big = torch.randn(150, 70, device=DEV).bfloat16().t()            # [70, 150], a transposed view
    small = torch.randn(150, 5, device=DEV)
    want = 1.7 * (big.float() @ small)
    for transpose in (False, True):
        got = lora._mm(big, small, True, 70, 1.7, transpose)
        assert got.is_contiguous() and got.dtype == torch.float32
        assert rel(got, want.t() if transpose else want) <= 1e-5


@pytest.mark.parametrize("choice", ["fp32", "triton"])
def test_fp32_adapter_products_either_path(choice, monkeypatch, no_fallback):
    """Both forms of the rank-r products (forced; on CUDA the faster is measured) give peft's result."""
    monkeypatch.setenv("FXOPT_LORA_SKINNY", choice)
    test_lora_dense_vs_eager((2, 9, 48), 80, 8, False, torch.bfloat16, torch.float32, no_fallback)


def test_bad_skinny_choice_is_a_clear_error(monkeypatch):
    from fxopt.kernels.lora import _mm
    monkeypatch.setenv("FXOPT_LORA_SKINNY", "fast")
    with pytest.raises(ValueError, match="FXOPT_LORA_SKINNY must be"):
        _mm(torch.randn(4, 8, device=DEV).half(), torch.randn(8, 2, device=DEV), True, 4)


def test_choice_keys_round_the_row_count(monkeypatch):
    """A choice made for one row count holds for every count in its power-of-2 bucket (a dynamic-length run would
    otherwise time each step's new count again), per layout, and not across buckets."""
    from fxopt.kernels import lora
    from fxopt.kernels.registry import tuning_key
    small = torch.randn(8, 2, device=DEV)
    monkeypatch.setattr(lora, "_SKINNY_CHOICE", {(tuning_key(torch.empty(64, 8), 64), 2, torch.float16): "fp32"})
    monkeypatch.setattr(lora, "skinny_mm",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("not the stored choice")))
    for rows in (33, 50, 64):
        big = torch.randn(rows, 8, device=DEV).half()
        assert rel(lora._mm(big, small, True, rows), big.float() @ small) <= 1e-6
    with pytest.raises(AssertionError, match="not the stored choice"):      # next bucket: its own choice
        lora._mm(torch.randn(65, 8, device=DEV).half(), small, True, 65)
    with pytest.raises(AssertionError, match="not the stored choice"):      # transposed layout: its own choice
        lora._mm(torch.randn(8, 50, device=DEV).half().t(), small, True, 50)
    assert tuning_key(torch.empty(50, 64), 50) == ((64, 64), (False, True))


@pytest.mark.parametrize("rows,copy_bytes", [(37, 4 * 11 * 5), (37, 4 * 11 * 37), (1, 1), (64, 4 * 11 * 7 + 3)])
def test_fp32_mm_blocks_of_rows_equal_one_fp32_copy(rows, copy_bytes):
    """peft's fp32 form (big.float() @ small) made a block of rows at a time (bounded copy): every row written, the
    same values as one whole copy, transposed big too."""
    from fxopt.kernels import lora
    small = torch.randn(11, 3, device=DEV)
    for big in (torch.randn(rows, 11, device=DEV).bfloat16(), torch.randn(11, rows, device=DEV).bfloat16().t()):
        want = big.float() @ small
        got = lora.fp32_mm(big, small, copy_bytes)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert rel(got, want) <= 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events")
def test_bench_ms_times_without_allocating():
    """The first-call tuners' timer holds no memory of its own (triton's do_bench holds a 256 MiB L2-flush buffer,
    which sat on top of the 1B step's peak) and measures a longer op as longer."""
    from fxopt.kernels.registry import bench_ms
    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(a)
    torch.mm(a, a, out=out)   # cuBLAS takes its workspace (32 MiB on the H200) from the allocator on first use
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    t1 = bench_ms(lambda: torch.mm(a, a, out=out))
    t8 = bench_ms(lambda: [torch.mm(a, a, out=out) for _ in range(8)])
    assert torch.cuda.max_memory_allocated() - before < 1 << 20
    assert 0 < t1 < t8
