"""Embedded default data set: deterministic axial chest-CT-like slices with reports whose facts equal what is drawn.

Orientation follows the radiological convention: the viewer looks up from the patient's feet, so the PATIENT'S RIGHT
IS ON THE IMAGE LEFT, anterior is up and posterior (the dependent side of a supine patient) is down. Findings store
and reports name the patient's side; `_SIDE_SIGN` maps it to image x.

The slice level encodes the zone, readable from anatomy: upper = smaller lungs, trachea, scapulae and no heart;
middle = heart and descending aorta; lower = liver dome in the right lung base and a gastric air bubble on the left.
Intensities imitate a lung window in uint8: air 0, lung ~38, ground glass ~118 (a distinct haze level),
vessels ~172, fibrous stripes and fluid ~185, soft tissue ~195-215 (consolidation sits at soft-tissue
brightness), bone ~250.
Every study's pixels are a pure function of (level, findings, size, seed, scanner), so the manifest row describes
its image completely (tests re-render rows and compare bytes).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from medvlm.config import Config
from medvlm.data.phantom_report import write_report
from medvlm.errors import ConfigError

FINDING_TYPES = ("ground_glass", "consolidation", "crazy_paving", "nodule", "effusion", "fibrosis")
INFECTION_TYPES = ("ground_glass", "consolidation", "crazy_paving")  # pneumonia = any of these
LABELS = ("pneumonia",) + FINDING_TYPES
SIDES, ZONES = ("right", "left", "bilateral"), ("upper", "middle", "lower")
DISTRIBUTIONS, EXTENTS = ("peripheral", "subpleural", "central"), ("small", "patchy", "extensive")
EFFUSION_DISTRIBUTION = "dependent"  # effusions always lie posteriorly (supine patient)
_SIDE_SIGN = {"right": -1.0, "left": 1.0}  # image x of the patient's side (radiological convention)

# Lung-window palette (uint8 grey levels).
AIR, LUNG, FAT, MUSCLE, HEART, BONE, MARROW, CANAL = 0.0, 38.0, 165.0, 195.0, 212.0, 250.0, 222.0, 120.0
VESSEL, GGO, CRAZY_HAZE, CRAZY_GRID, CONSOLIDATION, BRONCHOGRAM = 172.0, 118.0, 112.0, 165.0, 208.0, 55.0
NODULE, FIBROUS, EFFUSION = 218.0, 185.0, 185.0
NOISE_STD = 4.0  # grey levels of scanner noise before the scanner's noise scale
PNG_COMPRESS_LEVEL = 3  # zlib level: ~4x faster than Pillow's default 6 for ~10% larger files

# Sampling of abnormal studies: how many findings, which types, sides, extents; distributions per type.
_N_FINDINGS_P = (0.55, 0.32, 0.13)
_TYPE_P = dict(ground_glass=0.26, consolidation=0.16, crazy_paving=0.12, nodule=0.18, effusion=0.12, fibrosis=0.16)
_SIDE_P, _EXTENT_P = (0.35, 0.30, 0.35), (0.35, 0.40, 0.25)
_DISTRIBUTION_P = dict(ground_glass=(0.35, 0.45, 0.20), consolidation=(0.40, 0.35, 0.25),
                       crazy_paving=(0.40, 0.40, 0.20),
                       nodule=(0.34, 0.33, 0.33), fibrosis=(0.35, 0.50, 0.15))
# Lesion blobs per lung side by extent: (count low, count high, radius low, radius high) in half-image units.
_BLOBS = dict(small=(1, 1, 0.06, 0.08), patchy=(2, 4, 0.08, 0.12), extensive=(5, 8, 0.13, 0.20))
_NODULES = dict(small=(1, 1), patchy=(2, 3), extensive=(4, 7))
_STRIPES = dict(small=(2, 3), patchy=(4, 5), extensive=(6, 9))
_EFFUSION_DEPTH = dict(small=0.25, patchy=0.40, extensive=0.60)  # share of the lung's depth replaced by fluid

# Geometry per slice level (half-image units, x to the image right, y down = posterior).
_LEVELS = {
    "upper": dict(body=(0.02, 0.80, 0.58), lung=(0.36, -0.02, 0.25, 0.40), heart=None, trachea=True,
                  liver=None, stomach=None, scapula=True, aorta=(0.10, 0.18, 0.06)),
    "middle": dict(body=(0.03, 0.90, 0.64), lung=(0.40, 0.0, 0.32, 0.50), heart=(0.10, -0.14, 0.30, 0.24, -0.5),
                   trachea=False, liver=None, stomach=None, scapula=False, aorta=(0.13, 0.24, 0.07)),
    "lower": dict(body=(0.05, 0.92, 0.66), lung=(0.41, 0.06, 0.31, 0.46), heart=(0.14, -0.24, 0.22, 0.15, -0.4),
                  trachea=False, liver=(-0.30, -0.10, 0.29, 0.34), stomach=(0.30, -0.34, 0.12, 0.08),
                  scapula=False, aorta=(0.11, 0.26, 0.065)),
}


@dataclass(frozen=True)
class Scanner:
    """Acquisition differences between batches: brightness shift (share of 255) and noise multiplier."""

    intensity_shift: float = 0.0
    noise_scale: float = 1.0


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    axis = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0)
    return np.meshgrid(axis, axis)  # X (columns), Y (rows)


def _rho(X, Y, cx, cy, ax, ay, angle=0.0, lobes=None):
    """Normalised elliptic radius (<1 inside); `lobes` = (amplitudes, phases) bends the outline (lobulation)."""
    dx, dy = X - np.float32(cx), Y - np.float32(cy)
    if angle:
        c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    u, v = dx / np.float32(ax), dy / np.float32(ay)
    rho = np.sqrt(u * u + v * v)
    if lobes is not None:
        # sum a_k sin(k*theta + p_k), k = 2..4, from cos/sin of theta by the angle-addition recurrence
        # (float32 products only: no arctan2 or sin per pixel)
        safe = np.maximum(rho, np.float32(1e-6))
        c1, s1 = u / safe, v / safe
        ck, sk = c1 * c1 - s1 * s1, 2 * c1 * s1
        bend = np.zeros_like(rho)
        for a, p in zip(*lobes):
            bend += np.float32(a * np.cos(p)) * sk + np.float32(a * np.sin(p)) * ck
            ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
        rho = rho / (1 + bend)
    return rho


def _window(size, cx, cy, half):
    """Row/column slices of the image square around (cx, cy) +- half: small shapes are computed only there."""
    lo = lambda c: max(int((c - half + 1) * 0.5 * size), 0)  # noqa: E731
    hi = lambda c: min(int((c + half + 1) * 0.5 * size) + 2, size)  # noqa: E731
    return slice(lo(cy), hi(cy)), slice(lo(cx), hi(cx))


def _lobes(rng, strength):
    return rng.uniform(0, strength, 3), rng.uniform(0, 2 * np.pi, 3)


def _rasterize(size, points, weights):
    """Accumulate weighted points (half-image units) into an image: cheap vectorised line/dot drawing."""
    acc = np.zeros((size, size), np.float32)
    ij = np.clip(((points + 1.0) * 0.5 * size).astype(int), 0, size - 1)
    np.maximum.at(acc, (ij[:, 1], ij[:, 0]), weights.astype(np.float32))
    return acc


def _segments(starts, ends, rng, size, bend=0.15):
    """Points along gently curved segments (all at once), dense enough to leave no pixel gaps.
    Returns the points and each point's position t in [0, 1] along its segment."""
    starts, ends = np.asarray(starts, np.float32).reshape(-1, 2), np.asarray(ends, np.float32).reshape(-1, 2)
    delta = ends - starts
    counts = np.maximum((np.hypot(delta[:, 0], delta[:, 1]) * size).astype(int), 2)
    seg = np.repeat(np.arange(len(starts)), counts)
    t = (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)) / np.repeat(counts - 1, counts)
    t = t.astype(np.float32)[:, None]
    normal = np.stack([-delta[:, 1], delta[:, 0]], 1) * rng.uniform(-bend, bend, (len(starts), 1)).astype(np.float32)
    return starts[seg] + t * delta[seg] + np.sin(np.pi * t) * normal[seg], t[:, 0]


def _smooth_noise(rng, size, std, cell=8):
    """Low-frequency noise (parenchymal texture, uneven lesion density): a coarse grid of random values,
    bilinearly enlarged, which is far cheaper than blurring full-size white noise."""
    coarse = rng.standard_normal((size // cell + 1, size // cell + 1), np.float32)
    fine = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR))
    return fine * np.float32(std / max(float(fine.std()), 1e-6))


def _shape(size, cx, cy, ax, ay, angle=0.0, reach=1.4):
    """An ellipse's window and normalised radius there: small organs cost only their bounding box."""
    X, Y = _grid(size)
    win = _window(size, cx, cy, max(ax, ay) * reach)
    return win, _rho(X[win], Y[win], cx, cy, ax, ay, angle)


def _paint(img, shape, value, below=1.0, extra=None):
    win, rho = shape
    mask = rho < below if extra is None else (rho < below) & extra[win]
    img[win][mask] = value


def _carve(carve, shape, below):
    win, rho = shape
    carve[win] |= rho < below


def _anatomy(level, rng, size):
    """Draw the normal slice; return the canvas and per-side lung geometry for placing findings."""
    X, Y = _grid(size)
    g = _LEVELS[level]
    by, bax, bay = g["body"]
    by, bax, bay = by + rng.uniform(-0.02, 0.02), bax * rng.uniform(0.95, 1.03), bay * rng.uniform(0.95, 1.03)
    img = np.full((size, size), AIR, np.float32)
    # CT couch under the patient: a thin bright arc, one pixel row per column.
    cols = np.arange(size)
    rows = ((by + bay + 0.06 + 0.2 * X[0] ** 2 + 1) * 0.5 * size).astype(int)
    ok = rows < size - 1
    img[rows[ok], cols[ok]] = img[rows[ok] + 1, cols[ok]] = MUSCLE
    body = _rho(X, Y, 0, by, bax, bay)
    img[body < 1] = FAT  # subcutaneous fat ring remains between skin and muscle
    img[body < 0.92] = MUSCLE
    cavity = body < 0.85
    rib_ring = (body >= 0.85) & (body < 0.9) & (np.cos(11 * np.arctan2(Y - by, X) + rng.uniform(0, 6.3)) > 0.45)
    img[rib_ring & (Y < by + 0.75 * bay)] = BONE  # ribs: periodic arcs, absent over the spine
    img[cavity] = FAT + 5  # mediastinal fat; organs and lungs are drawn into it
    _paint(img, _shape(size, 0, by - bay * 0.9, 0.09, 0.045), BONE)  # sternum
    # Spine posteriorly: vertebral body (cortex + marrow), canal, spinous and transverse processes.
    vy = by + 0.52 * bay
    vert = _shape(size, 0, vy, 0.10, 0.095, reach=1.6)
    _paint(img, vert, BONE)
    _paint(img, vert, MARROW, 0.8)
    _paint(img, _shape(size, 0, vy + 0.14, 0.045, 0.04), CANAL)
    for cx, cy, ax, ay in ((0, vy + 0.22, 0.03, 0.06), (0.11, vy + 0.12, 0.06, 0.025), (-0.11, vy + 0.12, 0.06, 0.025)):
        _paint(img, _shape(size, cx, cy, ax, ay), BONE)
    carve = (np.abs(X) < 0.17) & (Y > vy)
    _carve(carve, vert, 1.5)
    if g["scapula"]:
        for sign in (-1, 1):
            _paint(img, _shape(size, sign * 0.55, by + 0.62 * bay, 0.20, 0.035, angle=sign * 0.55), BONE)
    lx, ly, lax, lay = g["lung"]
    _carve(carve, _shape(size, 0, by + ly - 0.05, 0.11, 0.55), 1.0)  # mediastinum between the lungs
    aorta = _shape(size, g["aorta"][0], by + g["aorta"][1], g["aorta"][2], g["aorta"][2], reach=1.5)
    _paint(img, aorta, HEART)
    _carve(carve, aorta, 1.35)
    if g["trachea"]:
        trachea = _shape(size, 0, by - 0.12, 0.075, 0.07)
        _paint(img, trachea, MUSCLE, 1.25)
        _paint(img, trachea, AIR + 10)
    if g["heart"] is not None:
        hx, hy, hax, hay, hang = g["heart"]
        heart = _shape(size, hx, by + hy, hax * rng.uniform(0.95, 1.05), hay, angle=hang, reach=1.2)
        _paint(img, heart, FAT, 1.08)
        _paint(img, heart, HEART)
        _carve(carve, heart, 1.12)
    if g["liver"] is not None:
        liver = _rho(X, Y, g["liver"][0], by + g["liver"][1], *g["liver"][2:], lobes=_lobes(rng, 0.03))
        img[liver < 1] = MUSCLE + 5
        carve |= liver < 1.06
    if g["stomach"] is not None:
        sx, sy, sax, say = g["stomach"]
        stomach = _shape(size, sx, by + sy, sax, say, reach=1.5)
        _paint(img, stomach, MUSCLE, 1.25)
        _paint(img, stomach, AIR + 5, extra=Y < by + sy + 0.02)  # gas above the fluid level
        _carve(carve, stomach, 1.35)
    carve |= ~cavity
    lungs, texture = {}, _smooth_noise(rng, size, 5.0)
    for side, sign in _SIDE_SIGN.items():
        cx, cy = sign * lx + rng.uniform(-0.015, 0.015), by + ly + rng.uniform(-0.015, 0.015)
        ax, ay = lax * rng.uniform(0.95, 1.04), lay * rng.uniform(0.95, 1.04)
        win = _window(size, cx, cy, max(ax, ay) * 1.15)
        rho = np.full((size, size), 9.0, np.float32)  # far outside the lung beyond its window
        rho[win] = _rho(X[win], Y[win], cx, cy, ax, ay, lobes=_lobes(rng, 0.035))
        mask = (rho < 1) & ~carve
        img[mask] = LUNG + texture[mask]
        lateral = sign * (X - cx) / ax  # >0 towards the chest wall, <0 towards the hilum
        lungs[side] = dict(mask=mask, rho=rho, lateral=lateral, cx=cx, cy=cy, ax=ax, ay=ay,
                           posterior=np.clip((Y - cy) / ay / np.maximum(rho, 1e-3), -1, 1))
    _draw_vessels(img, lungs, rng, size)
    return img, lungs


def _rotate(vec, turn):
    c, s = np.cos(turn), np.sin(turn)
    return np.array([c * vec[0] - s * vec[1], s * vec[0] + c * vec[1]], np.float32)


def _draw_vessels(img, lungs, rng, size):
    """Vessel trees from each hilum: short trunks that split twice, tapering and fading out before the pleura
    (real vessels do), plus vessels cut in cross-section (dots). Lines stay <= ~2 px wide so that a morphological
    opening can tell them from nodules and consolidation (see tests)."""
    starts, ends, w0, w1, dots, dot_w = [], [], [], [], [], []

    def branch(start, end, a, b):
        starts.append(start)
        ends.append(end)
        w0.append(a)
        w1.append(b)

    for side, lung in lungs.items():
        sign, ax, ay = _SIDE_SIGN[side], lung["ax"], lung["ay"]
        hilum = np.array([lung["cx"] - sign * 0.55 * ax, lung["cy"] - 0.05], np.float32)
        for ang in rng.uniform(-np.pi * 0.8, np.pi * 0.8, int(rng.integers(5, 8))):
            direction = np.array([sign * np.cos(ang) * ax, np.sin(ang) * ay], np.float32)
            fork = hilum + direction * rng.uniform(0.35, 0.5)
            branch(hilum, fork, 1.0, 0.8)
            for _ in range(int(rng.integers(2, 4))):
                child = fork + _rotate(direction, rng.normal(0, 0.45)) * rng.uniform(0.3, 0.55)
                branch(fork, child, 0.75, 0.5)
                for _ in range(2):
                    branch(child, child + (child - fork) * rng.uniform(0.3, 0.6) + rng.normal(0, 0.03, 2), 0.5, 0.25)
        n_dots = int(rng.integers(18, 30))
        dots.append(np.stack([lung["cx"] + rng.uniform(-0.75, 0.75, n_dots) * ax,
                              lung["cy"] + rng.uniform(-0.75, 0.75, n_dots) * ay], 1))
        dot_w.append(rng.uniform(0.4, 0.9, n_dots))
    pts, t = _segments(starts, ends, rng, size)
    counts = np.maximum((np.hypot(*(np.array(ends) - np.array(starts)).T) * size).astype(int), 2)
    weights = np.repeat(w0, counts) + (np.repeat(w1, counts) - np.repeat(w0, counts)) * t
    acc = _rasterize(size, np.concatenate([pts, *dots]), np.concatenate([weights, *dot_w]))
    vessel = np.clip(ndimage.gaussian_filter(acc, 0.55 * size / 256) * 1.8, 0, 1)
    for lung in lungs.values():
        m = lung["mask"] & (lung["rho"] < 0.88)
        img[m] += vessel[m] * (VESSEL - img[m])


def _blob_field(X, Y, centres, radii, rng):
    """Max over lobulated blobs of (1 - rho): 1 at a centre, 0 at the blob edge (computed in each blob's window)."""
    field = np.zeros_like(X)
    for (cx, cy), r in zip(centres, radii):
        win = _window(X.shape[0], cx, cy, r * 1.6)
        rho = _rho(X[win], Y[win], cx, cy, r * rng.uniform(0.8, 1.2), r * rng.uniform(0.8, 1.2), rng.uniform(0, np.pi),
                   lobes=_lobes(rng, 0.12))
        np.maximum(field[win], 1.0 - rho, out=field[win])
    return field


def _region(lung, distribution, free):
    rho, lateral = lung["rho"], lung["lateral"]
    zone = {"subpleural": rho > 0.72, "peripheral": (rho > 0.45) & (lateral > -0.1),
            "central": (rho < 0.55) & (lateral < 0.2)}[distribution]
    return free & zone


def _sample_centres(region, fallback, n, rng, size):
    pool = np.flatnonzero(region)
    if pool.size == 0:  # the level leaves no lung there (e.g. liver dome): keep the finding visible elsewhere
        pool = np.flatnonzero(fallback)
    idx = rng.choice(pool, n)
    X, Y = _grid(size)
    return np.stack([X.flat[idx], Y.flat[idx]], 1)


def _side_list(side):
    return ["right", "left"] if side == "bilateral" else [side]


def _draw_finding(img, f, lungs, free, occupied, rng, size):
    """Draw one finding into `img` (in place); returns its mask so later findings avoid covering it."""
    X, Y = _grid(size)
    drawn = np.zeros((size, size), bool)
    for side in _side_list(f["side"]):
        lung = lungs[side]
        avail = lung["mask"] & free
        if f["type"] == "effusion":
            depth = _EFFUSION_DEPTH[f["extent"]]
            post = np.clip(lung["posterior"], 0, 1) ** 1.5
            alpha = np.clip((lung["rho"] - (1.0 - depth * post)) / 0.03, 0, 1) * (lung["posterior"] > 0) * lung["mask"]
            img += alpha * (EFFUSION - img)
            drawn |= alpha > 0.5
            continue
        region = _region(lung, f["distribution"], avail)
        region_open = region & ~occupied
        region = region_open if region_open.any() else region
        if f["type"] == "nodule":
            n = int(rng.integers(_NODULES[f["extent"]][0], _NODULES[f["extent"]][1] + 1))
            centres = _sample_centres(region, avail, n, rng, size)
            field = np.zeros_like(X)
            for cx, cy in centres:
                r, win = rng.uniform(0.035, 0.06), _window(size, cx, cy, 0.07)
                np.maximum(field[win], 1.0 - _rho(X[win], Y[win], cx, cy, r, r), out=field[win])
            alpha = np.clip(field / 0.12, 0, 1) * avail
            img += alpha * np.clip(NODULE - img, 0, None)
        elif f["type"] == "fibrosis":
            n = int(rng.integers(_STRIPES[f["extent"]][0], _STRIPES[f["extent"]][1] + 1))
            starts = _sample_centres(region, avail, n, rng, size)
            # stripes run roughly parallel to the pleura, centred on their sampled point, so they stay in the lung
            radial = np.arctan2(starts[:, 1] - lung["cy"], starts[:, 0] - lung["cx"])
            ang = radial + np.pi / 2 + rng.uniform(-0.5, 0.5, n)
            half = np.stack([np.cos(ang), np.sin(ang)], 1) * rng.uniform(0.06, 0.12, (n, 1))
            starts, ends = starts - half, starts + half
            pts = _segments(starts, ends, rng, size * 2, bend=0.08)[0]
            acc = _rasterize(size, pts, np.ones(len(pts)))
            acc = np.maximum(acc, _rasterize(size, pts + 1.0 / size, np.ones(len(pts))))  # 2 px wide
            line = np.clip(ndimage.gaussian_filter(acc, 0.5 * size / 256) * 1.6, 0, 1) * avail
            halo = np.clip(ndimage.gaussian_filter(acc, 2.0 * size / 256) * 3.0, 0, 1) * avail
            img += halo * np.clip(GGO - 30 - img, 0, None)
            img += line * np.clip(FIBROUS - img, 0, None)
            alpha = line
        else:
            lo, hi, rlo, rhi = _BLOBS[f["extent"]]
            n = int(rng.integers(lo, hi + 1))
            centres = _sample_centres(region, avail, n, rng, size)
            field = _blob_field(X, Y, centres, rng.uniform(rlo, rhi, n), rng)
            keep = _region(lung, f["distribution"], avail) | (field > 0.5)  # lesions hug their distribution
            mottle = 0.85 + 0.15 * np.clip(_smooth_noise(rng, size, 1.0, cell=4), -1, 1)  # uneven density
            if f["type"] == "consolidation":
                alpha = np.clip(field / 0.15, 0, 1) * keep * avail
                img += alpha * (CONSOLIDATION - img)
                # one air-filled bronchus per blob, running away from the hilum, with a twig
                a = np.arctan2(centres[:, 1] - lung["cy"], centres[:, 0] - lung["cx"]) + rng.uniform(-0.4, 0.4, n)
                twig = a + rng.choice([-0.6, 0.6], n)
                starts = np.concatenate([centres - np.stack([np.cos(a), np.sin(a)], 1) * rlo * 0.5, centres])
                ends = np.concatenate([centres + np.stack([np.cos(a), np.sin(a)], 1) * rlo,
                                       centres + np.stack([np.cos(twig), np.sin(twig)], 1) * rlo * 0.7])
                bronchi = _segments(starts, ends, rng, size)[0]
                acc = ndimage.gaussian_filter(_rasterize(size, bronchi, np.ones(len(bronchi))), 0.5 * size / 256)
                air = np.clip(acc * 1.8, 0, 1) * (alpha > 0.7)
                img += air * (BRONCHOGRAM - img)
            else:
                haze = GGO if f["type"] == "ground_glass" else CRAZY_HAZE
                alpha = np.clip(field / 0.35, 0, 1) * keep * avail * mottle
                img += alpha * np.clip(haze - img, 0, None)
                if f["type"] == "crazy_paving":
                    cell, tilt = 0.05 * rng.uniform(0.9, 1.15), rng.uniform(0, np.pi)
                    u = (X * np.cos(tilt) + Y * np.sin(tilt)) / cell + 0.25 * np.sin(Y * 9 + tilt)
                    v = (-X * np.sin(tilt) + Y * np.cos(tilt)) / cell + 0.25 * np.sin(X * 9 + tilt)
                    grid = (np.abs(u - np.round(u)) < 0.11) | (np.abs(v - np.round(v)) < 0.11)
                    img += (alpha > 0.5) * grid * np.clip(CRAZY_GRID - img, 0, None)
        drawn |= alpha > 0.3
    return drawn


def render_slice(level: str, findings: list[dict], size: int, seed: list[int], scanner: Scanner = Scanner(),
                 return_lungs: bool = False):
    """Pixels of one study (uint8, size x size). Anatomy, lesions and noise use separate seed streams, so the same
    seed with and without a finding differs only where the finding is drawn."""
    anatomy_rng, lesion_rng, noise_rng = (np.random.default_rng([*seed, k]) for k in range(3))
    img, lungs = _anatomy(level, anatomy_rng, size)
    # Effusion first: it takes the dependent lung, and lung lesions are then placed in what remains.
    order = sorted(findings, key=lambda f: (f["type"] != "effusion", FINDING_TYPES.index(f["type"])))
    free = np.ones((size, size), bool)
    occupied = np.zeros((size, size), bool)
    for f in order:
        drawn = _draw_finding(img, f, lungs, free, occupied, lesion_rng, size)
        if f["type"] == "effusion":
            free &= ~drawn
        else:
            occupied |= drawn
    img = ndimage.gaussian_filter(img, 0.6 * size / 256)  # scanner point-spread: soft edges
    noise = ndimage.gaussian_filter(noise_rng.standard_normal((size, size), np.float32), 0.6)
    img += noise * (NOISE_STD * scanner.noise_scale / float(noise.std()))
    gain, offset = noise_rng.normal(1.0, 0.03), noise_rng.normal(0.0, 3.0)  # per-study window jitter
    img = img * gain + offset + scanner.intensity_shift * 255.0
    out = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return (out, {s: l["mask"] for s, l in lungs.items()}) if return_lungs else out


def sample_study(rng: np.random.Generator, normal: bool) -> tuple[str, list[dict]]:
    """Slice level and structured findings of one study (zone = level for every finding)."""
    level = ZONES[int(rng.integers(3))]
    if normal:
        return level, []
    types = [t for t in FINDING_TYPES if not (t == "effusion" and level == "upper")]  # effusions are basal/dependent
    p = np.array([_TYPE_P[t] for t in types])
    n = int(rng.choice(3, p=_N_FINDINGS_P)) + 1
    chosen = rng.choice(types, size=n, replace=False, p=p / p.sum())
    findings = []
    for t in sorted(chosen, key=FINDING_TYPES.index):
        dist = EFFUSION_DISTRIBUTION if t == "effusion" else DISTRIBUTIONS[int(rng.choice(3, p=_DISTRIBUTION_P[t]))]
        findings.append(dict(type=str(t), side=SIDES[int(rng.choice(3, p=_SIDE_P))], zone=level,
                             distribution=dist, extent=EXTENTS[int(rng.choice(3, p=_EXTENT_P))]))
    return level, findings


# Indications a requesting clinician might write, by the finding that explains them; a normal study gets a
# screening / rule-out one. INDICATION_NOISE of the studies get one drawn from any finding's list (clinical
# suspicion is not always right), so an indication is a clue, not the answer.
INDICATIONS = {
    "infection": ["fever, cough for {d} days", "fever and productive cough for {d} days",
                  "suspected pneumonia, SpO2 {s}%", "cough and fever, CRP raised"],
    "nodule": ["incidental nodule on prior imaging, follow-up", "smoker, {y} pack-years, screening",
               "weight loss, history of smoking"],
    "effusion": ["dyspnoea, reduced breath sounds at the base", "heart failure, increasing dyspnoea",
                 "pleuritic chest pain and dyspnoea"],
    "fibrosis": ["progressive exertional dyspnoea for {m} months", "dry cough, bibasal crackles",
                 "known interstitial lung disease, follow-up"],
    "normal": ["pre-operative assessment", "chest pain, rule out pathology", "routine screening",
               "trauma, rule out injury"],
}
INDICATION_NOISE = 0.2


def indication_for(findings: list[dict], rng: np.random.Generator) -> str:
    """A clinical indication that correlates with the findings (see INDICATIONS)."""
    present = {f["type"] for f in findings}
    keys = ([k for k, types in (("infection", INFECTION_TYPES), ("nodule", ("nodule",)), ("effusion", ("effusion",)),
                                ("fibrosis", ("fibrosis",))) if present & set(types)] or ["normal"])
    key = str(rng.choice(list(INDICATIONS))) if rng.random() < INDICATION_NOISE else keys[int(rng.integers(len(keys)))]
    options = INDICATIONS[key]
    text = options[int(rng.integers(len(options)))]
    return text.format(d=int(rng.integers(2, 11)), s=int(rng.integers(86, 95)), y=int(rng.integers(15, 60)),
                       m=int(rng.integers(3, 25)))


def labels_for(findings: list[dict], label_names: list[str]) -> dict[str, int]:
    present = {f["type"] for f in findings}
    full = {name: int(name in present) for name in FINDING_TYPES}
    full["pneumonia"] = int(bool(present & set(INFECTION_TYPES)))
    return {name: full[name] for name in label_names}


def _write_batch(out_dir: Path, prefix: str, n: int, normal_fraction: float, stream: int, scanner: Scanner,
                 cfg: Config) -> dict:
    s = cfg.synthesize
    images = out_dir / "images"
    if images.exists():
        shutil.rmtree(images)  # idempotent: no stale images from a larger earlier run
    images.mkdir(parents=True)
    normal = set(np.random.default_rng([s.seed, stream]).permutation(n)[: int(round(n * normal_fraction))].tolist())
    counts = dict.fromkeys(cfg.data.label_names, 0)
    rows = []
    for i in range(n):
        level, findings = sample_study(np.random.default_rng([s.seed, stream, i, 0]), i in normal)
        seed = [s.seed, stream, i, 1]
        pixels = render_slice(level, findings, s.image_size, seed, scanner)
        name = f"{prefix}_{i:05d}"
        Image.fromarray(pixels).save(images / f"{name}.png", compress_level=PNG_COMPRESS_LEVEL)
        labels = labels_for(findings, cfg.data.label_names)
        for k, v in labels.items():
            counts[k] += v
        rows.append(dict(study_id=name, image=f"images/{name}.png", images=[f"images/{name}.png"],
                         report=write_report(findings, np.random.default_rng([s.seed, stream, i, 2])),
                         labels=labels, findings=findings, slice_level=level, render_seed=seed,
                         group=name, source_row=i))
        if s.indications:  # off by default: the default data set (and every number made from it) stays the same
            rows[-1]["indication"] = indication_for(findings, np.random.default_rng([s.seed, stream, i, 3]))
    tmp = out_dir / "annotation.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out_dir / "annotation.jsonl")
    return dict(dir=str(out_dir), manifest=str(out_dir / "annotation.jsonl"), n=n,
                normal=len(normal), label_counts=counts)


def synthesize(cfg: Config) -> dict:
    """Write the phantom training set (synthesize.out_dir) and the shifted incoming batch (synthesize.incoming_dir).

    Each folder gets images/<prefix>_NNNNN.png and annotation.jsonl (generic JSONL manifest), one row per study:
    study_id, image, images, report, labels (keys = data.label_names), findings [{type, side, zone, distribution,
    extent}], slice_level, render_seed (render_slice(slice_level, findings, size, render_seed, scanner) redraws the
    image), group (= study_id), source_row; with synthesize.indications also `indication` (indication_for).
    Returns counts per label and the paths."""
    unknown = [name for name in cfg.data.label_names if name not in LABELS]
    if unknown:
        raise ConfigError(f"data.label_names: the phantom cannot draw {unknown}; it knows {list(LABELS)}")
    s = cfg.synthesize
    start = time.perf_counter()
    train = _write_batch(Path(s.out_dir), "phantom", s.n_images, s.normal_fraction, 0, Scanner(), cfg)
    incoming = _write_batch(Path(s.incoming_dir), "incoming", s.n_incoming, s.incoming_normal_fraction, 1,
                            Scanner(s.incoming_intensity_shift, s.incoming_noise_scale), cfg)
    return dict(train=train, incoming=incoming, seconds=round(time.perf_counter() - start, 2))
