#!/usr/bin/env bash
# compute-sanitizer over every CUDA test case, each case in a process of its own under each tool,
# many at once (the tools are bound by the host's instrumentation, not the GPU), so that all four
# tools cover every case inside the device's command limit.
#
#   usage: scripts/sanitize_cuda.sh TESTS_BINARY OUT_DIR [TOOLS]
#     TOOLS  comma-separated, of memcheck racecheck synccheck initcheck (default: all four)
#   env: JOBS (parallel processes, default nproc - 2)  CASE_TIMEOUT (seconds per case and tool, 300)
#        FILTER (doctest -tc filter of the cases, default *cuda*,*nccl*: every case that runs on a GPU)
# Every run gets RELORA_UNDER_SANITIZER=1, which the slowest cases read to run fewer steps or
# smaller shapes over the same kernels. "an absurd allocation" fails a cudaMalloc on purpose: its
# runs do not count API errors, every other run does.
# Output: OUT_DIR/sanitize_<tool>_<index>.log per run and OUT_DIR/sanitize.md, one row per case
# (clean, ERRORS n, TIMEOUT or rc), which is also printed.
set -u
bin=$1
out=$2
tools=${3:-memcheck,racecheck,synccheck,initcheck}
jobs=${JOBS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
case_timeout=${CASE_TIMEOUT:-300}
filter=${FILTER:-*cuda*,*nccl*}
mkdir -p "$out"

mapfile -t cases < <("$bin" -ltc -tc="$filter" --order-by=name | sed -n '/^====/,/^====/p' | grep -v '^====')
count=${#cases[@]}
echo "sanitize: $count cases x {${tools//,/ }}, $jobs at a time, ${case_timeout} s each"

run_one() {  # run_one TOOL INDEX: the INDEX-th case (1-based, by name) under TOOL
  local tool=$1 index=$2 name args log rc
  name=$("$bin" -ltc -tc="$filter" --order-by=name | sed -n '/^====/,/^====/p' | grep -v '^====' | sed -n "${index}p")
  case $tool in
    memcheck) args=(--tool memcheck --leak-check full) ;;
    racecheck) args=(--tool racecheck --racecheck-report all) ;;
    synccheck) args=(--tool synccheck) ;;
    initcheck) args=(--tool initcheck) ;;
    *) echo "unknown tool $tool"; return ;;
  esac
  case $name in *absurd*) args+=(--report-api-errors no) ;; esac
  log=$out/sanitize_${tool}_$index.log
  OMP_NUM_THREADS=2 RELORA_UNDER_SANITIZER=1 timeout "$case_timeout" compute-sanitizer "${args[@]}" --error-exitcode 99 \
    "$bin" -tc="$filter" --order-by=name --first="$index" --last="$index" -d >"$log" 2>&1
  rc=$?
  echo "rc=$rc" >>"$log"
}
export -f run_one
export bin out filter case_timeout

# Stopped from outside (a timeout around this script), stop every run it started as well: each
# run's own `timeout` leads a process group of its own, out of reach of the signal to ours, and a
# sanitizer left running would take the CPUs of whatever the caller times next.
trap 'pkill -TERM -f "compute-sanitizer .*$bin" 2>/dev/null; exit 143' TERM INT

start=$(date +%s)
for tool in ${tools//,/ }; do
  for index in $(seq 1 "$count"); do echo "$tool $index"; done
done | xargs -P "$jobs" -L 1 bash -c 'run_one "$0" "$1"'

{
  echo "| case | ${tools//,/ | } |"
  echo "| --- |$(for _ in ${tools//,/ }; do printf ' --- |'; done)"
  for index in $(seq 1 "$count"); do
    row="| ${cases[$((index - 1))]} |"
    for tool in ${tools//,/ }; do
      log=$out/sanitize_${tool}_$index.log
      rc=$(grep -o 'rc=[0-9]*' "$log" 2>/dev/null | tail -n 1 | cut -d= -f2)
      errors=$(grep -oE '(ERROR|RACECHECK) SUMMARY: [0-9]+' "$log" 2>/dev/null | tail -n 1 | grep -oE '[0-9]+$')
      seconds=$(grep -oE '^[0-9.]+ s: ' "$log" 2>/dev/null | head -n 1 | cut -d' ' -f1)
      if [ "$rc" = 124 ]; then cell="TIMEOUT"
      elif [ "$rc" = 0 ] && [ "${errors:-0}" = 0 ]; then cell="clean (${seconds:-?} s)"
      elif [ -n "$errors" ] && [ "$errors" != 0 ]; then cell="ERRORS $errors"
      else cell="rc $rc"; fi
      row+=" $cell |"
    done
    echo "$row"
  done
  echo
  echo "wall $(( $(date +%s) - start )) s"
} | tee "$out/sanitize.md"
