"""Host (CPU) time per call of the pieces of fxopt's LoRA/NF4 ops, with the GPU kept busy so that no call waits on it.

Why: without CUDA graphs the 8B QLoRA step waits on the host (8.86k tok/s vs 14.6k with graphs, 7c6901b); the
op's fwd+bwd took ~2-3 ms of host time per layer at 8B shapes (kernels_lora_host_h200.json) against ~0.5 ms of GPU.
Method: torch.cuda._sleep fills the stream for longer than the timed calls take on the host, then `n` calls are
timed with perf_counter and the stream is drained; us = host microseconds per call (median of `reps` batches).
  python -m benchmarks.kernel_bench.host_overhead --out host.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

BF = torch.bfloat16


def host_us(fn, n=20, reps=5, sleep_cycles=int(2e8)):
    """Median host microseconds per call of fn over `reps` batches of `n` calls, the GPU busy throughout."""
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        torch.cuda._sleep(sleep_cycles)          # ~0.1 s of GPU time at ~2 GHz: the calls below never wait on it
        t = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - t) * 1e6 / n)
        torch.cuda.synchronize()
    return round(statistics.median(out), 1)


def _noop_op():
    """A custom op that launches nothing, registered like fxopt's (fake + autograd): the dispatch cost alone."""
    @torch.library.custom_op("fxopt_bench::noop", mutates_args=())
    def noop(x: torch.Tensor, s: float) -> torch.Tensor:
        return x.new_empty(0)

    @noop.register_fake
    def _(x, s):
        return x.new_empty(0)

    noop.register_autograd(lambda ctx, g: (None, None), setup_context=lambda ctx, inputs, output: None)
    return torch.ops.fxopt_bench.noop


def rows_for(m=4096, k=4096, n=4096, r=16):
    import triton
    import triton.language as tl

    import fxopt  # noqa: F401
    from benchmarks.kernel_bench.lora_parts import nf4_layer
    from fxopt.kernels import lora as L
    from fxopt.kernels.nf4_chunked import chunked_matmul, dequantize_chunk

    @triton.jit
    def _empty_kernel(X, a, b, c, d, e, f, g, h, i, j, BLOCK: tl.constexpr, FLAG: tl.constexpr):
        pid = tl.program_id(0)
        if pid < 0:
            tl.store(X + pid, a + b + c + d + e + f + g + h + i + j)

    dev = torch.device("cuda")
    x = torch.randn(m, k, device=dev).to(BF)
    dy = torch.randn(m, n, device=dev).to(BF)
    a = torch.randn(r, k, device=dev) / k ** 0.5
    b = torch.randn(n, r, device=dev) * 0.3
    small = torch.randn(64, 64, device=dev).to(BF)
    small_out = torch.empty(64, 64, device=dev, dtype=BF)
    w = (torch.randn(n, k, device=dev) / k ** 0.5).to(BF)
    q, w4, qargs, state = nf4_layer(w)
    xa = L.skinny_mm(x, a.t())
    noop = _noop_op()
    xg = x.detach().clone().requires_grad_()
    ag, bg = a.clone().requires_grad_(), b.clone().requires_grad_()

    def fwd_bwd():
        y, _ = torch.ops.fxopt.lora_nf4(xg, *qargs, None, ag, bg, 2.0, *state, BF, BF)
        y.backward(dy)
        xg.grad = ag.grad = bg.grad = None

    left = xa.to(BF)
    right = b.t().to(BF)
    out_mn = torch.empty(m, n, device=dev, dtype=BF)
    wdq = dequantize_chunk(w4, 0, n, 0, k, BF)
    compiled = _empty_kernel[(1,)](x, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, BLOCK=64, FLAG=True)
    stream = torch.cuda.current_stream().cuda_stream

    def direct_launch():   # the compiled kernel's launcher without JITFunction.run (private API; may fail)
        compiled.run(1, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None,
                     x, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 64, True)

    cases = {
        "rank term: xa.to(bf16)": lambda: xa.to(BF),
        "rank term: (B^T * s).to(bf16)": lambda: (b.t() * 2.0).to(BF),
        "rank term: torch.mm K=16 out=": lambda: torch.mm(left, right, out=out_mn),
        "rank term: addmm_ beta=0 alpha=s K=16": lambda: out_mn.addmm_(left, right, beta=0, alpha=2.0),
        "base: addmm_ x W^T (beta 1)": lambda: out_mn.addmm_(x, wdq.t()),
        "base: torch.mm x W^T out=": lambda: torch.mm(x, wdq.t(), out=out_mn),
        "triton launch, direct CompiledKernel.run": direct_launch,
        "part.sum(0) [5, 4096, 16] fp32": lambda: torch.empty(5, m, r, device=dev).sum(0),
        "torch.empty": lambda: torch.empty((m, r), device=dev, dtype=torch.float32),
        "torch.mm 64x64 out=": lambda: torch.mm(small, small, out=small_out),
        "tensor.to(bf16) 64x64 fp32": lambda: small.float(),
        "slice + t()": lambda: x[:, :128].t(),
        "triton launch, 11 args, JITFunction": lambda: _empty_kernel[(1,)](x, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
                                                                          BLOCK=64, FLAG=True),
        "custom op no-op, no_grad": lambda: _no_grad(noop, x, 1.0),
        "custom op no-op, grad": lambda: noop(xg, 1.0),
        "skinny_mm x A^T": lambda: L.skinny_mm(x, a.t()),
        "_mm x A^T (choice + skinny)": lambda: L._mm(x, a.t(), True, m),
        "dequantize_chunk (flat)": lambda: dequantize_chunk(w4, 0, n, 0, k, BF),
        "chunked_matmul fwd + rank term": lambda: chunked_matmul(x, w4, True, xa, b.t(), 2.0, None, BF, BF),
        "chunked_matmul fwd, no rank term": lambda: chunked_matmul(x, w4, True, None, None, 1.0, None, BF, BF),
        "lora._forward (raw)": lambda: L._forward(x, w4, None, a, b, 2.0, BF, BF, True),
        "lora._backward (raw)": lambda: L._backward(dy, x, w4, a, b, xa, 2.0, BF, True, True, True, False, False,
                                                    True),
        "fxopt::lora_nf4 no_grad": lambda: _no_grad(torch.ops.fxopt.lora_nf4, x, *qargs, None, a, b, 2.0, *state,
                                                   BF, BF),
        "fxopt::lora_nf4_backward": lambda: torch.ops.fxopt.lora_nf4_backward(dy, x, *qargs, a, b, xa, 2.0, *state,
                                                                             BF, True, True, True, False),
        "fxopt::lora_nf4 fwd+bwd (autograd)": fwd_bwd,
    }
    out = []
    for name, fn in cases.items():
        try:
            out.append(dict(case=name, us=host_us(fn, n=4 if "fwd+bwd" in name else 20)))
        except Exception as e:  # noqa: BLE001 - one failing case must not lose the others
            out.append(dict(case=name, error=f"{type(e).__name__}: {e}"[:300]))
        print("ROW " + json.dumps(out[-1]), flush=True)
    return out


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


def cprofile_rows(m=4096, k=4096, n=4096, r=16, calls=50, top=25):
    """cProfile of `calls` no-grad forward and backward calls of fxopt::lora_nf4 (outside Dynamo, whose frame
    hooks misattribute time), the GPU kept busy: the functions with the most own time, per call."""
    from benchmarks.kernel_bench.common import cprofile_calls
    from benchmarks.kernel_bench.lora_parts import nf4_layer
    from fxopt.kernels import lora as L
    dev = torch.device("cuda")
    x = torch.randn(m, k, device=dev).to(BF)
    dy = torch.randn(m, n, device=dev).to(BF)
    a = torch.randn(r, k, device=dev) / k ** 0.5
    b = torch.randn(n, r, device=dev) * 0.3
    _, _, qargs, state = nf4_layer((torch.randn(n, k, device=dev) / k ** 0.5).to(BF))
    xa = L.skinny_mm(x, a.t())
    calls_of = {"forward": lambda: _no_grad(torch.ops.fxopt.lora_nf4, x, *qargs, None, a, b, 2.0, *state, BF, BF),
                "backward": lambda: torch.ops.fxopt.lora_nf4_backward(dy, x, *qargs, a, b, xa, 2.0, *state, BF,
                                                                      True, True, True, False)}
    out = {}
    for name, fn in calls_of.items():
        fn()
        torch.cuda.synchronize()
        torch.cuda._sleep(int(4e8))
        out[name] = cprofile_calls(fn, calls, top)["by_own"]
        print("CPROFILE " + name + " " + json.dumps(out[name][:12]), flush=True)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--cprofile", action="store_true", help="also cProfile the op's forward and backward calls")
    a = p.parse_args()
    from benchmarks.kernel_bench.common import environment, write_json
    cmd = "python -m benchmarks.kernel_bench.host_overhead --out " + a.out + (" --cprofile" if a.cprofile else "")
    res = dict(environment(cmd), shape=dict(m=4096, k=4096, n=4096, r=16), rows=rows_for())
    if a.cprofile:
        res["cprofile"] = cprofile_rows()
    write_json(a.out, res)


if __name__ == "__main__":
    main()
