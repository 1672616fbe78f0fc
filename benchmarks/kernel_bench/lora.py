"""LoRA / QLoRA linear layer fwd+bwd at Llama-3-8B shapes, 4096 tokens, r=16: peft(+bitsandbytes) eager, Inductor
(torch.compile of the peft module) and fxopt (torch.compile(backend="fxopt")), and both compilers with CUDA graphs
(Inductor's mode="reduce-overhead", fxopt's option "cudagraphs"; FXOPT_LORA_BENCH_CG=0 leaves them out).

Per shape and base (NF4 double-quant bf16-compute, or dense bf16), adapters as peft makes them by default over a bf16
model (fp32, autocast_adapter_dtype=True) and in bf16. Time: fwd + bwd (grads of x, A, B), leaf grads reset each
run: `ms` the wall time (do_bench), `gpu_ms` the kernels' summed durations (torch.profiler). Memory:
torch.cuda.max_memory_allocated over one fwd+bwd above what was allocated before it — a dequantized bf16 copy of W
(K*N*2 bytes) kept or re-materialized would show there. Correctness: fxopt vs peft eager on the same run.
"""
import json
import os

import torch

from benchmarks.kernel_bench.common import cprofile_calls, do_bench, fwd_bwd_step, gpu_busy_ms, rel

T, R, ALPHA = 4096, 16, 32          # tokens, rank, lora_alpha (scale 2)
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]   # (in_features K, out_features N)


class Proj(torch.nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.proj = lin

    def forward(self, x):
        return self.proj(x)


def make_layer(k, n, nf4, adapter_fp32):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    if nf4:
        import bitsandbytes as bnb
        q = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                              quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
        lin = q.cuda()
    lin.requires_grad_(False)
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["proj"], init_lora_weights=False)
    return get_peft_model(Proj(lin), cfg, autocast_adapter_dtype=adapter_fp32).train()


def peak_mib(fn, x, gy):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(x).backward(gy)
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


def bench(fn, x, gy, leaves):
    """(wall ms: do_bench median, GPU ms: the kernels' summed durations) of one fwd+bwd."""
    step = fwd_bwd_step(fn, (x,), gy, leaves, accumulate=False)
    return do_bench(step, warmup=10, rep=50), gpu_busy_ms(step)


def host_profile(fn, x, gy, leaves, n=50, top=25):
    """Where the host time of one fwd+bwd goes: cProfile over n steps, the top functions by own time (us per step)
    and by cumulative time. The GPU runs ahead; the host's Python is what cProfile sees."""
    step = fwd_bwd_step(fn, (x,), gy, leaves, accumulate=False)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    return cprofile_calls(step, n, top)


def grads(fn, x, gy, leaves):
    for t in leaves:
        t.grad = None
    y = fn(x)
    y.backward(gy)
    return [y.detach().float()] + [t.grad.float() for t in leaves]


def run(ceiling_tbps):
    import fxopt  # noqa: F401
    from fxopt.kernels import nf4 as nf4_kernels
    rows, check = [], {}
    # (nf4 base, fp32 adapters): peft's default keeps adapters fp32 over a bf16 model; FXOPT_LORA_BENCH_ALL=1 adds bf16.
    variants = [(True, True), (False, True)]
    if os.environ.get("FXOPT_LORA_BENCH_ALL") == "1":
        variants += [(True, False), (False, False)]
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # noqa: BLE001
        print("bitsandbytes unavailable, bf16 base only:", repr(e)[:120])
        variants = [v for v in variants if not v[0]]
    for k, n in SHAPES:
        for nf4, fp32_adapters in variants:
            layer = make_layer(k, n, nf4, fp32_adapters)
            leaves = [p for p in layer.parameters() if p.requires_grad]
            x = torch.randn(T, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            gy = torch.randn(T, n, device="cuda", dtype=torch.bfloat16)
            leaves = [x] + leaves
            torch._dynamo.reset()
            impls = {"eager": layer, "inductor": torch.compile(layer),
                     "fxopt": torch.compile(layer, backend="fxopt")}
            if os.environ.get("FXOPT_LORA_BENCH_CG", "1") == "1":
                # both compilers with their graphs replayed as CUDA graphs: the host's launch work gone (fxopt's op
                # costs ~2 ms of host time per fwd+bwd here, more than its GPU time at 4096 x 4096)
                impls["inductor_cudagraphs"] = torch.compile(layer, mode="reduce-overhead")
                impls["fxopt_cudagraphs"] = torch.compile(layer, backend="fxopt", options={"cudagraphs": True})
            base = "nf4" if nf4 else "bf16"
            tag = f"{base}_{k}x{n}_{'a32' if fp32_adapters else 'a16'}"
            ref = grads(layer, x, gy, leaves)
            got = grads(impls["fxopt"], x, gy, leaves)
            rep = fxopt.last_report()
            check[tag] = dict(matched=rep.matched.get("lora_nf4" if nf4 else "lora", 0),
                              **{name: rel(g, r) for name, g, r in zip(("y", "dx", "dA", "dB"), got, ref)})
            print(f"CHECK {tag} {check[tag]}", flush=True)
            flops = 2 * 2 * T * k * n + 3 * 2 * T * R * (k + n)   # fwd + dx (no dW); LoRA: 3 skinny GEMMs each way
            for name, f in impls.items():
                try:
                    ms, busy = bench(f, x, gy, leaves)
                    mem = peak_mib(f, x, gy)
                except Exception as e:  # noqa: BLE001
                    rows.append(dict(op="lora", impl=name, base=base, k=k, n=n, error=f"{type(e).__name__}: {e}"))
                    continue
                rows.append(dict(op="lora", impl=name, base=base, adapters="fp32" if fp32_adapters else "bf16",
                                 tokens=T, k=k, n=n, r=R, ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1),
                                 gpu_ms=round(busy, 4),
                                 peak_extra_mib=mem, dequant_w_mib=round(k * n * 2 / 2**20, 1)))
                print("ROW " + json.dumps(rows[-1]), flush=True)   # partial results survive a timeout
            if nf4 and k == n and os.environ.get("FXOPT_LORA_HOST_PROFILE", "1") == "1":
                try:
                    check[f"host_profile_{tag}"] = {name: host_profile(impls[name], x, gy, leaves)
                                                    for name in ("fxopt", "inductor")}
                except Exception as e:  # noqa: BLE001
                    check[f"host_profile_{tag}"] = f"{type(e).__name__}: {e}"[:300]
            del impls, layer
            torch.cuda.empty_cache()
    from fxopt.kernels.lora import _DENSE_CHOICE, _NF4_CHOICE, _SKINNY_CHOICE
    from fxopt.report import RUNTIME_FALLBACKS
    check["tuned_configs"] = {str(key): cfg for key, cfg in nf4_kernels._TUNED.items()}
    check["dense_gemm_choice"] = {str(key): v for key, v in _DENSE_CHOICE.items()}
    check["nf4_gemm_choice"] = {str(key): v for key, v in _NF4_CHOICE.items()}   # fused vs chunked, measured
    check["skinny_choice"] = {str(key): v for key, v in _SKINNY_CHOICE.items()}  # fp32-adapter products
    check["runtime_fallbacks"] = [str(f) for f in RUNTIME_FALLBACKS]   # must be empty: a fallback is not a kernel
    return rows, check
