#!/usr/bin/env bash
# relora <-> PyTorch + PEFT in one run (needs python3 with torch, peft and safetensors; no GPU):
# builds relora_peft_check (CPU only), then scripts/peft_roundtrip.py runs both directions with
# use_rslora false and true, LoRA and DoRA (use_dora). Logs go to $OUT (default ./out/peft), the exchanged files to $WORK.
#
#   scripts/run_peft_check.sh            # from the repository root
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/peft}
WORK=${WORK:-$(mktemp -d)}
BUILD=${BUILD:-build-peft}
mkdir -p "$OUT"
echo "building relora_peft_check in $BUILD (log: $OUT/build.log)"
cmake -S tools/peft_check -B "$BUILD" -DRELORA_CUDA=OFF -DCMAKE_BUILD_TYPE=Release >"$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
cmake --build "$BUILD" -j"$(nproc)" --target relora_peft_check >>"$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
PYTHONUNBUFFERED=1 python3 scripts/peft_roundtrip.py --tool "$BUILD/relora_peft_check" --work "$WORK" 2>&1 \
  | tee "$OUT/peft_roundtrip.log"
exit "${PIPESTATUS[0]}"
