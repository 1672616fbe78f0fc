"""`fxopt bench`: a thin wrapper over the benchmark scripts of a source checkout (benchmarks/, not installed).

    fxopt bench kernels [--ops rms_norm,rope] [--out kernels.json]     -> benchmarks/kernels.py
    fxopt bench suite quick [--only REGEX] [--out FILE.jsonl] [--list]  -> benchmarks/run_suite.py
    fxopt bench step --shape 1b --mode lora --variant fxopt              -> benchmarks/train_step.py

Arguments after the command go to the script unchanged (`fxopt bench suite --help` shows the script's help).
They measure on a CUDA GPU; without one this says so, except for what runs on the CPU anyway:
`suite ... --list`, `suite smoke --device cpu`, `step --dry-run` or `step --device cpu`.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

SCRIPTS = {"kernels": "kernels.py", "suite": "run_suite.py", "step": "train_step.py"}


def benchmarks_dir() -> str | None:
    """benchmarks/ next to the fxopt package (an editable install or a source checkout), else None."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    d = os.path.join(root, "benchmarks")
    return d if os.path.isfile(os.path.join(d, "run_suite.py")) else None


def _device(rest: list[str]) -> str | None:
    for i, a in enumerate(rest):
        if a == "--device" and i + 1 < len(rest):
            return rest[i + 1]
        if a.startswith("--device="):
            return a.split("=", 1)[1]
    return None


def needs_gpu(what: str, rest: list[str]) -> bool:
    if any(a in ("-h", "--help", "--list", "--dry-run") for a in rest):
        return False
    return not (what in ("suite", "step") and _device(rest) == "cpu")


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="run the GPU benchmarks (kernels, train-step suites) of a source checkout",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=sorted(SCRIPTS), help="kernels: per-op kernels; suite: a list of train steps; "
                                                         "step: one train step")
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the script")
    p.set_defaults(fn=run)


def run(args) -> int:
    d = benchmarks_dir()
    if d is None:
        print("fxopt bench: benchmarks/ is not installed with the package; run it from a source checkout of fxopt "
              "(pip install -e . there)", file=sys.stderr)
        return 2
    rest = list(args.args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if needs_gpu(args.what, rest):
        import torch
        if not torch.cuda.is_available():
            print(f"fxopt bench {args.what}: needs a CUDA GPU and torch sees none "
                  f"(torch {torch.__version__}, CUDA build {torch.version.cuda}). On the CPU: "
                  "`fxopt bench suite smoke --device cpu`, `fxopt bench step --dry-run`, `fxopt explain`",
                  file=sys.stderr)
            return 2
    cmd = [sys.executable, os.path.join(d, SCRIPTS[args.what]), *rest]
    return subprocess.call(cmd, cwd=os.path.dirname(d))
