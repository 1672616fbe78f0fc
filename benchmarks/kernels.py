"""Kernel benchmarks on the GPU: fwd+bwd per op against eager, Inductor and Liger in one process.

usage: python benchmarks/kernels.py [--ops rms_norm,...] [--out results.json]
       python benchmarks/kernels.py --sweep layer_norm|rms_norm|nf4_dequant --out sweep.json
Each op lives in benchmarks/kernel_bench/<op>.py with `run(ceiling_tbps) -> (rows, correctness)`.
"""
import argparse
import importlib
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.kernel_bench.common import copy_ceiling_tbps, environment, write_json  # noqa: E402

OPS = ["rms_norm", "layer_norm", "rope", "gated_mlp", "attention", "lora", "linear_cross_entropy"]


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "kernels.json"))
    p.add_argument("--sweep", default=None, help="run kernel_bench/<op>.py's sweep() (launch configs) instead")
    a = p.parse_args()
    if a.sweep:
        mod = importlib.import_module(f"benchmarks.kernel_bench.{a.sweep}")
        result = dict(environment(), what=f"{a.sweep} launch-config sweep",
                      copy_ceiling_tbps=round(copy_ceiling_tbps(), 3))
        out = mod.sweep()
        result.update(out if isinstance(out, dict) else dict(rows=out))
        for r in result["rows"]:
            print("SWEEP " + json.dumps(r), flush=True)
        write_json(a.out, result)
        return
    ceiling = copy_ceiling_tbps()
    print(f"copy ceiling {ceiling:.2f} TB/s", flush=True)
    result = dict(environment(), copy_ceiling_tbps=round(ceiling, 3), ops={})
    for op in a.ops.split(","):
        try:
            mod = importlib.import_module(f"benchmarks.kernel_bench.{op}")
        except ModuleNotFoundError as e:
            print(f"{op}: no benchmark ({e})")
            continue
        try:
            rows, check = mod.run(ceiling)
            result["ops"][op] = dict(rows=rows, correctness=check)
            for r in rows:
                print("ROW " + json.dumps(r), flush=True)
            print(f"{op} correctness {check}", flush=True)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            result["ops"][op] = dict(error=f"{type(e).__name__}: {e}")
        write_json(a.out, result)


if __name__ == "__main__":
    main()
