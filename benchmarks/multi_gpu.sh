#!/usr/bin/env bash
# fxopt on 2 GPUs (nvidia-h200-x2), one device call that carries .whl:
#     export FXOPT_GIT_SHA=<sha>; bash benchmarks/multi_gpu.sh
# 1B shape, LoRA and QLoRA, batch 2 x 2048 per rank (global 4 x 2048, the same data at any GPU count),
# 2 warm-up + 8 timed steps, loss-only outputs (benchmarks/multi_gpu.py):
#   1. the 1-GPU baselines, LoRA on GPU 0 and QLoRA on GPU 1 at the same time: the same global batch as
#      2 micro-steps of 2 x 2048 (--accum 2), so the per-GPU shapes, memory and compiled graph are those of a rank
#   2. DDP LoRA, FSDP2 LoRA, DDP QLoRA, FSDP2 QLoRA: torchrun --standalone --nproc-per-node 2
# Each run under `timeout` (the signal reaches torchrun's workers: timeout signals its whole process group);
# runs stop starting when fewer than 45 s of LIMIT (default 540 s) are left (they get "skipped" rows); ONLY=regex
# runs a subset (e.g. ONLY=qlora in a second call; `multi_gpu.py --summary a.jsonl b.jsonl` joins the files).
# Writes $OUT/multi_gpu.jsonl (one row per run; a run that left no row gets an error row from here),
# $OUT/multi_gpu.md (tok/s, scaling vs 1 GPU, per-rank peak memory, loss difference, matches), $OUT/<run>.log,
# $OUT/env.txt (GPUs, NVLink topology).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT/rows"
LIMIT=${LIMIT:-540}
T0=$(date +%s)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # multicast stays off
source benchmarks/gpu_env.sh
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-16}
{ nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv; nvidia-smi topo -m; \
  echo "sha $FXOPT_GIT_SHA"; env | grep -E '^(NCCL_NVLS|TORCH_SYMM|NVSHMEM)'; } >"$OUT/env.txt" 2>&1

COMMON=(benchmarks/multi_gpu.py --shape 1b --seq 2048 --warmup 2 --steps 8 --loss-only)
ORDER=(single_lora single_qlora ddp_lora fsdp2_lora ddp_qlora fsdp2_qlora)

run() {   # run NAME CAP_SECONDS CMD...: one benchmark run, its row in $OUT/rows/NAME.jsonl
    local name=$1 cap=$2; shift 2
    [[ -z "${ONLY:-}" || $name =~ $ONLY ]] || return 0   # ONLY=regex: a subset, e.g. ONLY=qlora
    local left=$(( LIMIT - $(date +%s) + T0 ))
    local lim=$(( cap < left - 5 ? cap : left - 5 ))
    rm -f "$OUT/rows/$name.jsonl"
    if (( lim < 45 )); then
        echo "== $name skipped: $left s left"
        no_row "$name" "skipped: $left s of LIMIT=$LIMIT left" 0
        return
    fi
    echo "== $name (limit ${lim}s, at $(( $(date +%s) - T0 ))s)"
    local t=$(date +%s)
    # shellcheck disable=SC2086  # MG_EXTRA: extra arguments, e.g. a CPU smoke test of this script:
    # MG_EXTRA='--device cpu --shape tiny --seq 64 --fxopt-options {"inductor":false}' bash benchmarks/multi_gpu.sh
    timeout -k 10 "$lim" "$@" ${MG_EXTRA:-} --out "$OUT/rows/$name.jsonl" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc wall=$(( $(date +%s) - t ))s"
    local why="no row (exit code $rc$( ((rc == 124)) && echo ", timeout ${lim}s"))"
    [ -s "$OUT/rows/$name.jsonl" ] || no_row "$name" "$why" "$rc"
    grep -h "RESULT" "$OUT/$name.log" | cut -c1-160 | tail -n 1
}

no_row() {   # no_row NAME WHY RC: an error row carrying the log's tail
    python3 - "$1" "$2" "$3" "$OUT/$1.log" "$OUT/rows/$1.jsonl" <<'PYEOF'
import json, os, sys
name, why, rc, log, out = sys.argv[1:]
wrap, mode = name.split("_", 1)
tail = open(log, errors="replace").read()[-1500:] if os.path.exists(log) else ""
row = dict(wrap=wrap, mode=mode, shape="1b", run=name, error=why, exit_code=int(rc), log_tail=tail,
           git_sha=os.environ.get("FXOPT_GIT_SHA"))
open(out, "w").write(json.dumps(row) + "\n")
PYEOF
}

# 1. one GPU each, at the same time (global batch 2 x 2048 x 2 micro-steps); OMP_NUM_THREADS=1 as torchrun gives
#    its workers (two processes spinning OpenMP threads on 2 shared cores slowed a CPU smoke run 200x)
ONE=(--wrap single --batch 2 --accum 2)
run single_lora 300 env CUDA_VISIBLE_DEVICES=0 OMP_NUM_THREADS=1 python3 "${COMMON[@]}" "${ONE[@]}" --mode lora &
run single_qlora 300 env CUDA_VISIBLE_DEVICES=1 OMP_NUM_THREADS=1 python3 "${COMMON[@]}" "${ONE[@]}" --mode qlora &
wait
# 2. two GPUs, batch 2 x 2048 per rank
TR=(torchrun --standalone --nproc-per-node 2)
run ddp_lora 200 "${TR[@]}" "${COMMON[@]}" --wrap ddp --mode lora --batch 2
run fsdp2_lora 160 "${TR[@]}" "${COMMON[@]}" --wrap fsdp2 --mode lora --batch 2
run ddp_qlora 200 "${TR[@]}" "${COMMON[@]}" --wrap ddp --mode qlora --batch 2
run fsdp2_qlora 160 "${TR[@]}" "${COMMON[@]}" --wrap fsdp2 --mode qlora --batch 2

for name in "${ORDER[@]}"; do
    [ -f "$OUT/rows/$name.jsonl" ] && cat "$OUT/rows/$name.jsonl"
done >"$OUT/multi_gpu.jsonl"
python3 benchmarks/multi_gpu.py --summary "$OUT/multi_gpu.jsonl" >"$OUT/multi_gpu.md" 2>&1
cat "$OUT/multi_gpu.md"
echo "done at $(( $(date +%s) - T0 ))s"
