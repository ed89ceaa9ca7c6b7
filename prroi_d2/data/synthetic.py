"""An embedded synthetic detection dataset in COCO format, generated on first use (the default data of IoU-Net jobs).

Five shape families, each with its own colour family, so classes are easy; localisation is made hard on purpose:
soft edges (per-object blur), irregular outlines, shading and texture on the objects, textured backgrounds with
stripes and low-contrast clutter, and occlusion. A box is the tight extent of the object's *visible* alpha >= 0.5
region, so every image holds the information needed to recover it exactly.

Rendering is a pure function of ``(seed, split, image_id, image_size)`` and identical bit for bit on every machine:
the per-image generator is ``np.random.default_rng([seed, split_index, image_id])`` and uses only ``random()`` and
``integers()``; pixels come from IEEE arithmetic only (no libm calls: sine, cosine and exponential are evaluated by
series here, masks by an exact even-odd scanline test on a 4x supersampled grid, blur by a separable kernel with a
fixed summation order), and PNGs are written with uncompressed deflate blocks (no dependence on the zlib build).
"""

import colorsys
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import zlib

import numpy as np

__all__ = [
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_VERSION",
    "default_datasets_root",
    "generate_synthetic_coco",
    "prepare_synthetic_split",
    "register_synthetic_datasets",
    "render_synthetic_image",
]

SYNTHETIC_CLASSES = ("ellipse", "box", "triangle", "star", "ring")
# Bump on any change to the rendering: it names the cache folder and enters the stamp.
SYNTHETIC_VERSION = 1

_SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}
_SS = 4  # supersampling factor of the coverage masks (per axis)
_MIN_VISIBLE_FRACTION = 0.4  # objects with less of their alpha >= 0.5 area visible are drawn but not annotated
_MIN_VISIBLE_AREA = 64
_MAX_SEGMENTATION_POINTS = 32
_MAX_EXTENT = 120.0  # px, longest side of a whole object's box
# Hue ranges (in turns) of the colour families, one per class.
_HUES = ((-0.035, 0.035), (0.56, 0.64), (0.28, 0.38), (0.12, 0.16), (0.78, 0.87))


# ----------------------------------------------------------------------------------------------------------------
# Platform-independent arithmetic
# ----------------------------------------------------------------------------------------------------------------

_TWO_PI = 2.0 * math.pi
_SIN_COEFFS = [(-1.0) ** k / math.factorial(2 * k + 1) for k in range(15)]
_COS_COEFFS = [(-1.0) ** k / math.factorial(2 * k) for k in range(15)]
_EXP_COEFFS = [1.0 / math.factorial(k) for k in range(12)]
_LN2 = 0.6931471805599453


def _cos_sin(theta):
    """cos and sin (float64 arrays) by range reduction and a Taylor series: no libm, same bits everywhere."""
    t = np.asarray(theta, dtype=np.float64)
    t = t - _TWO_PI * np.floor(t / _TWO_PI + 0.5)
    x2 = t * t
    s = np.full_like(t, _SIN_COEFFS[-1])
    c = np.full_like(t, _COS_COEFFS[-1])
    for k in range(len(_SIN_COEFFS) - 2, -1, -1):
        s = s * x2 + _SIN_COEFFS[k]
        c = c * x2 + _COS_COEFFS[k]
    return c, s * t


def _exp(x):
    """exp for moderate arguments (|x| < ~20) by a Taylor series of x / 1024 squared ten times: no libm."""
    y = np.asarray(x, dtype=np.float64) / 1024.0
    e = np.full_like(y, _EXP_COEFFS[-1])
    for k in range(len(_EXP_COEFFS) - 2, -1, -1):
        e = e * y + _EXP_COEFFS[k]
    for _ in range(10):
        e = e * e
    return e


def _exp2(x):
    return _exp(np.asarray(x, dtype=np.float64) * _LN2)


def _uniform(rng, lo, hi, size=None):
    return lo + (hi - lo) * rng.random(size)


def _hsv_to_rgb(h, s, v):
    """One colour, h in turns (any real), s and v in [0, 1]."""
    return np.array(colorsys.hsv_to_rgb(h - math.floor(h), s, v))


def _smooth_noise(rng, h, w, cell, shift=0.0):
    """Value noise in [-1, 1] on an (h, w) grid: random lattice every ``cell`` px (offset by ``shift`` cells),
    smoothstep interpolation."""
    gh, gw = int(h / cell) + 3, int(w / cell) + 3
    grid = rng.random((gh, gw)) * 2.0 - 1.0

    def axis(n):
        g = (np.arange(n) + 0.5) / cell + shift
        i = np.floor(g).astype(np.int64)
        t = g - i
        return i, t * t * (3.0 - 2.0 * t)

    iy, ty = axis(h)
    ix, tx = axis(w)
    rows = grid[iy] * (1.0 - ty)[:, None] + grid[iy + 1] * ty[:, None]
    return rows[:, ix] * (1.0 - tx) + rows[:, ix + 1] * tx


def _stripes(xx, yy, angle, period, phase):
    """Smooth triangle-wave stripes in [-0.5, 0.5] across direction ``angle``."""
    c, s = _cos_sin(angle)
    f = (xx * c + yy * s) / period + phase
    tri = np.abs(f - np.floor(f) - 0.5) * 2.0
    return tri * tri * (3.0 - 2.0 * tri) - 0.5


def _gaussian_blur(a, sigma):
    """Separable Gaussian blur with zero padding (the caller's window has a margin), fixed summation order."""
    r = max(1, int(math.ceil(3.0 * sigma)))
    k = _exp(-0.5 * (np.arange(-r, r + 1, dtype=np.float64) / sigma) ** 2)
    total = 0.0
    for v in k.tolist():
        total += v
    k = (k / total).tolist()
    h, w = a.shape
    p = np.pad(a, ((r, r), (0, 0)))
    out = k[0] * p[0:h]
    for j in range(1, 2 * r + 1):
        out = out + k[j] * p[j : j + h]
    p = np.pad(out, ((0, 0), (r, r)))
    out = k[0] * p[:, 0:w]
    for j in range(1, 2 * r + 1):
        out = out + k[j] * p[:, j : j + w]
    return out


def _coverage(loops, x0, y0, w, h):
    """Fraction of each pixel of the window [x0, x0 + w) x [y0, y0 + h) inside ``loops`` (even-odd rule).

    Exact inside tests at 4 x 4 sample points per pixel: for every sample row, the crossings with each edge are found
    in closed form and toggled along the row with a cumulative sum (integer arithmetic after one division per
    crossing).
    """
    n = _SS
    rows, cols = h * n, w * n
    ys = y0 + (np.arange(rows) + 0.5) / n
    flat = []
    for loop in loops:
        px, py = loop[:, 0], loop[:, 1]
        qx, qy = np.roll(px, -1), np.roll(py, -1)
        below_p = py[None, :] <= ys[:, None]
        below_q = qy[None, :] <= ys[:, None]
        r, e = np.nonzero(below_p != below_q)
        t = (ys[r] - py[e]) / (qy[e] - py[e])
        xc = px[e] + t * (qx[e] - px[e])
        first = np.clip(np.floor((xc - x0) * n - 0.5).astype(np.int64) + 1, 0, cols)
        flat.append(r * (cols + 1) + first)
    toggles = np.bincount(np.concatenate(flat), minlength=rows * (cols + 1)).astype(np.uint8)
    inside = np.cumsum(toggles.reshape(rows, cols + 1)[:, :cols], axis=1, dtype=np.uint8) & 1  # parity survives wrap
    counts = inside.reshape(h, n, cols).sum(axis=1, dtype=np.uint8).reshape(h, w, n).sum(axis=2, dtype=np.uint8)
    return counts / float(n * n)


# ----------------------------------------------------------------------------------------------------------------
# Shapes (outlines in pixels, centred on the origin, before rotation)
# ----------------------------------------------------------------------------------------------------------------


def _circular_noise(rng, n, passes=3):
    """Smooth periodic noise on n points, roughly in [-1, 1]."""
    u = rng.random(n) * 2.0 - 1.0
    for _ in range(passes):
        u = (np.roll(u, -2) + np.roll(u, -1) + u + np.roll(u, 1) + np.roll(u, 2)) / 5.0
    peak = np.max(np.abs(u))
    return u / peak if peak > 0 else u


def _irregular_ellipse(rng, a, b, n=64, amp=0.1):
    """An ellipse with half-axes (a, b) whose radius wobbles by low harmonics (up to ``amp`` relative)."""
    phi = (np.arange(n) / n + rng.random()) * _TWO_PI
    r = np.ones(n)
    for m in (2, 3, 4, 5):
        c, _ = _cos_sin(m * phi + rng.random() * _TWO_PI)
        r = r + amp * 0.5 * rng.random() * c
    c, s = _cos_sin(phi)
    return np.stack([a * r * c, b * r * s], axis=1)


def _rounded_polygon(vertices, frac, arc_points=6):
    """Cut every corner at ``frac`` of its two edges and replace it with a quadratic Bezier arc."""
    out = []
    m = len(vertices)
    t = np.arange(arc_points + 1)[:, None] / arc_points
    for i in range(m):
        v, p, q = vertices[i], vertices[i - 1], vertices[(i + 1) % m]
        a, b = v + frac * (p - v), v + frac * (q - v)
        out.append((1 - t) * (1 - t) * a + 2 * (1 - t) * t * v + t * t * b)
    return np.concatenate(out, axis=0)


def _densify(loop, n_target=64):
    """Subdivide every edge so the loop has about ``n_target`` points."""
    m = len(loop)
    k = max(1, -(-n_target // m))
    t = np.arange(k)[:, None, None] / k
    nxt = np.roll(loop, -1, axis=0)
    return (loop[None] + t * (nxt - loop)[None]).transpose(1, 0, 2).reshape(-1, 2)


def _roughen(rng, loop, amount):
    """Displace the points radially (from the origin) by smooth noise of relative size ``amount``."""
    if amount <= 0:
        return loop
    return loop * (1.0 + amount * _circular_noise(rng, len(loop)))[:, None]


def _shape_loops(rng, category, w, h):
    """Closed loops (even-odd) of one object of size about w x h, centred on the origin, not rotated."""
    a, b = w / 2.0, h / 2.0
    rough = _uniform(rng, 0.0, 0.06)
    if category == 0:  # ellipse
        return [_roughen(rng, _irregular_ellipse(rng, a, b, amp=0.12), rough)]
    if category == 1:  # box: rounded rectangle
        rect = np.array([[-a, -b], [a, -b], [a, b], [-a, b]])
        loop = _densify(_rounded_polygon(rect, _uniform(rng, 0.04, 0.4)), 72)
        return [_roughen(rng, loop, rough * 0.6)]
    if category == 2:  # triangle: jittered vertices, rounded corners
        ang = (np.arange(3) / 3.0 + 0.25) * _TWO_PI + _uniform(rng, -0.3, 0.3, 3)
        rad = _uniform(rng, 0.85, 1.15, 3)
        c, s = _cos_sin(ang)
        tri = np.stack([a * rad * c, b * rad * s], axis=1)
        tri = tri - (tri.max(axis=0) + tri.min(axis=0)) / 2.0
        tri = tri * (np.array([a, b]) * 2.0 / np.maximum(tri.max(axis=0) - tri.min(axis=0), 1e-6))
        loop = _densify(_rounded_polygon(tri, _uniform(rng, 0.03, 0.25)), 72)
        return [_roughen(rng, loop, rough * 0.6)]
    if category == 3:  # star: 5-8 points, noisy radius
        points = int(rng.integers(5, 9))
        ang = (np.arange(2 * points) / (2 * points) + rng.random()) * _TWO_PI
        rad = np.where(np.arange(2 * points) % 2 == 0, 1.0, _uniform(rng, 0.38, 0.62))
        rad = rad * _uniform(rng, 0.82, 1.12, 2 * points)
        c, s = _cos_sin(ang)
        star = np.stack([a * rad * c, b * rad * s], axis=1)
        return [_densify(_rounded_polygon(star, _uniform(rng, 0.0, 0.22), arc_points=3), 96)]
    # ring: irregular outer ellipse, inner hole offset a little
    outer = _roughen(rng, _irregular_ellipse(rng, a, b, amp=0.1), rough * 0.5)
    ratio = _uniform(rng, 0.42, 0.66)
    inner = _irregular_ellipse(rng, a * ratio, b * ratio, n=48, amp=0.08)
    inner = inner + np.array([a, b]) * _uniform(rng, -0.08, 0.08, 2)
    return [outer, inner]


def _simplify(loop, tol):
    """Ramer-Douglas-Peucker simplification of a closed loop, keeping at most ``_MAX_SEGMENTATION_POINTS``."""
    n = len(loop)
    far = int(np.argmax(((loop - loop[0]) ** 2).sum(axis=1)))
    keep = {0, far}
    stack = [(0, far), (far, n)]
    while stack:
        i, j = stack.pop()
        if j - i < 2:
            continue
        p, q = loop[i], loop[j % n]
        seg = loop[i + 1 : j]
        d = q - p
        norm = math.sqrt(float(d[0] * d[0] + d[1] * d[1]))
        if norm > 0:
            dist = np.abs(d[0] * (seg[:, 1] - p[1]) - d[1] * (seg[:, 0] - p[0])) / norm
        else:
            dist = np.sqrt(((seg - p) ** 2).sum(axis=1))
        k = int(np.argmax(dist))
        if dist[k] > tol:
            keep.add(i + 1 + k)
            stack += [(i, i + 1 + k), (i + 1 + k, j)]
    idx = sorted(keep)
    if len(idx) > _MAX_SEGMENTATION_POINTS:
        idx = [idx[(i * len(idx)) // _MAX_SEGMENTATION_POINTS] for i in range(_MAX_SEGMENTATION_POINTS)]
    return loop[idx]


def _clip_polygon(points, width, height):
    """Sutherland-Hodgman clip of a polygon (list of (x, y)) to [0, width] x [0, height]."""
    for axis, bound, keep_below in ((0, 0.0, False), (0, width, True), (1, 0.0, False), (1, height, True)):
        if not points:
            break

        def inside(p):
            return p[axis] <= bound if keep_below else p[axis] >= bound

        out = []
        for i, cur in enumerate(points):
            prev = points[i - 1]
            if inside(cur) != inside(prev):
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                cut = [prev[0] + t * (cur[0] - prev[0]), prev[1] + t * (cur[1] - prev[1])]
                cut[axis] = bound
                out.append(tuple(cut))
            if inside(cur):
                out.append(cur)
        points = out
    return points


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------


def _split_index(split):
    return _SPLIT_INDEX.get(split, zlib.crc32(split.encode("utf-8")) + len(_SPLIT_INDEX))


def _background(rng, height, width):
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    base = _hsv_to_rgb(rng.random(), _uniform(rng, 0.04, 0.35), _uniform(rng, 0.25, 0.8))
    lum = 0.16 * _smooth_noise(rng, height, width, _uniform(rng, 24.0, 64.0))
    cell = _uniform(rng, 5.0, 12.0)  # two lattices half a cell apart: fine grain without a visible grid
    fine = _smooth_noise(rng, height, width, cell) + _smooth_noise(rng, height, width, cell, 0.5)
    lum = lum + 0.06 * fine
    gc, gs = _cos_sin(rng.random() * _TWO_PI)
    lum = lum + _uniform(rng, 0.0, 0.3) * ((xx - width / 2.0) * gc + (yy - height / 2.0) * gs) / max(height, width)
    if rng.random() < 0.6:
        angle, period = rng.random() * _TWO_PI, _uniform(rng, 4.0, 24.0)
        lum = lum + _uniform(rng, 0.04, 0.16) * _stripes(xx, yy, angle, period, rng.random())
    img = base[None, None, :] * (1.0 + lum[:, :, None])
    tint = np.stack([_smooth_noise(rng, height, width, 40.0) for _ in range(3)], axis=2)
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
    size = 12.0 * float(_exp2(_uniform(rng, 0.0, 2.5)))
    w, h = size * float(_exp2(_uniform(rng, -0.8, 0.8))), size
    loop = _irregular_ellipse(rng, w / 2.0, h / 2.0, amp=0.2)
    loop = loop + np.array([_uniform(rng, 0.0, width), _uniform(rng, 0.0, height)])
    sigma = _uniform(rng, 1.0, 4.0)
    win = _window([loop], int(math.ceil(3 * sigma)) + 2)
    alpha = _gaussian_blur(_coverage([loop], *win), sigma) * _uniform(rng, 0.3, 0.7)
    colour = _hsv_to_rgb(rng.random(), _uniform(rng, 0.0, 0.25), _uniform(rng, 0.2, 0.9))
    _composite(img, alpha, np.broadcast_to(colour, (win[3], win[2], 3)), win, height, width)


def _object_colour(rng, category, win, centre, size):
    """Base colour of the class's family, with a linear shading ramp and a texture (noise or stripes)."""
    x0, y0, w, h = win
    lo, hi = _HUES[category]
    rgb = _hsv_to_rgb(_uniform(rng, lo, hi), _uniform(rng, 0.5, 0.95), _uniform(rng, 0.35, 0.95))
    yy, xx = np.mgrid[y0 : y0 + h, x0 : x0 + w] + 0.5
    gc, gs = _cos_sin(rng.random() * _TWO_PI)
    shade = 1.0 + _uniform(rng, 0.0, 0.45) * ((xx - centre[0]) * gc + (yy - centre[1]) * gs) / size
    if rng.random() < 0.3:
        shade = shade + _uniform(rng, 0.05, 0.2) * _stripes(xx, yy, rng.random() * _TWO_PI, _uniform(rng, 3, 9), 0.0)
    else:
        shade = shade + _uniform(rng, 0.03, 0.15) * _smooth_noise(rng, h, w, _uniform(rng, 2.5, 8.0))
    return rgb[None, None, :] * shade[:, :, None]


def _sample_object(rng, height, width):
    category = int(rng.integers(0, len(SYNTHETIC_CLASSES)))
    size = 16.0 * float(_exp2(_uniform(rng, 0.0, 2.7)))  # geometric mean of the sides: 16 .. 104 px
    aspect = float(_exp2(_uniform(rng, -1.585, 1.585)))  # 1:3 .. 3:1
    w = min(size * math.sqrt(aspect), 0.75 * width)
    h = min(size / math.sqrt(aspect), 0.8 * height)
    loops = _shape_loops(rng, category, w, h)
    c, s = _cos_sin(rng.random() * _TWO_PI)
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
        centre.append(_uniform(rng, a, b) if a < b else limit / 2.0 - (lo[k] + hi[k]) / 2.0)
    offset = np.array(centre)
    loops = [lp + offset for lp in loops]
    sigma = _uniform(rng, 0.5, min(3.4, 0.5 + 0.1 * min(w, h)))
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
        shadow_sigma = sigma + _uniform(rng, 1.0, 3.0)
        margin = int(math.ceil(3 * (shadow_sigma if shadow else sigma))) + (6 if shadow else 2)
        win = _window(loops, margin)
        tight = _window(loops, 1)
        coverage = np.zeros((win[3], win[2]))
        coverage[margin - 1 : margin - 1 + tight[3], margin - 1 : margin - 1 + tight[2]] = _coverage(loops, *tight)
        if shadow:  # a soft drop shadow: darkens the background next to the object, never part of its box
            dx, dy = (int(v) for v in rng.integers(-4, 5, 2))
            dark = np.roll(_gaussian_blur(coverage, shadow_sigma), (dy, dx), axis=(0, 1)) * _uniform(rng, 0.25, 0.5)
            _composite(img, dark, np.zeros((win[3], win[2], 3)), win, height, width)
        alpha = _gaussian_blur(coverage, sigma)
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
        outline = _simplify(loops[0], 0.4)
        clipped = _clip_polygon([(float(x), float(y)) for x, y in outline], width, height)
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

    noise = (rng.random((height, width, 3)) + rng.random((height, width, 3)) - 1.0) * _uniform(rng, 0.01, 0.035)
    img = np.clip(img + noise, 0.0, 1.0)
    return np.floor(img * 255.0 + 0.5).astype(np.uint8), objects


def _png_bytes(img):
    """An 8-bit RGB PNG with stored (uncompressed) deflate blocks: the bytes depend on nothing but the pixels."""
    height, width = img.shape[:2]
    raw = np.zeros((height, 1 + 3 * width), dtype=np.uint8)
    raw[:, 1:] = img.reshape(height, 3 * width)
    data = raw.tobytes()
    blocks = [b"\x78\x01"]
    for start in range(0, len(data), 65535):
        part = data[start : start + 65535]
        final = 1 if start + 65535 >= len(data) else 0
        blocks.append(struct.pack("<BHH", final, len(part), len(part) ^ 0xFFFF) + part)
    blocks.append(struct.pack(">I", zlib.adler32(data)))

    def chunk(tag, payload):
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(blocks)) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------------------------------------------
# COCO files and cache
# ----------------------------------------------------------------------------------------------------------------


def generate_synthetic_coco(root, split, num_images, seed=0, image_size=(160, 192)):
    """Write ``<root>/<split>/*.png`` and ``<root>/<split>.json`` (COCO instances); returns the json path.

    A pure function of its arguments: same bytes on every machine. ``image_size`` is (height, width).
    """
    height, width = (int(v) for v in image_size)
    image_dir = os.path.join(root, split)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, int(num_images) + 1):
        img, objects = render_synthetic_image(seed, split, image_id, (height, width))
        file_name = f"{image_id:06d}.png"
        with open(os.path.join(image_dir, file_name), "wb") as f:
            f.write(_png_bytes(img))
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for obj in objects:
            if obj["annotated"]:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": obj["category_id"],
                        "bbox": obj["bbox"],
                        "area": obj["area"],
                        "iscrowd": 0,
                        "segmentation": [obj["segmentation"]],
                    }
                )
    coco = {
        "info": {
            "description": f"prroi_d2 synthetic shapes v{SYNTHETIC_VERSION} ({split}, seed {seed})",
            "version": str(SYNTHETIC_VERSION),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SYNTHETIC_CLASSES)],
    }
    json_path = os.path.join(root, f"{split}.json")
    with open(json_path, "wb") as f:
        f.write(json.dumps(coco, separators=(",", ":")).encode("utf-8"))
    return json_path


def default_datasets_root():
    """``$PRROI_D2_DATASETS`` if set, else ``~/.cache/prroi_d2/datasets``."""
    return os.environ.get("PRROI_D2_DATASETS") or os.path.join(
        os.path.expanduser("~"), ".cache", "prroi_d2", "datasets"
    )


def _stamp(split, num_images, seed, image_size):
    params = {"version": SYNTHETIC_VERSION, "split": split, "num_images": int(num_images), "seed": int(seed)}
    params["image_size"] = [int(v) for v in image_size]
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode("utf-8")).hexdigest()


def _is_current(root, split, stamp):
    try:
        with open(os.path.join(root, f"{split}.stamp"), encoding="utf-8") as f:
            current = f.read().strip() == stamp
    except OSError:
        return False
    return current and os.path.isfile(os.path.join(root, f"{split}.json")) and os.path.isdir(os.path.join(root, split))


def prepare_synthetic_split(root, split, num_images, seed=0, image_size=(160, 192)):
    """Make sure ``<root>/<split>`` and ``<root>/<split>.json`` hold the requested data; returns the json path.

    Reuses them when ``<root>/<split>.stamp`` matches the parameters, else generates into a temporary sibling and
    renames it into place. Several processes may call this at once: they generate the same bytes and a process that
    loses the race to install its copy uses the winner's.
    """
    stamp = _stamp(split, num_images, seed, image_size)
    json_path = os.path.join(root, f"{split}.json")
    if _is_current(root, split, stamp):
        return json_path
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{split}.tmp-", dir=root)
    try:
        generate_synthetic_coco(tmp, split, num_images, seed, image_size)
        with open(os.path.join(tmp, f"{split}.stamp"), "w", encoding="utf-8") as f:
            f.write(stamp + "\n")
        if not _is_current(root, split, stamp):
            # Invalidate first, so nobody trusts a half-replaced split; the stamp goes back last.
            try:
                os.remove(os.path.join(root, f"{split}.stamp"))
            except FileNotFoundError:
                pass
            image_dir = os.path.join(root, split)
            try:
                os.rename(image_dir, os.path.join(tmp, "stale"))
            except OSError:
                pass  # absent, or another process moved it away
            try:
                os.rename(os.path.join(tmp, split), image_dir)
            except OSError:
                pass  # another process installed its (identical) images first
            os.replace(os.path.join(tmp, f"{split}.json"), json_path)
            os.replace(os.path.join(tmp, f"{split}.stamp"), os.path.join(root, f"{split}.stamp"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _is_current(root, split, stamp):
        raise RuntimeError(f"could not prepare the synthetic split {split!r} under {root}")
    return json_path


def register_synthetic_datasets(root=None, num_train=400, num_val=100, prefix="iounet_synth", num_holdout=100):
    """Generate (if missing or stale) and register ``{prefix}_train`` / ``{prefix}_val`` / ``{prefix}_holdout`` with
    Detectron2. The holdout split is more training data, never trained on: settings are chosen on it, so that the
    validation split only reports.

    ``root`` is the datasets directory (default: :func:`default_datasets_root`); the files live in
    ``<root>/synthetic_v<version>/``. Names already registered with the same json file are skipped. Returns
    ``{name: json_path}``.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    data_root = os.path.join(root or default_datasets_root(), f"synthetic_v{SYNTHETIC_VERSION}")
    registered = {}
    for split, num_images in (("train", num_train), ("val", num_val), ("holdout", num_holdout)):
        name = f"{prefix}_{split}"
        json_path = prepare_synthetic_split(data_root, split, num_images)
        if name in DatasetCatalog.list():
            existing = MetadataCatalog.get(name).get("json_file")
            if existing != json_path:
                raise ValueError(f"dataset {name!r} is already registered with json_file={existing!r}")
        else:
            meta = {"thing_classes": list(SYNTHETIC_CLASSES)}  # the json's categories, ids 1..K in this order
            register_coco_instances(name, meta, json_path, os.path.join(data_root, split))
        registered[name] = json_path
    return registered
