"""``IoUNetRCNN``: Detectron2's ``GeneralizedRCNN`` for IoU-Net (every stage's outputs, head-only training)."""

from typing import Dict, List, Optional

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

__all__ = ["IoUNetRCNN", "postprocess_instances"]


@META_ARCH_REGISTRY.register()
class IoUNetRCNN(GeneralizedRCNN):
    """``GeneralizedRCNN`` with ROI heads of :mod:`prroi_d2.modeling.roi_heads` (an IoU branch). It loads any
    ``GeneralizedRCNN`` checkpoint (same parameter names) and adds:

    * inference: ``pred_boxes_initial`` rescaled to the input's height/width like ``pred_boxes``; with
      ``MODEL.IOU_NET.OUTPUT_STAGES`` every output dict also has ``"stages": {stage: Instances}``;
    * ``MODEL.IOU_NET.TRAIN_ONLY_IOU_HEAD``: every parameter but the IoU head's is frozen and every module but the
      ROI heads and its IoU head stays in eval mode in training, so BatchNorm statistics are never updated.
    """

    @configurable
    def __init__(self, *, train_only_iou_head: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.train_only_iou_head = train_only_iou_head
        if train_only_iou_head:
            if not hasattr(self.roi_heads, "iou_head"):
                raise ValueError(
                    "MODEL.IOU_NET.TRAIN_ONLY_IOU_HEAD needs ROI heads with an IoU branch (MODEL.ROI_HEADS.NAME "
                    "IoUNetROIHeads or IoUNetCascadeROIHeads)"
                )
            trainable = {id(p) for p in self.roi_heads.iou_head.parameters()}
            for p in self.parameters():
                if id(p) not in trainable:
                    p.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["train_only_iou_head"] = cfg.MODEL.IOU_NET.TRAIN_ONLY_IOU_HEAD
        return ret

    def train(self, mode: bool = True):
        super().train(mode)
        if self.train_only_iou_head and mode:
            for name, module in self.named_children():
                if name != "roi_heads":
                    module.eval()
            for module in self.roi_heads.children():
                if module is not self.roi_heads.iou_head:
                    module.eval()
        return self

    def inference(
        self,
        batched_inputs: List[Dict],
        detected_instances: Optional[List[Instances]] = None,
        do_postprocess: bool = True,
    ):
        if detected_instances is not None:
            return super().inference(batched_inputs, detected_instances, do_postprocess)
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        if self.proposal_generator is not None:
            proposals, _ = self.proposal_generator(images, features, None)
        else:
            proposals = [x["proposals"].to(self.device) for x in batched_inputs]
        results, extra = self.roi_heads(images, features, proposals, None)
        if not do_postprocess:
            return results
        stages = extra.get("stages") if isinstance(extra, dict) else None
        outputs = []
        for i, (instances, inputs, size) in enumerate(zip(results, batched_inputs, images.image_sizes)):
            height, width = inputs.get("height", size[0]), inputs.get("width", size[1])
            output = {"instances": postprocess_instances(instances, height, width)}
            if stages is not None:
                output["stages"] = {k: postprocess_instances(v, height, width) for k, v in stages[i].items()}
            outputs.append(output)
        return outputs


def postprocess_instances(results: Instances, output_height: int, output_width: int) -> Instances:
    """Detectron2's ``detector_postprocess`` (rescale to the output size, clip, drop empty boxes) that also rescales
    and clips ``pred_boxes_initial``; ``results`` is left unchanged (its boxes are copied first)."""
    results = Instances(results.image_size, **results.get_fields())
    results.pred_boxes = Boxes(results.pred_boxes.tensor.clone())
    if results.has("pred_boxes_initial"):
        initial = Boxes(results.pred_boxes_initial.tensor.clone())
        initial.scale(output_width / results.image_size[1], output_height / results.image_size[0])
        initial.clip((output_height, output_width))
        results.pred_boxes_initial = initial
    return detector_postprocess(results, output_height, output_width)
