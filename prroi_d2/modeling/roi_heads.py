"""ROI heads with IoU-Net's IoU branch: ``IoUNetROIHeads`` (Faster / Mask R-CNN) and ``IoUNetCascadeROIHeads``
(Cascade R-CNN), both thin compositions of Detectron2's heads and :class:`~prroi_d2.modeling.iou_branch.IoUBranch`.

``IoUBranchMixin`` is the composition itself: put it before any ``StandardROIHeads`` subclass of your own
(``class MyHeads(IoUBranchMixin, MyStandardHeads)``), or subclass ``IoUNetCascadeROIHeads`` together with your own
``CascadeROIHeads`` subclass, to add IoU-Net without copying code.
"""

from typing import Dict, List, Sequence, Tuple

from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, CascadeROIHeads, StandardROIHeads
from detectron2.structures import Instances
from torch import Tensor, nn

from prroi_d2.modeling import poolers
from prroi_d2.modeling.iou_branch import STAGES, IoUBranch

__all__ = ["IoUBranchMixin", "IoUNetCascadeROIHeads", "IoUNetROIHeads", "STAGES"]


class IoUBranchMixin:
    """Adds an :class:`IoUBranch` (``iou_branch``, built from ``MODEL.IOU_NET``) to a ``StandardROIHeads`` subclass.

    Training adds ``loss_iou`` (with ``train_only_iou_head``, only that loss). Inference: the box head's
    predictions (:meth:`_box_predictions`) go through the branch (IoU prediction, IoU-guided NMS, top-k,
    refinement); masks / keypoints are predicted on the final boxes. Output ``Instances`` have ``pred_boxes,
    scores, pred_classes, pred_ious`` and, after refinement, ``pred_boxes_initial, pred_ious_initial``; with
    ``output_stages`` the second return value is ``{"stages": [per image {stage: Instances}]}`` instead of ``{}``.

    Checkpoints keep the names of the first IoU-Net heads: the branch's head and pooler are this module's children
    ``iou_head`` and ``iou_pooler`` (parameters ``roi_heads.iou_head.*``); the branch itself is a plain attribute.
    """

    @configurable
    def __init__(self, *, iou_branch: IoUBranch, **kwargs):
        super().__init__(**kwargs)
        self.iou_head = iou_branch.iou_head
        self.iou_pooler = iou_branch.pooler
        object.__setattr__(self, "iou_branch", iou_branch)  # not a child: no second name for the same parameters

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["iou_branch"] = IoUBranch(cfg, input_shape)
        return ret

    def forward(self, images, features: Dict[str, Tensor], proposals: List[Instances], targets=None):
        if not self.training:
            return self._iou_net_inference(features, proposals, images.image_sizes)
        if targets is None:
            raise ValueError(f"{type(self).__name__} needs targets in training")
        branch = self.iou_branch
        losses: Dict[str, Tensor] = {}
        if not branch.train_only_iou_head or branch.jitter["add_proposals"]:
            proposals = self.label_and_sample_proposals(proposals, targets)
        if not branch.train_only_iou_head:
            losses.update(self._box_losses(features, proposals, targets))
            losses.update(self._forward_mask(features, proposals))
            losses.update(self._forward_keypoint(features, proposals))
        losses.update(branch.losses(features, proposals, targets))
        return proposals, losses

    def _box_losses(self, features, proposals: List[Instances], targets: List[Instances]) -> Dict[str, Tensor]:
        """The box head's losses (``StandardROIHeads._forward_box`` in training)."""
        return self._forward_box(features, proposals)

    def _box_predictions(
        self, features: Dict[str, Tensor], proposals: List[Instances]
    ) -> Tuple[Sequence[Tensor], Sequence[Tensor], nn.Module]:
        """Inference of the box head: per-image boxes (R_i, K * 4 or 4), class probabilities (R_i, K + 1), and the
        box predictor whose test settings (score threshold, NMS threshold, detections per image) apply."""
        box_features = self.box_pooler(
            [features[f] for f in self.box_in_features], [x.proposal_boxes for x in proposals]
        )
        predictions = self.box_predictor(self.box_head(box_features))
        del box_features
        predictor = self.box_predictor
        boxes, scores = predictor.predict_boxes(predictions, proposals), predictor.predict_probs(predictions, proposals)
        return boxes, scores, predictor

    def _iou_net_inference(self, features, proposals: List[Instances], image_sizes: List[Tuple[int, int]]):
        branch = self.iou_branch
        prroi_box_pooler = isinstance(self.box_pooler, poolers.PrRoIPooler)
        maps = branch.pooling_maps(features, self.box_in_features if prroi_box_pooler else ())
        boxes, scores, predictor = self._box_predictions(maps if prroi_box_pooler else features, proposals)
        stages = branch.inference(
            maps,
            boxes,
            scores,
            image_sizes,
            score_thresh=predictor.test_score_thresh,
            nms_thresh=predictor.test_nms_thresh,
            topk=predictor.test_topk_per_image,
        )
        final = self.forward_with_given_boxes(features, stages[branch.last_stage])
        if not branch.output_stages:
            return final, {}
        return final, {"stages": [{s: stages[s][i] for s in stages} for i in range(len(image_sizes))]}

    # The first IoU-Net heads' names of the branch's settings and methods (tests, tools and user code use them).
    @property
    def iou_in_features(self) -> List[str]:
        return self.iou_branch.in_features

    @property
    def iou_tf32(self) -> bool:
        return self.iou_branch.tf32

    @iou_tf32.setter
    def iou_tf32(self, value: bool) -> None:
        self.iou_branch.tf32 = value

    @property
    def _refine_graphs(self):
        return self.iou_branch.refine_graphs

    def _forward_iou_loss(self, features, proposals, targets):
        return self.iou_branch.losses(features, proposals, targets)

    def _predict_ious(self, features, boxes, images, classes):
        return self.iou_branch.predict_ious(features, boxes, images, classes)


@ROI_HEADS_REGISTRY.register()
class IoUNetROIHeads(IoUBranchMixin, StandardROIHeads):
    """``StandardROIHeads`` with IoU-Net's IoU branch (Jiang et al., ECCV 2018); see :class:`IoUBranchMixin`."""


@ROI_HEADS_REGISTRY.register()
class IoUNetCascadeROIHeads(IoUBranchMixin, CascadeROIHeads):
    """``CascadeROIHeads`` with IoU-Net's IoU branch; see :class:`IoUBranchMixin`.

    Training: the cascade's losses of every stage plus ``loss_iou``. Inference: the IoU branch starts from the last
    stage's boxes and the scores averaged over the stages (as ``CascadeROIHeads._forward_box`` computes them);
    refinement runs after the final stage.
    """

    def _box_losses(self, features, proposals, targets):
        return self._forward_box(features, proposals, targets)

    def _box_predictions(self, features, proposals):
        box_features = [features[f] for f in self.box_in_features]
        image_sizes = [x.image_size for x in proposals]
        scores_per_stage = []
        boxes = None
        for stage in range(self.num_cascade_stages):
            if stage > 0:
                proposals = self._create_proposals_from_boxes(boxes, image_sizes)
            # CascadeROIHeads._run_stage without its gradient scaling (a Python autograd function, the identity in
            # inference, that torch.jit.trace cannot record).
            pooled = self.box_pooler(box_features, [x.proposal_boxes for x in proposals])
            predictions = self.box_predictor[stage](self.box_head[stage](pooled))
            predictor = self.box_predictor[stage]
            boxes = predictor.predict_boxes(predictions, proposals)
            scores_per_stage.append(predictor.predict_probs(predictions, proposals))
        scores = [sum(list(per_image)) * (1.0 / self.num_cascade_stages) for per_image in zip(*scores_per_stage)]
        return boxes, scores, predictor
