"""Batched detections of IoU-Net inference: candidates above the score threshold, top-k per image, per-image
``Instances``. Every function works on all images at once (detections are rows tagged with their image index).

They trace (``torch.jit.trace``) into graphs valid for any image size and detection count: no Python control flow
on counts or sizes of the data, counts read as tensor sizes (traced), image sizes taken as they come (Detectron2's
``ImageList.image_sizes`` holds tensors in tracing).
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.layers import cat
from detectron2.structures import Boxes, Instances
from torch import Tensor

__all__ = ["positions", "select_candidates", "sizes_of", "split_by_image", "to_instances", "top_per_image"]


def select_candidates(
    boxes: Sequence[Tensor], scores: Sequence[Tensor], image_sizes: List[Tuple[int, int]], score_thresh: float
) -> Dict[str, Tensor]:
    """Every (proposal, class) above ``score_thresh``, all images at once, as Detectron2's ``fast_rcnn_inference``
    selects them. ``boxes``: per image (R_i, K * 4) or class-agnostic (R_i, 4); ``scores``: per image (R_i, K + 1),
    the last column background. Returns boxes (M, 4) clipped to their image, scores (M,), classes (M,), images (M,).
    """
    device = scores[0].device
    images = cat([torch.full_like(b[:, 0], i, dtype=torch.int64, device=device) for i, b in enumerate(boxes)])
    boxes, scores = cat(list(boxes)), cat(list(scores))
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    scores = scores[:, :-1]
    boxes = boxes.view(boxes.size(0), -1, 4)
    # One host synchronisation (nonzero); the rest gathers by index. Clipping the chosen boxes (a copy) is
    # clipping them all: what is chosen does not depend on the box coordinates.
    rows, classes = ((scores > score_thresh) & valid[:, None]).nonzero().unbind(1)
    chosen = boxes[rows, 0] if boxes.size(1) == 1 else boxes[rows, classes]
    images = images[rows]
    bounds = sizes_of(images, image_sizes, chosen.dtype).flip(1).repeat(1, 2)  # (M, 4) width, height, width, height
    chosen = torch.minimum(chosen.clamp(min=0), bounds)
    return {"boxes": chosen, "scores": scores[rows, classes], "classes": classes, "images": images}


def top_per_image(index: Tensor, scores: Tensor, images: Tensor, k: int, num_images: int = 0) -> Tensor:
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
        order = order[positions(order) - first < k]
    return index[order]


def positions(t: Tensor) -> Tensor:
    """``arange(len(t))`` (int64, on t's device) that traces as a function of t's length, not a constant."""
    return torch.arange(t.size(0), device=t.device)


def to_instances(
    dets: Dict[str, Tensor],
    index: Optional[Tensor],
    scores: Tensor,
    image_sizes: List[Tuple[int, int]],
    extra: Optional[Dict[str, object]] = None,
) -> List[Instances]:
    """Per-image ``Instances`` (``pred_boxes, scores, pred_classes, pred_ious`` and the fields of ``extra``) of the
    detections ``dets[...][index]`` (``index`` None: ``dets`` as they are) with ``scores``; the detections must list
    each image's together, images in order (one host synchronisation to split them, none for one image)."""

    def pick(key: str) -> Tensor:
        return dets[key] if index is None else dets[key][index]

    fields = {
        "pred_boxes": pick("boxes"),
        "scores": scores,
        "pred_classes": pick("classes"),
        "pred_ious": pick("ious"),
    }
    for name, value in (extra or {}).items():
        fields[name] = value.tensor if isinstance(value, Boxes) else value
    split = split_by_image(fields, pick("images"), len(image_sizes))
    results = []
    for i, size in enumerate(image_sizes):
        inst = Instances(size)
        for name, parts in split.items():
            inst.set(name, Boxes(parts[i]) if name.startswith("pred_boxes") else parts[i])
        results.append(inst)
    return results


def split_by_image(fields: Dict[str, Tensor], images: Tensor, num_images: int) -> Dict[str, Sequence[Tensor]]:
    """Per field, its rows (grouped by image, images in order) split into ``num_images`` parts. One image: the
    fields as they are; several: one host synchronisation (the counts), or, in tracing, a mask per image."""
    if num_images == 1:
        return {name: [value] for name, value in fields.items()}
    if torch.jit.is_tracing():
        masks = [images == i for i in range(num_images)]
        return {name: [value[m] for m in masks] for name, value in fields.items()}
    counts = torch.bincount(images, minlength=num_images).tolist()
    return {name: value.split(counts) for name, value in fields.items()}


def sizes_of(images: Tensor, image_sizes: List[Tuple[int, int]], dtype: torch.dtype) -> Tensor:
    """(R, 2) (height, width) of the image of each of ``images`` (R,); filled in place for one image (no
    host-to-device copy)."""
    if len(image_sizes) == 1 and not isinstance(image_sizes[0][0], Tensor):
        sizes = torch.empty((images.size(0), 2), dtype=dtype, device=images.device)
        sizes[:, 0], sizes[:, 1] = image_sizes[0]
        return sizes
    if any(isinstance(size, Tensor) or isinstance(size[0], Tensor) for size in image_sizes):  # traced sizes
        rows = [size if isinstance(size, Tensor) else torch.stack(list(size)) for size in image_sizes]
        return torch.stack([r.to(device=images.device, dtype=dtype) for r in rows])[images]
    return torch.tensor(image_sizes, dtype=dtype, device=images.device)[images]
