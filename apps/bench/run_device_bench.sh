#!/usr/bin/env bash
# One device run for issue 5: build relora_bench with CUDA for sm_90, then side_by_side.sh (relora
# CUDA strict + TF32, relora CPU at 16 threads, PyTorch + PEFT on both, the scaling sweeps).
# Everything lands in $OUT: side_by_side.md (the table), build.log, and results.tar.gz (every
# JSON and log), since the device tool brings back at most 8 files.
#   usage (device machine, repository root): apps/bench/run_device_bench.sh
set -u
OUT=${OUT:-$PWD/device-bench-out}
BUILD=${BUILD:-build-gpu}
THREADS=${THREADS:-16}
WORK=$OUT/results
mkdir -p "$WORK"
t0=$(date +%s)
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  nvcc --version | tail -n 2
  lscpu | grep -E 'Model name|^CPU\(s\)|Thread|Core|Socket|Flags' | cut -c1-400
  python3 -c 'import torch, peft; print("torch", torch.__version__, "peft", peft.__version__)'
  git log --oneline -n 3
} >"$WORK/device.txt" 2>&1
head -n 6 "$WORK/device.txt"

finish() {
  tar -C "$OUT" -czf "$OUT/results.tar.gz" results && rm -rf "$WORK"
  echo "== total $(( $(date +%s) - t0 )) s"
}
trap finish EXIT

if ! { cmake -S . -B "$BUILD" -DRELORA_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DRELORA_BUILD_TESTS=OFF &&
       cmake --build "$BUILD" -j16 --target relora_bench; } >"$OUT/build.log" 2>&1; then
  echo "== build FAILED"; grep -m5 -E 'error' "$OUT/build.log"; tail -n 20 "$OUT/build.log"; exit 1
fi
echo "== build ok ($(( $(date +%s) - t0 )) s)"

BUILD=$BUILD OUT=$WORK THREADS=$THREADS SCALING=${SCALING:-1} timeout 400 apps/bench/side_by_side.sh
cp "$WORK/side_by_side.md" "$OUT/" 2>/dev/null
