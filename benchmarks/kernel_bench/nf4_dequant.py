"""NF4 dequantization kernel (fxopt/kernels/nf4_chunked.py) alone: launch-config sweep at Llama-3-8B weight shapes,
double-quantized bitsandbytes NF4 -> bf16, bandwidth on minimal bytes (read 0.5 B + write 2 B per element, block
scales ignored) against the copy ceiling. Each config's output is checked bit-exact against the default config's.

usage (GPU, bitsandbytes importable): python benchmarks/kernels.py --sweep nf4_dequant --out OUT.json
"""
import itertools
import torch

SHAPES = [(14336, 4096), (4096, 14336), (4096, 4096)]   # [out_features N, in_features K]
CONFIGS = [(bn, bk, w) for bn, bk, w in itertools.product((16, 32, 64, 128), (64, 128, 256, 512), (4, 8))
           if 2048 <= bn * bk <= 32768]


def bnb_nf4(n, k):
    """(bitsandbytes Params4bit, fxopt NF4Weight) of one random double-quantized [n, k] weight on CUDA."""
    import bitsandbytes as bnb
    from fxopt.kernels.nf4 import NF4Weight
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
    p = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True).cuda()
    qs = p.quant_state
    return p, NF4Weight(p.data, qs.absmax, qs.state2.absmax, qs.state2.code, qs.offset, qs.blocksize,
                        qs.state2.blocksize, n, k)


def nf4_weight(n, k):
    return bnb_nf4(n, k)[1]


def sweep():
    import fxopt.kernels.nf4_chunked as C
    from benchmarks.kernel_bench.common import copy_ceiling_tbps, do_bench
    ceiling = copy_ceiling_tbps()
    default, rows = C.DEQUANT_CONFIG, []
    try:
        for n, k in SHAPES:
            wt = nf4_weight(n, k)
            C.DEQUANT_CONFIG = default
            ref = C.dequantize_chunk(wt, 0, n, 0, k, torch.bfloat16)
            out = torch.empty_like(ref)
            moved = n * k * 2.5
            for cfg in CONFIGS:
                C.DEQUANT_CONFIG = cfg
                out.fill_(float("nan"))
                try:
                    C.dequantize_chunk(wt, 0, n, 0, k, torch.bfloat16, out=out)
                    exact = bool(torch.equal(out, ref))
                    ms = do_bench(lambda: C.dequantize_chunk(wt, 0, n, 0, k, torch.bfloat16, out=out))
                except Exception as e:  # noqa: BLE001
                    rows.append(dict(n=n, k=k, config=cfg, error=f"{type(e).__name__}: {e}"[:200]))
                    continue
                rows.append(dict(n=n, k=k, config=cfg, default=cfg == default, exact=exact, ms=round(ms, 4),
                                 tbps=round(moved / ms / 1e9, 3), frac_of_copy=round(moved / ms / 1e9 / ceiling, 3)))
    finally:
        C.DEQUANT_CONFIG = default
    rows.sort(key=lambda r: (r["n"], r["k"], r.get("ms", 1e9)))
    return rows
