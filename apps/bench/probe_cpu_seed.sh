#!/usr/bin/env bash
# The CPU seed_demo step on the device machine under several thread settings, alternating with
# PyTorch + PEFT's seed_demo, so that the spread of both sides can be read from one run.
#   usage (device machine, repository root): apps/bench/probe_cpu_seed.sh
set -u
OUT=${OUT:-$PWD/probe-out}
BUILD=${BUILD:-build-probe}
ROUNDS=${ROUNDS:-4}
mkdir -p "$OUT"
lscpu | grep -E 'Model name|^CPU\(s\)|Thread|Core|Socket|MHz|L1d|L2|L3' | tee "$OUT/cpu.txt"
grep -o -w -E 'avx512f|avx512vl|avx2|amx_tile' /proc/cpuinfo | sort | uniq -c | tee -a "$OUT/cpu.txt"
t0=$(date +%s)
cmake -S . -B "$BUILD" -DRELORA_CUDA=OFF -DRELORA_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=Release >"$OUT/build.log" 2>&1 &&
  cmake --build "$BUILD" -j16 --target relora_bench >>"$OUT/build.log" 2>&1 || { tail -n 30 "$OUT/build.log"; exit 1; }
echo "== build $(( $(date +%s) - t0 )) s"
BENCH="$BUILD/apps/bench/relora_bench"
seed() { "$BENCH" --backend cpu --cases seed_demo --no-memory --repeats 15 "$@" 2>&1 | awk '/^seed_demo/ {print $6, $7}'; }
for round in $(seq 1 "$ROUNDS"); do
  echo "-- round $round"
  echo "relora thr16: $(seed --threads 16)"
  echo "relora thr16 passive: $(OMP_WAIT_POLICY=passive seed --threads 16)"
  echo "relora thr1: $(seed --threads 1)"
  echo "relora thr16 ${EXTRA_LABEL:-}: $(seed --threads 16 ${EXTRA:-})"
  python3 apps/bench/peft_reference.py --device cpu --threads 16 --cases seed_demo --json "$OUT/peft_$round.json" >/dev/null 2>&1
  echo "peft thr16: $(python3 -c "import json,sys; d=json.load(open('$OUT/peft_$round.json')); print(d)" | head -c 400)"
done
