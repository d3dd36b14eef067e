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
# (clean, ERRORS n, TIMEOUT or rc) and the first distinct reports of every run that is not clean,
# which is also printed.
#
# Findings in other libraries' code are counted apart and named in the cell ("clean; 384 in
# cuBLAS"), never dropped; a run is clean only when every report it printed is one of these and
# it printed every report it counted:
#   nccl-kernel-probe (memcheck): cudaErrorNoKernelImageForDevice from cudaFuncGetAttributes.
#     NCCL asks for the attributes of every kernel it ships, those built for other GPUs included,
#     and skips the ones that fail; relora never calls cudaFuncGetAttributes.
#   cublas-hazard (racecheck): a hazard whose read and write both lie in a cuBLAS kernel
#     (nvjet_*): shared memory inside cuBLAS's own kernel, which no caller can reach.
# initcheck does not see the stores of cuBLAS's 16-bit products on sm_90:
# scripts/cublas_16bit_store_probe.cu, run first under initcheck, reads memory that only a bf16
# product wrote and is reported, and after an fp32 product it is not. The library marks those
# products' outputs as written through NVTX's memory extension (lib/cuda/cuda_sanitizer_marks.cuh),
# which initcheck reads with --nvtx yes; the probe's result is printed as the reason.
set -u
bin=$1
out=$2
tools=${3:-memcheck,racecheck,synccheck,initcheck}
jobs=${JOBS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
case_timeout=${CASE_TIMEOUT:-300}
filter=${FILTER:-*cuda*,*nccl*}
mkdir -p "$out"

# Does initcheck see the stores of cuBLAS's 16-bit products here? (1: it misses them)
tool_misses_16bit_stores=0
if [[ ,$tools, == *,initcheck,* ]] && command -v nvcc >/dev/null; then
  probe=$out/cublas_16bit_store_probe
  if nvcc -O2 -o "$probe" "$(dirname "$0")/cublas_16bit_store_probe.cu" -lcublas >"$out/probe.log" 2>&1; then
    compute-sanitizer --tool initcheck "$probe" bf16 >"$out/probe_bf16.log" 2>&1
    compute-sanitizer --tool initcheck "$probe" fp32 >"$out/probe_fp32.log" 2>&1
    if grep -q 'Uninitialized __global__ memory read' "$out/probe_bf16.log" &&
       ! grep -q 'Uninitialized __global__ memory read' "$out/probe_fp32.log" &&
       grep -q 'sum of Y 0 ' "$out/probe_bf16.log"; then
      tool_misses_16bit_stores=1
    fi
  fi
  echo "initcheck and cuBLAS's 16-bit stores: $([ $tool_misses_16bit_stores = 1 ] && echo 'missed by the tool (the probe reads unwritten memory after a bf16 product, none after an fp32 one)' || echo 'seen, or not probed')"
fi

mapfile -t cases < <("$bin" -ltc -tc="$filter" --order-by=name | sed -n '/^====/,/^====/p' | grep -v '^====')
count=${#cases[@]}
echo "sanitize: $count cases x {${tools//,/ }}, $jobs at a time, ${case_timeout} s each"

run_one() {  # run_one TOOL INDEX: the INDEX-th case (1-based, by name) under TOOL
  local tool=$1 index=$2 name args log rc
  name=$("$bin" -ltc -tc="$filter" --order-by=name | sed -n '/^====/,/^====/p' | grep -v '^====' | sed -n "${index}p")
  case $tool in
    memcheck) args=(--tool memcheck --leak-check full) ;;
    racecheck) args=(--tool racecheck --racecheck-report all --print-limit 0 --show-backtrace no) ;;
    synccheck) args=(--tool synccheck) ;;
    initcheck) args=(--tool initcheck --nvtx yes) ;;
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

# known TOOL LOG: how many of the run's printed reports are other libraries' (see the header),
# then how many reports it printed, then the name of the known kind.
known() {
  local tool=$1 log=$2
  case $tool in
    memcheck)
      echo "$(grep -c 'cudaErrorNoKernelImageForDevice.*cudaFuncGetAttributes' "$log") $(grep -cE '^========= (Program hit|Invalid|Uninitialized|Leaked|Memcpy|Cuda|Error)' "$log") in NCCL's kernel probe" ;;
    racecheck)  # hazards (a read and a write line each) and race reports (two lines each)
      awk '/hazard detected/ { shown++; mine[shown] = 0; in_hazard = 1; next }
           /Race reported between/ { shown++; nvjet = gsub(/nvjet_/, "&"); in_hazard = 0; in_race = 1; next }
           in_race { mine[shown] = (nvjet + gsub(/nvjet_/, "&") < 2); in_race = 0; next }
           in_hazard && /(Read|Write) Thread/ { if ($0 !~ / at nvjet_/) mine[shown] = 1 }
           END { k = 0; for (i = 1; i <= shown; ++i) if (!mine[i]) ++k; print k, shown + 0, "in cuBLAS" }' "$log" ;;
    *) echo "0 0 -" ;;
  esac
}

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
      read -r known_count shown kind < <(known "$tool" "$log")
      if [ "$rc" = 124 ]; then cell="TIMEOUT"
      elif [ "$rc" = 0 ] && [ "${errors:-0}" = 0 ]; then
        cell="clean (${seconds:-?} s)"
      elif [ "${errors:-0}" != 0 ] && [ "$known_count" = "$errors" ] && [ "$shown" = "$errors" ] &&
           ! grep -q 'FAILED\|ERROR: ' <(grep -v '^=========' "$log"); then
        cell="clean; $known_count $kind"
      elif [ -n "$errors" ] && [ "$errors" != 0 ]; then cell="ERRORS $errors ($known_count of $shown shown $kind)"
      else cell="rc $rc"; fi
      row+=" $cell |"
    done
    echo "$row"
  done
  echo
  echo "wall $(( $(date +%s) - start )) s"
  # The first distinct reports of every run that is not clean, addresses and threads left out.
  for log in "$out"/sanitize_*_*.log; do
    grep -q '^rc=0$' "$log" && continue
    echo
    echo "### $(basename "$log" .log): $(grep -m 1 '^TEST CASE:' "$log" | sed 's/^TEST CASE: *//')"
    grep -E '^=========|ERROR|FAILED|CRASHED|rc=' "$log" |
      grep -vE 'Saved host backtrace|Address 0x|by thread|Current Value|Host Frame|^=========\s*$' |
      sed -E 's/0x[0-9a-f]+/0x_/g; s/\(([0-9]+,){2}[0-9]+\)/(_)/g' | awk '!seen[$0]++' | head -n 12
  done
} | tee "$out/sanitize.md"
