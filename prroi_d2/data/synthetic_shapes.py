"""Platform-independent arithmetic and the outlines of the synthetic shapes (:mod:`prroi_d2.data.synthetic`).

Identical bit for bit on every machine: sine, cosine and exponential are evaluated by series (no libm calls), masks
by an exact even-odd scanline test on a 4x supersampled grid, blur by a separable kernel with a fixed summation order.
Outlines are ``(N, 2)`` float64 loops in pixels.
"""

import colorsys
import math

import numpy as np

__all__ = ["TWO_PI", "clip_polygon", "cos_sin", "coverage", "exp2", "gaussian_blur", "hsv_to_rgb", "irregular_ellipse",
           "shape_loops", "simplify", "smooth_noise", "stripes", "uniform"]  # fmt: skip

SS = 4  # supersampling factor of the coverage masks (per axis)
MAX_SEGMENTATION_POINTS = 32

TWO_PI = 2.0 * math.pi
_SIN_COEFFS = [(-1.0) ** k / math.factorial(2 * k + 1) for k in range(15)]
_COS_COEFFS = [(-1.0) ** k / math.factorial(2 * k) for k in range(15)]
_EXP_COEFFS = [1.0 / math.factorial(k) for k in range(12)]
_LN2 = 0.6931471805599453


def cos_sin(theta):
    """cos and sin (float64 arrays) by range reduction and a Taylor series: no libm, same bits everywhere."""
    t = np.asarray(theta, dtype=np.float64)
    t = t - TWO_PI * np.floor(t / TWO_PI + 0.5)
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


def exp2(x):
    return _exp(np.asarray(x, dtype=np.float64) * _LN2)


def uniform(rng, lo, hi, size=None):
    return lo + (hi - lo) * rng.random(size)


def hsv_to_rgb(h, s, v):
    """One colour, h in turns (any real), s and v in [0, 1]."""
    return np.array(colorsys.hsv_to_rgb(h - math.floor(h), s, v))


def smooth_noise(rng, h, w, cell, shift=0.0):
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


def stripes(xx, yy, angle, period, phase):
    """Smooth triangle-wave stripes in [-0.5, 0.5] across direction ``angle``."""
    c, s = cos_sin(angle)
    f = (xx * c + yy * s) / period + phase
    tri = np.abs(f - np.floor(f) - 0.5) * 2.0
    return tri * tri * (3.0 - 2.0 * tri) - 0.5


def gaussian_blur(a, sigma):
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


def coverage(loops, x0, y0, w, h):
    """Fraction of each pixel of the window [x0, x0 + w) x [y0, y0 + h) inside ``loops`` (even-odd rule).

    Exact inside tests at 4 x 4 sample points per pixel: for every sample row, the crossings with each edge are found
    in closed form and toggled along the row with a cumulative sum (integer arithmetic after one division per
    crossing).
    """
    n = SS
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


def irregular_ellipse(rng, a, b, n=64, amp=0.1):
    """An ellipse with half-axes (a, b) whose radius wobbles by low harmonics (up to ``amp`` relative)."""
    phi = (np.arange(n) / n + rng.random()) * TWO_PI
    r = np.ones(n)
    for m in (2, 3, 4, 5):
        c, _ = cos_sin(m * phi + rng.random() * TWO_PI)
        r = r + amp * 0.5 * rng.random() * c
    c, s = cos_sin(phi)
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


def shape_loops(rng, category, w, h):
    """Closed loops (even-odd) of one object of size about w x h, centred on the origin, not rotated."""
    a, b = w / 2.0, h / 2.0
    rough = uniform(rng, 0.0, 0.06)
    if category == 0:  # ellipse
        return [_roughen(rng, irregular_ellipse(rng, a, b, amp=0.12), rough)]
    if category == 1:  # box: rounded rectangle
        rect = np.array([[-a, -b], [a, -b], [a, b], [-a, b]])
        loop = _densify(_rounded_polygon(rect, uniform(rng, 0.04, 0.4)), 72)
        return [_roughen(rng, loop, rough * 0.6)]
    if category == 2:  # triangle: jittered vertices, rounded corners
        ang = (np.arange(3) / 3.0 + 0.25) * TWO_PI + uniform(rng, -0.3, 0.3, 3)
        rad = uniform(rng, 0.85, 1.15, 3)
        c, s = cos_sin(ang)
        tri = np.stack([a * rad * c, b * rad * s], axis=1)
        tri = tri - (tri.max(axis=0) + tri.min(axis=0)) / 2.0
        tri = tri * (np.array([a, b]) * 2.0 / np.maximum(tri.max(axis=0) - tri.min(axis=0), 1e-6))
        loop = _densify(_rounded_polygon(tri, uniform(rng, 0.03, 0.25)), 72)
        return [_roughen(rng, loop, rough * 0.6)]
    if category == 3:  # star: 5-8 points, noisy radius
        points = int(rng.integers(5, 9))
        ang = (np.arange(2 * points) / (2 * points) + rng.random()) * TWO_PI
        rad = np.where(np.arange(2 * points) % 2 == 0, 1.0, uniform(rng, 0.38, 0.62))
        rad = rad * uniform(rng, 0.82, 1.12, 2 * points)
        c, s = cos_sin(ang)
        star = np.stack([a * rad * c, b * rad * s], axis=1)
        return [_densify(_rounded_polygon(star, uniform(rng, 0.0, 0.22), arc_points=3), 96)]
    # ring: irregular outer ellipse, inner hole offset a little
    outer = _roughen(rng, irregular_ellipse(rng, a, b, amp=0.1), rough * 0.5)
    ratio = uniform(rng, 0.42, 0.66)
    inner = irregular_ellipse(rng, a * ratio, b * ratio, n=48, amp=0.08)
    inner = inner + np.array([a, b]) * uniform(rng, -0.08, 0.08, 2)
    return [outer, inner]


def simplify(loop, tol):
    """Ramer-Douglas-Peucker simplification of a closed loop, keeping at most ``MAX_SEGMENTATION_POINTS``."""
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
    if len(idx) > MAX_SEGMENTATION_POINTS:
        idx = [idx[(i * len(idx)) // MAX_SEGMENTATION_POINTS] for i in range(MAX_SEGMENTATION_POINTS)]
    return loop[idx]


def clip_polygon(points, width, height):
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
