"""Kernels compiled for the GPU (sm_90, Triton's own compiler down to cubin) on a CPU machine: the interpreter runs
Python, so code the compiler rejects passes every interpreter test. Found this way after the H200 run: lora's
`_lowp` returned fp16 from one branch and bf16 from another (fp16 training fell back to the reference)."""
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import sys, triton
    from triton.backends.compiler import GPUTarget
    from fxopt.kernels import attention, lora

    def build(fn, ptrs, floats, constexprs):
        """Every argument not named is an i32; pointers and fp32 scalars as named."""
        sig = {}
        for name in fn.arg_names:
            sig[name] = ("constexpr" if name in constexprs else ptrs.get(name) or
                         ("fp32" if name in floats else "i32"))
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
        assert "cubin" in k.asm, list(k.asm)

    case = sys.argv[1]
    dt = {"fp16": "fp16", "bf16": "bf16"}[sys.argv[2]]
    if case == "skinny":
        build(lora._skinny_kernel, {"BIG": "*" + dt, "SMALL": "*fp32", "OUT": "*fp32"}, (),
              {"HALF": int(dt == "fp16"), "INTERP": False, "BP": 64, "BQ": 64, "RB": 16})
    elif case == "attn_fwd":
        flags = dict(CAUSAL=True, WINDOW=False, SOFTCAP=False, UPCAST=False, IEEE=False, LIBDEVICE=False,
                     EVEN_D=True, D_PAD=128, MASK_KIND=1, BLOCK_M=64, BLOCK_N=64)
        ptrs = {n: "*" + dt for n in "QKVO"}
        ptrs.update(LSE="*fp32", MASK="*i1", DS="*i32", DE="*i32")
        build(attention._attn_fwd, ptrs, ("qk_scale2", "cap_x", "cap2"), flags)
    print("compiled", case, dt)
''')


@pytest.mark.parametrize("case", ["skinny", "attn_fwd"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_kernel_compiles_for_sm90(case, dtype):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, case, dtype], env=env, capture_output=True, text=True,
                       timeout=600)
    if r.returncode != 0 and ("ptxas" in r.stderr and "not found" in r.stderr.lower()):
        pytest.skip("no ptxas in this Triton install")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"compiled {case} {dtype}" in r.stdout
