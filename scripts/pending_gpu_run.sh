#!/usr/bin/env bash
# The device call the pending bf16 work waits for (docs/PERFORMANCE.md, "Where mlp4x4k's bf16 step
# goes now"), in one command on the GPU machine, from the repository root of main:
#   1. the two probes (PROBES=1): the adapter's bf16 products whole and in depth chunks, and the
#      fp32 strict rank-sized products (issue 14);
#   2. three trees side by side: old = main as it is, mid = main with MID_PATCHES, new = this tree
#      with NEW_PATCHES applied; apps/bench/device_run.sh builds all three, runs the test cases
#      TEST_FILTER picks on new, and times old, mid and new alternating on GPU_CASES.
# Results under $OUT: the probes' output and device_run.sh's summary.txt and compare.md.
#   env: PROBES (1)  MID_PATCHES (depth chunks)  NEW_PATCHES (chunks, then side gradients)
#        and device_run.sh's (GPU_CASES, GPU_ARGS, ROUNDS, TEST_FILTER, ...), set below unless given.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build-device/out}
export OUT
mkdir -p "$OUT"
P=docs/pending
MID_PATCHES=${MID_PATCHES-"$P/cuda_half_depth_chunks.patch"}  # set and empty: no mid
NEW_PATCHES=${NEW_PATCHES:-"$P/cuda_half_depth_chunks.patch $P/cuda_half_side_gradients.patch"}

if [ "${PROBES:-1}" = 1 ]; then
  for probe in half_adapter_products fp32_rank_products; do
    if nvcc -std=c++17 -O2 -arch=sm_90 "scripts/${probe}_probe.cu" -lcublas -o "/tmp/${probe}_probe" \
        >"$OUT/${probe}_probe_build.txt" 2>&1; then
      timeout 120 "/tmp/${probe}_probe" 2>&1 | tee "$OUT/${probe}_probe.txt"
    else
      echo "== ${probe}_probe did not build: $(head -c 400 "$OUT/${probe}_probe_build.txt")"
    fi
  done
fi

# The trees, copied before anything is applied here. git apply --directory works from the root
# whether or not the copy is a git checkout.
rm -rf .base .mid
mkdir -p .base .mid
tar --exclude='./build*' --exclude=./.base --exclude=./.mid --exclude=./.git --exclude=./.device -cf - . |
  tar -xf - -C .base
mid=
if [ -n "$MID_PATCHES" ]; then
  cp -a .base/. .mid/
  # shellcheck disable=SC2086  # lists of patches: words on purpose
  git apply --directory=.mid $MID_PATCHES || { echo "== MID_PATCHES do not apply"; exit 1; }
  mid=.mid
fi
# shellcheck disable=SC2086
git apply $NEW_PATCHES || { echo "== NEW_PATCHES do not apply"; exit 1; }

# A build folder that a warm machine kept from a call with other patches holds objects newer than
# the sources sent since (the tree travels with its own file times), so make would keep objects of
# the old patches and the link fails: a build whose patch set changed starts afresh.
fresh_build_for() {  # fresh_build_for BUILD_DIR [PATCH ...]
  local dir=$1 stamp
  shift
  stamp=$(printf '%s\n' "$@" | cat - "$@" | sha256sum | cut -c1-16)
  [ "$(cat "$dir/patch_set" 2>/dev/null)" = "$stamp" ] || rm -rf "$dir"
  mkdir -p "$dir" && echo "$stamp" >"$dir/patch_set"
}
# shellcheck disable=SC2086
fresh_build_for build-device $NEW_PATCHES
# shellcheck disable=SC2086
fresh_build_for build-device-mid $MID_PATCHES
fresh_build_for build-device-base

BASE=.base MID=$mid GPU_CASES=${GPU_CASES:-mlp4x4k,llm_mlp} GPU_ARGS=${GPU_ARGS:-"--precision bf16 --activations bf16"} \
  CPU_CASES=${CPU_CASES-} PEFT=${PEFT:-0} TEST_FILTER=${TEST_FILTER:-'*16-bit*,*host-wait*'} ROUNDS=${ROUNDS:-3} \
  bash apps/bench/device_run.sh
