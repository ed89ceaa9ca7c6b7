#!/usr/bin/env bash
# tree crowns, IoU-head variants x 3 seeds side by side; each: train (uncalibrated stages on val),
# calibrate on the training image's held-out strip, evaluate val with the choice.
# VARIANTS: "name|override override ..." entries separated by ';'.
set -u
export PYTHONUNBUFFERED=1 PRROI_D2_DATASETS=/tmp/prroi_ds
START=$(date +%s)
mkdir -p /tmp/prroi_ds/downloads && cp .gpu/trees/deepforest-2.1.0-py3-none-any.whl /tmp/prroi_ds/downloads/  # the wheel, carried in .gpu/trees
python3 -c "from prroi_d2.data.neon_trees import register_neon_trees_datasets as r; r()" > $OUT/datagen.log 2>&1 || tail -5 $OUT/datagen.log
ITERS=${ITERS:-800}
COMMON=(MODEL.DEVICE cuda DATALOADER.NUM_WORKERS ${WORKERS:-4} SOLVER.MAX_ITER $ITERS SOLVER.STEPS "${STEPS:-(600,750)}"
        SOLVER.CHECKPOINT_PERIOD 100000 MODEL.IOU_NET.CALIBRATION.DATASET '""')
pipeline() {  # name seed overrides...
  local name=$1 seed=$2; shift 2
  local out=output/trees/$name/seed_$seed config=configs/iounet_trees_R18.yaml
  mkdir -p $out
  {
    python3 tools/train_net.py --config-file $config "$@" "${COMMON[@]}" SEED $seed OUTPUT_DIR $out \
    && python3 tools/calibrate_refinement.py --dataset neon_trees_train_holdout --config-file $config "$@" "${COMMON[@]}" SEED $seed \
      MODEL.WEIGHTS $out/model_final.pth OUTPUT_DIR $out/cal \
    && python3 tools/train_net.py --eval-only --config-file $out/cal/config.yaml MODEL.WEIGHTS $out/model_final.pth \
      OUTPUT_DIR $out/cal
    echo "pipeline exit $? after $(( $(date +%s) - START )) s"
  } > $out/pipeline.log 2>&1
}
IFS=';' read -ra VS <<< "${VARIANTS:-base|}"
for v in "${VS[@]}"; do
  name=${v%%|*}; read -ra ov <<< "${v#*|}"
  for seed in ${SEEDS:-0 1 2}; do pipeline $name $seed "${ov[@]}" & done
done
pack() {
  find output/trees \( -name "*.json" -o -name "*.md" -o -name "*.log" -o -name "config.yaml" \) \
    ! -name "coco_instances_results_*" ! -name "*_coco_format.json" | tar czf $OUT/trees.tgz -T - 2>/dev/null
}
while [ -n "$(jobs -r)" ]; do sleep 15; pack; echo "t=$(( $(date +%s) - START )) s: $(grep -h -o 'iter: [0-9]*' output/trees/*/seed_*/pipeline.log 2>/dev/null | tail -1)"; done
pack
grep -h "pipeline exit" output/trees/*/seed_*/pipeline.log
