"""Boxes cut by a window (a tile, a strip, a crop): the one rule the tree-crown datasets and the aerial
augmentation share."""

import numpy as np

__all__ = ["clip_to_window"]


def clip_to_window(boxes, window):
    """Clip XYXY boxes (N, 4) to ``window`` (x0, y0, x1, y1); returns ``(clipped, visible)``.

    ``clipped`` (N, 4) is in the window's coordinates (origin at its top-left corner); ``visible`` (N,) is the
    fraction of each box's area inside the window (0 for boxes outside it). The rule of the datasets: keep a box when
    ``visible`` reaches a minimum fraction (``neon_trees.MIN_VISIBLE_FRACTION``, ``INPUT.AERIAL_AUGMENT.MIN_VISIBLE``).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x0, y0, x1, y1 = (float(v) for v in window)
    lo, hi = np.array([x0, y0, x0, y0]), np.array([x1, y1, x1, y1])
    clipped = np.clip(boxes, lo, hi)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    visible = np.where(area > 0, inside / np.maximum(area, 1e-12), 0.0)
    return clipped - np.array([x0, y0, x0, y0]), visible
