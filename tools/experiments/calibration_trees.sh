#!/usr/bin/env bash
# tree crowns, IoU-head variants x 3 seeds side by side; each: train (uncalibrated stages on val),
# calibrate on the training image's held-out strip, evaluate val with the choice.
# VARIANTS: "name|override override ..." entries separated by ';'.
set -u
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PRROI_D2_DATASETS=/tmp/prroi_ds
START=$(date +%s)
mkdir -p /tmp/prroi_ds/downloads && cp .gpu/trees/deepforest-2.1.0-py3-none-any.whl /tmp/prroi_ds/downloads/  # the wheel, carried in .gpu/trees
python3 -c "from prroi_d2.data.neon_trees import register_neon_trees_datasets as r; r()" > $OUT/datagen.log 2>&1 || tail -5 $OUT/datagen.log
ITERS=${ITERS:-800}
COMMON=(MODEL.DEVICE cuda DATALOADER.NUM_WORKERS ${WORKERS:-4} SOLVER.MAX_ITER $ITERS SOLVER.STEPS "${STEPS:-(600,750)}"
        SOLVER.CHECKPOINT_PERIOD 100000 MODEL.IOU_NET.CALIBRATION.DATASET '""')
source tools/experiments/calibration_runs.sh
IFS=';' read -ra VS <<< "${VARIANTS:-base|}"
for v in "${VS[@]}"; do
  name=${v%%|*}; read -ra ov <<< "${v#*|}"
  for seed in ${SEEDS:-0 1 2}; do
    calibration_run output/trees/$name/seed_$seed configs/iounet_trees_R18.yaml neon_trees_train_holdout $seed -- "${ov[@]}" &
  done
done
wait_for_runs output/trees trees.tgz
