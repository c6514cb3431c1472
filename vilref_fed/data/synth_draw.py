"""Drawing synthetic colour fundus photographs with vectorised numpy (and PIL for lines and blurs).

The benchmark needs images whose findings a small CNN can learn but not by looking at one pixel: each
label has its own visual signature drawn at random positions, sizes and counts on top of a plausible
fundus (field of view, vignetting, optic disc and cup, branching vessel trees, macula and fovea), and
then a site's camera changes colour, brightness, sharpness and size. Everything is drawn in a float
RGB canvas whose coordinates are normalised to the field of view (x, y in [-1, 1]), so lesion sizes
scale with the image and the same seed gives the same picture at every resolution.

Speed matters (a thousand images must take seconds): full-image operations are whole-array numpy,
lesions are stamped into small bounding boxes, vessels are drawn as PIL polylines at 2x and
downsampled, and blurs use PIL's C implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

Color = tuple[float, float, float]


@dataclass(frozen=True)
class Camera:
    """A site's fundus camera: what makes images from two hospitals look different for the same eye."""

    width: int = 320
    height: int = 256
    fov_fraction: float = 0.96  # FOV diameter as a fraction of min(width, height)
    cast: Color = (1.0, 1.0, 1.0)  # per-channel gain
    brightness: float = 1.0
    gamma: float = 1.0
    blur: float = 0.0  # Gaussian sigma in pixels of the FOV diameter / 256
    noise: float = 0.01  # additive Gaussian noise (0..1 scale)
    vignette: float = 0.35  # darkening at the FOV rim (0 = none)
    notch: bool = False  # the small square marker some cameras burn into the FOV edge
    manufacturer: str = "Synthetic Optics"
    model_name: str = "FundusCam 1"


@dataclass
class Geometry:
    """Where the anatomy of one eye sits, in normalised FOV coordinates (x right, y down)."""

    eye: str  # "OD" | "OS"
    fovea: tuple[float, float]
    disc: tuple[float, float]
    disc_r: float
    cup_ratio: float
    veins: list[list[tuple[np.ndarray, float]]] = field(default_factory=list)  # trunk -> [(points, width)]
    arteries: list[list[tuple[np.ndarray, float]]] = field(default_factory=list)

    @property
    def side(self) -> float:
        """+1 when the disc is to the right of the fovea (right eye as photographed), -1 for the left eye."""
        return 1.0 if self.eye == "OD" else -1.0


# ----------------------------------------------------------------------------------------------- grids


@lru_cache(maxsize=16)
def _grid(d: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(d, dtype=np.float32) + 0.5) / d * 2.0 - 1.0
    return c[None, :].repeat(d, 0), c[:, None].repeat(d, 1)


def _smooth_noise(rng: np.random.Generator, d: int, cells: int) -> np.ndarray:
    """Band-limited noise in [0, 1]: a cells x cells random field upsampled bicubically to d x d."""
    small = rng.random((cells + 3, cells + 3), dtype=np.float32)
    big = Image.fromarray(small).resize((d + d * 3 // cells, d + d * 3 // cells), Image.Resampling.BICUBIC)
    off = d * 3 // cells // 2
    arr = np.asarray(big, dtype=np.float32)[off : off + d, off : off + d]
    return np.clip(arr, 0.0, 1.0)


def _to_px(p: float, d: int) -> float:
    return (p + 1.0) * 0.5 * d


# ---------------------------------------------------------------------------------------------- stamps


def stamp(
    img: np.ndarray,
    cx: float,
    cy: float,
    rx: float,
    ry: float | None = None,
    color: Color = (1.0, 1.0, 1.0),
    alpha: float = 1.0,
    sharp: float = 6.0,
    angle: float = 0.0,
) -> None:
    """Blend a soft-edged ellipse (normalised centre and radii) into img in place, inside its bounding box.

    The edge is logistic in the ellipse's normalised radius: `sharp` ~4 looks like a fluffy spot
    (cotton wool, drusen), ~12 like a crisp one (microaneurysm, laser burn).
    """
    d = img.shape[0]
    ry = rx if ry is None else ry
    px, py = _to_px(cx, d), _to_px(cy, d)
    prx, pry = max(rx * d * 0.5, 0.35), max(ry * d * 0.5, 0.35)
    reach = max(prx, pry) * (1.0 + 3.0 / sharp) + 1.0
    x0, x1 = max(int(px - reach), 0), min(int(px + reach) + 2, d)
    y0, y1 = max(int(py - reach), 0), min(int(py + reach) + 2, d)
    if x0 >= x1 or y0 >= y1:
        return
    xs = np.arange(x0, x1, dtype=np.float32) + 0.5 - px
    ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - py
    if angle:
        ca, sa = math.cos(angle), math.sin(angle)
        u, v = xs * ca + ys * sa, -xs * sa + ys * ca
    else:
        u, v = xs + 0 * ys, ys + 0 * xs
    r = np.sqrt((u / prx) ** 2 + (v / pry) ** 2)
    m = alpha / (1.0 + np.exp(np.clip((r - 1.0) * sharp, -30, 30)))
    m = m[..., None]
    patch = img[y0:y1, x0:x1]
    patch *= 1.0 - m
    patch += m * np.asarray(color, dtype=np.float32)


def blend_mask(img: np.ndarray, mask: np.ndarray, color: Color, alpha: float = 1.0) -> None:
    """img = img * (1 - a m) + color * a m, in place, for a full-image mask in [0, 1]."""
    m = (mask.astype(np.float32, copy=False) * np.float32(alpha))[..., None]
    img -= m * (img - np.asarray(color, dtype=np.float32))


def _gauss(xx: np.ndarray, yy: np.ndarray, c: tuple[float, float], sigma: float) -> np.ndarray:
    return np.exp(-((xx - c[0]) ** 2 + (yy - c[1]) ** 2) / (2.0 * sigma * sigma))


def _blur_rgb(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur of a float [0,1] RGB canvas through PIL (8-bit is plenty before the camera stage)."""
    if sigma_px <= 0.05:
        return img
    u8 = Image.fromarray(np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return np.asarray(u8.filter(ImageFilter.GaussianBlur(sigma_px)), dtype=np.float32) / 255.0


# --------------------------------------------------------------------------------------------- anatomy


def make_geometry(rng: np.random.Generator, eye: str, cup_ratio: float, disc_scale: float = 1.0) -> Geometry:
    side = 1.0 if eye == "OD" else -1.0
    fovea = (-side * 0.07 + rng.normal(0, 0.03), 0.03 + rng.normal(0, 0.03))
    disc = (fovea[0] + side * (0.60 + rng.normal(0, 0.03)), fovea[1] - 0.05 + rng.normal(0, 0.03))
    disc_r = 0.13 * disc_scale * (1.0 + rng.normal(0, 0.05))
    g = Geometry(eye=eye, fovea=fovea, disc=disc, disc_r=disc_r, cup_ratio=cup_ratio)
    g.veins, g.arteries = _vessel_trees(rng, g)
    return g


def _walk(
    rng: np.random.Generator,
    start: tuple[float, float],
    heading: float,
    curvature: float,
    length: float,
    width: float,
    depth: int,
    branch_p: float,
    out: list[tuple[np.ndarray, float]],
    wiggle: float,
) -> None:
    """A vessel as a curving random walk; children branch off at 25-60 degrees, thinner and shorter.

    Vectorised: headings are a cumulative sum of curvature + noise, positions a cumulative sum of
    steps; the walk is cut where it leaves the field of view."""
    step = 0.035
    n = max(int(length / step), 2)
    headings = heading + np.cumsum(curvature * step + rng.normal(0, wiggle, size=n))
    xs = start[0] + np.cumsum(step * np.cos(headings))
    ys = start[1] + np.cumsum(step * np.sin(headings))
    outside = np.flatnonzero(xs * xs + ys * ys > 1.1)
    end = int(outside[0]) + 1 if outside.size else n
    pts = np.empty((end + 1, 2), dtype=np.float32)
    pts[0] = start
    pts[1:, 0], pts[1:, 1] = xs[:end], ys[:end]
    children = []
    if depth < 3:
        draws = rng.random(n)
        signs = np.where(rng.random(n) < 0.5, -1.0, 1.0)
        angles = rng.uniform(0.45, 1.05, size=n)
        for i in np.flatnonzero(draws[: end - 1] < branch_p):
            if i < 2:  # no branch in the first steps (inside the disc)
                continue
            children.append((float(xs[i]), float(ys[i]), float(headings[i] + signs[i] * angles[i]), signs[i]))
    out.append((pts, width))
    for cx, cy, ch, sign in children:
        _walk(
            rng,
            (cx, cy),
            ch,
            curvature * 0.3 + sign * rng.uniform(0.0, 0.6),
            length * rng.uniform(0.35, 0.6),
            width * 0.66,
            depth + 1,
            branch_p * 0.8,
            out,
            wiggle,
        )


def _vessel_trees(rng: np.random.Generator, g: Geometry):
    """Four arcades (superior/inferior, temporal/nasal) of a vein and its companion artery from the disc."""
    side = g.side
    temporal = math.pi if side > 0 else 0.0  # heading from the disc toward the fovea
    veins, arteries = [], []
    for vertical in (-1.0, 1.0):  # -1 superior (up), +1 inferior
        for kind, toward in (("temporal", temporal), ("nasal", temporal + math.pi)):
            base = math.atan2(vertical, 0.0)  # straight up or down
            # Temporal arcades leave vertically and bend around the macula; nasal ones fan out.
            tilt = 0.35 if kind == "temporal" else 0.55
            dx, dy = math.cos(toward), math.sin(toward)
            heading = math.atan2(math.sin(base) + tilt * dy, math.cos(base) + tilt * dx)
            bend = -vertical * (1.0 if (dx < 0) == (vertical > 0) else -1.0)
            curv = bend * (1.25 if kind == "temporal" else 0.35) * rng.uniform(0.8, 1.2)
            length = rng.uniform(1.1, 1.5) if kind == "temporal" else rng.uniform(0.7, 1.0)
            for store, width, offset in ((veins, 0.024, 0.0), (arteries, 0.016, rng.uniform(0.12, 0.3))):
                tree: list[tuple[np.ndarray, float]] = []
                start = (g.disc[0] + rng.normal(0, 0.01), g.disc[1] + vertical * g.disc_r * 0.25)
                _walk(
                    rng,
                    start,
                    heading + offset * (1 if kind == "temporal" else -1) * vertical,
                    curv,
                    length,
                    width * (1.0 if kind == "temporal" else 0.8),
                    0,
                    0.11,
                    tree,
                    0.06,
                )
                store.append(tree)
    # Sign convention check: make temporal arcades bend toward the fovea, whatever the eye.
    return veins, arteries


def _draw_trees(d: int, trees: list[list[tuple[np.ndarray, float]]], width_scale: list[float]) -> np.ndarray:
    """Rasterise vessel polylines at 2x with PIL and box-downsample: anti-aliased sub-pixel widths."""
    s = 2 * d
    im = Image.new("L", (s, s), 0)
    dr = ImageDraw.Draw(im)
    for tree, ws in zip(trees, width_scale, strict=True):
        for pts, width in tree:
            px = ((pts + 1.0) * 0.5 * s).ravel().tolist()
            wpx = max(int(round(width * ws * s * 0.5)), 1)
            dr.line(px, fill=255, width=wpx, joint="curve")
    return np.asarray(im.resize((d, d), Image.Resampling.BOX), dtype=np.float32) / 255.0


# ----------------------------------------------------------------------------------------------- scene


@dataclass
class Scene:
    """The working state while drawing one eye: canvas, grids, geometry and per-label switches."""

    img: np.ndarray
    xx: np.ndarray
    yy: np.ndarray
    g: Geometry
    rng: np.random.Generator
    labels: frozenset[str]
    vein_scale: list[float]
    artery_scale: list[float]

    @property
    def d(self) -> int:
        return self.img.shape[0]


def _background(sc: Scene, pigment: Color, real: np.ndarray | None) -> None:
    xx, yy, g, rng, d = sc.xx, sc.yy, sc.g, sc.rng, sc.d
    rr2 = xx * xx + yy * yy
    if real is not None:
        sc.img[:] = real
        return
    base = np.asarray(pigment, dtype=np.float32) * rng.uniform(0.9, 1.1, size=3).astype(np.float32)
    low = _smooth_noise(rng, d, 5)
    mid = _smooth_noise(rng, d, 22)
    shade = (1.0 - 0.22 * rr2) * (0.92 + 0.16 * low) * (0.97 + 0.06 * mid)
    sc.img[:] = shade[..., None] * base
    # Faint normal choroidal pattern (tessellation draws a strong one).
    _choroid(sc, strength=rng.uniform(0.02, 0.06))
    # Macular pigment: darker, browner around the fovea, darkest at the foveola.
    mac = _gauss(xx, yy, g.fovea, 0.16)
    sc.img *= (1.0 - 0.28 * mac)[..., None]
    fov = _gauss(xx, yy, g.fovea, 0.035)
    blend_mask(sc.img, fov, (0.42, 0.12, 0.06), 0.45)
    # Nerve fibre sheen: brighter arcuate bundles above and below the disc.
    ang = np.arctan2(yy - g.disc[1], (xx - g.disc[0]) * -g.side)
    dist = np.sqrt((xx - g.disc[0]) ** 2 + (yy - g.disc[1]) ** 2)
    bundle = np.exp(-((np.abs(ang) - 1.1) ** 2) / 0.18) * np.exp(-dist / 0.5) * (dist > g.disc_r)
    if "rnfl_defect" in sc.labels:
        centre = rng.choice((-1.0, 1.0)) * rng.uniform(0.75, 1.25)
        half = rng.uniform(0.1, 0.2)
        wedge = 1.0 / (1.0 + np.exp(np.clip((np.abs(ang - centre) - half) / 0.04, -30, 30)))
        wedge = wedge * (dist > g.disc_r) * np.exp(-dist / 1.2)
        bundle = bundle * (1.0 - wedge)
        sc.img *= (1.0 - rng.uniform(0.35, 0.45) * wedge)[..., None]
    sc.img *= (1.0 + 0.14 * bundle)[..., None]


def _polar_noise(rng: np.random.Generator, theta: np.ndarray, r: np.ndarray, n_theta: int) -> np.ndarray:
    """Noise that varies fast around the fovea and slowly along the radius (bilinear, wraps in angle)."""
    small = rng.random((6, n_theta), dtype=np.float32)
    small = np.concatenate([small[:, -3:], small, small[:, :3]], axis=1)  # periodic in angle
    big = np.asarray(
        Image.fromarray(small).resize(((n_theta + 6) * 8, 48), Image.Resampling.BICUBIC), dtype=np.float32
    )
    big = np.ascontiguousarray(big[:, 24 : 24 + n_theta * 8])
    ti = (theta + math.pi) / (2 * math.pi) * (n_theta * 8 - 1)
    ri = np.clip(r / 1.6, 0, 1) * 47
    t0 = np.floor(ti).astype(np.int32)
    r0 = np.minimum(np.floor(ri).astype(np.int32), 46)
    ft, fr = ti - t0, ri - r0
    t1 = (t0 + 1) % (n_theta * 8)
    top = big[r0, t0] * (1 - ft) + big[r0, t1] * ft
    bot = big[r0 + 1, t0] * (1 - ft) + big[r0 + 1, t1] * ft
    return np.clip(top * (1 - fr) + bot * fr, 0.0, 1.0)


def _choroid(sc: Scene, strength: float) -> None:
    """Choroidal vessels seen through a thin RPE: wandering orange vessels running outward from the
    posterior pole with dark pigmented interspaces (the "tigroid" pattern when strong)."""
    rng, g = sc.rng, sc.g
    half = max(sc.d // 2, 8)  # drawn at half resolution and upsampled: the pattern is smooth
    xx, yy = _grid(half)
    theta = np.arctan2(yy - g.fovea[1], xx - g.fovea[0])
    r = np.sqrt((xx - g.fovea[0]) ** 2 + (yy - g.fovea[1]) ** 2)
    n = _polar_noise(rng, theta, r, int(rng.integers(28, 40)))
    ridge = np.clip(1.0 - np.abs(2.0 * n - 1.0) * 4.0, 0, 1) ** 1.5
    ridge *= np.clip((r - 0.08) * 4.0, 0, 1)  # the macula hides the choroid
    ridge = np.asarray(
        Image.fromarray(ridge.astype(np.float32)).resize((sc.d, sc.d), Image.Resampling.BILINEAR)
    )
    dark = (1.0 - ridge) * strength
    sc.img *= (1.0 - dark)[..., None]
    blend_mask(sc.img, ridge, (0.92, 0.45, 0.22), strength * 0.6)


def _disc(sc: Scene) -> None:
    g, labels = sc.g, sc.labels
    cx, cy = g.disc
    rx, ry = g.disc_r, g.disc_r * 1.08
    if "pathological_myopia" in labels:
        rx *= 0.8  # tilted myopic disc
    if "optic_disc_edema" in labels:
        rx, ry = rx * 1.35, ry * 1.35
        stamp(sc.img, cx, cy, rx * 1.3, ry * 1.3, (0.90, 0.48, 0.30), 0.6, sharp=2.5)
        stamp(sc.img, cx, cy, rx, ry, (0.96, 0.62, 0.40), 0.9, sharp=3.0)
        return  # no cup visible, margin blurred later
    if "optic_atrophy" in labels:
        stamp(sc.img, cx, cy, rx, ry, (0.98, 0.95, 0.88), 0.97, sharp=14)
        stamp(sc.img, cx, cy, rx * 0.5, ry * 0.5, (1.0, 0.98, 0.95), 0.6, sharp=6)
        return
    stamp(sc.img, cx, cy, rx * 1.08, ry * 1.08, (0.55, 0.24, 0.12), 0.35, sharp=12)  # pigment margin
    stamp(sc.img, cx, cy, rx, ry, (0.96, 0.56, 0.38), 0.95, sharp=10)
    # Neuroretinal rim is pinker toward the nasal side; the cup is pale and slightly temporal.
    cr = g.cup_ratio
    ccx = cx - g.side * rx * (0.12 if cr < 0.6 else 0.05)
    stamp(
        sc.img,
        ccx,
        cy,
        rx * cr * 0.95,
        ry * cr * (1.12 if cr > 0.6 else 1.0),
        (1.0, 0.9, 0.72),
        0.95,
        sharp=7 if cr > 0.6 else 5,
    )


def _vessels(sc: Scene) -> None:
    d = sc.d
    veins = _draw_trees(d, sc.g.veins, sc.vein_scale)
    arteries = _draw_trees(d, sc.g.arteries, sc.artery_scale)
    if "optic_disc_edema" in sc.labels:  # vessels vanish into the swollen margin
        dist = np.sqrt((sc.xx - sc.g.disc[0]) ** 2 + (sc.yy - sc.g.disc[1]) ** 2)
        obscured = 1.0 - 0.75 * np.exp(-((dist - sc.g.disc_r * 1.3) ** 2) / (2 * (sc.g.disc_r * 0.35) ** 2))
        veins *= obscured
        arteries *= obscured
    blend_mask(sc.img, veins, (0.40, 0.06, 0.05), 0.85)
    blend_mask(sc.img, arteries, (0.66, 0.16, 0.10), 0.72)


# ---------------------------------------------------------------------------------------------- lesions


def _rand_in_disc(rng: np.random.Generator, centre: tuple[float, float], r_min: float, r_max: float):
    a = rng.uniform(0, 2 * math.pi)
    r = math.sqrt(rng.uniform(r_min**2, r_max**2))
    return centre[0] + r * math.cos(a), centre[1] + r * math.sin(a)


def _away_from_disc(g: Geometry, p: tuple[float, float], margin: float = 1.3) -> bool:
    return (p[0] - g.disc[0]) ** 2 + (p[1] - g.disc[1]) ** 2 > (g.disc_r * margin) ** 2 and (
        p[0] ** 2 + p[1] ** 2 < 0.88
    )


def _scatter(sc: Scene, n: int, centre, r_min, r_max):
    pts = []
    tries = 0
    while len(pts) < n and tries < n * 6:
        tries += 1
        p = _rand_in_disc(sc.rng, centre, r_min, r_max)
        if _away_from_disc(sc.g, p):
            pts.append(p)
    return pts


def _dr(sc: Scene) -> None:
    rng, g = sc.rng, sc.g
    severity = rng.uniform(0.3, 1.0)
    for p in _scatter(sc, int(rng.integers(6, 30) * severity) + 4, g.fovea, 0.05, 0.75):
        stamp(sc.img, *p, rng.uniform(0.009, 0.015), None, (0.50, 0.05, 0.05), 0.95, sharp=10)
    for p in _scatter(sc, int(rng.integers(2, 12) * severity) + 2, g.fovea, 0.1, 0.8):
        r = rng.uniform(0.02, 0.042)
        stamp(
            sc.img,
            *p,
            r,
            r * rng.uniform(0.7, 1.0),
            (0.52, 0.07, 0.05),
            0.9,
            sharp=6,
            angle=rng.uniform(0, 3),
        )
        stamp(sc.img, p[0] + r * 0.6, p[1] - r * 0.3, r * 0.6, None, (0.50, 0.06, 0.05), 0.85, sharp=6)
    if rng.random() < 0.7:
        for _ in range(int(rng.integers(1, 4))):
            c = _rand_in_disc(rng, g.fovea, 0.12, 0.5)
            for p in _scatter(sc, int(rng.integers(3, 9)), c, 0.0, 0.06):
                stamp(sc.img, *p, rng.uniform(0.008, 0.017), None, (0.97, 0.88, 0.45), 0.95, sharp=9)


def _macular_edema(sc: Scene) -> None:
    rng, g = sc.rng, sc.g
    stamp(sc.img, *g.fovea, rng.uniform(0.12, 0.18), None, (0.90, 0.62, 0.30), 0.35, sharp=3)
    radius = rng.uniform(0.12, 0.2)
    start, span = rng.uniform(0, 2 * math.pi), rng.uniform(1.6 * math.pi, 2 * math.pi)
    for _ in range(int(rng.integers(14, 28))):
        a = start + rng.uniform(0, span)
        r = radius * rng.uniform(0.85, 1.15)
        stamp(
            sc.img,
            g.fovea[0] + r * math.cos(a),
            g.fovea[1] + r * math.sin(a),
            rng.uniform(0.01, 0.02),
            None,
            (0.98, 0.90, 0.48),
            0.95,
            sharp=9,
        )


def _amd(sc: Scene) -> None:
    rng, g = sc.rng, sc.g
    for p in _scatter(sc, int(rng.integers(10, 35)), g.fovea, 0.0, 0.3):
        stamp(sc.img, *p, rng.uniform(0.014, 0.034), None, (0.93, 0.80, 0.42), 0.85, sharp=4.5)
    for p in _scatter(sc, int(rng.integers(0, 5)), g.fovea, 0.0, 0.15):
        stamp(sc.img, *p, rng.uniform(0.01, 0.02), None, (0.22, 0.12, 0.06), 0.8, sharp=6)
    if rng.random() < 0.25:  # geographic atrophy
        stamp(sc.img, *g.fovea, rng.uniform(0.06, 0.11), None, (0.92, 0.78, 0.60), 0.8, sharp=8)


def _myopia(sc: Scene) -> None:
    rng, g = sc.rng, sc.g
    dist = np.sqrt((sc.xx - g.disc[0]) ** 2 + (sc.yy - g.disc[1]) ** 2)
    ang = np.arctan2(sc.yy - g.disc[1], (sc.xx - g.disc[0]) * -g.side)  # 0 = temporal
    width = rng.uniform(0.7, 1.3) * g.disc_r
    reach = g.disc_r * 1.05 + width * np.clip(np.cos(ang), 0, 1) ** 1.5
    crescent = (1.0 / (1.0 + np.exp(np.clip((dist - reach) / 0.01, -30, 30)))) * (dist > g.disc_r * 0.85)
    blend_mask(sc.img, crescent, (0.94, 0.82, 0.62), 0.92)
    rim = np.exp(-((dist - reach) ** 2) / (2 * 0.012**2)) * (np.cos(ang) > 0.2)
    blend_mask(sc.img, rim, (0.30, 0.15, 0.08), 0.6)
    for p in _scatter(sc, int(rng.integers(1, 4)), g.fovea, 0.08, 0.4):
        r = rng.uniform(0.04, 0.10)
        stamp(sc.img, *p, r * 1.1, r, (0.28, 0.14, 0.08), 0.55, sharp=7, angle=rng.uniform(0, 3))
        stamp(sc.img, *p, r, r * 0.9, (0.95, 0.88, 0.74), 0.9, sharp=7, angle=rng.uniform(0, 3))


def _flame(sc: Scene, p, direction: float, size: float) -> None:
    stamp(sc.img, *p, size, size * 0.35, (0.66, 0.07, 0.04), 0.92, sharp=4.5, angle=direction)


def _rvo(sc: Scene) -> None:
    """Branch (one temporal trunk) or central (all trunks) occlusion: the affected veins dilate."""
    rng = sc.rng
    central = rng.random() < 0.3
    trunks = list(range(len(sc.g.veins))) if central else [int(rng.choice([0, 2]))]  # temporal trunks
    for t in trunks:
        sc.vein_scale[t] = 1.45


def _rao(sc: Scene) -> None:
    rng, g = sc.rng, sc.g
    whit = _gauss(sc.xx, sc.yy, g.fovea, rng.uniform(0.3, 0.42))
    whit *= 1.0 - _gauss(sc.xx, sc.yy, g.fovea, 0.05)
    blend_mask(sc.img, whit, (0.90, 0.80, 0.72), rng.uniform(0.55, 0.75))
    stamp(sc.img, *g.fovea, rng.uniform(0.035, 0.05), None, (0.78, 0.10, 0.06), 0.95, sharp=6)
    sc.artery_scale[:] = [0.55] * len(sc.artery_scale)


def _hypertensive(sc: Scene) -> None:
    rng, g = sc.rng, sc.g
    sc.artery_scale[:] = [0.6] * len(sc.artery_scale)
    for p in _scatter(sc, int(rng.integers(2, 7)), g.disc, g.disc_r * 1.5, 0.55):
        r = rng.uniform(0.025, 0.05)
        stamp(
            sc.img,
            *p,
            r,
            r * rng.uniform(0.6, 0.9),
            (0.96, 0.93, 0.86),
            0.85,
            sharp=3.5,
            angle=rng.uniform(0, 3),
        )
    for p in _scatter(sc, int(rng.integers(0, 4)), g.disc, g.disc_r * 1.5, 0.6):
        _flame(sc, p, math.atan2(p[1] - g.disc[1], p[0] - g.disc[0]) + math.pi / 2, rng.uniform(0.02, 0.035))


def _csc(sc: Scene) -> None:
    rng, g = sc.rng, sc.g
    c = (g.fovea[0] + rng.normal(0, 0.04), g.fovea[1] + rng.normal(0, 0.04))
    r = rng.uniform(0.1, 0.17)
    stamp(sc.img, *c, r * 1.03, None, (0.98, 0.85, 0.62), 0.55, sharp=30)
    stamp(sc.img, *c, r * 0.95, None, (0.72, 0.36, 0.18), 0.75, sharp=16)


def _erm(sc: Scene) -> None:
    rng, g = sc.rng, sc.g
    d = sc.d
    stamp(sc.img, *g.fovea, rng.uniform(0.18, 0.26), None, (0.97, 0.88, 0.78), 0.3, sharp=3)
    s = 2 * d
    im = Image.new("L", (s, s), 0)
    dr = ImageDraw.Draw(im)
    c0 = g.fovea
    for _ in range(int(rng.integers(7, 14))):
        a = rng.uniform(0, 2 * math.pi)
        r0, r1 = rng.uniform(0.03, 0.08), rng.uniform(0.15, 0.27)
        bend = rng.normal(0, 0.25)
        pts = []
        for t in np.linspace(0, 1, 6):
            r = r0 + (r1 - r0) * t
            aa = a + bend * t
            pts += [(c0[0] + r * math.cos(aa) + 1) * 0.5 * s, (c0[1] + r * math.sin(aa) + 1) * 0.5 * s]
        dr.line(pts, fill=255, width=max(int(0.008 * s), 1))
    m = np.asarray(im.resize((d, d), Image.Resampling.BOX), dtype=np.float32) / 255.0
    blend_mask(sc.img, m, (1.0, 0.95, 0.88), 0.5)


def _macular_hole(sc: Scene) -> None:
    rng, g = sc.rng, sc.g
    r = rng.uniform(0.03, 0.048)
    stamp(sc.img, *g.fovea, r * 1.9, None, (0.78, 0.62, 0.50), 0.45, sharp=8)
    stamp(sc.img, *g.fovea, r, None, (0.62, 0.10, 0.05), 0.97, sharp=18)
    for _ in range(int(rng.integers(2, 5))):
        p = _rand_in_disc(rng, g.fovea, 0, r * 0.6)
        stamp(sc.img, *p, r * 0.18, None, (0.95, 0.85, 0.45), 0.9, sharp=10)


def _detachment(sc: Scene) -> None:
    """A grey, translucent, billowing elevation that enters from the periphery, with folds along its edge."""
    rng = sc.rng
    a = rng.uniform(0, 2 * math.pi)
    c = (1.0 * math.cos(a), 1.0 * math.sin(a))
    radius = rng.uniform(0.45, 0.75)
    dx, dy = sc.xx - c[0], sc.yy - c[1]
    dist = np.sqrt(dx * dx + dy * dy)
    phi = np.arctan2(dy, dx)
    edge = radius * (
        1.0 + 0.07 * np.sin(3 * phi + rng.uniform(0, 6)) + 0.04 * np.sin(7 * phi + rng.uniform(0, 6))
    )
    region = 1.0 / (1.0 + np.exp(np.clip((dist - edge) / 0.015, -30, 30)))
    folds = 0.5 + 0.5 * np.sin((edge - dist) * rng.uniform(35, 55) + 2.0 * np.sin(5 * phi))
    blend_mask(sc.img, region, (0.80, 0.74, 0.70), 0.6)
    blend_mask(sc.img, region * folds, (0.98, 0.95, 0.92), 0.28)
    blend_mask(sc.img, region * (1 - folds), (0.45, 0.38, 0.38), 0.22)


def _disc_edema_blur(sc: Scene) -> None:
    g, d = sc.g, sc.d
    half = g.disc_r * 2.2
    x0, x1 = int(max(_to_px(g.disc[0] - half, d), 0)), int(min(_to_px(g.disc[0] + half, d), d))
    y0, y1 = int(max(_to_px(g.disc[1] - half, d), 0)), int(min(_to_px(g.disc[1] + half, d), d))
    if x1 - x0 < 4 or y1 - y0 < 4:
        return
    patch = sc.img[y0:y1, x0:x1].copy()
    blurred = _blur_rgb(patch, d * 0.012)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dist = np.sqrt((xx - _to_px(g.disc[0], d)) ** 2 + (yy - _to_px(g.disc[1], d)) ** 2) / (half * d * 0.5)
    w = np.clip(1.3 - dist, 0, 1)[..., None]
    sc.img[y0:y1, x0:x1] = patch * (1 - w) + blurred * w
    for p in _scatter(sc, int(sc.rng.integers(0, 4)), g.disc, g.disc_r * 1.4, g.disc_r * 2.2):
        _flame(sc, p, math.atan2(p[1] - g.disc[1], p[0] - g.disc[0]) + math.pi / 2, 0.025)


def _laser(sc: Scene) -> None:
    rng, g = sc.rng, sc.g
    spacing = rng.uniform(0.085, 0.11)
    fill = rng.uniform(0.4, 0.75)
    rot = rng.uniform(0, math.pi / 3)
    ca, sa = math.cos(rot), math.sin(rot)
    r_spot = spacing * rng.uniform(0.22, 0.3)
    n = int(2.0 / spacing) + 2
    for i in range(-n, n + 1):
        for j in range(-n, n + 1):
            u = (i + 0.5 * (j % 2)) * spacing
            v = j * spacing * 0.866
            x, y = g.fovea[0] + u * ca - v * sa, g.fovea[1] + u * sa + v * ca
            df = math.hypot(x - g.fovea[0], y - g.fovea[1])
            if df < 0.42 or x * x + y * y > 0.86 or rng.random() > fill:
                continue
            if (x - g.disc[0]) ** 2 + (y - g.disc[1]) ** 2 < (g.disc_r * 1.6) ** 2:
                continue
            x += rng.normal(0, spacing * 0.05)
            y += rng.normal(0, spacing * 0.05)
            stamp(sc.img, x, y, r_spot, None, (0.22, 0.12, 0.07), 0.85, sharp=10)
            stamp(sc.img, x, y, r_spot * 0.55, None, (0.90, 0.80, 0.60), 0.8, sharp=10)


def _media_opacity(sc: Scene) -> np.ndarray:
    rng = sc.rng
    img = _blur_rgb(sc.img, sc.d * rng.uniform(0.008, 0.016))
    veil = 0.55 + 0.45 * _gauss(sc.xx, sc.yy, (rng.normal(0, 0.15), rng.normal(0, 0.15)), 0.6)
    blend_mask(img, veil, (0.80, 0.70, 0.58), rng.uniform(0.35, 0.55))
    return img


# Order matters: deep layers first (choroid, atrophy), then disc, vessels, retinal lesions, overlays.
_BEFORE_VESSELS = (
    ("tessellated_fundus", lambda sc: _choroid(sc, strength=sc.rng.uniform(0.3, 0.42))),
    ("pathological_myopia", _myopia),
    ("retinal_artery_occlusion", _rao),
    ("laser_scars", _laser),
)
_AFTER_VESSELS = (
    ("diabetic_retinopathy", _dr),
    ("macular_edema", _macular_edema),
    ("age_related_macular_degeneration", _amd),
    ("retinal_vein_occlusion", None),  # flames drawn with the dilated vein, see render_fundus
    ("hypertensive_retinopathy", _hypertensive),
    ("central_serous_chorioretinopathy", _csc),
    ("epiretinal_membrane", _erm),
    ("macular_hole", _macular_hole),
    ("retinal_detachment", _detachment),
)

DRAWN_LABELS = frozenset(
    [k for k, _ in _BEFORE_VESSELS]
    + [k for k, _ in _AFTER_VESSELS]
    + ["glaucoma", "rnfl_defect", "optic_disc_edema", "optic_atrophy", "media_opacity", "normal"]
)


@lru_cache(maxsize=8)
def _real_background(d: int, eye: str) -> np.ndarray:
    """The CC0 scikit-image fundus (a left eye), resized to the canvas; mirrored for a right eye."""
    from skimage import data

    rgb = data.retina()
    arr = np.asarray(Image.fromarray(rgb).resize((d, d), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    if eye == "OD":
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr)


def real_geometry(rng: np.random.Generator, eye: str, cup_ratio: float) -> Geometry:
    """Anatomy of the scikit-image photograph (disc found once at x=0.174, y=0.465 of the frame)."""
    side = 1.0 if eye == "OD" else -1.0
    g = Geometry(eye=eye, fovea=(0.0, 0.02), disc=(side * 0.652, -0.07), disc_r=0.1, cup_ratio=cup_ratio)
    g.veins, g.arteries = _vessel_trees(rng, g)  # used only to place lesions along a path
    return g


def render_fundus(
    rng: np.random.Generator,
    labels: frozenset[str],
    eye: str,
    size: int,
    pigment: Color = (0.80, 0.34, 0.16),
    real_background: bool = False,
) -> np.ndarray:
    """One eye's fundus with the given findings: float32 [size, size, 3] in [0, 1], black outside the FOV.

    `labels` are ontology label ids; `normal` or an empty set draws a healthy eye. Camera effects are
    applied separately (`apply_camera`) so the same eye can be photographed by different sites.
    """
    if "glaucoma" in labels:
        cup = rng.uniform(0.68, 0.88)
    elif "optic_atrophy" in labels:
        cup = rng.uniform(0.3, 0.5)
    else:
        cup = rng.uniform(0.2, 0.45)
    g = real_geometry(rng, eye, cup) if real_background else make_geometry(rng, eye, cup)
    xx, yy = _grid(size)
    img = np.empty((size, size, 3), dtype=np.float32)
    sc = Scene(img, xx, yy, g, rng, labels, [1.0] * len(g.veins), [1.0] * len(g.arteries))
    _background(sc, pigment, _real_background(size, eye) if real_background else None)
    for name, fn in _BEFORE_VESSELS:
        if name in labels:
            fn(sc)
    if real_background:
        if labels & {"glaucoma", "optic_atrophy", "optic_disc_edema"}:
            _disc(sc)
    else:
        _disc(sc)
    if "retinal_vein_occlusion" in labels:
        _rvo(sc)  # dilates the affected veins before they are drawn; flames go on top below
    if real_background:
        dilated = [i for i, s in enumerate(sc.vein_scale) if s > 1.0]
        if dilated:
            veins = _draw_trees(size, [g.veins[i] for i in dilated], [1.6] * len(dilated))
            blend_mask(sc.img, veins, (0.40, 0.06, 0.05), 0.8)
    else:
        _vessels(sc)
    if "retinal_vein_occlusion" in labels:
        _rvo_flames(sc)
    for name, fn in _AFTER_VESSELS:
        if fn is not None and name in labels:
            fn(sc)
    if "optic_disc_edema" in labels:
        _disc_edema_blur(sc)
    out = sc.img
    if "media_opacity" in labels:
        out = _media_opacity(sc)
    return np.clip(out, 0.0, 1.0)


def _rvo_flames(sc: Scene) -> None:
    """Flame haemorrhages along the dilated veins, oriented with the vessel (they follow the nerve fibres)."""
    rng = sc.rng
    for t, s in enumerate(sc.vein_scale):
        if s <= 1.0:
            continue
        segs = sc.g.veins[t]
        central = all(v > 1.0 for v in sc.vein_scale)
        for _ in range(int(rng.integers(6, 12) if central else rng.integers(12, 24))):
            pts, _w = segs[int(rng.integers(0, len(segs)))]
            if len(pts) < 2:
                continue
            i = int(rng.integers(0, len(pts) - 1))
            dx, dy = pts[i + 1] - pts[i]
            off = rng.normal(0, 0.02)
            p = (float(pts[i][0] - off * dy / 0.035), float(pts[i][1] + off * dx / 0.035))
            _flame(sc, p, math.atan2(dy, dx), rng.uniform(0.035, 0.065))


@lru_cache(maxsize=16)
def _camera_masks(d: int, vignette: float, notch: bool) -> tuple[np.ndarray, np.ndarray]:
    """Vignetting gain and the field-of-view mask (1-pixel anti-aliased rim, optional notch) for a size."""
    xx, yy = _grid(d)
    rr2 = xx * xx + yy * yy
    vign = (1.0 - vignette * rr2**1.6).astype(np.float32)[..., None]
    edge = np.clip((1.0 - np.sqrt(rr2)) * d * 0.5, 0.0, 1.0)
    if notch:
        tab = (xx > 0.62) & (xx < 0.74) & (yy > -0.82) & (yy < -0.7)
        edge = np.where(tab, 1.0, edge)
    return vign, edge.astype(np.float32)[..., None]


def apply_camera(fundus: np.ndarray, camera: Camera, rng: np.random.Generator) -> np.ndarray:
    """Photograph a rendered fundus with a site's camera: uint8 [height, width, 3] with a black surround."""
    d = fundus.shape[0]
    vign, edge = _camera_masks(d, camera.vignette, camera.notch)
    gain = np.asarray(camera.cast, dtype=np.float32) * np.float32(
        camera.brightness * rng.uniform(0.92, 1.08) * 255.0
    )
    img = fundus * vign
    img *= gain
    if camera.noise > 0:
        img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(camera.noise * 255.0)
    np.clip(img, 0.0, 255.0, out=img)
    u8 = (img + 0.5).astype(np.uint8)
    gamma = camera.gamma * rng.uniform(0.95, 1.05)
    lut = np.clip((np.arange(256) / 255.0) ** gamma * 255.0 + 0.5, 0, 255).astype(np.uint8)
    u8 = lut[u8]
    if camera.blur > 0:
        sigma = camera.blur * d / 256.0 * rng.uniform(0.8, 1.2)
        u8 = np.asarray(Image.fromarray(u8).filter(ImageFilter.GaussianBlur(sigma)))
    u8 = (u8 * edge + 0.5).astype(np.uint8)
    out = np.zeros((camera.height, camera.width, 3), dtype=np.uint8)
    y0, x0 = (camera.height - d) // 2, (camera.width - d) // 2
    out[y0 : y0 + d, x0 : x0 + d] = u8
    return out


def fov_diameter(camera: Camera) -> int:
    return int(round(min(camera.width, camera.height) * camera.fov_fraction))
