"""NF4 dequantization, whole-row chunks: the flat kernel (one int32 word per packed byte, three code-book lookups)
against the 2-D tile kernel and bitsandbytes' own CUDA kernel, at Llama-3-8B weight shapes, double-quantized NF4 ->
bf16. Bandwidth on minimal bytes (read 0.5 B + write 2 B per element) against the copy ceiling; also the write-only
ceiling (fill_ of the output). Every variant's output is checked bit-exact against the tile kernel's.

usage (GPU, bitsandbytes importable): python benchmarks/kernels.py --sweep nf4_dequant_flat --out OUT.json
"""
import itertools

import torch

from benchmarks.kernel_bench.nf4_dequant import SHAPES

MODES = {0: "gather2", 1: "pair_lut", 2: "select"}
CONFIGS = list(itertools.product(MODES, (512, 1024, 2048, 4096), (4, 8)))


def sweep():
    import bitsandbytes as bnb
    import fxopt.kernels.nf4_chunked as C
    from benchmarks.kernel_bench.common import copy_ceiling_tbps, do_bench
    from fxopt.kernels.nf4 import NF4Weight
    ceiling = copy_ceiling_tbps()
    saved, rows = C.FLAT_CONFIG, []

    def row(n, k, impl, fn, out, ref, **kw):
        out.fill_(float("nan"))
        try:
            fn()
            exact = bool(torch.equal(out, ref))
            ms = do_bench(fn)
        except Exception as e:  # noqa: BLE001
            rows.append(dict(n=n, k=k, impl=impl, error=f"{type(e).__name__}: {e}"[:200], **kw))
            return
        moved = n * k * 2.5
        rows.append(dict(n=n, k=k, impl=impl, exact=exact, ms=round(ms, 4), tbps=round(moved / ms / 1e9, 3),
                         frac_of_copy=round(moved / ms / 1e9 / ceiling, 3), **kw))
        print("ROW", rows[-1], flush=True)

    try:
        for n, k in SHAPES:
            w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
            p = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True).cuda()
            qs = p.quant_state
            wt = NF4Weight(p.data, qs.absmax, qs.state2.absmax, qs.state2.code, qs.offset, qs.blocksize,
                           qs.state2.blocksize, n, k)
            C.FLAT_CONFIG = None
            ref = C.dequantize_chunk(wt, 0, n, 0, k, torch.bfloat16)
            out = torch.empty_like(ref)
            ms_fill = do_bench(lambda: out.fill_(0.0))
            rows.append(dict(n=n, k=k, impl="write_only_fill", ms=round(ms_fill, 4),
                             write_tbps=round(n * k * 2 / ms_fill / 1e9, 3)))
            row(n, k, "tile", lambda: C.dequantize_chunk(wt, 0, n, 0, k, torch.bfloat16, out=out), out, ref,
                config=list(C.DEQUANT_CONFIG))
            row(n, k, "bnb", lambda: bnb.functional.dequantize_4bit(p.data, qs, out=out), out, ref)
            for mode, block, warps in CONFIGS:
                C.FLAT_CONFIG = (mode, block, warps)
                row(n, k, f"flat_{MODES[mode]}", lambda: C.dequantize_chunk(wt, 0, n, 0, k, torch.bfloat16, out=out),
                    out, ref, config=[mode, block, warps])
    finally:
        C.FLAT_CONFIG = saved
    rows.sort(key=lambda r: (r["n"], r["k"], r.get("ms", 1e9)))
    return rows
