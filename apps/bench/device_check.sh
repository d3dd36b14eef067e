#!/usr/bin/env bash
# One device call: build relora with CUDA for sm_90 (tests and bench), run the whole test suite
# there (the CPU tests on that machine's AVX-512, the CUDA tests on its GPU), then time the CPU
# seed_demo step of this tree against a baseline tree (BASE, a copy of an earlier commit) in
# alternating runs, beside PyTorch + PEFT's.
#   usage (device machine, repository root): BASE=.base apps/bench/device_check.sh
set -u
OUT=${OUT:-$PWD/device-check-out}
BUILD=${BUILD:-build-gpu}
BASE=${BASE:-}
ROUNDS=${ROUNDS:-5}
mkdir -p "$OUT"
t0=$(date +%s)
{ cmake -S . -B "$BUILD" -DRELORA_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release &&
  cmake --build "$BUILD" -j16; } >"$OUT/build.log" 2>&1 || { echo "== build FAILED"; grep -m5 error "$OUT/build.log"; tail -n 20 "$OUT/build.log"; exit 1; }
echo "== build ok ($(( $(date +%s) - t0 )) s)"
if [ -n "$BASE" ]; then
  { cmake -S "$BASE" -B "$BASE/build" -DRELORA_CUDA=OFF -DRELORA_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=Release &&
    cmake --build "$BASE/build" -j16 --target relora_bench; } >"$OUT/base_build.log" 2>&1 || echo "== base build FAILED"
fi
timeout 240 "$BUILD/tests/relora_tests" >"$OUT/tests.log" 2>&1
echo "== all tests (rc $?): $(grep -E '^\[doctest\] (test cases|assertions)' "$OUT/tests.log" | tr '\n' ' ')"
grep -B3 -A12 "ERROR" "$OUT/tests.log" | head -60
grep -E "MESSAGE: .*(error|cuda)" "$OUT/tests.log" | sed 's/^.*MESSAGE: /   /' | sort -u | head -30
seed() { "$1" --backend cpu --cases seed_demo --no-memory --no-floor --repeats 15 --threads 16 2>&1 | awk '/^seed_demo/ {print $6, $7}'; }
for round in $(seq 1 "$ROUNDS"); do
  [ -n "$BASE" ] && echo "base: $(seed "$BASE/build/apps/bench/relora_bench")"
  echo "new:  $(seed "$BUILD/apps/bench/relora_bench")"
  python3 apps/bench/peft_reference.py --device cpu --threads 16 --cases seed_demo --json "$OUT/peft_$round.json" >/dev/null 2>&1
  python3 -c "import json; d=json.load(open('$OUT/peft_$round.json')); print('peft:', d['steps'][0]['step_ms'])"
done
echo "== total $(( $(date +%s) - t0 )) s"
