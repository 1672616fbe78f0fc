"""The LoRA backward's two products of dy (dxa = s dy B, dB = s dy^T xa; fp32 adapters, bf16 dy) at Llama-3-8B
shapes (4096 tokens, r = 16; N = 1024, 4096, 14336): lora_dy.dy_pass at launch configs against the two skinny
kernels it would replace (lora.skinny_mm twice, as lora._backward's "separate" path calls them). GPU time of the
whole call (the kernel and its two split sums) by registry.bench_ms (the GPU spins while the host queues the timed
runs, so no run waits on the host), in interleaved ROUNDS; every config's result checked against fp64 torch
(rel_err). Bandwidth on minimal bytes: dy read once.

- 575d9f8, the 8B step's tuner: the first kernel (dB as dy^T xa; BM 256, BN 64, 8 warps, 3 stages) was slower than
  the two skinny kernels at every shape: 38.2 vs 33.6 us at 4096 x 4096, 88.5 vs 81.5 at 4096 x 14336.
- 3db28d6, this sweep with triton's do_bench (lora_dy_sweep_h200.json): its times include the host's launch latency
  (0.08-0.13 ms for calls of 17-70 us GPU time), so only the ranking at 14336 means much. The config it picked,
  (1, 256, 64, 8, 3, 256), then won the step's tuner at every shape (GPU us: 17.3 vs 21.2, 30.0 vs 33.4, 69.4 vs
  83.5) and is the default. In both sweeps (xa^T dy)^T beat dy^T xa at the best configs of every shape, so the
  kernel keeps only that form.

usage (GPU): python benchmarks/kernels.py --sweep lora_dy --out OUT.json
"""
import itertools
import statistics

import torch

M, R, SCALE = 4096, 16, 2.0
NS = (1024, 4096, 14336)
# (BM, BN, num_warps, num_stages, split-sum BLOCK). The committed sweeps also ran dB's tile as dy^T xa (a transpose
# of every dy tile): their configs carry a leading 0 for it, 1 for (xa^T dy)^T, the kernel's one form since.
CONFIGS = [(bm, bn, w, st, blk) for bm, bn, w, st, blk in
           itertools.product((128, 256), (64, 128), (4, 8), (2, 3, 4), (256, 1024))]
ROUNDS = 2


def sweep():
    from fxopt.kernels.lora import skinny_mm
    from fxopt.kernels.lora_dy import dy_pass
    from fxopt.kernels.registry import bench_ms
    from benchmarks.kernel_bench.common import copy_ceiling_tbps, rel
    ceiling = copy_ceiling_tbps()
    rows = []
    for n in NS:
        g = torch.Generator(device="cuda").manual_seed(n)
        dy = torch.randn(M, n, device="cuda", generator=g).bfloat16()
        b = torch.randn(n, R, device="cuda", generator=g) * 0.1
        xa = torch.randn(M, R, device="cuda", generator=g)
        want_dxa = SCALE * (dy.double() @ b.double())
        want_db = SCALE * (dy.double().t() @ xa.double())
        cands = {"two_skinny": lambda: (skinny_mm(dy, b, scale=SCALE, low=torch.bfloat16)[0], None,
                                        skinny_mm(dy.t(), xa, scale=SCALE))}
        for cfg in CONFIGS:
            cands[f"dy_pass {cfg}"] = (lambda c: lambda: dy_pass(dy, b, xa, SCALE, low=torch.bfloat16, config=c))(cfg)
        times, errs = {k: [] for k in cands}, {}
        for name, fn in cands.items():
            try:
                out = fn()
                errs[name] = max(rel(out[0], want_dxa), rel(out[2], want_db))
            except Exception as e:  # noqa: BLE001 - a config that does not compile (shared memory) is a row
                errs[name] = f"{type(e).__name__}: {e}"[:200]
        for _ in range(ROUNDS):
            for name, fn in cands.items():
                if isinstance(errs[name], float):
                    times[name].append(bench_ms(fn, warmup=5, rep=40))
        nbytes = dy.numel() * 2
        for name in cands:
            t = times[name]
            row = dict(n=n, m=M, r=R, impl=name, rel_err=errs[name] if isinstance(errs[name], str)
                       else float(f"{errs[name]:.3g}"))
            if t:
                med = statistics.median(t)
                row.update(ms_min=round(min(t), 4), ms_median=round(med, 4), passes=[round(v, 4) for v in t],
                           tbps=round(nbytes / min(t) / 1e9, 3), copy_ceiling_frac=round(nbytes / min(t) / 1e9 /
                                                                                          ceiling, 3))
            rows.append(row)
        base = min(times["two_skinny"])
        best = min((min(v), k) for k, v in times.items() if v and k != "two_skinny")
        rows.append(dict(n=n, summary=True, two_skinny_ms=round(base, 4), best=best[1], best_ms=round(best[0], 4),
                         speedup=round(base / best[0], 3)))
        print("SUMMARY", rows[-1], flush=True)
    return dict(rows=rows, copy_ceiling_tbps=round(ceiling, 3))
