"""NF4 dequantization, whole-row chunks: the flat kernel (one int32 word per packed byte) at several launch configs
against the 2-D tile kernel and bitsandbytes' own CUDA kernel, at Llama-3-8B weight shapes, double-quantized NF4 ->
bf16. Bandwidth on minimal bytes (read 0.5 B + write 2 B per element) against the copy ceiling; also the write-only
ceiling (fill_ of the output). Every variant's output is checked bit-exact against the tile kernel's. ROUNDS passes
over all variants, interleaved (single do_bench medians of the same work varied by up to 40% in the first sweep);
the row keeps each pass and reports the minimum and the median.

The first sweep (2026-12-01, f7eef8b) also tried two other code-book lookups, one gather per byte from a 256-entry
table of fp32 pairs and a select tree; both were slower and were removed (rows in the committed result file).

usage (GPU, bitsandbytes importable): python benchmarks/kernels.py --sweep nf4_dequant_flat --out OUT.json
"""
import statistics

import torch

from benchmarks.kernel_bench.nf4_dequant import SHAPES, bnb_nf4

CONFIGS = [(512, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 4)]
ROUNDS = 3


def sweep():
    import bitsandbytes as bnb
    import fxopt.kernels.nf4_chunked as C
    from benchmarks.kernel_bench.common import copy_ceiling_tbps, do_bench
    ceiling = copy_ceiling_tbps()
    saved, rows = C.FLAT_CONFIG, []

    def variants(wt, p, qs, n, k, out):
        def flat(cfg):
            def f():
                C.FLAT_CONFIG = cfg
                return C.dequantize_chunk(wt, 0, n, 0, k, torch.bfloat16, out=out)
            return f

        def tile():
            C.FLAT_CONFIG = None
            return C.dequantize_chunk(wt, 0, n, 0, k, torch.bfloat16, out=out)
        yield "write_only_fill", None, lambda: out.fill_(0.0)
        yield "tile", list(C.DEQUANT_CONFIG), tile
        yield "bnb", None, lambda: bnb.functional.dequantize_4bit(p.data, qs, out=out)
        for cfg in CONFIGS:
            yield "flat", list(cfg), flat(cfg)

    try:
        for n, k in SHAPES:
            p, wt = bnb_nf4(n, k)
            qs = p.quant_state
            C.FLAT_CONFIG = None
            ref = C.dequantize_chunk(wt, 0, n, 0, k, torch.bfloat16)
            out = torch.empty_like(ref)
            found = {}
            for _ in range(ROUNDS):
                for impl, cfg, fn in variants(wt, p, qs, n, k, out):
                    r = found.setdefault((impl, str(cfg)), dict(n=n, k=k, impl=impl, config=cfg, passes=[]))
                    try:
                        out.fill_(float("nan"))
                        fn()
                        if impl != "write_only_fill":
                            r["exact"] = bool(torch.equal(out, ref)) and r.get("exact", True)
                        r["passes"].append(round(do_bench(fn), 4))
                    except Exception as e:  # noqa: BLE001
                        r["error"] = f"{type(e).__name__}: {e}"[:200]
            for r in found.values():
                if r["passes"]:
                    r["ms"], r["ms_median"] = min(r["passes"]), statistics.median(r["passes"])
                    moved = n * k * (2 if r["impl"] == "write_only_fill" else 2.5)
                    r["tbps"] = round(moved / r["ms"] / 1e9, 3)
                    r["frac_of_copy"] = round(r["tbps"] / ceiling, 3)
                rows.append(r)
                print("ROW", r, flush=True)
    finally:
        C.FLAT_CONFIG = saved
    rows.sort(key=lambda r: (r["n"], r["k"], r.get("ms", 1e9)))
    return rows
