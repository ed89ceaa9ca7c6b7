"""Augmentations for aerial (top-down) imagery with Detectron2's ``T.Augmentation`` API, and their dataset mapper.

``INPUT.AERIAL_AUGMENT`` (added by :func:`add_aerial_augment_config`) describes, in order: a random crop of
``CROP_SIZE`` px, colour jitter (brightness, contrast, saturation, each a factor in ``[1 - COLOR, 1 + COLOR]``), a
rescale of the crop by a factor drawn uniformly in ``SCALE_RANGE`` (imagery has no canonical size: small crowns are
upsampled), flips both ways and a random multiple of 90 degrees (a view from above has no "up"). Testing rescales
whole images by ``TEST_SCALE``.

A box cut by the crop edge follows the datasets' rule (``prroi_d2.data.boxes.clip_to_window``): clipped to the
crop and kept when at least ``MIN_VISIBLE`` of its area remains, else dropped (:class:`AerialDatasetMapper`).
"""

import numpy as np
from detectron2.config import CfgNode as CN
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from fvcore.transforms.transform import Transform

__all__ = [
    "AerialDatasetMapper",
    "RandomRot90",
    "Rot90Transform",
    "add_aerial_augment_config",
    "build_aerial_augmentation",
]


def add_aerial_augment_config(cfg):
    """Add ``INPUT.AERIAL_AUGMENT`` (off by default) to ``cfg`` in place; returns ``cfg``. Idempotent."""
    if "AERIAL_AUGMENT" in cfg.INPUT:
        return cfg
    aug = cfg.INPUT.AERIAL_AUGMENT = CN()
    aug.ENABLED = False  # on: the training loader uses build_aerial_augmentation and AerialDatasetMapper
    aug.CROP_SIZE = 384  # px of the source image, square (clamped to the image)
    aug.SCALE_RANGE = (1.6, 2.4)  # rescale factor of the crop, uniform
    aug.FLIP = True  # horizontal and vertical flips, each with probability 0.5
    aug.ROT90 = True  # rotation by 0, 90, 180 or 270 degrees, uniform
    aug.COLOR = 0.2  # brightness / contrast / saturation factors in [1 - COLOR, 1 + COLOR]; 0: off
    aug.MIN_VISIBLE = 0.5  # a box cut by the crop is kept when this fraction of its area remains
    aug.TEST_SCALE = 2.0  # testing: whole images rescaled by this factor (instead of INPUT.MIN_SIZE_TEST)
    return cfg


class Rot90Transform(Transform):
    """Rotation of an (h, w) image by ``k`` x 90 degrees counter-clockwise (as ``np.rot90``), exact on boxes."""

    def __init__(self, h, w, k):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img):
        return np.ascontiguousarray(np.rot90(img, self.k % 4))

    def apply_segmentation(self, segmentation):
        return self.apply_image(segmentation)

    def apply_coords(self, coords):
        """(N, 2) x, y in pixel units (continuous, the image spans [0, w] x [0, h])."""
        x, y = coords[:, 0].copy(), coords[:, 1].copy()
        k = self.k % 4
        if k == 1:
            coords[:, 0], coords[:, 1] = y, self.w - x
        elif k == 2:
            coords[:, 0], coords[:, 1] = self.w - x, self.h - y
        elif k == 3:
            coords[:, 0], coords[:, 1] = self.h - y, x
        return coords

    def inverse(self):
        h, w = (self.w, self.h) if self.k % 2 else (self.h, self.w)
        return Rot90Transform(h, w, -self.k % 4)


class RandomRot90(T.Augmentation):
    """Rotate by a uniformly drawn multiple of 90 degrees."""

    def get_transform(self, image):
        h, w = image.shape[:2]
        return Rot90Transform(h, w, int(np.random.randint(4)))


class RandomRelativeResize(T.Augmentation):
    """Resize by a factor drawn uniformly in ``[min_scale, max_scale]`` (aspect ratio kept)."""

    def __init__(self, min_scale, max_scale):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        scale = np.random.uniform(self.min_scale, self.max_scale)
        return T.ResizeTransform(h, w, max(1, int(round(h * scale))), max(1, int(round(w * scale))))


def build_aerial_augmentation(cfg, is_train=True):
    """The augmentation list of ``INPUT.AERIAL_AUGMENT``; for testing, the rescale by ``TEST_SCALE`` only."""
    aug = cfg.INPUT.AERIAL_AUGMENT
    if not is_train:
        if aug.TEST_SCALE <= 0:
            raise ValueError(f"INPUT.AERIAL_AUGMENT.TEST_SCALE must be > 0, got {aug.TEST_SCALE}")
        return [RandomRelativeResize(aug.TEST_SCALE, aug.TEST_SCALE)]
    lo, hi = (float(v) for v in aug.SCALE_RANGE)
    if not 0 < lo <= hi:
        raise ValueError(f"INPUT.AERIAL_AUGMENT.SCALE_RANGE must be 0 < min <= max, got {tuple(aug.SCALE_RANGE)}")
    if aug.CROP_SIZE <= 0 or not 0 <= aug.COLOR < 1 or not 0 <= aug.MIN_VISIBLE <= 1:
        raise ValueError(
            "INPUT.AERIAL_AUGMENT needs CROP_SIZE > 0, 0 <= COLOR < 1, 0 <= MIN_VISIBLE <= 1; got "
            f"CROP_SIZE={aug.CROP_SIZE}, COLOR={aug.COLOR}, MIN_VISIBLE={aug.MIN_VISIBLE}"
        )
    augs = [T.RandomCrop("absolute", (aug.CROP_SIZE, aug.CROP_SIZE))]
    if aug.COLOR > 0:  # on the crop before its rescale (about 2x per side): the blends are per pixel, 4x fewer here
        lo_c, hi_c = 1.0 - aug.COLOR, 1.0 + aug.COLOR
        augs += [T.RandomBrightness(lo_c, hi_c), T.RandomContrast(lo_c, hi_c), T.RandomSaturation(lo_c, hi_c)]
    augs.append(RandomRelativeResize(lo, hi))
    if aug.FLIP:
        augs += [T.RandomFlip(0.5, horizontal=True, vertical=False), T.RandomFlip(0.5, horizontal=False, vertical=True)]
    if aug.ROT90:
        augs.append(RandomRot90())
    return augs


class AerialDatasetMapper(DatasetMapper):
    """Detectron2's ``DatasetMapper`` whose boxes cut by the crop follow the rule of ``MIN_VISIBLE``: clipped and
    kept when at least that fraction of the (transformed) box remains inside the image, else dropped."""

    def __init__(self, cfg, is_train=True):
        super().__init__(cfg, is_train=is_train, augmentations=build_aerial_augmentation(cfg, is_train))
        self.min_visible = float(cfg.INPUT.AERIAL_AUGMENT.MIN_VISIBLE)

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        from detectron2.structures import BoxMode

        from prroi_d2.data.boxes import clip_to_window

        annos = [a for a in dataset_dict["annotations"] if a.get("iscrowd", 0) == 0]
        if annos:
            boxes = np.array([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos])
            moved = transforms.apply_box(boxes)  # unclipped, in the output image's coordinates
            h, w = image_shape
            _, visible = clip_to_window(moved, (0, 0, w, h))
            annos = [a for a, frac in zip(annos, visible.tolist()) if frac >= self.min_visible]
        dataset_dict["annotations"] = annos
        super()._transform_annotations(dataset_dict, transforms, image_shape)
