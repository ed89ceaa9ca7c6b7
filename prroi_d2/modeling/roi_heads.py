"""``IoUNetROIHeads``: Detectron2's ``StandardROIHeads`` plus IoU-Net's IoU branch, IoU-guided NMS and refinement."""

import contextlib
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, batched_nms, cat
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.structures import Boxes, Instances, pairwise_iou
from torch import Tensor

from prroi_d2.functional import channels_last_copy
from prroi_d2.modeling import poolers
from prroi_d2.modeling.box_jitter import sample_jittered_boxes
from prroi_d2.modeling.cuda_graphs import CUDAGraphCache
from prroi_d2.modeling.iou_guided_nms import iou_guided_nms
from prroi_d2.modeling.iou_head import build_iou_head
from prroi_d2.modeling.poolers import pool_levels, pool_rois
from prroi_d2.modeling.refinement import refine_boxes

__all__ = ["IoUNetROIHeads", "STAGES"]

STAGES = ("baseline", "iou_nms", "refined")
NMS_RANKS = ("iou", "score_x_iou")
SCORE_MODES = ("cls", "iou", "cls_x_iou")


@ROI_HEADS_REGISTRY.register()
class IoUNetROIHeads(StandardROIHeads):
    """``StandardROIHeads`` with an IoU branch (IoU-Net, Jiang et al., ECCV 2018).

    Training adds ``loss_iou``: the IoU head, on its own pooler, learns the IoU of jittered ground-truth boxes
    (:func:`~prroi_d2.modeling.box_jitter.sample_jittered_boxes`). With ``train_only_iou_head`` only that loss is
    computed (the detector is frozen by :class:`~prroi_d2.modeling.meta_arch.IoUNetRCNN`).

    Inference, batched over all images: the box head's class-specific boxes above the score threshold are the
    candidates; the IoU head predicts each candidate's IoU for its class; then IoU-guided NMS (or Detectron2's NMS),
    the top-k per image by score, refinement by gradient ascent on the predicted IoU, and the final score. Output
    ``Instances`` have ``pred_boxes, scores, pred_classes, pred_ious`` and, after refinement, ``pred_boxes_initial,
    pred_ious_initial``. With ``output_stages`` the second return value is ``{"stages": [per image {stage:
    Instances}]}`` (``baseline``: Detectron2's NMS, no refinement; ``iou_nms``; ``refined``) instead of ``{}``.
    """

    @configurable
    def __init__(
        self,
        *,
        iou_in_features: List[str],
        iou_pooler: ROIPooler,
        iou_head: torch.nn.Module,
        jitter: Dict[str, float],
        train_only_iou_head: bool = False,
        output_stages: bool = False,
        iou_nms_enabled: bool = True,
        iou_nms_thresh: float = 0.5,
        iou_nms_rank: str = "iou",
        refine_enabled: bool = True,
        refine_step: float = 0.5,
        refine_max_iter: int = 5,
        refine_stop_delta: float = 0.001,
        refine_stop_drop: float = -0.01,
        refine_cuda_graphs: int = 8,
        iou_tf32: bool = True,
        score_mode: str = "cls",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if iou_nms_rank not in NMS_RANKS:
            raise ValueError(f"MODEL.IOU_NET.NMS.RANK must be one of {NMS_RANKS}, got {iou_nms_rank!r}")
        if score_mode not in SCORE_MODES:
            raise ValueError(f"MODEL.IOU_NET.SCORE must be one of {SCORE_MODES}, got {score_mode!r}")
        if refine_enabled and not isinstance(iou_pooler, poolers.PrRoIPooler):
            raise ValueError(
                "MODEL.IOU_NET.REFINE needs a Precise RoI Pooling IoU pooler (MODEL.IOU_NET.POOLER_TYPE PrRoIPool or "
                "PrRoIPoolV2): other poolers have no gradient with respect to the box coordinates"
            )
        if refine_max_iter < 0:
            raise ValueError(f"MODEL.IOU_NET.REFINE.MAX_ITER must be >= 0, got {refine_max_iter}")
        if refine_cuda_graphs < 0:
            raise ValueError(f"MODEL.IOU_NET.REFINE.CUDA_GRAPHS must be >= 0, got {refine_cuda_graphs}")
        self.iou_in_features = iou_in_features
        self.iou_pooler = iou_pooler
        self.iou_head = iou_head
        self.jitter = dict(jitter)
        self.train_only_iou_head = train_only_iou_head
        self.output_stages = output_stages
        self.iou_nms_enabled = iou_nms_enabled
        self.iou_nms_thresh = iou_nms_thresh
        self.iou_nms_rank = iou_nms_rank
        self.refine_enabled = refine_enabled
        self.refine_step = refine_step
        self.refine_max_iter = refine_max_iter
        self.refine_stop_delta = refine_stop_delta
        self.refine_stop_drop = refine_stop_drop
        self._refine_graphs = CUDAGraphCache(refine_cuda_graphs)
        self.iou_tf32 = iou_tf32
        self.score_mode = score_mode

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret.update(cls._init_iou_head(cfg, input_shape))
        return ret

    @classmethod
    def _init_iou_head(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        iou = cfg.MODEL.IOU_NET
        in_features = list(iou.IN_FEATURES) or list(cfg.MODEL.ROI_HEADS.IN_FEATURES)
        channels = {input_shape[f].channels for f in in_features}
        if len(channels) != 1:
            raise ValueError(f"MODEL.IOU_NET.IN_FEATURES must have one channel count, got {sorted(channels)}")
        resolution = iou.POOLER_RESOLUTION
        pooler = ROIPooler(
            output_size=resolution,
            scales=tuple(1.0 / input_shape[f].stride for f in in_features),
            sampling_ratio=cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
            pooler_type=iou.POOLER_TYPE,
        )
        head = build_iou_head(cfg, ShapeSpec(channels=channels.pop(), height=resolution, width=resolution))
        jitter = {
            "num_samples": iou.JITTER.NUM_PER_IMAGE,
            "num_bins": iou.JITTER.NUM_BINS,
            "min_iou": iou.JITTER.MIN_IOU,
            "max_shift": iou.JITTER.MAX_SHIFT,
            "max_scale": iou.JITTER.MAX_SCALE,
            "candidates_per_sample": iou.JITTER.CANDIDATES_PER_SAMPLE,
            "add_proposals": iou.JITTER.ADD_PROPOSALS,
        }
        return {
            "iou_in_features": in_features,
            "iou_pooler": pooler,
            "iou_head": head,
            "jitter": jitter,
            "train_only_iou_head": iou.TRAIN_ONLY_IOU_HEAD,
            "output_stages": iou.OUTPUT_STAGES,
            "iou_nms_enabled": iou.NMS.ENABLED,
            "iou_nms_thresh": iou.NMS.IOU_THRESH,
            "iou_nms_rank": iou.NMS.RANK,
            "refine_enabled": iou.REFINE.ENABLED,
            "refine_step": iou.REFINE.STEP,
            "refine_max_iter": iou.REFINE.MAX_ITER,
            "refine_stop_delta": iou.REFINE.STOP_DELTA,
            "refine_stop_drop": iou.REFINE.STOP_DROP,
            "refine_cuda_graphs": iou.REFINE.CUDA_GRAPHS,
            "iou_tf32": iou.TF32,
            "score_mode": iou.SCORE,
        }

    # ----------------------------------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------------------------------

    def forward(self, images, features: Dict[str, Tensor], proposals: List[Instances], targets=None):
        if not self.training:
            return self._inference(features, proposals, images.image_sizes)
        if targets is None:
            raise ValueError("IoUNetROIHeads needs targets in training")
        losses: Dict[str, Tensor] = {}
        if not self.train_only_iou_head or self.jitter["add_proposals"]:
            proposals = self.label_and_sample_proposals(proposals, targets)
        if not self.train_only_iou_head:
            losses.update(self._forward_box(features, proposals))
            losses.update(self._forward_mask(features, proposals))
            losses.update(self._forward_keypoint(features, proposals))
        losses.update(self._forward_iou_loss(features, proposals, targets))
        return proposals, losses

    def _forward_iou_loss(self, features, proposals: List[Instances], targets: List[Instances]) -> Dict[str, Tensor]:
        """``{"loss_iou"}`` on jittered ground truth (and, optionally, the sampled proposals with IoU >= MIN_IOU)."""
        options = {k: v for k, v in self.jitter.items() if k != "add_proposals"}
        rois, ious, classes = [], [], []
        for image, target in enumerate(targets):
            gt = target.gt_boxes.tensor
            boxes, iou, gt_index = sample_jittered_boxes(gt, target.image_size, **options)
            parts = [(boxes, iou, target.gt_classes[gt_index])]
            if self.jitter["add_proposals"] and len(gt) > 0:
                boxes = proposals[image].proposal_boxes.tensor.detach()
                iou, gt_index = pairwise_iou(Boxes(boxes), target.gt_boxes).max(dim=1)
                keep = iou >= options["min_iou"]
                parts.append((boxes[keep], iou[keep], target.gt_classes[gt_index[keep]]))
            for boxes, iou, cls in parts:
                rois.append(torch.cat([torch.full_like(boxes[:, :1], image), boxes], dim=1))
                ious.append(iou)
                classes.append(cls)
        rois = cat(rois)
        pooled = pool_rois(self.iou_pooler, [features[f] for f in self.iou_in_features], rois)
        with _tf32_matmuls(self.iou_tf32 and pooled.is_cuda):
            raw = self.iou_head(pooled)
        return self.iou_head.losses(raw, cat(classes), cat(ious))

    # ----------------------------------------------------------------------------------------------------------------
    # Inference
    # ----------------------------------------------------------------------------------------------------------------

    def _inference(self, features, proposals: List[Instances], image_sizes: List[Tuple[int, int]]):
        maps = self._pooling_maps(features)
        box_maps = maps if isinstance(self.box_pooler, poolers.PrRoIPooler) else features
        box_features = self.box_head(
            self.box_pooler([box_maps[f] for f in self.box_in_features], [x.proposal_boxes for x in proposals])
        )
        predictions = self.box_predictor(box_features)
        del box_features
        cand = self._candidates(
            self.box_predictor.predict_boxes(predictions, proposals),
            self.box_predictor.predict_probs(predictions, proposals),
            image_sizes,
        )
        iou_features = [maps[f] for f in self.iou_in_features]
        cand["ious"] = self._predict_ious(iou_features, cand["boxes"], cand["images"], cand["classes"])
        num_images = len(image_sizes)
        groups = cand["images"] * self.num_classes + cand["classes"]
        topk = self.box_predictor.test_topk_per_image

        last = "refined" if self.refine_enabled else "iou_nms" if self.iou_nms_enabled else "baseline"

        def wanted(stage: str) -> bool:  # Instances are built only for the stages returned
            return self.output_stages or stage == last

        stages: Dict[str, List[Instances]] = {}
        if self.output_stages or not self.iou_nms_enabled:
            keep = batched_nms(cand["boxes"], cand["scores"], groups, self.box_predictor.test_nms_thresh)
            keep = _top_per_image(keep, cand["scores"][keep], cand["images"][keep], topk, num_images)
            cls_scores = cand["scores"][keep]
            if wanted("baseline"):
                stages["baseline"] = self._to_instances(cand, keep, cls_scores, image_sizes)
        if self.iou_nms_enabled:
            rank = cand["ious"] if self.iou_nms_rank == "iou" else cand["scores"] * cand["ious"]
            keep, cluster_scores = iou_guided_nms(cand["boxes"], cand["scores"], rank, groups, self.iou_nms_thresh)
            top = _top_per_image(
                torch.arange(len(keep), device=keep.device), cluster_scores, cand["images"][keep], topk, num_images
            )
            keep, cls_scores = keep[top], cluster_scores[top]
            if wanted("iou_nms"):
                scores = self._score(cls_scores, cand["ious"][keep])
                stages["iou_nms"] = self._to_instances(cand, keep, scores, image_sizes)
        if self.refine_enabled:
            capacity = num_images * topk if topk > 0 else 0
            kept = {name: cand[name][keep] for name in ("boxes", "classes", "images")}
            boxes, ious, initial = self._refine(iou_features, kept, image_sizes, capacity)
            refined = {"boxes": boxes, "ious": ious, "classes": kept["classes"], "images": kept["images"]}
            extra = {"pred_boxes_initial": Boxes(kept["boxes"]), "pred_ious_initial": initial}
            stages["refined"] = self._to_instances(refined, None, self._score(cls_scores, ious), image_sizes, extra)
        final = self.forward_with_given_boxes(features, stages[last])
        if not self.output_stages:
            return final, {}
        return final, {"stages": [{s: stages[s][i] for s in stages} for i in range(num_images)]}

    def _pooling_maps(self, features: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """The maps Precise RoI Pooling reads in inference (the IoU branch's, and the box head's when its pooler is a
        PrRoI one): float32/float64 maps on CUDA as copies in the channels-last memory format, which the op reads with
        coalesced loads (one copy serves the box head, the IoU prediction and every refinement step); other maps as
        they are (float16/bfloat16 maps pool faster channels-first)."""
        names = set(self.iou_in_features)
        if isinstance(self.box_pooler, poolers.PrRoIPooler):
            names.update(self.box_in_features)
        maps = dict(features)
        for name in names:
            if features[name].is_cuda and features[name].dtype in (torch.float32, torch.float64):
                maps[name] = channels_last_copy(features[name])
        return maps

    def _candidates(self, boxes, scores, image_sizes) -> Dict[str, Tensor]:
        """Every (proposal, class) above the score threshold, all images at once, as Detectron2's
        ``fast_rcnn_inference`` selects them: boxes (M, 4) clipped, scores (M,), classes (M,), images (M,)."""
        counts = [len(b) for b in boxes]
        boxes, scores = cat(list(boxes)), cat(list(scores))
        device = scores.device
        images = cat([torch.full((n,), i, dtype=torch.int64, device=device) for i, n in enumerate(counts)])
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
        scores = scores[:, :-1]
        boxes = boxes.view(boxes.size(0), boxes.size(1) // 4, 4)
        # One host synchronisation (nonzero); the rest gathers by index. Clipping the chosen boxes (a copy) is
        # clipping them all: what is chosen does not depend on the box coordinates.
        rows, classes = ((scores > self.box_predictor.test_score_thresh) & valid[:, None]).nonzero().unbind(1)
        chosen = boxes[rows, 0] if boxes.size(1) == 1 else boxes[rows, classes]
        images = images[rows]
        if len(image_sizes) == 1:
            height, width = image_sizes[0]
            chosen[:, 0::2].clamp_(0, width)
            chosen[:, 1::2].clamp_(0, height)
        else:
            sizes = _sizes_of(images, image_sizes, chosen.dtype)
            chosen = torch.minimum(chosen.clamp(min=0), sizes.flip(1).repeat(1, 2))
        return {"boxes": chosen, "scores": scores[rows, classes], "classes": classes, "images": images}

    def _predict_ious(self, features: List[Tensor], boxes: Tensor, images: Tensor, classes: Tensor) -> Tensor:
        """(M,) predicted IoU in [0, 1] of boxes (M, 4) of ``images`` (M,) for ``classes`` (M,)."""
        rois = torch.cat([images.to(boxes.dtype)[:, None], boxes], dim=1)
        pooled = pool_rois(self.iou_pooler, features, rois)
        with _tf32_matmuls(self.iou_tf32 and pooled.is_cuda):
            raw = self.iou_head(pooled)
        return self.iou_head.predict_ious(raw, classes)

    def _refine(self, features, kept, image_sizes, capacity: int = 0) -> Tuple[Tensor, Tensor, Tensor]:
        """Refine the kept detections ``kept`` (``boxes`` (R, 4), ``classes`` (R,), ``images`` (R,)) by Algorithm 2
        with one pooling launch per step; FPN levels stay those of the initial boxes. Returns boxes (R, 4), predicted
        IoU (R,), predicted IoU before refinement (R,).

        On CUDA, with an IoU head that declares ``cuda_graph_safe``, the whole refinement is replayed from a CUDA
        graph (at most ``refine_cuda_graphs`` kept, one per feature shape and box count). The boxes are padded, by
        repeating the last one, to ``capacity`` (the most there can be: images x detections per image) when
        R <= capacity, else to the next power of two; the padding is dropped from the results."""
        boxes, classes, images = kept["boxes"], kept["classes"], kept["images"]
        sizes = _sizes_of(images, image_sizes, boxes.dtype)
        r = boxes.size(0)
        inputs = [boxes, classes, images, sizes] + list(features)
        graphs = self._refine_graphs.max_graphs > 0 and getattr(self.iou_head, "cuda_graph_safe", False)
        if r == 0 or not boxes.is_cuda or not graphs or _is_tracing():
            return CUDAGraphCache.eager(self._refine_boxes, inputs)
        padded = capacity if r <= capacity else 1 << (r - 1).bit_length()
        if padded > r:
            pad = torch.arange(padded, device=boxes.device).clamp_(max=r - 1)
            inputs[:4] = [t[pad] for t in inputs[:4]]
        key = (
            self.refine_step,
            self.refine_max_iter,
            self.refine_stop_delta,
            self.refine_stop_drop,
            self.iou_pooler.output_size,
            tuple(self.iou_pooler.prroi_scales),
            self.iou_pooler.prroi_aligned,
            tuple((p.data_ptr(), p.dtype) for p in self.iou_head.parameters()),
            self.iou_tf32,
            torch.is_autocast_enabled("cuda"),
            torch.get_autocast_dtype("cuda"),
        )
        outputs = self._refine_graphs(self._refine_boxes, inputs, key)
        return tuple(t[:r] for t in outputs) if padded > r else outputs

    def _refine_boxes(self, boxes, classes, images, sizes, *features) -> Tuple[Tensor, Tensor, Tensor]:
        """``refine_boxes`` of boxes (R, 4) of ``images`` (R,) with ``sizes`` (R, 2) for ``classes`` (R,), through
        the IoU pooler and head; no host synchronisation (what :meth:`_refine` captures in a CUDA graph)."""
        pooler = self.iou_pooler
        image_index = images.to(boxes.dtype)[:, None]
        levels = pooler.levels_of(boxes)
        features = list(features)

        def predict(b: Tensor) -> Tensor:
            rois = torch.cat([image_index, b], dim=1)
            pooled = pool_levels(features, rois, levels, pooler.output_size, pooler.prroi_scales, pooler.prroi_aligned)
            return self.iou_head.predict_ious(self.iou_head(pooled), classes, clamp=False)

        with _tf32_matmuls(self.iou_tf32 and boxes.is_cuda):  # the IoU head's backward too
            refined, ious, initial = refine_boxes(
                boxes,
                predict,
                step=self.refine_step,
                max_iter=self.refine_max_iter,
                stop_delta=self.refine_stop_delta,
                stop_drop=self.refine_stop_drop,
                clip_size=sizes,
            )
        return refined, ious.clamp(0.0, 1.0), initial.clamp(0.0, 1.0)

    def _score(self, cls_scores: Tensor, ious: Tensor) -> Tensor:
        if self.score_mode == "cls":
            return cls_scores
        if self.score_mode == "iou":
            return ious.to(cls_scores.dtype)
        return cls_scores * ious.to(cls_scores.dtype)

    @staticmethod
    def _to_instances(
        dets: Dict[str, Tensor],
        index: Optional[Tensor],
        scores: Tensor,
        image_sizes: List[Tuple[int, int]],
        extra: Optional[Dict[str, object]] = None,
    ) -> List[Instances]:
        """Per-image ``Instances`` of the detections ``dets[...][index]`` (``index`` None: ``dets`` as they are) with
        ``scores``; the detections must list each image's together, images in order (one host synchronisation to
        split them, none for one image)."""

        def pick(key: str) -> Tensor:
            return dets[key] if index is None else dets[key][index]

        fields = {
            "pred_boxes": pick("boxes"),
            "scores": scores,
            "pred_classes": pick("classes"),
            "pred_ious": pick("ious"),
        }
        images = pick("images")
        if len(image_sizes) == 1:
            counts = [images.numel()]
        else:
            counts = torch.bincount(images, minlength=len(image_sizes)).tolist()
        for name, value in (extra or {}).items():
            fields[name] = value.tensor if isinstance(value, Boxes) else value
        split = {name: value.split(counts) for name, value in fields.items()}
        results = []
        for i, size in enumerate(image_sizes):
            inst = Instances(size)
            for name, parts in split.items():
                inst.set(name, Boxes(parts[i]) if name.startswith("pred_boxes") else parts[i])
            results.append(inst)
        return results


def _top_per_image(index: Tensor, scores: Tensor, images: Tensor, k: int, num_images: int = 0) -> Tensor:
    """The entries of ``index`` (M,) with the ``k`` highest ``scores`` (M,) of each image in ``images`` (M,); grouped
    by image (in image order), by decreasing score within an image (ties keep their input order). k < 0: all.
    ``num_images`` 1 says every entry is of one image (one sort, no per-image bookkeeping)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    if num_images == 1:
        return index[order[:k] if k >= 0 else order]
    order = order[torch.sort(images[order], stable=True).indices]
    if k >= 0:
        sorted_images = images[order]
        first = torch.searchsorted(sorted_images, sorted_images, right=False)
        order = order[torch.arange(len(order), device=order.device) - first < k]
    return index[order]


@contextlib.contextmanager
def _tf32_matmuls(enabled: bool) -> Iterator[None]:
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


def _sizes_of(images: Tensor, image_sizes: List[Tuple[int, int]], dtype: torch.dtype) -> Tensor:
    """(R, 2) (height, width) of the image of each of ``images`` (R,); filled in place for one image (no
    host-to-device copy)."""
    if len(image_sizes) == 1:
        sizes = torch.empty((images.numel(), 2), dtype=dtype, device=images.device)
        sizes[:, 0], sizes[:, 1] = image_sizes[0]
        return sizes
    return torch.tensor(image_sizes, dtype=dtype, device=images.device)[images]


def _is_tracing() -> bool:
    return torch.jit.is_scripting() or torch.jit.is_tracing()
