# Shared by calibration_synthetic.sh and calibration_trees.sh (sourced, on the GPU machine through gpu_check.sh):
# one seeded run = train, calibrate on a held-out split, evaluate with the choice; the logs packed into $OUT.
# Expects START (seconds since the epoch) and COMMON (the overrides every command gets).

calibration_run() {  # root config held_out seed [train overrides...] -- [overrides...]; writes root/NAME/seed_S
  local out=$1 config=$2 held_out=$3 seed=$4; shift 4
  local train=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do train+=("$1"); shift; done
  shift  # --
  mkdir -p "$out"
  {
    python3 tools/train_net.py --config-file "$config" "$@" "${COMMON[@]}" SEED "$seed" OUTPUT_DIR "$out" "${train[@]}" \
    && python3 tools/calibrate_refinement.py --dataset "$held_out" --config-file "$config" "$@" "${COMMON[@]}" \
      SEED "$seed" MODEL.WEIGHTS "$out/model_final.pth" OUTPUT_DIR "$out/cal" \
    && python3 tools/train_net.py --eval-only --config-file "$out/cal/config.yaml" \
      MODEL.WEIGHTS "$out/model_final.pth" OUTPUT_DIR "$out/cal"
    echo "pipeline exit $? after $(( $(date +%s) - START )) s"
  } > "$out/pipeline.log" 2>&1
}

pack_runs() {  # root archive: the runs' tables, logs and configs (not the detections) into $OUT/archive
  find "$1" \( -name "*.json" -o -name "*.md" -o -name "*.log" -o -name "config.yaml" \) \
    ! -name "coco_instances_results_*" ! -name "*_coco_format.json" | tar czf "$OUT/$2" -T - 2>/dev/null
}

wait_for_runs() {  # root archive: pack every 15 s while the runs train, then once more
  while [ -n "$(jobs -r)" ]; do
    sleep 15
    pack_runs "$1" "$2"
    echo "t=$(( $(date +%s) - START )) s: $(grep -h -o 'iter: [0-9]*' "$1"/*/seed_*/pipeline.log 2>/dev/null | tail -1)"
  done
  pack_runs "$1" "$2"
  grep -h "pipeline exit" "$1"/*/seed_*/pipeline.log
}
