"""Host<->device copy bandwidth on this GPU, and what a concurrent copy costs compute (for fxopt's offload model).

Measures, with pinned host buffers and CUDA events:
  d2h / h2d        one direction alone, per tensor size (a [2, 2048, 4096] bf16 residual is 32 MiB)
  both             d2h and h2d at once on two side streams (the offload of one layer beside the reload of another)
  gemm_alone       a bf16 [8192, 4096] x [4096, 4096] GEMM loop on the main stream
  gemm_with_copy   the same loop while a side stream copies d2h and another h2d: the slowdown is what overlap costs
    python benchmarks/pcie.py --out pcie_h200.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_bench.common import environment  # noqa: E402


def _time_ms(fn, stream=None, reps=20) -> float:
    s = stream or torch.cuda.current_stream()
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(s):
        a.record()
        for _ in range(reps):
            fn()
        b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def copy_rows(sizes_mib):
    rows = []
    for mib in sizes_mib:
        n = mib << 20
        dev = torch.empty(n, dtype=torch.uint8, device="cuda")
        host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        d2h = _time_ms(lambda: host.copy_(dev, non_blocking=True))
        h2d = _time_ms(lambda: dev.copy_(host, non_blocking=True))
        dev2 = torch.empty_like(dev)
        host2 = torch.empty_like(host)
        s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

        def both():
            with torch.cuda.stream(s1):
                host.copy_(dev, non_blocking=True)
            with torch.cuda.stream(s2):
                dev2.copy_(host2, non_blocking=True)
            torch.cuda.current_stream().wait_stream(s1)
            torch.cuda.current_stream().wait_stream(s2)
        t_both = _time_ms(both)
        rows.append({"mib": mib, "d2h_ms": d2h, "h2d_ms": h2d, "both_ms": t_both,
                     "d2h_GBps": n / d2h / 1e6, "h2d_GBps": n / h2d / 1e6, "both_each_GBps": n / t_both / 1e6})
        print(f"ROW copy {mib} MiB: d2h {rows[-1]['d2h_GBps']:.1f} GB/s, h2d {rows[-1]['h2d_GBps']:.1f} GB/s, "
              f"both at once {rows[-1]['both_each_GBps']:.1f} GB/s each", flush=True)
    return rows


def overlap_row(directions, mib=32, m=8192, k=4096, n=4096, reps=50):
    """A GEMM loop on the main stream while side streams copy `directions` ("d2h", "h2d" or both) every 4th GEMM."""
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    gemm = lambda: a @ b  # noqa: E731
    alone = _time_ms(gemm, reps=reps)
    size = mib << 20
    dev, dev2 = (torch.empty(size, dtype=torch.uint8, device="cuda") for _ in range(2))
    host, host2 = (torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(2))
    pairs = {"d2h": (torch.cuda.Stream(), host, dev), "h2d": (torch.cuda.Stream(), dev2, host2)}
    main = torch.cuda.current_stream()
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    copies = 0
    t0.record(main)
    for i in range(reps):
        if i % 4 == 0:
            for d in directions:
                s, dst, src = pairs[d]
                s.wait_stream(main)
                with torch.cuda.stream(s):
                    dst.copy_(src, non_blocking=True)
            copies += 1
        gemm()
    t1.record(main)
    for d in directions:
        main.wait_stream(pairs[d][0])
    torch.cuda.synchronize()
    with_copy = t0.elapsed_time(t1) / reps
    flops = 2 * m * k * n
    row = {"directions": list(directions), "gemm": [m, k, n], "gemm_alone_ms": alone, "gemm_with_copy_ms": with_copy,
           "slowdown": with_copy / alone, "copy_mib": mib, "copies_each_way": copies,
           "tflops_alone": flops / alone / 1e9, "tflops_with_copy": flops / with_copy / 1e9}
    print(f"ROW overlap {'+'.join(directions)}: GEMM {alone:.3f} ms alone, {with_copy:.3f} ms beside copies "
          f"({row['slowdown']:.3f}x)", flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("pcie.py needs a CUDA GPU")
    res = {"env": environment(" ".join(sys.argv)), "copies": copy_rows([8, 32, 128, 512]),
           "overlap": [overlap_row(d) for d in (("d2h",), ("h2d",), ("d2h", "h2d"))],
           "command": " ".join(sys.argv)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
