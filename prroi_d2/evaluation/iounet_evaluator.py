"""The Detectron2 ``DatasetEvaluator`` of IoU-Net: COCO evaluation of every stage from one inference pass.

With ``MODEL.IOU_NET.OUTPUT_STAGES`` on, the model returns, besides ``"instances"``, a dict ``"stages"`` of
``Instances``: ``baseline`` (standard NMS), ``iou_nms`` (IoU-guided NMS) and ``refined`` (IoU-guided NMS + box
refinement). :class:`IoUNetEvaluator` turns each stage into COCO result records (:mod:`.records`), runs pycocotools'
``COCOeval`` (bbox) on each (:mod:`.coco_stages`), so the gain of each stage at high IoU (AP80, AP90) is visible from
one pass, measures how well the predicted IoU agrees with the true IoU (:mod:`.iou_statistics`), and writes the
reports (:mod:`.reports`).
"""

import itertools
import json
import logging
import os
from collections import OrderedDict

import detectron2.utils.comm as comm
from detectron2.data import MetadataCatalog
from detectron2.evaluation.evaluator import DatasetEvaluator
from detectron2.utils.file_io import PathManager
from pycocotools.coco import COCO

from prroi_d2.evaluation.coco_stages import _quiet, coco_max_dets, coco_stage_evaluation
from prroi_d2.evaluation.iou_statistics import localization_statistics
from prroi_d2.evaluation.records import instances_to_records
from prroi_d2.evaluation.reliability import refinement_reliability
from prroi_d2.evaluation.reports import format_stage_table, write_stage_reports
from prroi_d2.evaluation.visualize import draw_reliability
from prroi_d2.modeling.stages import FINAL, sort_stages

__all__ = ["IoUNetEvaluator"]

logger = logging.getLogger(__name__)


class IoUNetEvaluator(DatasetEvaluator):
    """COCO bbox AP of every IoU-Net stage (baseline NMS, IoU-guided NMS, refinement) from one inference pass.

    Args:
        dataset_name: a registered dataset with COCO-format ground truth (``MetadataCatalog.get(name).json_file``; if
            absent, the dataset dicts are converted into one, as ``COCOEvaluator`` does).
        output_dir: where to write ``iounet_stages.json``, ``iounet_stages.md``, ``ap_vs_iou.png``,
            ``iou_histogram.png``, ``iou_reliability.png``, ``refinement_gain_by_iou.png`` and
            ``coco_instances_results_<stage>.json``; None writes nothing.
        distributed: gather the predictions of all processes and evaluate on the main one.
        stages: names of the stages to evaluate (keys of ``outputs["stages"]``, or ``"final"`` for
            ``outputs["instances"]``); None evaluates every stage found (``"final"`` when outputs have no stages).
        max_dets_per_image: the most detections per image (and class) that COCOeval counts: its ``params.maxDets``
            is ``[1, 10, max_dets_per_image]`` and every AP is read at that cap. Default 100, COCO's (and Detectron2's)
            standard; ``tools/train_net.py`` passes ``TEST.DETECTIONS_PER_IMAGE`` (>= 300 for dense scenes).
    """

    def __init__(self, dataset_name, output_dir=None, distributed=True, stages=None, max_dets_per_image=100):
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._distributed = distributed
        self._stages = list(stages) if stages is not None else None
        self._max_dets = coco_max_dets(max_dets_per_image)[-1]  # checks the value before any inference runs
        self._metadata = MetadataCatalog.get(dataset_name)
        self._warned_missing = set()
        self.reset()

    def reset(self):
        self._predictions = []

    def _stage_instances(self, output):
        found = output.get("stages") or {}
        names = self._stages if self._stages is not None else (list(found) if found else [FINAL])
        selected = OrderedDict()
        for name in names:
            if name in found:
                selected[name] = found[name]
            elif name == FINAL and "instances" in output:
                selected[name] = output["instances"]
            elif name not in self._warned_missing:
                self._warned_missing.add(name)
                logger.warning(f"Stage {name!r} is not in the model's outputs (MODEL.IOU_NET.OUTPUT_STAGES off?)")
        return selected

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            stages = OrderedDict(
                (name, instances_to_records(inst, inp["image_id"]))  # reads only the fields it needs
                for name, inst in self._stage_instances(out).items()
            )
            self._predictions.append({"image_id": inp["image_id"], "stages": stages})

    def _contiguous_to_dataset_id(self, coco_gt):
        """Dataset category id of each contiguous class id: from the metadata's thing_dataset_id_to_contiguous_id
        (set when the dataset is loaded), else the json's sorted category ids (what ``load_coco_json`` would set)."""
        mapping = getattr(self._metadata, "thing_dataset_id_to_contiguous_id", None)
        if not mapping:
            return sorted(coco_gt.getCatIds())
        reverse = {v: k for k, v in mapping.items()}
        if sorted(reverse) != list(range(len(reverse))):
            raise ValueError(f"thing_dataset_id_to_contiguous_id of {self._dataset_name} is not onto 0..K-1")
        return [reverse[i] for i in range(len(reverse))]

    def _coco_gt(self):
        json_file = getattr(self._metadata, "json_file", None)
        if json_file is None:
            from detectron2.data.datasets.coco import convert_to_coco_json

            if self._output_dir is None:
                raise ValueError(f"{self._dataset_name} has no json_file; give output_dir to convert it to COCO json")
            json_file = os.path.join(self._output_dir, f"{self._dataset_name}_coco_format.json")
            convert_to_coco_json(self._dataset_name, json_file)
        return _quiet(COCO, PathManager.get_local_path(json_file))

    def evaluate(self):
        if self._distributed:
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(self._predictions, dst=0)))
            if not comm.is_main_process():
                return {}
        else:
            predictions = self._predictions
        if not predictions:
            logger.warning("[IoUNetEvaluator] Did not receive any predictions.")
            return {}

        names = []
        for pred in predictions:
            names.extend(n for n in pred["stages"] if n not in names)
        if self._stages is None:
            names = sort_stages(names)
        else:
            names = [n for n in self._stages if n in names]
        img_ids = sorted({p["image_id"] for p in predictions})
        coco_gt = self._coco_gt()
        # Contiguous class ids -> dataset category ids, on copies (the predictions stay as process() made them).
        dataset_ids = self._contiguous_to_dataset_id(coco_gt)
        records = OrderedDict()
        for n in names:
            records[n] = [dict(r) for p in predictions for r in p["stages"].get(n, [])]
            for r in records[n]:
                c = r["category_id"]
                if not 0 <= c < len(dataset_ids):
                    raise ValueError(f"a prediction has class {c}, but {self._dataset_name} has {len(dataset_ids)}")
                r["category_id"] = dataset_ids[c]

        results = OrderedDict()
        curves = OrderedDict()
        if self._output_dir:
            PathManager.mkdirs(self._output_dir)
        for name, stage_records in records.items():
            if self._output_dir:
                path = os.path.join(self._output_dir, f"coco_instances_results_{name}.json")
                with PathManager.open(path, "w") as f:
                    json.dump(stage_records, f)
            if not stage_records:
                logger.warning(f"[IoUNetEvaluator] Stage {name!r} has no detections: every AP is 0.")
            results[name], curves[name] = coco_stage_evaluation(coco_gt, stage_records, img_ids, self._max_dets)

        results["localization"], histogram = localization_statistics(coco_gt, records)
        reliability = refinement_reliability(coco_gt, records, histogram.get("stage"))
        if self._output_dir:
            write_stage_reports(self._output_dir, self._dataset_name, results, curves, histogram, self._max_dets,
                                reliability)  # fmt: skip
            draw_reliability(reliability, self._output_dir)
        title = f"IoU-Net stages on {self._dataset_name} (COCOeval maxDets {self._max_dets}):"
        table = format_stage_table(results)
        if logger.isEnabledFor(logging.INFO) and logger.hasHandlers():
            logger.info("%s\n%s", title, table)
        else:
            print(f"{title}\n{table}")
        return results
