#!/usr/bin/env bash
# CPU-only builds of relora_bench in several variants (NAME=CXXFLAGS pairs, and BASE: a copy of an
# earlier tree), then the CPU seed_demo step of each in alternating rounds, at 16 threads and 1.
#   usage (device machine, repository root): BASE=.base apps/bench/variants_cpu_seed.sh name=flags ...
set -u
OUT=${OUT:-$PWD/variants-out}
ROUNDS=${ROUNDS:-6}
mkdir -p "$OUT"
benches=()
names=()
build() {  # build NAME SOURCE FLAGS
  local dir="build-variant-$1"
  { cmake -S "$2" -B "$dir" -DRELORA_CUDA=OFF -DRELORA_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_CXX_FLAGS="$3" && cmake --build "$dir" -j16 --target relora_bench; } >"$OUT/build-$1.log" 2>&1 ||
    { echo "== $1: build FAILED"; tail -n 5 "$OUT/build-$1.log"; return; }
  benches+=("$dir/apps/bench/relora_bench"); names+=("$1")
}
t0=$(date +%s)
[ -n "${BASE:-}" ] && build base "$BASE" ""
for v in "$@"; do build "${v%%=*}" . "${v#*=}"; done
echo "== builds $(( $(date +%s) - t0 )) s"
for round in $(seq 1 "$ROUNDS"); do
  for i in "${!benches[@]}"; do
    for thr in 16 1; do
      echo "${names[$i]} thr$thr $("${benches[$i]}" --backend cpu --cases seed_demo --no-memory --no-floor --repeats 15 \
        --threads $thr 2>&1 | awk '/^seed_demo/ {print $6}')"
    done
  done
done | tee "$OUT/rounds.txt" | python3 -c "
import sys, statistics as st
d = {}
for line in sys.stdin:
    name, thr, v = line.split()
    d.setdefault((name, thr), []).append(float(v) * 1000)
for (name, thr), v in d.items():
    print(f'{name:10s} {thr:6s} median {st.median(v):.2f} us  min {min(v):.2f}  rounds', ' '.join(f'{x:.2f}' for x in v))
"
echo "== total $(( $(date +%s) - t0 )) s"
