"""Rendering of one synthetic image (:mod:`prroi_d2.data.synthetic`): five shape families, each with its own colour
family, so classes are easy; localisation is made hard on purpose: soft edges (per-object blur), irregular outlines,
shading and texture on the objects, textured backgrounds with stripes and low-contrast clutter, and occlusion. A box
is the tight extent of the object's *visible* alpha >= 0.5 region, so every image holds the information needed to
recover it exactly.

A pure function of ``(seed, split, image_id, image_size)``, identical bit for bit on every machine: the per-image
generator is ``np.random.default_rng([seed, split_index, image_id])`` and uses only ``random()`` and ``integers()``;
pixels come from IEEE arithmetic only (:mod:`prroi_d2.data.synthetic_shapes`).
"""

import math
import zlib

import numpy as np

from prroi_d2.data import synthetic_shapes as shapes

__all__ = ["SYNTHETIC_CLASSES", "render_synthetic_image"]

SYNTHETIC_CLASSES = ("ellipse", "box", "triangle", "star", "ring")

_SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}
_MIN_VISIBLE_FRACTION = 0.4  # objects with less of their alpha >= 0.5 area visible are drawn but not annotated
_MIN_VISIBLE_AREA = 64
_MAX_SEGMENTATION_POINTS = 32
_MAX_EXTENT = 120.0  # px, longest side of a whole object's box
# Hue ranges (in turns) of the colour families, one per class.
_HUES = ((-0.035, 0.035), (0.56, 0.64), (0.28, 0.38), (0.12, 0.16), (0.78, 0.87))


def _split_index(split):
    return _SPLIT_INDEX.get(split, zlib.crc32(split.encode("utf-8")) + len(_SPLIT_INDEX))


def _background(rng, height, width):
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    base = shapes.hsv_to_rgb(rng.random(), shapes.uniform(rng, 0.04, 0.35), shapes.uniform(rng, 0.25, 0.8))
    lum = 0.16 * shapes.smooth_noise(rng, height, width, shapes.uniform(rng, 24.0, 64.0))
    cell = shapes.uniform(rng, 5.0, 12.0)  # two lattices half a cell apart: fine grain without a visible grid
    fine = shapes.smooth_noise(rng, height, width, cell) + shapes.smooth_noise(rng, height, width, cell, 0.5)
    lum = lum + 0.06 * fine
    gc, gs = shapes.cos_sin(rng.random() * shapes.TWO_PI)
    lum = lum + shapes.uniform(rng, 0.0, 0.3) * ((xx - width / 2.0) * gc + (yy - height / 2.0) * gs) / max(
        height, width
    )
    if rng.random() < 0.6:
        angle, period = rng.random() * shapes.TWO_PI, shapes.uniform(rng, 4.0, 24.0)
        lum = lum + shapes.uniform(rng, 0.04, 0.16) * shapes.stripes(xx, yy, angle, period, rng.random())
    img = base[None, None, :] * (1.0 + lum[:, :, None])
    tint = np.stack([shapes.smooth_noise(rng, height, width, 40.0) for _ in range(3)], axis=2)
    return img + 0.04 * tint


def _window(loops, margin):
    pts = np.concatenate(loops, axis=0)
    x0 = int(math.floor(float(pts[:, 0].min()))) - margin
    y0 = int(math.floor(float(pts[:, 1].min()))) - margin
    x1 = int(math.ceil(float(pts[:, 0].max()))) + margin
    y1 = int(math.ceil(float(pts[:, 1].max()))) + margin
    return x0, y0, x1 - x0, y1 - y0


def _composite(img, alpha, colour, win, height, width):
    """Blend ``colour`` (window-sized, 3 channels) with ``alpha`` over ``img``; returns the image-clipped slices."""
    x0, y0, w, h = win
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, width), min(y0 + h, height)
    if cx0 >= cx1 or cy0 >= cy1:
        return None
    a = alpha[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0][:, :, None]
    c = colour[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    region = img[cy0:cy1, cx0:cx1]
    img[cy0:cy1, cx0:cx1] = region * (1.0 - a) + c * a
    return (slice(cy0, cy1), slice(cx0, cx1)), (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))


def _draw_clutter(rng, img):
    """A semi-transparent, unsaturated soft blob: texture, never annotated."""
    height, width = img.shape[:2]
    size = 12.0 * float(shapes.exp2(shapes.uniform(rng, 0.0, 2.5)))
    w, h = size * float(shapes.exp2(shapes.uniform(rng, -0.8, 0.8))), size
    loop = shapes.irregular_ellipse(rng, w / 2.0, h / 2.0, amp=0.2)
    loop = loop + np.array([shapes.uniform(rng, 0.0, width), shapes.uniform(rng, 0.0, height)])
    sigma = shapes.uniform(rng, 1.0, 4.0)
    win = _window([loop], int(math.ceil(3 * sigma)) + 2)
    alpha = shapes.gaussian_blur(shapes.coverage([loop], *win), sigma) * shapes.uniform(rng, 0.3, 0.7)
    colour = shapes.hsv_to_rgb(rng.random(), shapes.uniform(rng, 0.0, 0.25), shapes.uniform(rng, 0.2, 0.9))
    _composite(img, alpha, np.broadcast_to(colour, (win[3], win[2], 3)), win, height, width)


def _object_colour(rng, category, win, centre, size):
    """Base colour of the class's family, with a linear shading ramp and a texture (noise or stripes)."""
    x0, y0, w, h = win
    lo, hi = _HUES[category]
    rgb = shapes.hsv_to_rgb(
        shapes.uniform(rng, lo, hi), shapes.uniform(rng, 0.5, 0.95), shapes.uniform(rng, 0.35, 0.95)
    )
    yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w] + 0.5
    gc, gs = shapes.cos_sin(rng.random() * shapes.TWO_PI)
    shade = 1.0 + shapes.uniform(rng, 0.0, 0.45) * ((xx - centre[0]) * gc + (yy - centre[1]) * gs) / size
    if rng.random() < 0.3:
        shade = shade + shapes.uniform(rng, 0.05, 0.2) * shapes.stripes(
            xx, yy, rng.random() * shapes.TWO_PI, shapes.uniform(rng, 3, 9), 0.0
        )
    else:
        shade = shade + shapes.uniform(rng, 0.03, 0.15) * shapes.smooth_noise(rng, h, w, shapes.uniform(rng, 2.5, 8.0))
    return rgb[None, None, :] * shade[:, :, None]


def _sample_object(rng, height, width):
    category = int(rng.integers(0, len(SYNTHETIC_CLASSES)))
    size = 16.0 * float(shapes.exp2(shapes.uniform(rng, 0.0, 2.7)))  # geometric mean of the sides: 16 .. 104 px
    aspect = float(shapes.exp2(shapes.uniform(rng, -1.585, 1.585)))  # 1:3 .. 3:1
    w = min(size * math.sqrt(aspect), 0.75 * width)
    h = min(size / math.sqrt(aspect), 0.8 * height)
    loops = shapes.shape_loops(rng, category, w, h)
    c, s = shapes.cos_sin(rng.random() * shapes.TWO_PI)
    rot = np.array([[c, s], [-s, c]], dtype=np.float64)
    loops = [lp[:, :1] * rot[0] + lp[:, 1:] * rot[1] for lp in loops]
    pts = np.concatenate(loops, axis=0)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    shrink = min(1.0, _MAX_EXTENT / float((hi - lo).max()))
    if shrink < 1.0:  # a long, rotated shape: keep its box at most _MAX_EXTENT px
        loops, lo, hi = [lp * shrink for lp in loops], lo * shrink, hi * shrink
        w, h = w * shrink, h * shrink
    extent = hi - lo
    centre = []
    for k, limit in ((0, width), (1, height)):
        a, b = -lo[k] - 0.2 * extent[k], limit - hi[k] + 0.2 * extent[k]
        centre.append(shapes.uniform(rng, a, b) if a < b else limit / 2.0 - (lo[k] + hi[k]) / 2.0)
    offset = np.array(centre)
    loops = [lp + offset for lp in loops]
    sigma = shapes.uniform(rng, 0.5, min(3.4, 0.5 + 0.1 * min(w, h)))
    return category, loops, sigma, offset, math.sqrt(w * h)


def render_synthetic_image(seed, split, image_id, image_size=(160, 192)):
    """Render one image: returns ``(image, objects)``.

    ``image`` is an (H, W, 3) uint8 array; ``objects`` lists every drawn object in drawing order as dicts with
    ``category_id`` (1-based), ``bbox`` ([x, y, w, h] of the visible alpha >= 0.5 region, or None), ``area`` (visible
    pixels), ``full_area`` (alpha >= 0.5 pixels of the whole shape, inside the image or not), ``visible_mask``
    ((H, W) bool), ``segmentation`` (outline of the whole shape, clipped to the image) and ``annotated``.
    """
    height, width = image_size
    rng = np.random.default_rng([seed, _split_index(split), image_id])
    img = _background(rng, height, width)
    for _ in range(int(rng.integers(0, 4))):
        _draw_clutter(rng, img)

    drawn = []
    for _ in range(int(rng.integers(1, 7))):
        category, loops, sigma, centre, size = _sample_object(rng, height, width)
        shadow = rng.random() < 0.35
        shadow_sigma = sigma + shapes.uniform(rng, 1.0, 3.0)
        margin = int(math.ceil(3 * (shadow_sigma if shadow else sigma))) + (6 if shadow else 2)
        win = _window(loops, margin)
        tight = _window(loops, 1)
        coverage = np.zeros((win[3], win[2]))
        coverage[margin - 1 : margin - 1 + tight[3], margin - 1 : margin - 1 + tight[2]] = shapes.coverage(
            loops, *tight
        )
        if shadow:  # a soft drop shadow: darkens the background next to the object, never part of its box
            dx, dy = (int(v) for v in rng.integers(-4, 5, 2))
            dark = np.roll(shapes.gaussian_blur(coverage, shadow_sigma), (dy, dx), axis=(0, 1)) * shapes.uniform(
                rng, 0.25, 0.5
            )
            _composite(img, dark, np.zeros((win[3], win[2], 3)), win, height, width)
        alpha = shapes.gaussian_blur(coverage, sigma)
        colour = _object_colour(rng, category, win, centre, size)
        slices = _composite(img, alpha, colour, win, height, width)
        drawn.append((category, loops, alpha, slices, int((alpha >= 0.5).sum())))

    objects = []
    transmittance = np.ones((height, width))
    for category, loops, alpha, slices, full_area in reversed(drawn):
        mask = np.zeros((height, width), dtype=bool)
        if slices is not None:
            (iy, ix), (wy, wx) = slices
            a = alpha[wy, wx]
            mask[iy, ix] = a * transmittance[iy, ix] >= 0.5
            transmittance[iy, ix] = transmittance[iy, ix] * (1.0 - a)
        area = int(mask.sum())
        bbox = None
        if area:
            ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
            bbox = [int(xs[0]), int(ys[0]), int(xs[-1] + 1 - xs[0]), int(ys[-1] + 1 - ys[0])]
        outline = shapes.simplify(loops[0], 0.4)
        clipped = shapes.clip_polygon([(float(x), float(y)) for x, y in outline], width, height)
        segmentation = [round(v, 2) for p in clipped for v in p]
        annotated = area >= _MIN_VISIBLE_AREA and area >= _MIN_VISIBLE_FRACTION * full_area and len(segmentation) >= 6
        objects.append(
            {
                "category_id": category + 1,
                "bbox": bbox,
                "area": area,
                "full_area": full_area,
                "visible_mask": mask,
                "segmentation": segmentation,
                "annotated": bool(annotated),
            }
        )
    objects.reverse()

    noise = (rng.random((height, width, 3)) + rng.random((height, width, 3)) - 1.0) * shapes.uniform(rng, 0.01, 0.035)
    img = np.clip(img + noise, 0.0, 1.0)
    return np.floor(img * 255.0 + 0.5).astype(np.uint8), objects
