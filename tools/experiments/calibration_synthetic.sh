#!/usr/bin/env bash
# synthetic Faster and Cascade R-CNN + IoU-Net, IoU-head candidates, 3 seeds each, side by side;
# each run: train (uncalibrated stages on holdout + val), calibrate on the holdout, evaluate val with the choice.
set -u
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PRROI_D2_DATASETS=/tmp/prroi_ds
START=$(date +%s)
ITERS=${ITERS:-750}
python3 -c "from prroi_d2.data.synthetic import register_synthetic_datasets as r; r()" > $OUT/datagen.log 2>&1
COMMON=(MODEL.DEVICE cuda DATALOADER.NUM_WORKERS 1 SOLVER.MAX_ITER $ITERS SOLVER.STEPS "(550,700)"
        SOLVER.CHECKPOINT_PERIOD 100000 MODEL.IOU_NET.CALIBRATION.DATASET '""')
source tools/experiments/calibration_runs.sh
STAGES_ON=(DATASETS.TEST '("iounet_synth_holdout","iounet_synth_val")')  # training reports on both splits
run() {  # name config seed overrides...
  local name=$1 config=$2 seed=$3; shift 3
  calibration_run output/synth/$name/seed_$seed $config iounet_synth_holdout $seed "${STAGES_ON[@]}" -- "$@"
}
for seed in 0 1 2; do
  run faster configs/iounet_synthetic_R18.yaml $seed &
  run cascade configs/iounet_cascade_synthetic_R18.yaml $seed &
  run cascade_decoupled configs/iounet_cascade_synthetic_R18.yaml $seed MODEL.IOU_NET.HEAD.TARGET decoupled &
  run cascade_conv configs/iounet_cascade_synthetic_R18.yaml $seed \
    MODEL.IOU_NET.HEAD.NUM_CONV 4 MODEL.IOU_NET.HEAD.CONV_DIM 64 MODEL.IOU_NET.HEAD.NUM_FC 1 &
done
wait_for_runs output/synth synth.tgz
