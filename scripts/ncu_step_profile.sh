#!/usr/bin/env bash
# One training step of relora_bench, kernel by kernel, timed by Nsight Compute (ncu):
#   scripts/ncu_step_profile.sh BENCH [relora_bench arguments naming one case]
# e.g. scripts/ncu_step_profile.sh build/apps/bench/relora_bench --backend cuda --math tf32 \
#        --precision bf16 --activations bf16 --cases mlp4x4k
# The case runs a few steps under ncu with the clocks and caches left as they are (the device
# tool's METHOD.md: do not lock the clocks); the nodes of the step's CUDA graph are profiled one by
# one. scripts/ncu_step_table.py then prints one step's kernels (from one launch of the loss
# kernel to the next) in order, and their sums by kernel.
# env: SKIP (launches left out first, the setup's: 150), COUNT (launches profiled: 400),
#      CSV (ncu's table: ncu_step.csv)
set -eu
[ $# -ge 1 ] || { sed -n '2,12p' "$0"; exit 2; }
bench=$1
shift
csv=${CSV:-ncu_step.csv}
ncu --graph-profiling node --clock-control none --cache-control none --metrics gpu__time_duration.sum \
  --csv --print-units base --launch-skip "${SKIP:-150}" --launch-count "${COUNT:-400}" \
  "$bench" "$@" --repeats 3 --warmup 2 --max-seconds 1 --no-memory --no-floor >"$csv"
python3 "$(dirname "$0")/ncu_step_table.py" "$csv"
