"""lora_term: C := bias + s * L @ R in one pass (Triton interpreter on CPU, natively on GPU), against the fp32 math,
into column slices of a wider C, every element written and nothing beside it."""
import pytest
import torch

import fxopt  # noqa: F401
from fxopt.kernels import lora_term as T
from tests.helpers import rel

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ULP = {torch.float32: 4e-6, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}   # one rounding of C's dtype


@pytest.mark.parametrize("config", T.CONFIGS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,p,r,lr_dtype,bias", [(37, 83, 5, torch.float32, True),
                                                 (64, 64, 16, torch.float32, False),
                                                 (19, 130, 1, torch.bfloat16, True),
                                                 (33, 47, 64, torch.float16, False)])
def test_lora_term_matches_fp32_math(dtype, m, p, r, lr_dtype, bias, config):
    """Every config the tuner may pick (in the interpreter: both ways of forming a tile, one dot or r FMAs per
    element, at small tiles)."""
    left = torch.randn(m, r, device=DEV).to(lr_dtype)
    right = torch.randn(p, r, device=DEV).to(lr_dtype).t()          # R a transposed view, as lora_b.t() is
    b = torch.randn(p, device=DEV).to(dtype) if bias else None
    wide = torch.full((m, p + 9), float("nan"), device=DEV, dtype=dtype)
    out = T.lora_term(wide[:, 4:4 + p], left, right, 1.7, b, config=config)
    want = 1.7 * (left.float() @ right.float()) + (b.float() if bias else 0)
    assert out.data_ptr() == wide[:, 4:].data_ptr() and out.dtype == dtype
    assert not out.isnan().any(), "every element of C written"
    assert wide[:, :4].isnan().all() and wide[:, 4 + p:].isnan().all(), "nothing beside C written"
    assert (out.float() - want).abs().max() <= ULP[dtype] * want.abs().max() * 1.01
    assert rel(out.float(), want) <= ULP[dtype]


def test_lora_term_reference_above_max_rank():
    """Ranks above MAX_RANK take the torch form (same contract)."""
    r = T.MAX_RANK + 1
    left, right = torch.randn(8, r, device=DEV), torch.randn(r, 12, device=DEV)
    out = T.lora_term(torch.empty(8, 12, device=DEV), left, right, 0.5)
    assert rel(out, 0.5 * left @ right) <= 1e-6


def test_lora_term_cost_counts_c_once():
    flops, nbytes = T.lora_term_cost(4096, 14336, 16)
    assert flops == 2 * 4096 * 14336 * 16 and nbytes == 4096 * 14336 * 2 + 4 * 16 * (4096 + 14336)


@pytest.mark.gpu
def test_lora_term_times_its_configs_once_per_shape(monkeypatch):
    from fxopt.kernels import registry
    timed = []
    monkeypatch.setattr(T, "bench_ms", lambda fn, **k: timed.append(fn) or registry.bench_ms(fn, **k))
    monkeypatch.setattr(T, "TUNED", {})
    left, right = torch.randn(300, 16, device="cuda"), torch.randn(16, 777, device="cuda")
    for _ in range(2):
        out = T.lora_term(torch.empty(300, 777, device="cuda", dtype=torch.bfloat16), left, right, 2.0)
        assert rel(out.float(), 2.0 * left @ right) <= 2 ** -8
    assert len(timed) == len(T.CONFIGS) and list(T.TUNED.values())[0] in T.CONFIGS
