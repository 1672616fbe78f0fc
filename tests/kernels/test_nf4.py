"""NF4: reference dequantization bit-exact with bitsandbytes; the fused NF4/dense GEMM vs its reference (Triton
interpreter on CPU, natively on GPU)."""
import pytest
import torch

import fxopt  # noqa: F401
from fxopt.kernels import nf4 as K
from tests.helpers import rel

bnb_F = pytest.importorskip("bitsandbytes.functional")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def quantize(w, blocksize=64, nested=False):
    """bitsandbytes NF4 quantization of w [n, k] -> (NF4Weight, packed, quant_state)."""
    q, st = bnb_F.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    if nested:
        nw = K.NF4Weight(q, st.absmax, st.state2.absmax, st.state2.code, st.offset, blocksize, st.state2.blocksize,
                         *w.shape)
    else:
        nw = K.NF4Weight(q, st.absmax, None, None, None, blocksize, 256, *w.shape)
    return nw, q, st


def test_code_book_is_bitsandbytes_nf4():
    assert torch.equal(K.nf4_code("cpu"), bnb_F.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("shape", [(96, 64), (33, 128), (7, 33), (5, 40)])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_bit_exact(shape, blocksize, nested):
    for wdt in (torch.float32, torch.bfloat16, torch.float16):
        w = torch.randn(shape, dtype=wdt, device=DEV)
        nw, q, st = quantize(w, blocksize, nested)
        absmax = bnb_F.dequantize_blockwise(st.absmax, st.state2) + st.offset if nested else st.absmax
        if nested:
            assert torch.equal(K.dequantize_absmax_reference(st.absmax, st.state2.absmax, st.state2.code, st.offset),
                               absmax)
        for odt in (torch.float32, torch.bfloat16, torch.float16):
            ours = K.nf4_dequantize_reference(nw, odt)
            # bnb's CPU C kernel indexes absmax per row when in_features % blocksize != 0 (K even): compare
            # those with bnb's flat-layout PyTorch kernel instead (see nf4.py).
            if DEV == "cpu" and shape[1] % blocksize and shape[1] % 2 == 0:
                from bitsandbytes.backends.default.ops import _dequantize_4bit_compute as dq
                dq = getattr(dq, "__wrapped__", dq)
                theirs = dq(q.reshape(-1), absmax, K.nf4_code("cpu"), blocksize, shape, odt)
            else:
                theirs = torch.ops.bitsandbytes.dequantize_4bit(q, absmax, blocksize, "nf4", list(shape), odt)
                assert torch.equal(bnb_F.dequantize_4bit(q, st).to(odt), ours) or wdt != odt
            assert theirs.dtype == ours.dtype and torch.equal(theirs, ours), (wdt, odt)


def _operands(m, n, k, r, dtype, nested=False, blocksize=64, bias=True, dense=False):
    w = torch.randn(n, k, device=DEV)
    nw = quantize(w, blocksize, nested)[0]
    weight = K.nf4_dequantize_reference(nw, dtype) if dense else nw
    x = torch.randn(m, k, device=DEV, dtype=dtype)
    a = (torch.randn(r, k, device=DEV) * 0.2).to(dtype)
    b = (torch.randn(n, r, device=DEV) * 0.2).to(dtype)
    return weight, x, a, b, (torch.randn(n, device=DEV, dtype=dtype) if bias else None)


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
CASES = [  # m, n, k, r, dtype, nested, blocksize, dense
    (37, 96, 64, 4, torch.float32, False, 64, False),     # fast path, tile within a block
    (37, 96, 128, 4, torch.float32, True, 32, False),     # fast path, tiles spanning blocks, double quant
    (1, 48, 40, 3, torch.float32, False, 32, False),      # K % blocksize != 0: per-element path, one row
    (16, 7, 33, 4, torch.float16, True, 64, False),       # odd K, odd N, fp16
    (19, 96, 64, 16, torch.bfloat16, True, 64, False),    # bf16 (rounding emulated in the interpreter)
    (37, 96, 64, 4, torch.float32, False, 64, True),      # dense weight
    (9, 80, 48, 5, torch.float16, False, 64, True),
]


def _cfg(swap, m, p, q):
    """Interpreter-sized blocks, weight tile on the right (swap=0) or left (swap=1) of the dot; None on the GPU."""
    return None if DEV == "cuda" else K._interp_config(m, p, q)[:6] + (swap,)


@pytest.mark.parametrize("swap", [0, 1])
@pytest.mark.parametrize("m,n,k,r,dtype,nested,blocksize,dense", CASES)
def test_fused_matmul_forward_and_input_grad(m, n, k, r, dtype, nested, blocksize, dense, swap):
    weight, x, a, b, bias = _operands(m, n, k, r, dtype, nested, blocksize, dense=dense)
    xa = (x @ a.t()).to(dtype)
    for lora in (True, False):
        left, right = (xa, b.t()) if lora else (None, None)
        y = K.fused_matmul(x, weight, True, left, right, 1.7, bias, config=_cfg(swap, m, n, k))
        y_ref = K.fused_matmul_reference(x, weight, True, left, right, 1.7, bias)
        assert y.dtype == dtype and y.shape == (m, n) and torch.isfinite(y).all()
        assert rel(y, y_ref) <= TOL[dtype]
    dy = torch.randn(m, n, device=DEV, dtype=dtype)
    dxa = (dy @ b).to(dtype)
    dx = K.fused_matmul(dy, weight, False, dxa, a, 1.0, None, config=_cfg(swap, m, k, n))
    dx_ref = K.fused_matmul_reference(dy, weight, False, dxa, a, 1.0, None)
    assert dx.shape == (m, k) and rel(dx, dx_ref) <= TOL[dtype]
    if dtype == torch.float32:   # against plain torch on the dequantized weight
        wd = K.nf4_dequantize_reference(weight, dtype) if not dense else weight
        y = K.fused_matmul(x, weight, True, xa, b.t(), 1.7, bias, config=_cfg(swap, m, n, k))
        y_eager = x @ wd.t() + 1.7 * (xa @ b.t()) + (bias if bias is not None else 0)
        assert rel(y, y_eager) <= 1e-5 and rel(dx, dy @ wd + dxa @ a) <= 1e-5


def test_strided_input_and_compute_dtype():
    weight, x, a, b, bias = _operands(24, 64, 64, 4, torch.float32)
    xs = torch.randn(24, 128, device=DEV)[:, ::2]      # column stride 2
    xt = torch.randn(64, 24, device=DEV).t()
    for inp in (xs, xt):
        y = K.fused_matmul(inp, weight, True, None, None, 1.0, bias)
        assert rel(y, K.fused_matmul_reference(inp.contiguous(), weight, True, None, None, 1.0, bias)) <= 1e-5
    # fp32 input rounded to an fp16 compute dtype inside the kernel (a stripped cast)
    y = K.fused_matmul(xt, weight, True, None, None, 1.0, None, out_dtype=torch.float32, compute_dtype=torch.float16)
    y_ref = K.fused_matmul_reference(xt, weight, True, None, None, 1.0, None, torch.float32, torch.float16)
    assert y.dtype == torch.float32 and rel(y, y_ref) <= 1e-6


@pytest.mark.parametrize("cfg", [(16, 16, 16, 1, 4, 1), (32, 64, 128, 4, 4, 1, 1), (64, 32, 32, 2, 4, 1, 0),
                                 (16, 32, 64, 2, 4, 1, 1)])
def test_block_sizes_selectable(cfg):
    weight, x, a, b, bias = _operands(21, 80, 128, 4, torch.float32, nested=True, blocksize=64)
    xa = x @ a.t()
    y = K.fused_matmul(x, weight, True, xa, b.t(), 2.0, bias, config=cfg)
    assert rel(y, K.fused_matmul_reference(x, weight, True, xa, b.t(), 2.0, bias)) <= 1e-5
    dy = torch.randn(21, 80, device=DEV)
    dx = K.fused_matmul(dy, weight, False, dy @ b, a, 1.0, None, config=cfg)
    assert rel(dx, K.fused_matmul_reference(dy, weight, False, dy @ b, a, 1.0, None)) <= 1e-5
    K.set_config("fwd", cfg)
    try:
        assert rel(K.fused_matmul(x, weight, True), K.fused_matmul_reference(x, weight, True)) <= 1e-5
    finally:
        K.set_config("fwd", None)
    with pytest.raises(ValueError):
        K.set_config("sideways", cfg)
