#!/usr/bin/env bash
# The GPU measurements in one prepared run (<= 8 minutes on an H100/H200), in order of value:
#   1. the CUDA-marked tests (the region step's tensor backend on CUDA against the CPU reference,
#      bit for bit; its host synchronisations) and the CPU host-read tests;
#   2. bench_model: bare ResNet-50 vs AG-CNN forward, batch 256, 224 px, bf16, channels_last,
#      with and without torch.compile (graph breaks counted), region step vs per-image CPU loop;
#   3. bench_train: each training stage next to a bare ResNet-50 step, peak memory;
#   4. bench_predict: agcnn predict end to end vs decode-only, same workers.
# Writes $OUT/gpu_check.json (every result, the device and versions, each target met or not),
# $OUT/gpu_check.md (the table for docs/benchmarks.md) and $OUT/gpu_check.log. OUT defaults to
# out/gpu_check. A step that fails or runs past its time is recorded and the next one runs; the
# exit status is non-zero if any step failed.
#
#   scripts/gpu_check.sh            # on the GPU machine
#   scripts/gpu_check.sh --dry-run  # the same code paths on the CPU at tiny sizes (< 2 minutes; CI)
#
# PYTHON selects the interpreter (default: .venv/bin/python when present, else python3). It needs
# torch, torchvision, OpenCV, scikit-image, pandas and PyYAML; bench_predict also pydicom (and
# pylibjpeg-openjpeg for JPEG 2000), which a machine without them can be given as wheels.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT="${OUT:-out/gpu_check}"
mkdir -p "$OUT"
PARTS="$(mktemp -d)"
trap 'rm -rf "$PARTS"' EXIT
LOG="$OUT/gpu_check.log"
: >"$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1

if ((DRY)); then
  DEVICE=cpu
  MODEL_ARGS=(--device cpu --backbone resnet18 --batch-size 2 --image-size 64 --dtype fp32 --iters 1 --warmup 0
              --threads 1 --compile --compile-backend aot_eager)
  TRAIN_ARGS=(--device cpu --backbone resnet18 --batch-size 2 --image-size 64 --steps 1 --warmup 0)
  PREDICT_ARGS=(--device cpu --backbone resnet18 --image-size 32 --files 2 --workers 0 --batch-size 2 --rss-counts)
  LIMITS=(90 240 240 240)
else
  DEVICE=cuda
  if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA device visible to $PYTHON; on a machine without a GPU run: $0 --dry-run" >&2
    exit 2
  fi
  MODEL_ARGS=(--device cuda --backbone resnet50 --batch-size 256 --image-size 224 --dtype bf16 --channels-last
              --iters 20 --warmup 5 --compile)
  TRAIN_ARGS=(--device cuda --backbone resnet50 --batch-size 128 --image-size 224 --steps 20 --warmup 3
              --channels-last)
  WORKERS=$(( $(nproc) / 2 > 1 ? $(nproc) / 2 : 1 ))
  PREDICT_ARGS=(--device cuda --backbone resnet50 --image-size 224 --files 64 --workers "$WORKERS" --batch-size 64
                --rss-counts)
  # Seconds per step; together under 8 minutes.
  LIMITS=(40 170 120 110)
fi

declare -A STATUS
step() {  # step NAME LIMIT COMMAND...: run with a time limit, stdout to $PARTS/NAME.out, log the rest
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$PARTS/$name.out" 2>>"$LOG"
  local rc=$?
  STATUS[$name]="$rc $((SECONDS - t0))"
  echo "   rc=$rc after $((SECONDS - t0))s" | tee -a "$LOG"
}

# Only the files that hold CUDA tests: collecting the whole suite would need every test dependency.
step cuda_tests "${LIMITS[0]}" "$PYTHON" -m pytest -q -p no:cacheprovider --junitxml="$PARTS/cuda_tests.xml" -m gpu \
  tests/models/test_roi.py tests/data/test_device_transforms.py
step host_sync_tests "${LIMITS[0]}" "$PYTHON" -m pytest -q -p no:cacheprovider --junitxml="$PARTS/host_sync_tests.xml" \
  tests/models/test_roi.py -k host
step bench_model "${LIMITS[1]}" "$PYTHON" scripts/bench_model.py "${MODEL_ARGS[@]}"
step bench_train "${LIMITS[2]}" "$PYTHON" scripts/bench_train.py "${TRAIN_ARGS[@]}"
step bench_predict "${LIMITS[3]}" "$PYTHON" scripts/bench_predict.py "${PREDICT_ARGS[@]}"

STATUS_ARGS=()
for name in "${!STATUS[@]}"; do STATUS_ARGS+=(--status "$name" ${STATUS[$name]}); done
"$PYTHON" scripts/gpu_report.py --parts "$PARTS" --out "$OUT" --device "$DEVICE" $( ((DRY)) && echo --dry-run ) \
  "${STATUS_ARGS[@]}" 2>>"$LOG" | tee -a "$LOG"
