"""The LoRA step's rank-r kernels at Llama-3-8B QLoRA shapes (4096 tokens, rank 16, fp32 adapters):

- the rank-r term C := s * L @ R as nf4_chunked writes it (cuBLAS K=16 GEMM after bf16 conversions of L and R);
- skinny_mm (fp32-accurate half @ fp32 rank-r products), split over programs (partials summed) or not, and
  peft's fp32 form, on the layouts of the step (x A^T, dy B, dy^T xa, x^T dxa).

Each variant: GPU kernel time per call (torch.profiler, `gpu_ms`: what a CUDA-graph replay costs, less the gaps
between kernels), registry.bench_ms (the tuners' timer) and bandwidth on minimal bytes against the copy ceiling;
every output checked against the fp32 math. The two sweeps of 2026-12-01 (lora_term_sweep_h200*.json, 9e8f77f and
670c1c0) also timed a Triton kernel for the rank-r term (lora_term, since removed: slower than cuBLAS in the step)
and four other skinny_mm launch configs (16-64 rows x 64-256 columns per program; each slower at every shape).

usage (GPU): python benchmarks/kernels.py --sweep lora_rank --out OUT.json
"""
import torch

M, R = 4096, 16
WIDTHS = (1024, 4096, 14336)


def _row(kind, impl, shape, cfg, fn, want, nbytes, ceiling):
    from benchmarks.kernel_bench.common import gpu_busy_ms
    from fxopt.kernels.registry import bench_ms
    r = dict(kind=kind, impl=impl, shape=list(shape), config=list(cfg) if cfg else None)
    try:
        got = fn()
        r["rel_err"] = float((got.float() - want).norm() / want.norm())
        r["gpu_ms"] = round(gpu_busy_ms(fn), 4)
        r["bench_ms"] = round(bench_ms(fn), 4)
        r["tbps"] = round(nbytes / r["gpu_ms"] / 1e9, 3)
        r["frac_of_copy"] = round(r["tbps"] / ceiling, 3)
    except Exception as e:  # noqa: BLE001
        r["error"] = f"{type(e).__name__}: {e}"[:300]
    print("ROW", r, flush=True)
    return r


def sweep():
    from benchmarks.kernel_bench.common import copy_ceiling_tbps
    from fxopt.kernels.lora import fp32_mm, skinny_mm
    ceiling = copy_ceiling_tbps()
    dev, bf = "cuda", torch.bfloat16
    rows = []
    for p in WIDTHS:
        left = torch.randn(M, R, device=dev)
        right = torch.randn(p, R, device=dev).t() * 0.1
        out = torch.empty(M, p, device=dev, dtype=bf)
        want = 2.0 * left @ right
        nbytes = M * p * 2
        rows.append(_row("lora term", "torch_mm", (M, p), None,
                         lambda: torch.mm(left.to(bf), (right * 2.0).to(bf), out=out), want, nbytes, ceiling))
    for name, big_shape, transposed in (("x A^T", (M, 4096), False), ("x A^T", (M, 14336), False),
                                        ("dy^T xa", (4096, M), True), ("dy^T xa", (14336, M), True),
                                        ("dy^T xa", (1024, M), True), ("dy B", (M, 1024), False)):
        big = (torch.randn(big_shape[::-1], device=dev).to(bf).t() if transposed
               else torch.randn(big_shape, device=dev).to(bf))
        small = torch.randn(big_shape[1], R, device=dev) / big_shape[1] ** 0.5
        want = big.float() @ small
        nbytes = big.numel() * 2
        for split in (0, 1):
            rows.append(_row(f"skinny {name}", "skinny_mm", big_shape, ("split", split),
                             lambda split=split: skinny_mm(big, small, split), want, nbytes, ceiling))
        rows.append(_row(f"skinny {name}", "fp32_mm", big_shape, None, lambda: fp32_mm(big, small), want,
                         nbytes, ceiling))
    return rows
