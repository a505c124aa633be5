#!/bin/bash
# The GPU smoke tier (as detectron2's dev/run_instant_tests.sh): each
# configs/quick_schedules/*_instant_test.py trains 40 iterations of a paper setting (full-size
# student and teacher, model-zoo teacher weights) on coco_2017_val_100 and evaluates it with
# COCOEvaluator. Not part of `make test`: it needs GPUs, COCO and the model zoo.
#
# Needs $DETECTRON2_DATASETS/coco/val2017 and coco/annotations/instances_val2017_100.json
# (detectron2's builtin coco_2017_val_100), and the teachers' model-zoo files (downloaded on
# first use into ~/.torch/iopath_cache).
#
# Usage: dev/run_instant_tests.sh [CONFIG.py ...] [key=value ...]
#   no CONFIG: every instant test; key=value overrides go to every run.
#   NUM_GPUS (default: the GPUs nvidia-smi lists), PYTHON (default python). Without a GPU the
#   runs go to NUM_GPUS CPU processes (default 1), train.device=cpu.
set -e
HERE=$PWD
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUTPUT=${OUTPUT:-instant_test_output}
FOUND_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
DEVICE=()
ON="GPU(s)"
if [ "${FOUND_GPUS:-0}" -eq 0 ]; then
  DEVICE=(train.device=cpu)
  ON="CPU process(es)"
  NUM_GPUS=${NUM_GPUS:-1}
fi
NUM_GPUS=${NUM_GPUS:-$FOUND_GPUS}

CONFIGS=()
OPTS=()
for arg in "$@"; do
  case "$arg" in
    *.py)  # a path from the caller's directory, else from the repository root
      if [ "${arg#/}" = "$arg" ] && [ "$HERE" != "$PWD" ] && [ -f "$HERE/$arg" ]; then
        arg="$HERE/$arg"
      fi
      CONFIGS+=("$arg") ;;
    *) OPTS+=("$arg") ;;
  esac
done
[ ${#CONFIGS[@]} -gt 0 ] || CONFIGS=(configs/quick_schedules/*_instant_test.py)

for cfg in "${CONFIGS[@]}"; do
  echo "========================================================================"
  echo "Running $cfg on $NUM_GPUS $ON ..."
  echo "========================================================================"
  rm -rf "$OUTPUT"
  "$PYTHON" train_net.py --num-gpus "$NUM_GPUS" --config-file "$cfg" \
    dataloader.train.total_batch_size=$((NUM_GPUS * 2)) train.output_dir="$OUTPUT" "${DEVICE[@]}" "${OPTS[@]}"
  rm -rf "$OUTPUT"
done
