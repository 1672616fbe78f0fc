#!/usr/bin/env bash
# Two gpu_session.sh stage lists at once on a 2-GPU machine (nvidia-h200-x2), one per GPU, in one device call:
#     export FXOPT_GIT_SHA=<sha>; bash benchmarks/gpu_pair.sh "evidence rope" "check2"
# GPU 0 runs the first list, GPU 1 the second (CUDA_VISIBLE_DEVICES), each writing $OUT/gpu<i>/; the wheels and the
# editable install happen once, before both. At the end each GPU's folder becomes one $OUT/gpu<i>.tgz (a call returns
# at most 8 files). Timings taken this way share the host's 32 CPU cores and its Inductor compile threads (8 each
# here) with the other GPU's work: GPU-bound steps are unaffected, warm-up (compile) seconds are not comparable with
# single-GPU runs. Result files record CUDA_VISIBLE_DEVICES and the pairing (FXOPT_PAIRED_WITH).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
source benchmarks/gpu_env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/pip.log" 2>&1 \
    && touch /tmp/.fxopt_pip_done || echo "pip -e failed (see pip.log)"
export TORCHINDUCTOR_COMPILE_THREADS=8
lists=("$1" "${2:-}")
for i in 0 1; do
    [ -n "${lists[$i]}" ] || continue
    # shellcheck disable=SC2086  # the list is several stage names
    CUDA_VISIBLE_DEVICES=$i FXOPT_PAIRED_WITH="${lists[$((1 - i))]}" OUT="$OUT/gpu$i" \
        bash benchmarks/gpu_session.sh ${lists[$i]} >"$OUT/gpu$i.txt" 2>&1 &
done
wait
for i in 0 1; do
    [ -d "$OUT/gpu$i" ] || continue
    cp "$OUT/gpu$i.txt" "$OUT/gpu$i/" 2>/dev/null
    tar czf "$OUT/gpu$i.tgz" -C "$OUT" "gpu$i" && rm -rf "$OUT/gpu$i"
    echo "== GPU $i: ${lists[$i]}"; cat "$OUT/gpu$i.txt"
done
