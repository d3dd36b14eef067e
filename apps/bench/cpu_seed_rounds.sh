#!/usr/bin/env bash
# The CPU seed_demo row of the side-by-side alone, more rounds: a CPU-only build of relora_bench,
# then ROUNDS alternating pairs of relora (16 threads) and PyTorch + PEFT (16 threads), each pair's
# ratio, and the medians.
#   usage (device machine, repository root): ROUNDS=8 apps/bench/cpu_seed_rounds.sh
set -u
OUT=${OUT:-$PWD/cpu-seed-out}
BUILD=${BUILD:-build-cpu-seed}
ROUNDS=${ROUNDS:-8}
THREADS=${THREADS:-16}
mkdir -p "$OUT"
{ cmake -S . -B "$BUILD" -DRELORA_CUDA=OFF -DRELORA_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=Release &&
  cmake --build "$BUILD" -j16 --target relora_bench; } >"$OUT/build.log" 2>&1 || { tail -n 20 "$OUT/build.log"; exit 1; }
for round in $(seq 1 "$ROUNDS"); do
  "$BUILD/apps/bench/relora_bench" --backend cpu --threads "$THREADS" --cases seed_demo --repeats 7 --max-seconds 5 \
    --json "$OUT/relora_$round.json" >/dev/null 2>&1
  python3 apps/bench/peft_reference.py --device cpu --threads "$THREADS" --cases seed_demo \
    --json "$OUT/peft_$round.json" >/dev/null 2>&1
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
rel, peft = [], []
for r in range(1, rounds + 1):
    rel.append(json.load(open(f"{out}/relora_{r}.json"))["results"][0]["step_ms"] * 1e3)
    peft.append(json.load(open(f"{out}/peft_{r}.json"))["steps"][0]["step_ms"] * 1e3)
    print(f"round {r}: relora {rel[-1]:.2f} us, PEFT {peft[-1]:.1f} us: {peft[-1] / rel[-1]:.0f}x")
print(f"medians: relora {statistics.median(rel):.2f} us, PEFT {statistics.median(peft):.1f} us: "
      f"{statistics.median(peft) / statistics.median(rel):.0f}x; rounds {min(p / q for p, q in zip(peft, rel)):.0f}x "
      f"to {max(p / q for p, q in zip(peft, rel)):.0f}x")
PY
