"""benchmarks/kernel_bench/lora_parts.py at tiny shapes on CPU (Triton interpreter): every path runs, no kernel falls
back, and each path's error vs fp64 is what its precision allows."""
import pytest
import torch

pytest.importorskip("bitsandbytes")
FP32_EXACT = {"skinny_mm", "peft_fp32", "cublas_hilo"}   # fp32-level rank-r products (skinny_mm ~2e-6 measured)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke; on a GPU run benchmarks/kernels.py --ops lora_parts")
def test_lora_parts_cpu_smoke():
    from benchmarks.kernel_bench.lora_parts import cpu_smoke
    rows, check = cpu_smoke()
    assert check["errors"] == 0, [r for r in rows if "error" in r]
    assert check["runtime_fallbacks"] == []
    assert all(v for k, v in check.items() if k.startswith("nf4_dequant_bit_exact"))
    assert {r["part"] for r in rows} == {"skinny", "base", "op", "nf4_dequant"}
    assert {r["base"] for r in rows if "base" in r} == {"bf16", "nf4"}
    for r in rows:
        assert r["ms"] > 0 and r["rel_err"] < 1e-2, r
        if r["impl"] in FP32_EXACT:
            assert r["rel_err"] < 2e-5, r
        if r["part"] == "op" and r["adapters"] == "fp32" and "rel_errs" in r:   # dA, dB stay fp32-accurate
            assert max(r["rel_errs"]["dA"], r["rel_errs"]["dB"]) < 2e-5, r
        if r["part"] == "nf4_dequant":
            assert r["rel_err"] == 0, r
