"""``IoUBranch``: IoU-Net's IoU branch as a component of any Detectron2 ROI heads.

It holds the IoU head and its own pooler and does IoU-Net's work around a detector's box head: the IoU loss on
jittered ground truth in training; in inference, from the box head's per-class boxes and class probabilities (of
Faster R-CNN's box predictor, or the last stage's boxes and averaged scores of Cascade R-CNN), IoU prediction,
IoU-guided NMS, the top-k per image, refinement by gradient ascent on the predicted IoU (replayed from CUDA graphs on
CUDA) and the final score, returned as per-image ``Instances`` of each stage. The ROI heads that compose it are in
:mod:`prroi_d2.modeling.roi_heads`.
"""

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, batched_nms, cat
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes, Instances, pairwise_iou
from torch import Tensor, nn

from prroi_d2.functional import channels_last_copy
from prroi_d2.modeling import poolers
from prroi_d2.modeling.box_jitter import sample_jittered_boxes
from prroi_d2.modeling.cuda_graphs import CUDAGraphCache
from prroi_d2.modeling.detections import positions, select_candidates, sizes_of, to_instances, top_per_image
from prroi_d2.modeling.iou_guided_nms import iou_guided_nms
from prroi_d2.modeling.iou_head import build_iou_head, coverage_factors
from prroi_d2.modeling.poolers import pool_rois
from prroi_d2.modeling.refine_acceptance import accept_refinement
from prroi_d2.modeling.refinement import refine_boxes
from prroi_d2.modeling.stages import BASELINE, IOU_NMS, REFINED, STAGES, final_stage
from prroi_d2.options import ARG_DEFAULTS, config_arguments

__all__ = ["DEFAULT_JITTER", "IoUBranch", "STAGES"]

NMS_RANKS = ("iou", "score_x_iou")
SCORE_MODES = ("cls", "iou", "cls_x_iou")
DEFAULT_JITTER = ARG_DEFAULTS["jitter"]  # the box sampler's keywords (MODEL.IOU_NET.JITTER), from prroi_d2.options


class IoUBranch(nn.Module):
    """The IoU branch of IoU-Net (Jiang et al., ECCV 2018): ``iou_head`` on pooled features of ``in_features`` from
    ``pooler`` (Precise RoI Pooling for refinement). Options as ``MODEL.IOU_NET`` (see the README); ``jitter``: the
    keyword arguments of :func:`~prroi_d2.modeling.box_jitter.sample_jittered_boxes` plus ``add_proposals``.

    ``train_only_iou_head`` tells the ROI heads to compute ``loss_iou`` only (the detector is frozen by
    :class:`~prroi_d2.modeling.meta_arch.IoUNetRCNN`). ``output_stages``: the ROI heads also return every stage.
    The branch reads no ``self.training``: its owner calls :meth:`losses` or :meth:`inference`.
    """

    @configurable
    def __init__(
        self,
        *,
        in_features: List[str],
        pooler: ROIPooler,
        iou_head: nn.Module,
        jitter: Optional[Dict[str, float]] = None,
        train_only_iou_head: bool = ARG_DEFAULTS["train_only_iou_head"],
        output_stages: bool = ARG_DEFAULTS["output_stages"],
        nms_enabled: bool = ARG_DEFAULTS["nms_enabled"],
        nms_thresh: float = ARG_DEFAULTS["nms_thresh"],
        nms_rank: str = ARG_DEFAULTS["nms_rank"],
        refine_enabled: bool = ARG_DEFAULTS["refine_enabled"],
        refine_step: float = ARG_DEFAULTS["refine_step"],
        refine_max_iter: int = ARG_DEFAULTS["refine_max_iter"],
        refine_stop_delta: float = ARG_DEFAULTS["refine_stop_delta"],
        refine_stop_drop: float = ARG_DEFAULTS["refine_stop_drop"],
        refine_cuda_graphs: int = ARG_DEFAULTS["refine_cuda_graphs"],
        refine_accept_margin: float = ARG_DEFAULTS["refine_accept_margin"],
        refine_accept_iou_range: Sequence[float] = ARG_DEFAULTS["refine_accept_iou_range"],
        tf32: bool = ARG_DEFAULTS["tf32"],
        score_mode: str = ARG_DEFAULTS["score_mode"],
    ):
        super().__init__()
        if nms_rank not in NMS_RANKS:
            raise ValueError(f"MODEL.IOU_NET.NMS.RANK must be one of {NMS_RANKS}, got {nms_rank!r}")
        if score_mode not in SCORE_MODES:
            raise ValueError(f"MODEL.IOU_NET.SCORE must be one of {SCORE_MODES}, got {score_mode!r}")
        if refine_enabled and not isinstance(pooler, poolers.PrRoIPooler):
            raise ValueError(
                "MODEL.IOU_NET.REFINE needs a Precise RoI Pooling IoU pooler (MODEL.IOU_NET.POOLER_TYPE PrRoIPool or "
                "PrRoIPoolV2): other poolers have no gradient with respect to the box coordinates"
            )
        if refine_max_iter < 0:
            raise ValueError(f"MODEL.IOU_NET.REFINE.MAX_ITER must be >= 0, got {refine_max_iter}")
        if refine_cuda_graphs < 0:
            raise ValueError(f"MODEL.IOU_NET.REFINE.CUDA_GRAPHS must be >= 0, got {refine_cuda_graphs}")
        unknown = set(jitter or {}) - set(DEFAULT_JITTER)
        if unknown:
            raise ValueError(f"IoUBranch jitter: unknown keys {sorted(unknown)}; known: {sorted(DEFAULT_JITTER)}")
        self.in_features = list(in_features)
        self.pooler = pooler
        self.iou_head = iou_head
        self.jitter = {**DEFAULT_JITTER, **(jitter or {})}
        self.train_only_iou_head = train_only_iou_head
        self.output_stages = output_stages
        self.nms_enabled = nms_enabled
        self.nms_thresh = nms_thresh
        self.nms_rank = nms_rank
        self.refine_enabled = refine_enabled
        self.refine_step = refine_step
        self.refine_max_iter = refine_max_iter
        self.refine_stop_delta = refine_stop_delta
        self.refine_stop_drop = refine_stop_drop
        self.refine_graphs = CUDAGraphCache(refine_cuda_graphs)
        self.refine_accept_margin = float(refine_accept_margin)
        self.refine_accept_iou_range = tuple(float(v) for v in refine_accept_iou_range)
        self.tf32 = tf32
        self.score_mode = score_mode

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        """Every keyword from ``MODEL.IOU_NET`` through the table :data:`prroi_d2.options.OPTIONS`; the pooler reads
        the box head's sampling ratio, the IoU head is ``MODEL.IOU_NET.HEAD.NAME`` built from ``cfg``."""
        kwargs = config_arguments(cfg.MODEL.IOU_NET)
        in_features = list(kwargs.pop("in_features")) or list(cfg.MODEL.ROI_HEADS.IN_FEATURES)
        unknown = [f for f in in_features if f not in input_shape]
        if unknown:
            raise ValueError(f"MODEL.IOU_NET.IN_FEATURES: {unknown} not among the backbone's {sorted(input_shape)}")
        channels = {input_shape[f].channels for f in in_features}
        if len(channels) != 1:
            raise ValueError(f"MODEL.IOU_NET.IN_FEATURES must have one channel count, got {sorted(channels)}")
        pooler = kwargs.pop("pooler")
        kwargs.pop("iou_head")  # IoUHead.from_config reads them
        resolution = pooler["output_size"]
        return {
            **kwargs,
            "in_features": in_features,
            "pooler": ROIPooler(
                **pooler,
                scales=tuple(1.0 / input_shape[f].stride for f in in_features),
                sampling_ratio=cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
            ),
            "iou_head": build_iou_head(cfg, ShapeSpec(channels=channels.pop(), height=resolution, width=resolution)),
        }

    @property
    def last_stage(self) -> str:
        """The stage the ROI heads return as their detections."""
        return final_stage(self.nms_enabled, self.refine_enabled)

    # ----------------------------------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------------------------------

    def losses(
        self, features: Dict[str, Tensor], proposals: Optional[List[Instances]], targets: List[Instances]
    ) -> Dict[str, Tensor]:
        """``{"loss_iou"}`` on jittered ground truth of ``targets`` (and, with ``jitter["add_proposals"]``, the
        sampled ``proposals`` with IoU >= ``min_iou``)."""
        options = {k: v for k, v in self.jitter.items() if k != "add_proposals"}
        rois, ious, classes, objects = [], [], [], []
        for image, target in enumerate(targets):
            gt = target.gt_boxes.tensor
            boxes, iou, gt_index = sample_jittered_boxes(gt, target.image_size, **options)
            parts = [(boxes, iou, gt_index)]
            if self.jitter["add_proposals"] and len(gt) > 0:
                boxes = proposals[image].proposal_boxes.tensor.detach()
                iou, gt_index = pairwise_iou(Boxes(boxes), target.gt_boxes).max(dim=1)
                keep = iou >= options["min_iou"]
                parts.append((boxes[keep], iou[keep], gt_index[keep]))
            for boxes, iou, index in parts:
                rois.append(torch.cat([torch.full_like(boxes[:, :1], image), boxes], dim=1))
                ious.append(iou)
                classes.append(target.gt_classes[index])
                objects.append(gt[index])
        rois = cat(rois)
        pooled = pool_rois(self.pooler, [features[f] for f in self.in_features], rois)
        with tf32_matmuls(self.tf32 and pooled.is_cuda):
            raw = self.iou_head(pooled)
        if getattr(self.iou_head, "target", "iou") == "decoupled":
            factors = coverage_factors(rois[:, 1:], cat(objects))
            return self.iou_head.losses(raw, cat(classes), cat(ious), factors)
        return self.iou_head.losses(raw, cat(classes), cat(ious))

    # ----------------------------------------------------------------------------------------------------------------
    # Inference
    # ----------------------------------------------------------------------------------------------------------------

    def pooling_maps(self, features: Dict[str, Tensor], also: Sequence[str] = ()) -> Dict[str, Tensor]:
        """The maps Precise RoI Pooling reads in inference (the IoU branch's and those named in ``also``, e.g. a box
        head's on a PrRoI pooler): float32/float64 maps on CUDA as copies in the channels-last memory format, which
        the op reads with coalesced loads (one copy serves the box head, the IoU prediction and every refinement
        step); other maps as they are (float16/bfloat16 maps pool faster channels-first)."""
        maps = dict(features)
        for name in set(self.in_features) | set(also):
            if features[name].is_cuda and features[name].dtype in (torch.float32, torch.float64):
                maps[name] = channels_last_copy(features[name])
        return maps

    def inference(
        self,
        maps: Dict[str, Tensor],
        boxes: Sequence[Tensor],
        scores: Sequence[Tensor],
        image_sizes: List[Tuple[int, int]],
        *,
        score_thresh: float,
        nms_thresh: float,
        topk: int,
    ) -> Dict[str, List[Instances]]:
        """Per stage, per image ``Instances`` from a box head's predictions, all images at once.

        ``maps``: the features by name (:meth:`pooling_maps`); ``boxes``: per image (R_i, K * 4) or class-agnostic
        (R_i, 4); ``scores``: per image (R_i, K + 1) class probabilities, background last; ``score_thresh``,
        ``nms_thresh``, ``topk``: the box predictor's test settings. Returns ``{stage: [Instances]}`` with
        :attr:`last_stage` and, with ``output_stages``, every stage (``baseline``: Detectron2's NMS, no
        refinement; ``iou_nms``; ``refined``, which also has ``pred_boxes_initial, pred_ious_initial``).
        """
        num_classes = scores[0].size(1) - 1
        cand = select_candidates(boxes, scores, image_sizes, score_thresh)
        features = [maps[f] for f in self.in_features]
        cand["ious"] = self.predict_ious(features, cand["boxes"], cand["images"], cand["classes"])
        num_images = len(image_sizes)
        groups = cand["images"] * num_classes + cand["classes"]
        last = self.last_stage

        def wanted(stage: str) -> bool:  # Instances are built only for the stages returned
            return self.output_stages or stage == last

        stages: Dict[str, List[Instances]] = {}
        if self.output_stages or not self.nms_enabled:
            keep = batched_nms(cand["boxes"], cand["scores"], groups, nms_thresh)
            keep = top_per_image(keep, cand["scores"][keep], cand["images"][keep], topk, num_images)
            cls_scores = cand["scores"][keep]
            if wanted(BASELINE):
                stages[BASELINE] = to_instances(cand, keep, cls_scores, image_sizes)
        if self.nms_enabled:
            rank = cand["ious"] if self.nms_rank == "iou" else cand["scores"] * cand["ious"]
            keep, cluster_scores = iou_guided_nms(cand["boxes"], cand["scores"], rank, groups, self.nms_thresh)
            top = top_per_image(positions(keep), cluster_scores, cand["images"][keep], topk, num_images)
            keep, cls_scores = keep[top], cluster_scores[top]
            if wanted(IOU_NMS):
                scores = self.score(cls_scores, cand["ious"][keep])
                stages[IOU_NMS] = to_instances(cand, keep, scores, image_sizes)
        if self.refine_enabled:
            capacity = num_images * topk if topk > 0 else 0
            kept = {name: cand[name][keep] for name in ("boxes", "classes", "images")}
            boxes, ious, initial = self.refine(features, kept, image_sizes, capacity)
            boxes, ious = accept_refinement(
                kept["boxes"], boxes, initial, ious, self.refine_accept_margin, self.refine_accept_iou_range
            )
            refined = {"boxes": boxes, "ious": ious, "classes": kept["classes"], "images": kept["images"]}
            extra = {"pred_boxes_initial": Boxes(kept["boxes"]), "pred_ious_initial": initial}
            stages[REFINED] = to_instances(refined, None, self.score(cls_scores, ious), image_sizes, extra)
        return stages

    def predict_ious(self, features: List[Tensor], boxes: Tensor, images: Tensor, classes: Tensor) -> Tensor:
        """(M,) predicted IoU in [0, 1] of boxes (M, 4) of ``images`` (M,) for ``classes`` (M,); ``features``: the
        maps of ``in_features``, in order."""
        rois = torch.cat([images.to(boxes.dtype)[:, None], boxes], dim=1)
        pooled = pool_rois(self.pooler, features, rois)
        with tf32_matmuls(self.tf32 and pooled.is_cuda):
            raw = self.iou_head(pooled)
        return self.iou_head.predict_ious(raw, classes)

    def refine(self, features, kept, image_sizes, capacity: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
        """Refine the kept detections ``kept`` (``boxes`` (R, 4), ``classes`` (R,), ``images`` (R,)) by Algorithm 2
        with one pooling launch per step; FPN levels stay those of the initial boxes. Returns boxes (R, 4), predicted
        IoU (R,), predicted IoU before refinement (R,).

        On CUDA, with an IoU head that declares ``cuda_graph_safe``, the whole refinement is replayed from a CUDA
        graph (at most ``refine_cuda_graphs`` kept, one per feature shape and box count). The boxes are padded, by
        repeating the last one, to ``capacity`` (the most there can be: images x detections per image) when
        R <= capacity, else to the next power of two; the padding is dropped from the results."""
        boxes, classes, images = kept["boxes"], kept["classes"], kept["images"]
        sizes = sizes_of(images, image_sizes, boxes.dtype)
        inputs = [boxes, classes, images, sizes] + list(features)
        graphs = self.refine_graphs.max_graphs > 0 and getattr(self.iou_head, "cuda_graph_safe", False)
        if _is_tracing() or not boxes.is_cuda or not graphs or boxes.size(0) == 0:  # tracing: no count on the host
            return CUDAGraphCache.eager(self.refine_boxes, inputs)
        r = boxes.size(0)
        padded = capacity if r <= capacity else 1 << (r - 1).bit_length()
        if padded > r:
            pad = torch.arange(padded, device=boxes.device).clamp_(max=r - 1)
            inputs[:4] = [t[pad] for t in inputs[:4]]
        key = (
            self.refine_step,
            self.refine_max_iter,
            self.refine_stop_delta,
            self.refine_stop_drop,
            self.pooler.output_size,
            tuple(self.pooler.prroi_scales),
            self.pooler.prroi_aligned,
            tuple((p.data_ptr(), p.dtype) for p in self.iou_head.parameters()),
            self.tf32,
            torch.is_autocast_enabled("cuda"),
            torch.get_autocast_dtype("cuda"),
        )
        outputs = self.refine_graphs(self.refine_boxes, inputs, key)
        return tuple(t[:r] for t in outputs) if padded > r else outputs

    def refine_boxes(self, boxes, classes, images, sizes, *features) -> Tuple[Tensor, Tensor, Tensor]:
        """``refine_boxes`` of boxes (R, 4) of ``images`` (R,) with ``sizes`` (R, 2) for ``classes`` (R,), through
        the IoU pooler and head; no host synchronisation (what :meth:`refine` captures in a CUDA graph).

        With an IoU head that has an explicit input gradient (``supports_input_grad()``), the gradient of the
        predicted IoU with respect to the boxes is a plain forward computation (:meth:`iou_and_box_grad`): no
        autograd, so it runs under inference mode and traces. Other heads are differentiated by autograd."""
        features = list(features)
        levels = self.pooler.levels_of(boxes)
        explicit = getattr(self.iou_head, "supports_input_grad", None)
        with tf32_matmuls(self.tf32 and boxes.is_cuda):  # the IoU head's backward too
            if explicit is not None and explicit():

                def iou_and_grad(b: Tensor, need_grad: bool) -> Tuple[Tensor, Optional[Tensor]]:
                    return self.iou_and_box_grad(features, b, images, levels, classes, need_grad)

                options = {"predict_iou_and_grad": iou_and_grad}
            else:

                def predict(b: Tensor) -> Tensor:
                    return self.iou_and_box_grad(features, b, images, levels, classes, need_grad=False)[0]

                options = {"predict_iou": predict}
            refined, ious, initial = refine_boxes(
                boxes,
                step=self.refine_step,
                max_iter=self.refine_max_iter,
                stop_delta=self.refine_stop_delta,
                stop_drop=self.refine_stop_drop,
                clip_size=sizes,
                **options,
            )
        return refined, ious.clamp(0.0, 1.0), initial.clamp(0.0, 1.0)

    def iou_and_box_grad(
        self, features: List[Tensor], boxes: Tensor, images: Tensor, levels: Tensor, classes: Tensor, need_grad: bool
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Unclamped predicted IoU (R,) of boxes (R, 4) of ``images`` (R,) pooled at FPN ``levels`` (R,) for
        ``classes`` (R,) and, with ``need_grad``, its gradient with respect to the boxes (R, 4): the IoU head's
        explicit input gradient chained with the PrRoI pooling coordinate backward op (without ``need_grad`` the
        IoU alone, differentiable by autograd)."""
        pooler = self.pooler
        height, width = pooler.output_size
        rois = torch.cat([images.to(boxes.dtype)[:, None], boxes], dim=1)
        rois = rois.to(poolers.roi_dtype(features[0].dtype, rois.dtype))
        pooled = torch.ops.prroi_d2.prroi_pool2d_levels(
            features, rois, levels, height, width, pooler.prroi_scales, pooler.prroi_aligned
        )
        if not need_grad:
            return self.iou_head.predict_ious(self.iou_head(pooled), classes, clamp=False), None
        ious, grad_pooled = self.iou_head.predict_ious_and_input_grad(pooled, classes)
        _, grad_rois = torch.ops.prroi_d2._prroi_pool2d_levels_backward(
            grad_pooled.to(pooled.dtype),
            features,
            rois,
            levels,
            height,
            width,
            pooler.prroi_scales,
            pooler.prroi_aligned,
            False,
            True,
        )
        return ious, grad_rois[:, 1:].to(boxes.dtype)

    def score(self, cls_scores: Tensor, ious: Tensor) -> Tensor:
        """The final score (M,) of detections with classification scores (M,) and predicted IoU (M,)."""
        if self.score_mode == "cls":
            return cls_scores
        if self.score_mode == "iou":
            return ious.to(cls_scores.dtype)
        return cls_scores * ious.to(cls_scores.dtype)


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """Inside the block, CUDA float32 matmuls may use TF32 tensor cores (``torch.backends.cuda.matmul.allow_tf32``,
    a process-wide setting, restored on exit); nothing changes when ``enabled`` is false."""
    if not enabled:
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _is_tracing() -> bool:
    return torch.jit.is_scripting() or torch.jit.is_tracing()
