# Source on the GPU machine, from the repo root, in a call that carries .whl:
#     source benchmarks/gpu_env.sh
# Installs the carried wheels (bitsandbytes, liger-kernel, unsloth and its needs; see prepare_wheels.sh) into
# /tmp/site without touching the machine's own packages, and sets the offline environment the runs need.
# Sourced, so it never exits the caller's shell: a failed install is reported and the runs that need those
# packages record "not installed" rows instead.
_fx_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -f /tmp/site/.fxopt_installed ]; then   # a second stage on the same machine (gpu_pair.sh) reuses it
    :
elif ls "$_fx_root"/.whl/*.whl >/dev/null 2>&1; then
    _fx_t0=$(date +%s)
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$_fx_root"/.whl/*.whl; then
        echo "gpu_env: installed $(ls "$_fx_root"/.whl/*.whl | wc -l) wheels into /tmp/site in $(( $(date +%s) - _fx_t0 )) s" >&2
        touch /tmp/site/.fxopt_installed
    else
        echo "gpu_env: WARNING wheel install failed; liger/unsloth/qlora runs will be recorded as not installed" >&2
    fi
else
    echo "gpu_env: no .whl/ here (run benchmarks/prepare_wheels.sh, then carry .whl); liger/unsloth/qlora skipped" >&2
fi
# /tmp/site first: it holds datasets 4.3.0 (unsloth needs <5), which the machine does not have anyway.
export PYTHONPATH="/tmp/site:$_fx_root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1
export UNSLOTH_DISABLE_STATISTICS=1 UNSLOTH_STUDIO_DISABLED=1 UNSLOTH_COMPILE_LOCATION=/tmp/unsloth_compiled_cache
# The caller exports FXOPT_GIT_SHA (its own HEAD). The GPU machine's copy of .git can be stale: in the seventh
# session its rev-parse answered the previous session's HEAD for three calls. Unset, results say so.
if [ -z "${FXOPT_GIT_SHA:-}" ]; then
    echo "gpu_env: WARNING FXOPT_GIT_SHA not exported by the caller; results record 'unknown'" >&2
    export FXOPT_GIT_SHA="unknown (FXOPT_GIT_SHA not exported; this machine's .git may be stale)"
fi
python3 - <<'PYEOF' >&2 || true
import importlib.metadata as md
names = ["torch", "triton", "transformers", "peft", "bitsandbytes", "liger-kernel", "unsloth", "unsloth_zoo", "trl",
         "datasets", "fxopt"]
def version(n):
    try:
        return md.version(n)
    except md.PackageNotFoundError:
        return "-"
print("gpu_env: " + ", ".join(f"{n} {version(n)}" for n in names))
PYEOF
unset _fx_root _fx_t0
