"""Precise RoI Pooling as pooler types of Detectron2's ``ROIPooler``.

Importing this module (``import prroi_d2`` does it as soon as ``detectron2.modeling`` is imported) makes every
``ROIPooler`` accept

* ``"PrRoIPool"``: Precise RoI Pooling in the original geometry (``aligned=False``, like ``"ROIAlign"``);
* ``"PrRoIPoolV2"``: Precise RoI Pooling in the half-pixel geometry of ``"ROIAlignV2"`` (``aligned=True``).

So ``cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "PrRoIPoolV2"`` (likewise ``ROI_MASK_HEAD``, ``ROI_KEYPOINT_HEAD``) or
``LazyCall(ROIPooler)(..., pooler_type="PrRoIPoolV2")`` switches a head to Precise RoI Pooling. PrRoI pooling
integrates each bin exactly, so ``sampling_ratio`` is ignored. The poolers hold no parameters: weights trained with
another pooler type load unchanged.

This module is where Detectron2's ``ROIPooler`` is extended (the README's "Layout" lists the two other places that
patch Detectron2: the import hook and ``create_ddp_model`` on CPUs). ``ROIPooler.__init__`` is wrapped once (the wrapper
carries the ``_prroi_d2_pooler_types`` registry and ``__wrapped__`` points at Detectron2's own ``__init__``). For a
registered type the wrapper runs Detectron2's ``__init__`` as if ``"ROIAlignV2"`` had been asked for (so scales,
output size and levels are validated and set up by Detectron2 itself), then replaces ``level_poolers`` with one
module per scale built by the registered factory. Any other type goes to Detectron2's ``__init__`` untouched, so the
stock types behave as before and unknown names still raise Detectron2's ``ValueError``. For ``PrRoIPool`` and
``PrRoIPoolV2`` the new instance becomes a :class:`PrRoIPooler` (a ``ROIPooler`` subclass) whose ``forward`` pools all
levels in one launch, with Detectron2's level assignment, box format and output order; other registered types keep
Detectron2's ``ROIPooler.forward``.

Further pooler types are added with :func:`register_pooler_type`.
"""

import functools
import inspect
import threading
from collections.abc import Callable
from typing import List, Tuple

import torch
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels
from detectron2.structures import Boxes
from torch import Tensor, nn

from prroi_d2.functional import assign_fpn_levels, boxes_to_rois, prroi_pool2d
from prroi_d2.modules import PrRoIPool

__all__ = [
    "PRROI_POOLER_TYPES",
    "LevelPrRoIPool",
    "PoolerFactory",
    "PrRoIPooler",
    "pool_levels",
    "pool_rois",
    "register_pooler_type",
    "registered_pooler_types",
]

PoolerFactory = Callable[[tuple[int, int], float, int], nn.Module]
"""``factory(output_size (h, w), spatial_scale, sampling_ratio) -> module``; ``module(features, rois (K, 5))``."""

PRROI_POOLER_TYPES = ("PrRoIPool", "PrRoIPoolV2")

# The pooler types Detectron2 itself implements (v0.6 and main); probing ROIPooler also catches later additions.
_DETECTRON2_POOLER_TYPES = frozenset({"ROIAlign", "ROIAlignV2", "ROIPool", "ROIAlignRotated"})
# A stock type whose setup (levels, checks) a registered type reuses before its level poolers are replaced.
_SETUP_POOLER_TYPE = "ROIAlignV2"
_REGISTRY_ATTR = "_prroi_d2_pooler_types"
_LOCK = threading.RLock()


def _install() -> dict[str, PoolerFactory]:
    """Wrap ``ROIPooler.__init__`` unless already wrapped; return the registry the wrapper reads."""
    with _LOCK:
        current = ROIPooler.__init__
        registry = getattr(current, _REGISTRY_ATTR, None)
        if registry is not None:
            return registry
        original = current
        signature = inspect.signature(original)
        registry = {}

        @functools.wraps(original)
        def __init__(self, *args, **kwargs):
            try:
                bound = signature.bind(self, *args, **kwargs)
            except TypeError:
                bound = None  # let Detectron2 report the bad call
            pooler_type = bound.arguments.get("pooler_type") if bound is not None else None
            factory = registry.get(pooler_type) if isinstance(pooler_type, str) else None
            if factory is None:
                original(self, *args, **kwargs)
                return
            bound.arguments["pooler_type"] = _SETUP_POOLER_TYPE
            original(*bound.args, **bound.kwargs)
            output_size = (int(self.output_size[0]), int(self.output_size[1]))
            sampling_ratio = bound.arguments["sampling_ratio"]
            self.level_poolers = nn.ModuleList(
                factory(output_size, float(scale), sampling_ratio) for scale in bound.arguments["scales"]
            )
            if all(type(m) is LevelPrRoIPool for m in self.level_poolers):
                # Precise RoI Pooling on every level: pool the whole pyramid in one launch (PrRoIPooler.forward).
                self.__class__ = PrRoIPooler
                self.prroi_scales = [m.spatial_scale for m in self.level_poolers]
                self.prroi_aligned = bool(self.level_poolers[0].aligned)

        setattr(__init__, _REGISTRY_ATTR, registry)
        ROIPooler.__init__ = __init__
        return registry


def _original_init():
    init = ROIPooler.__init__
    while getattr(init, _REGISTRY_ATTR, None) is not None:
        init = init.__wrapped__
    return init


def _is_detectron2_pooler_type(name: str) -> bool:
    if name in _DETECTRON2_POOLER_TYPES:
        return True
    # A name Detectron2 accepts builds a one-level pooler; an unknown one raises ("Unknown pooler type").
    probe = ROIPooler.__new__(ROIPooler)
    try:
        _original_init()(probe, 1, (1.0,), 0, name)
    except (ValueError, TypeError, AssertionError, RuntimeError):
        return False
    return True


def register_pooler_type(name: str, factory: PoolerFactory, overwrite: bool = False) -> None:
    """Make ``ROIPooler(..., pooler_type=name)`` build its level poolers with ``factory``.

    Args:
        name: the ``pooler_type`` string (e.g. the value of ``cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE``). It must not be
            a type Detectron2 implements itself (``ROIAlign``, ``ROIAlignV2``, ``ROIPool``, ``ROIAlignRotated``).
        factory: called once per feature level as ``factory(output_size, spatial_scale, sampling_ratio)`` with
            ``output_size`` an ``(h, w)`` pair; returns an ``nn.Module`` mapping ``(features (N, C, H, W), rois
            (K, 5) (batch_index, x0, y0, x1, y1))`` to ``(K, C, h, w)``.
        overwrite: replace a different factory already registered under ``name``.

    Registering the same factory again is a no-op. Raises ``ValueError`` for a Detectron2 name, or for a name taken
    by another factory when ``overwrite`` is false; ``TypeError`` for a bad name or a non-callable factory.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"pooler type name must be a non-empty str, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory for pooler type {name!r} must be callable, got {factory!r}")
    with _LOCK:
        registry = _install()
        existing = registry.get(name)
        if existing is factory:
            return
        if _is_detectron2_pooler_type(name):
            raise ValueError(f"pooler type {name!r} is implemented by Detectron2 and cannot be registered")
        if existing is not None and not overwrite:
            raise ValueError(
                f"pooler type {name!r} is already registered with {existing!r}; pass overwrite=True to replace it"
            )
        registry[name] = factory


def registered_pooler_types() -> tuple[str, ...]:
    """The pooler types added to ``ROIPooler`` through :func:`register_pooler_type`, sorted."""
    with _LOCK:
        return tuple(sorted(_install()))


class LevelPrRoIPool(PrRoIPool):
    """:class:`~prroi_d2.PrRoIPool` as one level of a ``ROIPooler``: rois ``(K, 5)`` may differ in dtype from the
    features.

    Detectron2's ``Boxes`` are always float32 while features may be float64, float16 or bfloat16. Detectron2's
    ``ROIAlign`` casts the rois to the features' dtype; here the features keep their dtype and the boxes go in as
    float32 (float64 with float64 features), so coordinates never lose precision, which the IoU-Net box refinement
    needs; the result has the features' dtype.
    """

    def forward(self, features: Tensor, rois: Tensor) -> Tensor:
        return prroi_pool2d(
            features,
            rois.to(roi_dtype(features.dtype, rois.dtype)),
            self.pooled_height,
            self.pooled_width,
            self.spatial_scale,
            self.aligned,
        )


def pool_levels(
    x: List[Tensor], rois: Tensor, levels: Tensor, output_size: Tuple[int, int], scales: List[float], aligned: bool
) -> Tensor:
    """Pool rois (K, 5) from the maps ``x`` (each (N, C, H_l, W_l)) at ``levels`` (K,) in one launch -> (K, C, h, w)
    in the features' dtype. Features are pooled in their own dtype (no float32 copy of half maps under AMP)."""
    rois = rois.to(roi_dtype(x[0].dtype, rois.dtype))
    return torch.ops.prroi_d2.prroi_pool2d_levels(x, rois, levels, output_size[0], output_size[1], scales, aligned)


def roi_dtype(features_dtype: torch.dtype, rois_dtype: torch.dtype) -> torch.dtype:
    """The dtype the op takes box coordinates in: float64 with float64 maps (and float64 boxes with float32 maps),
    float32 otherwise. Detectron2's float32 ``Boxes`` are never rounded to float16/bfloat16 with half features."""
    if features_dtype == torch.float64 or (features_dtype == torch.float32 and rois_dtype == torch.float64):
        return torch.float64
    return torch.float32


class PrRoIPooler(ROIPooler):
    """A ``ROIPooler`` of type ``PrRoIPool`` / ``PrRoIPoolV2`` (the ``ROIPooler`` constructor returns one for those
    types): same outputs, order and gradients as Detectron2's level-by-level ``forward``, but every level is pooled
    by one launch of ``prroi_pool2d_levels``, without a gather, a scatter and a host synchronisation per level."""

    prroi_scales: List[float]
    prroi_aligned: bool

    def forward(self, x: List[Tensor], box_lists: List[Boxes]) -> Tensor:
        """x: one (N, C, H_l, W_l) map per level; box_lists: N ``Boxes`` -> (sum of boxes, C, h, w)."""
        if len(x) != len(self.level_poolers):
            raise ValueError(f"ROIPooler expects {len(self.level_poolers)} feature maps, got {len(x)}")
        if len(box_lists) != x[0].size(0):
            raise ValueError(f"ROIPooler got {len(box_lists)} box lists for a batch of {x[0].size(0)} images")
        if len(box_lists) == 0:
            return torch.zeros((0, x[0].shape[1]) + self.output_size, device=x[0].device, dtype=x[0].dtype)
        # Detectron2's convert_boxes_to_pooler_format, without its host sync (the host knows the lists' lengths).
        rois = boxes_to_rois([b.tensor for b in box_lists])
        if len(self.level_poolers) == 1:
            levels = torch.zeros(rois.size(0), dtype=torch.int64, device=rois.device)
        else:
            levels = assign_boxes_to_levels(
                box_lists, self.min_level, self.max_level, self.canonical_box_size, self.canonical_level
            )
        return pool_levels(x, rois, levels, self.output_size, self.prroi_scales, self.prroi_aligned)

    def levels_of(self, rois: Tensor) -> Tensor:
        """(K,) int64 index of the level each of rois (K, 5) or boxes (K, 4) is pooled from (Detectron2's rule)."""
        if len(self.level_poolers) == 1:
            return torch.zeros(rois.size(0), dtype=torch.int64, device=rois.device)
        return assign_fpn_levels(rois, self.prroi_scales, self.canonical_box_size, self.canonical_level)


def pool_rois(pooler: ROIPooler, x: List[Tensor], rois: Tensor) -> Tensor:
    """Pool rois (K, 5) ``(image index, x0, y0, x1, y1)`` in any order with ``pooler`` -> (K, C, h, w).

    A :class:`PrRoIPooler` pools them as they are, in one launch and without a host synchronisation. Any other
    ``ROIPooler`` gets them as per-image ``Boxes`` (one synchronisation to count them), and the rows are put back
    in the input order.
    """
    if isinstance(pooler, PrRoIPooler):
        levels = pooler.levels_of(rois)
        return pool_levels(x, rois, levels, pooler.output_size, pooler.prroi_scales, pooler.prroi_aligned)
    image = rois[:, 0].to(torch.int64)
    order = torch.argsort(image, stable=True)
    counts = torch.bincount(image, minlength=x[0].size(0)).tolist()
    box_lists = [Boxes(b) for b in rois[order, 1:].split(counts)]
    pooled = pooler(x, box_lists)
    return pooled[torch.argsort(order)]


def _prroi_pool(output_size: tuple[int, int], spatial_scale: float, sampling_ratio: int) -> nn.Module:
    return LevelPrRoIPool(output_size, spatial_scale=spatial_scale, aligned=False)


def _prroi_pool_v2(output_size: tuple[int, int], spatial_scale: float, sampling_ratio: int) -> nn.Module:
    return LevelPrRoIPool(output_size, spatial_scale=spatial_scale, aligned=True)


# overwrite=True: a reloaded module re-registers its own (new) factory objects.
register_pooler_type("PrRoIPool", _prroi_pool, overwrite=True)
register_pooler_type("PrRoIPoolV2", _prroi_pool_v2, overwrite=True)
