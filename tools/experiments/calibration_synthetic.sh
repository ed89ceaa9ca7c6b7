#!/usr/bin/env bash
# synthetic Faster and Cascade R-CNN + IoU-Net, IoU-head candidates, 3 seeds each, side by side;
# each run: train (uncalibrated stages on holdout + val), calibrate on the holdout, evaluate val with the choice.
set -u
export PYTHONUNBUFFERED=1 PRROI_D2_DATASETS=/tmp/prroi_ds
START=$(date +%s)
ITERS=${ITERS:-750}
python3 -c "from prroi_d2.data.synthetic import register_synthetic_datasets as r; r()" > $OUT/datagen.log 2>&1
COMMON=(MODEL.DEVICE cuda DATALOADER.NUM_WORKERS 1 SOLVER.MAX_ITER $ITERS SOLVER.STEPS "(550,700)"
        SOLVER.CHECKPOINT_PERIOD 100000 MODEL.IOU_NET.CALIBRATION.DATASET '""')
pipeline() {  # name config seed overrides...
  local name=$1 config=$2 seed=$3; shift 3
  local out=output/synth/$name/seed_$seed
  mkdir -p $out
  {
    python3 tools/train_net.py --config-file $config "$@" "${COMMON[@]}" SEED $seed OUTPUT_DIR $out \
      DATASETS.TEST '("iounet_synth_holdout","iounet_synth_val")' \
    && python3 tools/calibrate_refinement.py --dataset iounet_synth_holdout --config-file $config "$@" "${COMMON[@]}" SEED $seed \
      MODEL.WEIGHTS $out/model_final.pth OUTPUT_DIR $out/cal DATASETS.TEST '("iounet_synth_val",)' \

    && python3 tools/train_net.py --eval-only --config-file $out/cal/config.yaml MODEL.WEIGHTS $out/model_final.pth \
      OUTPUT_DIR $out/cal
    echo "pipeline exit $? after $(( $(date +%s) - START )) s"
  } > $out/pipeline.log 2>&1
}
for seed in 0 1 2; do
  pipeline faster configs/iounet_synthetic_R18.yaml $seed &
  pipeline cascade configs/iounet_cascade_synthetic_R18.yaml $seed &
  pipeline cascade_decoupled configs/iounet_cascade_synthetic_R18.yaml $seed MODEL.IOU_NET.HEAD.TARGET decoupled &
  pipeline cascade_conv configs/iounet_cascade_synthetic_R18.yaml $seed \
    MODEL.IOU_NET.HEAD.NUM_CONV 4 MODEL.IOU_NET.HEAD.CONV_DIM 64 MODEL.IOU_NET.HEAD.NUM_FC 1 &
done
pack() {
  find output/synth \( -name "*.json" -o -name "*.md" -o -name "*.log" -o -name "config.yaml" \) \
    ! -name "coco_instances_results_*" ! -name "*_coco_format.json" | tar czf $OUT/synth.tgz -T - 2>/dev/null
}
while [ -n "$(jobs -r)" ]; do sleep 15; pack; echo "t=$(( $(date +%s) - START )) s: $(grep -h -o 'iter: [0-9]*' output/synth/*/seed_*/pipeline.log 2>/dev/null | tail -1)"; done
pack
grep -h "pipeline exit" output/synth/*/seed_*/pipeline.log
