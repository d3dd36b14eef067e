#!/usr/bin/env bash
# Everything a GPU machine is needed for, in one command (one device call):
#   1. build this tree with CUDA (tests, apps, bench) and, beside it, a baseline tree's bench;
#   2. the whole test suite, CPU and CUDA cases (TESTS=1), and compute-sanitizer over every CUDA
#      case (SANITIZE: comma-separated of memcheck, racecheck, synccheck, initcheck; 1 means all
#      four; scripts/sanitize_cuda.sh runs them);
#   3. old against new (BENCH=1): the baseline's relora_bench and this tree's, alternating in
#      every round, on GPU seed_demo, layer1k, mlp4x4k (strict and TF32) and CPU seed_demo and
#      mlp4x2k, with PyTorch + PEFT's CPU seed_demo in the same rounds; the table gives each
#      side's median over the rounds, new/old and the PEFT ratio;
#   4. relora against PyTorch + PEFT on every anchor case, CUDA strict and TF32 and the CPU
#      (SIDE=1, side_by_side.py's table; off by default: with it, set TESTS=0 BENCH=0);
#   5. DoRA (DORA=1): relora's LoRA and DoRA steps against PEFT's, alternating, CUDA strict;
#   6. a bf16 base (HALF=1): relora_bench --precision bf16 against PEFT on a bf16 base model;
#   7. GaLore (GALORE=1): relora_bench --galore and apps/bench/galore_reference.py;
#   8. the CPU thread sweep (SWEEP=1): relora_bench --thread-sweep, and the demo at 1 thread;
#   9. data-parallel weak scaling (DDP=1, needs 2 GPUs): relora_bench --ranks 1,2 and PyTorch DDP +
#      PEFT under torchrun (apps/bench/ddp_reference.py) for 1 and 2 processes, alternating in every
#      round, fp32 and bf16 bases, CUDA strict; weak_scaling_table.py's table of step ms and
#      efficiency t(1) / t(2) for both, and issue 17's targets. Where the system has no NCCL,
#      PyTorch's own (the nvidia-nccl wheel) is linked. With it, set TESTS=0 BENCH=0.
# Nothing stops at a failure: a baseline that does not build leaves the old column empty, a
# failing test is reported and the benchmark still runs.
#
#   usage (device machine, repository root):
#     BASE=.base apps/bench/device_run.sh        # .base: a copy of the baseline tree, e.g.
#       mkdir -p .base && git archive 6ad3727 | tar -x -C .base   (here, before the call;
#       .base ignored through .git/info/exclude and named in the device tool's carry)
#   env: BASE (none: no old column)  ROUNDS (5)  THREADS (16: the CPU cases' threads)
#        GPU_CASES (seed_demo,layer1k,mlp4x4k)  CPU_CASES (seed_demo,mlp4x2k; empty: none)
#        GPU_ARGS (more relora_bench arguments for both sides' GPU runs, e.g. a bf16 base and
#          bf16 activations: "--precision bf16 --activations bf16")
#        TESTS (1)  SANITIZE (none)  BENCH (1)  SIDE (0)  PEFT (1: PEFT's CPU seed_demo per round)
#        DORA (0)  DORA_CASES (layer1k,layer4k,mlp4x2k,mlp4x4k,llm_mlp)  SWEEP (0)
#        HALF (0)  HALF_CASES (layer4k,mlp4x2k,mlp4x4k,llm_mlp)  GALORE (0)
#        GALORE_CASES (mlp4x2k,mlp4x4k,llm_mlp)
#        DDP (0)  DDP_CASES (mlp4x4k,llm_mlp)  DDP_PRECISIONS (fp32,bf16)  DDP_ROUNDS (3)
#        DDP_TIMEOUT (150 s: each relora_bench --ranks or torchrun run; a hung rank ends there, and
#          NCCL_DEBUG=WARN puts NCCL's reasons in ddp.log)
#        TEST_FILTER (doctest -tc filter of the test cases; default every case)
#        PORTABLE (0; 1 adds a third column: this tree built without RELORA_NATIVE, CPU cases)
#        MID (none: a second baseline tree, e.g. .mid with part of a change applied, built and timed
#          as a third side between old and new; its column and mid/old in the table)
#        SCALING (0; with SIDE=1, 1 adds relora_bench --scaling on each backend)
#        ARCH (90)  JOBS (nproc)  TEST_TIMEOUT (300 s)  DEADLINE (540 s: no round starts that
#        would end past it, so the table is printed inside the device tool's 10 minutes)
#        CUDA (0: build without CUDA, for a dry run of the script on a machine with no GPU)
# The table's limit column is issue 13's: no case more than 5% slower by the medians, CPU
# seed_demo up to 15%; OVER marks a case past it.
# Results: $OUT/summary.txt (what is printed), $OUT/compare.md (the table), $OUT/results.tar.gz
# (every JSON file and log). Both trees are built with -DRELORA_NATIVE=ON, the baseline's
# default, so that the columns compare the code and not the compiler flags.
set -u
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${OUT:-$ROOT/build-device/out}
BASE=${BASE:-}
ROUNDS=${ROUNDS:-5}
THREADS=${THREADS:-16}
GPU_CASES=${GPU_CASES:-seed_demo,layer1k,mlp4x4k}
GPU_ARGS=${GPU_ARGS:-}
CPU_CASES=${CPU_CASES-seed_demo,mlp4x2k}  # set and empty: no CPU cases
TESTS=${TESTS:-1}
SANITIZE=${SANITIZE:-}
BENCH=${BENCH:-1}
SIDE=${SIDE:-0}
DORA=${DORA:-0}
DORA_CASES=${DORA_CASES:-layer1k,layer4k,mlp4x2k,mlp4x4k,llm_mlp}
SWEEP=${SWEEP:-0}
HALF=${HALF:-0}
HALF_CASES=${HALF_CASES:-layer4k,mlp4x2k,mlp4x4k,llm_mlp}
GALORE=${GALORE:-0}
GALORE_CASES=${GALORE_CASES:-mlp4x2k,mlp4x4k,llm_mlp}
PEFT=${PEFT:-1}
DDP=${DDP:-0}
DDP_CASES=${DDP_CASES:-mlp4x4k,llm_mlp}
DDP_PRECISIONS=${DDP_PRECISIONS:-fp32,bf16}
DDP_ROUNDS=${DDP_ROUNDS:-3}
DDP_TIMEOUT=${DDP_TIMEOUT:-150}
PORTABLE=${PORTABLE:-0}
MID=${MID:-}
ARCH=${ARCH:-90}
JOBS=${JOBS:-$(nproc)}
TEST_TIMEOUT=${TEST_TIMEOUT:-300}
DEADLINE=${DEADLINE:-540}
BUILD=$ROOT/build-device
BASE_BUILD=$ROOT/build-device-base
PORTABLE_BUILD=$ROOT/build-device-portable
MID_BUILD=$ROOT/build-device-mid
WORK=$OUT/results
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1
[ "$SANITIZE" = 1 ] && SANITIZE=memcheck,racecheck,synccheck,initcheck
[ "$SANITIZE" = 0 ] && SANITIZE=
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
note() { echo "$*" | tee -a "$OUT/summary.txt"; }
: >"$OUT/summary.txt"

finish() {
  tar -C "$OUT" -czf "$OUT/results.tar.gz" results 2>/dev/null && rm -rf "$WORK"
  note "== total $(elapsed) s"
}
trap finish EXIT

gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=1; fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  nvcc --version 2>&1 | tail -n 2
  cmake --version | head -n 1
  lscpu | grep -E 'Model name|^CPU\(s\)|Thread|Core|Socket'
  grep -o -w -E 'avx512f|avx2|amx_tile' /proc/cpuinfo | sort | uniq -c
  python3 -c 'import torch, peft; print("torch", torch.__version__, "peft", peft.__version__)' 2>&1
} >"$WORK/machine.txt" 2>&1
note "== $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1) | $(lscpu | sed -n 's/^Model name: *//p' | head -n 1) | $(nproc) cores"

# ---- builds: the baseline's bench (and the portable one) in the background, this tree in front
cuda_flag=-DRELORA_CUDA=ON
[ "$gpu" = 1 ] || cuda_flag=-DRELORA_CUDA=AUTO
[ "${CUDA:-}" = 0 ] && cuda_flag=-DRELORA_CUDA=OFF  # a dry run of the script on a machine without a GPU
# build_bench_of TREE BUILD_DIR LOG: a baseline tree's relora_bench, in the background ($! its pid).
build_bench_of() {
  local tree=$1 build=$2 log=$3
  # A build folder left by another baseline would be refused by CMake, or worse, kept.
  if [ -f "$build/CMakeCache.txt" ] &&
     ! grep -qx "CMAKE_HOME_DIRECTORY:INTERNAL=$(cd "$tree" && pwd)" "$build/CMakeCache.txt"; then
    rm -rf "$build"
  fi
  ( cmake -S "$tree" -B "$build" -DCMAKE_BUILD_TYPE=Release $cuda_flag -DCMAKE_CUDA_ARCHITECTURES="$ARCH" \
      -DRELORA_NATIVE=ON -DRELORA_BUILD_TESTS=OFF &&
    cmake --build "$build" -j"$JOBS" --target relora_bench ) >"$log" 2>&1 &
}
# start_side_build SIDE VARIABLE TREE BUILD_DIR: the bench of a baseline tree (BASE's: side old,
# MID's: side mid) built in the background when the benchmark runs and the tree is given; its pid
# goes to side_pid (empty: none).
start_side_build() {
  local side=$1 variable=$2 tree=$3 build=$4
  side_pid=
  [ "$BENCH" = 1 ] && [ -n "$tree" ] || return 0
  if [ -f "$tree/CMakeLists.txt" ]; then
    build_bench_of "$tree" "$build" "$WORK/build_$side.log"
    side_pid=$!
  else
    note "== $variable=$tree holds no CMakeLists.txt: no $side column"
  fi
}
start_side_build old BASE "$BASE" "$BASE_BUILD"
base_pid=$side_pid
start_side_build mid MID "$MID" "$MID_BUILD"
mid_pid=$side_pid
# add_side_when_built SIDE PID BUILD_DIR: waits for start_side_build's build and adds its bench to
# the rounds' sides once it built.
add_side_when_built() {
  local side=$1 pid=$2 build=$3
  [ -n "$pid" ] || return 0
  if wait "$pid"; then
    note "== $side build: ok ($(elapsed) s)"
    if [ -x "$build/apps/bench/relora_bench" ]; then sides+=("$side"); bins+=("$build/apps/bench/relora_bench"); fi
  else
    note "== $side build FAILED: $(grep -m3 -E 'error|Error' "$WORK/build_$side.log" | tr '\n' ' ' | head -c 400)"
  fi
}
portable_pid=
if [ "$BENCH" = 1 ] && [ "$PORTABLE" = 1 ]; then
  ( cmake -S . -B "$PORTABLE_BUILD" -DCMAKE_BUILD_TYPE=Release -DRELORA_CUDA=OFF -DRELORA_NATIVE=OFF \
      -DRELORA_BUILD_TESTS=OFF && cmake --build "$PORTABLE_BUILD" -j"$JOBS" --target relora_bench ) \
    >"$WORK/build_portable.log" 2>&1 &
  portable_pid=$!
fi
# NCCL for the data-parallel benchmark: where the system has none, PyTorch's own (the nvidia-nccl
# wheel), through a folder of links that CMake's search finds (the wheel ships libnccl.so.2 only).
if [ "$DDP" = 1 ] && [ -z "${NCCL_ROOT:-}${NCCL_HOME:-}" ] &&
   ! ls /usr/include/nccl.h /usr/local/cuda/include/nccl.h /usr/local/cuda/targets/*/include/nccl.h 2>/dev/null |
     grep -q .; then
  wheel=$(python3 -c 'import nvidia.nccl; print(list(nvidia.nccl.__path__)[0])' 2>/dev/null)
  if [ -n "$wheel" ] && [ -f "$wheel/include/nccl.h" ] && ls "$wheel"/lib/libnccl.so* >/dev/null 2>&1; then
    mkdir -p "$BUILD/nccl/include" "$BUILD/nccl/lib"
    ln -sf "$wheel/include/nccl.h" "$BUILD/nccl/include/nccl.h"
    for so in "$wheel"/lib/libnccl.so*; do ln -sf "$so" "$BUILD/nccl/lib/"; done
    [ -e "$BUILD/nccl/lib/libnccl.so" ] || ln -sf "$(ls "$wheel"/lib/libnccl.so* | head -n 1)" "$BUILD/nccl/lib/libnccl.so"
    export NCCL_ROOT=$BUILD/nccl
    note "== NCCL: none in the system; PyTorch's, from $wheel"
  else
    note "== NCCL: none in the system nor in PyTorch's wheels; relora_bench --ranks on cuda will say so"
  fi
fi
targets=()
[ "$TESTS" = 1 ] || [ -n "$SANITIZE" ] || targets=(--target relora_bench)
# The sweep also times the regression demo.
[ "${#targets[@]}" -gt 0 ] && [ "$SWEEP" = 1 ] && targets+=(--target relora_regression)
if { cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release $cuda_flag -DCMAKE_CUDA_ARCHITECTURES="$ARCH" \
       -DRELORA_NATIVE=ON &&
     cmake --build "$BUILD" -j"$JOBS" "${targets[@]}"; } >"$WORK/build.log" 2>&1; then
  note "== build: ok ($(elapsed) s)"
  built=1
else
  note "== build FAILED ($(elapsed) s): $(grep -m3 -E 'error|Error' "$WORK/build.log" | tr '\n' ' ' | head -c 600)"
  built=0
  # The bench alone may still build when a test file does not.
  if [ "${#targets[@]}" = 0 ] && cmake --build "$BUILD" -j"$JOBS" --target relora_bench >>"$WORK/build.log" 2>&1; then
    note "== relora_bench alone: ok"
  fi
fi

# ---- tests: every case in one process (the CUDA cases one after the other), then the examples
if [ "$TESTS" = 1 ] && [ "$built" = 1 ]; then
  timeout "$TEST_TIMEOUT" "$BUILD/tests/relora_tests" ${TEST_FILTER:+-tc="$TEST_FILTER"} >"$WORK/tests.log" 2>&1
  rc=$?
  note "== tests (rc $rc$([ $rc = 124 ] && echo ", timed out after $TEST_TIMEOUT s"), $(elapsed) s): $(grep -E '^\[doctest\] (test cases|assertions)' "$WORK/tests.log" | tr -s ' ' | tr '\n' ' ')"
  grep -B2 -A10 -E '^.*ERROR|FATAL' "$WORK/tests.log" | head -n 40 | tee -a "$OUT/summary.txt"
  grep -E 'MESSAGE: ' "$WORK/tests.log" | sed 's/^.*MESSAGE: /   /' | sort -u | head -n 40 >>"$OUT/summary.txt"
  timeout 120 ctest --test-dir "$BUILD" -R '^example\.' --output-on-failure >"$WORK/ctest_examples.log" 2>&1
  note "== examples (ctest rc $?): $(grep -E 'tests passed|tests failed' "$WORK/ctest_examples.log" | tail -n 1)"
  cp "$WORK/tests.log" "$OUT/tests.log"
fi

# ---- compute-sanitizer: every CUDA case in a process of its own under each tool, many at once
# (scripts/sanitize_cuda.sh); the table of cases against tools goes to summary.txt
if [ -n "$SANITIZE" ] && [ "$gpu" = 0 ]; then note "== SANITIZE=$SANITIZE: no GPU answers, skipped"; fi
if [ -n "$SANITIZE" ] && [ "$built" = 1 ] && [ "$gpu" = 1 ]; then
  CASE_TIMEOUT=${CASE_TIMEOUT:-300} bash scripts/sanitize_cuda.sh "$BUILD/tests/relora_tests" "$WORK/sanitize" \
    "$SANITIZE" >"$WORK/sanitize_summary.txt" 2>&1
  note "== sanitizers ($SANITIZE, $(elapsed) s):"
  cat "$WORK/sanitize_summary.txt" >>"$OUT/summary.txt"
  cp "$WORK/sanitize/sanitize.md" "$OUT/sanitize.md" 2>/dev/null
fi

# ---- old against new, alternating
bench_runs() {  # bench_runs SIDE BINARY ROUND: this side's runs of one round, a JSON file each
  local side=$1 bin=$2 round=$3
  if [ "$gpu" = 1 ] && [ "$side" != portable ]; then
    for math in strict tf32; do
      # shellcheck disable=SC2086  # GPU_ARGS: words on purpose
      "$bin" --backend cuda --math $math --cases "$GPU_CASES" $GPU_ARGS --no-memory --no-floor --repeats 9 \
        --json "$WORK/${side}_cuda_${math}_$round.json" >>"$WORK/${side}_bench.log" 2>&1 ||
        echo "$side cuda $math round $round: rc $?" >>"$WORK/failures.txt"
    done
  fi
  [ -n "$CPU_CASES" ] || return 0
  "$bin" --backend cpu --threads "$THREADS" --cases "$CPU_CASES" --no-memory --no-floor --repeats 9 \
    --max-seconds 5 --json "$WORK/${side}_cpu_$round.json" >>"$WORK/${side}_bench.log" 2>&1 ||
    echo "$side cpu round $round: rc $?" >>"$WORK/failures.txt"
}
if [ "$BENCH" = 1 ]; then
  # No build may run while the rounds are timed.
  sides=()
  bins=()
  add_side_when_built old "$base_pid" "$BASE_BUILD"
  add_side_when_built mid "$mid_pid" "$MID_BUILD"
  if [ -n "$portable_pid" ]; then
    wait "$portable_pid" || note "== portable build FAILED (see build_portable.log)"
  fi
  if [ -x "$BUILD/apps/bench/relora_bench" ]; then sides+=(new); bins+=("$BUILD/apps/bench/relora_bench"); fi
  if [ "$PORTABLE" = 1 ] && [ -x "$PORTABLE_BUILD/apps/bench/relora_bench" ]; then
    sides+=(portable); bins+=("$PORTABLE_BUILD/apps/bench/relora_bench")
  fi
  note "== rounds: ${sides[*]:-nothing built}$([ "$PEFT" = 1 ] && echo ' peft'), $ROUNDS rounds from $(elapsed) s"
  round_s=0
  for round in $(seq 1 "$ROUNDS"); do
    [ "${#sides[@]}" = 0 ] && break
    start=$(date +%s)
    if [ $(( start - t0 + round_s + 15 )) -gt "$DEADLINE" ]; then
      note "== stopped before round $round: the next would end past DEADLINE=$DEADLINE s"
      break
    fi
    # The order turns round every round (old new, new old, ...): a drift of the machine's speed
    # over a round then favours neither side in the medians.
    order=("${!sides[@]}")
    if [ $(( round % 2 )) = 0 ]; then
      order=(); for (( i=${#sides[@]}-1; i>=0; i-- )); do order+=("$i"); done
    fi
    for i in "${order[@]}"; do bench_runs "${sides[$i]}" "${bins[$i]}" "$round"; done
    if [ "$PEFT" = 1 ]; then
      python3 apps/bench/peft_reference.py --device cpu --threads "$THREADS" --cases seed_demo \
        --json "$WORK/peft_cpu_$round.json" >>"$WORK/peft.log" 2>&1 || echo "peft round $round: rc $?" >>"$WORK/failures.txt"
    fi
    round_s=$(( $(date +%s) - start ))
    echo "   round $round: $round_s s" | tee -a "$OUT/summary.txt"
  done
  [ -f "$WORK/failures.txt" ] && sed 's/^/   failed: /' "$WORK/failures.txt" | head -n 10 | tee -a "$OUT/summary.txt"
  python3 - "$WORK" "$OUT/compare.md" <<'PY' | tee -a "$OUT/summary.txt"
import glob, json, os, re, statistics, sys
work, md = sys.argv[1], sys.argv[2]
times = {}  # (side, backend, math, case) -> [step_ms per round]
for path in sorted(glob.glob(os.path.join(work, "*.json"))):
    m = re.match(r"(old|mid|new|portable|peft)_.*_(\d+)\.json$", os.path.basename(path))
    if not m:
        continue
    try:
        doc = json.load(open(path))
    except (OSError, ValueError):
        continue
    side = m.group(1)
    for r in doc.get("steps" if side == "peft" else "results", []):
        if "step_ms" not in r or r.get("mode", "peft") != "peft":
            continue
        backend = r.get("device") if side == "peft" else r.get("backend")
        math = "strict" if backend == "cpu" else r.get("math", "strict")
        times.setdefault((side, backend, math, r["case"]), []).append(r["step_ms"])
med = {k: statistics.median(v) for k, v in times.items()}
order = ["seed_demo", "layer1k", "layer4k", "mlp4x2k", "mlp4x4k"]
cases = sorted({k[3] for k in times}, key=lambda c: order.index(c) if c in order else len(order))
rows = [(b, m, c) for b, m in (("cuda", "strict"), ("cuda", "tf32"), ("cpu", "strict")) for c in cases]
def f(x):
    return "-" if x is None else (f"{x * 1e3:.2f} us" if x < 1 else f"{x:.4g} ms")
portable = any(k[0] == "portable" for k in times)
mid = any(k[0] == "mid" for k in times)
head = "| case | old median |" + (" mid median | mid/old |" if mid else "") + " new median | new/old | limit |" + \
       (" portable (no -march=native) |" if portable else "") + \
       " PEFT median | PEFT/new |"
lines = [head, "|" + "---|" * (head.count("|") - 1)]
for backend, math, case in rows:
    o, n = med.get(("old", backend, math, case)), med.get(("new", backend, math, case))
    p = med.get(("peft", backend, math, case))
    if o is None and n is None:
        continue
    limit = 1.15 if (backend, case) == ("cpu", "seed_demo") else 1.05
    ratio = n / o if o and n else None
    verdict = "-" if ratio is None else (f"{ratio:.3f}" + ("" if ratio <= limit else " OVER"))
    name = f"{backend} {case}" + ("" if backend == "cpu" else f" {math}")
    line = f"| {name} | {f(o)} |"
    if mid:
        mm = med.get(("mid", backend, math, case))
        line += f" {f(mm)} | {'-' if not (mm and o) else f'{mm / o:.3f}'} |"
    line += f" {f(n)} | {verdict} | {limit:.2f} |"
    if portable:
        line += f" {f(med.get(('portable', backend, math, case)))} |"
    line += f" {f(p)} | {'-' if not (p and n) else f'{p / n:.0f}x'} |"
    lines.append(line)
rounds = max((len(v) for v in times.values()), default=0)
lines.append("")
lines.append(f"Medians over {rounds} rounds; each round ran every side once, alternating the order. Every round, ms:")
for key in sorted(times):
    lines.append(f"- {' '.join(key)}: " + " ".join(f"{x:.4g}" for x in times[key]))
new_seed = times.get(("new", "cpu", "strict", "seed_demo"), [])
peft_seed = times.get(("peft", "cpu", "strict", "seed_demo"), [])
if new_seed and peft_seed and len(new_seed) == len(peft_seed):
    per_round = [p / n for p, n in zip(peft_seed, new_seed)]
    lines.append(f"- CPU seed_demo, PEFT/new per round: " + " ".join(f"{x:.0f}x" for x in per_round) +
                 f" (lowest {min(per_round):.0f}x)")
text = "\n".join(lines)
open(md, "w").write(text + "\n")
print(text)
PY
fi

# ---- relora against PyTorch + PEFT on every anchor case (run G's method)
if [ "$SIDE" = 1 ] && [ -x "$BUILD/apps/bench/relora_bench" ]; then
  rel=(); pef=()
  for round in $(seq 1 "$ROUNDS"); do
    if [ "$gpu" = 1 ]; then
      for math in strict tf32; do
        "$BUILD/apps/bench/relora_bench" --backend cuda --math $math --cases all \
          --json "$WORK/side_relora_cuda_${math}_$round.json" >>"$WORK/side.log" 2>&1 &&
          rel+=("$WORK/side_relora_cuda_${math}_$round.json")
      done
      ceilings=; [ "$round" = 1 ] && ceilings=--ceilings
      python3 apps/bench/peft_reference.py --device cuda --math strict,tf32 $ceilings \
        --json "$WORK/side_peft_cuda_$round.json" >>"$WORK/side.log" 2>&1 && pef+=("$WORK/side_peft_cuda_$round.json")
    fi
    "$BUILD/apps/bench/relora_bench" --backend cpu --threads "$THREADS" --cases seed_demo,layer1k,mlp4x2k \
      --repeats 7 --max-seconds 5 --json "$WORK/side_relora_cpu_$round.json" >>"$WORK/side.log" 2>&1 &&
      rel+=("$WORK/side_relora_cpu_$round.json")
    python3 apps/bench/peft_reference.py --device cpu --threads "$THREADS" --cases seed_demo,layer1k,mlp4x2k \
      --json "$WORK/side_peft_cpu_$round.json" >>"$WORK/side.log" 2>&1 && pef+=("$WORK/side_peft_cpu_$round.json")
    echo "   side-by-side round $round done ($(elapsed) s)"
  done
  if [ "${SCALING:-0}" = 1 ]; then
    [ "$gpu" = 1 ] && "$BUILD/apps/bench/relora_bench" --backend cuda --scaling --repeats 7 --max-seconds 2 --no-memory \
      --json "$WORK/side_relora_cuda_scaling.json" >>"$WORK/side.log" 2>&1
    "$BUILD/apps/bench/relora_bench" --backend cpu --threads "$THREADS" --scaling --repeats 5 --max-seconds 1 \
      --no-memory --json "$WORK/side_relora_cpu_scaling.json" >>"$WORK/side.log" 2>&1
  fi
  python3 apps/bench/side_by_side.py --relora "${rel[@]}" --peft "${pef[@]}" --md "$OUT/side_by_side.md" |
    tee -a "$OUT/summary.txt"
fi

# ---- DoRA: relora's LoRA and DoRA steps and PEFT's LoRA and DoRA, alternating in every round, on
# the GPU in strict fp32 (issue 14's table and targets, side_by_side.py's DoRA section)
if [ "$DORA" = 1 ] && [ "$gpu" = 1 ] && [ -x "$BUILD/apps/bench/relora_bench" ]; then
  rel=(); pef=()
  for round in $(seq 1 "$ROUNDS"); do
    for layer in lora dora; do
      "$BUILD/apps/bench/relora_bench" --backend cuda --math strict --layer $layer --cases "$DORA_CASES" \
        --no-floor --repeats 9 --json "$WORK/dora_relora_${layer}_$round.json" >>"$WORK/dora.log" 2>&1 &&
        rel+=("$WORK/dora_relora_${layer}_$round.json")
    done
    python3 apps/bench/peft_reference.py --device cuda --math strict --cases "$DORA_CASES" --modes peft,peft_dora \
      --json "$WORK/dora_peft_$round.json" >>"$WORK/dora.log" 2>&1 && pef+=("$WORK/dora_peft_$round.json")
    echo "   DoRA round $round done ($(elapsed) s)"
  done
  python3 apps/bench/side_by_side.py --relora "${rel[@]}" --peft "${pef[@]}" --md "$OUT/dora.md" |
    tee -a "$OUT/summary.txt"
fi

# ---- a 16-bit frozen base (HALF=1, issue 16): relora with --precision bf16 against PEFT on a bf16
# base model, alternating, CUDA strict (the LoRA products and the optimizer stay fp32 on both)
if [ "$HALF" = 1 ] && [ "$gpu" = 1 ] && [ -x "$BUILD/apps/bench/relora_bench" ]; then
  for round in $(seq 1 "$ROUNDS"); do
    "$BUILD/apps/bench/relora_bench" --backend cuda --math strict --precision bf16 --cases "$HALF_CASES" \
      --repeats 9 --json "$WORK/half_relora_$round.json" 2>&1 | tee -a "$WORK/half.log" | grep -v '^wrote' >>"$OUT/summary.txt"
    python3 apps/bench/peft_reference.py --device cuda --math strict --precision bf16 --cases "$HALF_CASES" \
      --json "$WORK/half_peft_$round.json" 2>&1 | tee -a "$WORK/half.log" | grep '"step_ms"' |
      python3 -c 'import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print("   PEFT bf16 %s: %.4g ms, peak %.1f MiB" % (r["case"], r["step_ms"], (r["peak_bytes"] or 0) / 2**20))' >>"$OUT/summary.txt"
  done
  note "== bf16 base done ($(elapsed) s)"
fi

# ---- GaLore (GALORE=1, issue 15): relora_bench --galore (GaLore and our full Adam) and the
# PyTorch GaLore-Adam reference, CUDA
if [ "$GALORE" = 1 ] && [ "$gpu" = 1 ] && [ -x "$BUILD/apps/bench/relora_bench" ]; then
  "$BUILD/apps/bench/relora_bench" --galore --backend cuda --cases "$GALORE_CASES" 2>&1 | tee "$WORK/galore.log" >>"$OUT/summary.txt"
  python3 apps/bench/galore_reference.py --device cuda --cases "$GALORE_CASES" --json "$WORK/galore_torch.json" \
    2>&1 | tee -a "$WORK/galore.log" | tail -n 12 >>"$OUT/summary.txt"
  note "== GaLore done ($(elapsed) s)"
fi

# ---- the CPU's thread sweep (issue 18): every size at 1 thread, the default and every core
if [ "$SWEEP" = 1 ] && [ -x "$BUILD/apps/bench/relora_bench" ]; then
  "$BUILD/apps/bench/relora_bench" --backend cpu --thread-sweep --repeats 5 --max-seconds 1 --warmup 1 \
    --json "$WORK/thread_sweep.json" 2>&1 | tee "$OUT/thread_sweep.txt" >>"$OUT/summary.txt"
  # The regression demo on a mid-size model, every method, at 1 thread and at the default.
  for threads in 1 default; do
    flag=; [ "$threads" = 1 ] && flag="--threads 1"
    start=$(date +%s.%N)
    "$BUILD/apps/regression/relora_regression" --samples 1000 --in-features 64 --out-features 32 --rank 8 \
      --steps 300 $flag --out "$WORK/demo_$threads" >"$WORK/demo_$threads.log" 2>&1
    note "   regression demo, n 1000, 64 -> 32, rank 8, 300 steps x 6 methods, threads $threads: rc $?, $(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }') s"
  done
  note "== thread sweep done ($(elapsed) s)"
fi

# ---- data-parallel weak scaling (DDP=1, issue 17): relora_bench --ranks 1,2 against PyTorch DDP +
# PEFT under torchrun for 1 and 2 processes, every rank on its own batch of the case's n rows;
# the two sides alternate their order from round to round, as the old/new rounds do
if [ "$DDP" = 1 ]; then
  gpus=0
  [ "$gpu" = 1 ] && gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
  if [ "$gpus" -lt 2 ]; then
    note "== DDP=1: weak scaling needs 2 GPUs, $gpus visible: skipped"
  elif [ ! -x "$BUILD/apps/bench/relora_bench" ]; then
    note "== DDP=1: relora_bench was not built: skipped"
  else
    grep -m1 -E 'relora: NCCL communicator' "$WORK/build.log" | sed 's/^-- /== /' | tee -a "$OUT/summary.txt"
    ddp_relora() {  # ddp_relora PRECISION ROUND
      local json="$WORK/ddp_relora_$1_$2.json"
      NCCL_DEBUG=${NCCL_DEBUG:-WARN} timeout "$DDP_TIMEOUT" "$BUILD/apps/bench/relora_bench" --backend cuda --math strict --precision "$1" --ranks 1,2 \
        --cases "$DDP_CASES" --warmup 5 --batch 10 --repeats 9 --json "$json" >>"$WORK/ddp.log" 2>&1 ||
        echo "relora $1 round $2: rc $?" >>"$WORK/ddp_failures.txt"
      [ -f "$json" ] && rel+=("$json")
    }
    ddp_torch() {  # ddp_torch PRECISION ROUND: torchrun for 1, then 2 processes
      local n json
      for n in 1 2; do
        json="$WORK/ddp_torch_$1_${n}_$2.json"
        timeout "$DDP_TIMEOUT" python3 -m torch.distributed.run --standalone --nproc_per_node "$n" apps/bench/ddp_reference.py \
          --cases "$DDP_CASES" --precision "$1" --math strict --json "$json" >>"$WORK/ddp.log" 2>&1 ||
          echo "torchrun $1 $n processes round $2: rc $?" >>"$WORK/ddp_failures.txt"
        [ -f "$json" ] && pyt+=("$json")
      done
    }
    rel=(); pyt=()
    round_s=0
    for round in $(seq 1 "$DDP_ROUNDS"); do
      start=$(date +%s)
      if [ $(( start - t0 + round_s + 15 )) -gt "$DEADLINE" ]; then
        note "== weak scaling: stopped before round $round, the next would end past DEADLINE=$DEADLINE s"
        break
      fi
      for precision in ${DDP_PRECISIONS//,/ }; do
        if [ $(( round % 2 )) = 1 ]; then ddp_relora "$precision" "$round"; ddp_torch "$precision" "$round"
        else ddp_torch "$precision" "$round"; ddp_relora "$precision" "$round"; fi
      done
      round_s=$(( $(date +%s) - start ))
      echo "   weak-scaling round $round: $round_s s" | tee -a "$OUT/summary.txt"
    done
    [ -f "$WORK/ddp_failures.txt" ] && sed 's/^/   failed: /' "$WORK/ddp_failures.txt" | head -n 10 | tee -a "$OUT/summary.txt"
    grep -E '^relora_bench: |^ddp_reference: |Error' "$WORK/ddp.log" | sort -u | head -n 10 | sed 's/^/   /' |
      tee -a "$OUT/summary.txt"
    python3 apps/bench/weak_scaling_table.py --relora "${rel[@]}" --ddp "${pyt[@]}" --md "$OUT/weak_scaling.md" |
      tee -a "$OUT/summary.txt"
    note "== weak scaling done ($(elapsed) s)"
  fi
fi
