#!/usr/bin/env bash
# relora vs PyTorch + PEFT on the anchor cases, in one command, one table at the end.
#   CUDA (when relora_bench was built with it and a GPU answers): relora strict and TF32 beside
#   PEFT strict and TF32, plus the fp32/TF32 GEMM ceilings through PyTorch.
#   CPU: relora and PEFT with the same number of threads (THREADS; --threads and torch.set_num_threads).
# usage: apps/bench/side_by_side.sh            (from the repository root; needs python3 with torch and peft)
# env:   BUILD (build-bench) OUT (bench-out) THREADS (nproc) CPU_CASES (seed_demo,layer1k,mlp4x2k)
#        ROUNDS (3): relora and PEFT alternate this many times; the table shows medians over rounds.
#        SCALING=1 adds relora_bench --scaling on each backend.
set -u
BUILD=${BUILD:-build-bench}
OUT=${OUT:-$PWD/bench-out}
THREADS=${THREADS:-$(nproc)}
CPU_CASES=${CPU_CASES:-seed_demo,layer1k,mlp4x2k}   # as the anchor: no 4096-wide case on the CPU
SCALING=${SCALING:-0}
ROUNDS=${ROUNDS:-3}
BENCH="$BUILD/apps/bench/relora_bench"
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
[ -x "$BENCH" ] || { echo "side_by_side: $BENCH not built"; exit 1; }

relora_json=()
peft_json=()
run() {  # run NAME CMD...: output to $OUT/NAME.log, status noted
  local name=$1; shift
  echo "== $name: $(echo "$*" | head -c 160 | tr "\n" " ")"
  local t0=$(date +%s)
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 12 "$OUT/$name.log"
  echo "== $name: rc $rc, $(( $(date +%s) - t0 )) s"
  return $rc
}

# ROUNDS rounds, relora and PEFT back to back in each: the lent machine's speed drifts by up to
# 2x over minutes (a tiny CPU step measured 5.3 us in one run and 14 us in another, PEFT's 0.37
# and 0.78 ms), so each library is measured next to the other several times and the table takes
# each side's median over the rounds.
gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi
for round in $(seq 1 "$ROUNDS"); do
  if [ "$gpu" = 1 ]; then
    for math in strict tf32; do
      run relora_cuda_${math}_$round "$BENCH" --backend cuda --math $math --cases all \
        --json "$OUT/relora_cuda_${math}_$round.json" && relora_json+=("$OUT/relora_cuda_${math}_$round.json")
    done
    ceilings=""; [ "$round" = 1 ] && ceilings=--ceilings
    run peft_cuda_$round python3 "$HERE/peft_reference.py" --device cuda --math strict,tf32 $ceilings \
      --json "$OUT/peft_cuda_$round.json" && peft_json+=("$OUT/peft_cuda_$round.json")
  fi
  run relora_cpu_$round "$BENCH" --backend cpu --threads "$THREADS" --cases "$CPU_CASES" --repeats 7 --max-seconds 5 \
    --json "$OUT/relora_cpu_$round.json" && relora_json+=("$OUT/relora_cpu_$round.json")
  run peft_cpu_$round python3 "$HERE/peft_reference.py" --device cpu --threads "$THREADS" --cases "$CPU_CASES" \
    --json "$OUT/peft_cpu_$round.json" && peft_json+=("$OUT/peft_cpu_$round.json")
done
if [ "$SCALING" = 1 ]; then
  [ "$gpu" = 1 ] && run relora_cuda_scaling "$BENCH" --backend cuda --scaling --repeats 7 --max-seconds 2 --no-memory \
    --json "$OUT/relora_cuda_scaling.json"
  run relora_cpu_scaling "$BENCH" --backend cpu --threads "$THREADS" --scaling --repeats 5 --max-seconds 1 \
    --no-memory --json "$OUT/relora_cpu_scaling.json"
fi
# Eigen vs an optimised BLAS on this CPU: numpy's sgemm (OpenBLAS in the wheels) at the same threads.
OPENBLAS_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS run numpy_sgemm python3 -c '
import numpy as np, time, json
np.show_config() if False else None
res = {}
for n in (1024, 2048):
    a = np.random.rand(n, n).astype(np.float32); b = np.random.rand(n, n).astype(np.float32)
    a @ b; ts = []
    for _ in range(7):
        t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)
    ts.sort(); res[n] = 2 * n**3 / ts[3] / 1e9
print(json.dumps({"numpy_sgemm_gflops": res}))'

echo
echo "== side by side ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1), CPU threads $THREADS)"
python3 "$HERE/side_by_side.py" --relora "${relora_json[@]}" --peft "${peft_json[@]}" --md "$OUT/side_by_side.md"
