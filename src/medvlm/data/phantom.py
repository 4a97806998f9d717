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

from functools import lru_cache

import numpy as np
from scipy import ndimage

from medvlm.data import phantom_shapes as ps
from medvlm.data.phantom_study import FINDING_TYPES, INFECTION_TYPES, Scanner, labels_for

_SIDE_SIGN = {"right": -1.0, "left": 1.0}  # image x of the patient's side (radiological convention)

# Lung-window palette (uint8 grey levels).
AIR, LUNG, FAT, MUSCLE, HEART, BONE, MARROW, CANAL = 0.0, 38.0, 165.0, 195.0, 212.0, 250.0, 222.0, 120.0
VESSEL, GGO, CRAZY_HAZE, CRAZY_GRID, CONSOLIDATION, BRONCHOGRAM = 172.0, 118.0, 112.0, 165.0, 208.0, 55.0
NODULE, FIBROUS, EFFUSION = 218.0, 185.0, 185.0
NOISE_STD = 4.0  # grey levels of scanner noise before the scanner's noise scale
MIN_REGION_DIFF = 8  # grey levels: a pixel belongs to a finding's drawn region when drawing it changes it by more

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


@lru_cache(maxsize=4)
def _anatomy(level, rng, size):
    """Draw the normal slice; return the canvas and per-side lung geometry for placing findings."""
    X, Y = ps.grid(size)
    g = _LEVELS[level]
    by, bax, bay = g["body"]
    by, bax, bay = by + rng.uniform(-0.02, 0.02), bax * rng.uniform(0.95, 1.03), bay * rng.uniform(0.95, 1.03)
    img = np.full((size, size), AIR, np.float32)
    # CT couch under the patient: a thin bright arc, one pixel row per column.
    cols = np.arange(size)
    rows = ((by + bay + 0.06 + 0.2 * X[0] ** 2 + 1) * 0.5 * size).astype(int)
    ok = rows < size - 1
    img[rows[ok], cols[ok]] = img[rows[ok] + 1, cols[ok]] = MUSCLE
    body = ps.rho(X, Y, 0, by, bax, bay)
    img[body < 1] = FAT  # subcutaneous fat ring remains between skin and muscle
    img[body < 0.92] = MUSCLE
    cavity = body < 0.85
    rib_ring = (body >= 0.85) & (body < 0.9) & (np.cos(11 * np.arctan2(Y - by, X) + rng.uniform(0, 6.3)) > 0.45)
    img[rib_ring & (Y < by + 0.75 * bay)] = BONE  # ribs: periodic arcs, absent over the spine
    img[cavity] = FAT + 5  # mediastinal fat; organs and lungs are drawn into it
    ps.paint(img, ps.shape(size, 0, by - bay * 0.9, 0.09, 0.045), BONE)  # sternum
    # Spine posteriorly: vertebral body (cortex + marrow), canal, spinous and transverse processes.
    vy = by + 0.52 * bay
    vert = ps.shape(size, 0, vy, 0.10, 0.095, reach=1.6)
    ps.paint(img, vert, BONE)
    ps.paint(img, vert, MARROW, 0.8)
    ps.paint(img, ps.shape(size, 0, vy + 0.14, 0.045, 0.04), CANAL)
    for cx, cy, ax, ay in ((0, vy + 0.22, 0.03, 0.06), (0.11, vy + 0.12, 0.06, 0.025), (-0.11, vy + 0.12, 0.06, 0.025)):
        ps.paint(img, ps.shape(size, cx, cy, ax, ay), BONE)
    carve = (np.abs(X) < 0.17) & (Y > vy)
    ps.carve(carve, vert, 1.5)
    if g["scapula"]:
        for sign in (-1, 1):
            ps.paint(img, ps.shape(size, sign * 0.55, by + 0.62 * bay, 0.20, 0.035, angle=sign * 0.55), BONE)
    lx, ly, lax, lay = g["lung"]
    ps.carve(carve, ps.shape(size, 0, by + ly - 0.05, 0.11, 0.55), 1.0)  # mediastinum between the lungs
    aorta = ps.shape(size, g["aorta"][0], by + g["aorta"][1], g["aorta"][2], g["aorta"][2], reach=1.5)
    ps.paint(img, aorta, HEART)
    ps.carve(carve, aorta, 1.35)
    if g["trachea"]:
        trachea = ps.shape(size, 0, by - 0.12, 0.075, 0.07)
        ps.paint(img, trachea, MUSCLE, 1.25)
        ps.paint(img, trachea, AIR + 10)
    if g["heart"] is not None:
        hx, hy, hax, hay, hang = g["heart"]
        heart = ps.shape(size, hx, by + hy, hax * rng.uniform(0.95, 1.05), hay, angle=hang, reach=1.2)
        ps.paint(img, heart, FAT, 1.08)
        ps.paint(img, heart, HEART)
        ps.carve(carve, heart, 1.12)
    if g["liver"] is not None:
        liver = ps.rho(X, Y, g["liver"][0], by + g["liver"][1], *g["liver"][2:], lobes=ps.lobes(rng, 0.03))
        img[liver < 1] = MUSCLE + 5
        carve |= liver < 1.06
    if g["stomach"] is not None:
        sx, sy, sax, say = g["stomach"]
        stomach = ps.shape(size, sx, by + sy, sax, say, reach=1.5)
        ps.paint(img, stomach, MUSCLE, 1.25)
        ps.paint(img, stomach, AIR + 5, extra=Y < by + sy + 0.02)  # gas above the fluid level
        ps.carve(carve, stomach, 1.35)
    carve |= ~cavity
    lungs, texture = {}, ps.smooth_noise(rng, size, 5.0)
    for side, sign in _SIDE_SIGN.items():
        cx, cy = sign * lx + rng.uniform(-0.015, 0.015), by + ly + rng.uniform(-0.015, 0.015)
        ax, ay = lax * rng.uniform(0.95, 1.04), lay * rng.uniform(0.95, 1.04)
        win = ps.window(size, cx, cy, max(ax, ay) * 1.15)
        rho = np.full((size, size), 9.0, np.float32)  # far outside the lung beyond its window
        rho[win] = ps.rho(X[win], Y[win], cx, cy, ax, ay, lobes=ps.lobes(rng, 0.035))
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
    pts, t = ps.segments(starts, ends, rng, size)
    counts = np.maximum((np.hypot(*(np.array(ends) - np.array(starts)).T) * size).astype(int), 2)
    weights = np.repeat(w0, counts) + (np.repeat(w1, counts) - np.repeat(w0, counts)) * t
    acc = ps.rasterize(size, np.concatenate([pts, *dots]), np.concatenate([weights, *dot_w]))
    vessel = np.clip(ndimage.gaussian_filter(acc, 0.55 * size / 256) * 1.8, 0, 1)
    for lung in lungs.values():
        m = lung["mask"] & (lung["rho"] < 0.88)
        img[m] += vessel[m] * (VESSEL - img[m])


def _blob_field(X, Y, centres, radii, rng):
    """Max over lobulated blobs of (1 - rho): 1 at a centre, 0 at the blob edge (computed in each blob's window)."""
    field = np.zeros_like(X)
    for (cx, cy), r in zip(centres, radii):
        win = ps.window(X.shape[0], cx, cy, r * 1.6)
        rho = ps.rho(X[win], Y[win], cx, cy, r * rng.uniform(0.8, 1.2), r * rng.uniform(0.8, 1.2), rng.uniform(0, np.pi),
                   lobes=ps.lobes(rng, 0.12))
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
    X, Y = ps.grid(size)
    return np.stack([X.flat[idx], Y.flat[idx]], 1)


def _side_list(side):
    return ["right", "left"] if side == "bilateral" else [side]


def _draw_finding(img, f, lungs, free, occupied, rng, size):
    """Draw one finding into `img` (in place); returns its mask so later findings avoid covering it."""
    X, Y = ps.grid(size)
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
                r, win = rng.uniform(0.035, 0.06), ps.window(size, cx, cy, 0.07)
                np.maximum(field[win], 1.0 - ps.rho(X[win], Y[win], cx, cy, r, r), out=field[win])
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
            pts = ps.segments(starts, ends, rng, size * 2, bend=0.08)[0]
            acc = ps.rasterize(size, pts, np.ones(len(pts)))
            acc = np.maximum(acc, ps.rasterize(size, pts + 1.0 / size, np.ones(len(pts))))  # 2 px wide
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
            mottle = 0.85 + 0.15 * np.clip(ps.smooth_noise(rng, size, 1.0, cell=4), -1, 1)  # uneven density
            if f["type"] == "consolidation":
                alpha = np.clip(field / 0.15, 0, 1) * keep * avail
                img += alpha * (CONSOLIDATION - img)
                # one air-filled bronchus per blob, running away from the hilum, with a twig
                a = np.arctan2(centres[:, 1] - lung["cy"], centres[:, 0] - lung["cx"]) + rng.uniform(-0.4, 0.4, n)
                twig = a + rng.choice([-0.6, 0.6], n)
                starts = np.concatenate([centres - np.stack([np.cos(a), np.sin(a)], 1) * rlo * 0.5, centres])
                ends = np.concatenate([centres + np.stack([np.cos(a), np.sin(a)], 1) * rlo,
                                       centres + np.stack([np.cos(twig), np.sin(twig)], 1) * rlo * 0.7])
                bronchi = ps.segments(starts, ends, rng, size)[0]
                acc = ndimage.gaussian_filter(ps.rasterize(size, bronchi, np.ones(len(bronchi))), 0.5 * size / 256)
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


def drawing_order(findings: list[dict]) -> list[dict]:
    """The order render_slice draws findings in. Effusion first: it takes the dependent lung, and lung lesions are
    then placed in what remains."""
    return sorted(findings, key=lambda f: (f["type"] != "effusion", FINDING_TYPES.index(f["type"])))


def render_slice(level: str, findings: list[dict], size: int, seed: list[int], scanner: Scanner = Scanner(),
                 return_lungs: bool = False):
    """Pixels of one study (uint8, size x size). Anatomy, lesions and noise use separate seed streams, so the same
    seed with and without a finding differs only where the finding is drawn."""
    anatomy_rng, lesion_rng, noise_rng = (np.random.default_rng([*seed, k]) for k in range(3))
    img, lungs = _anatomy(level, anatomy_rng, size)
    order = drawing_order(findings)
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


def finding_regions(level: str, findings: list[dict], size: int, seed: list[int], scanner: Scanner = Scanner(),
                    min_diff: int = MIN_REGION_DIFF) -> list[np.ndarray]:
    """Where each finding is drawn (bool masks (size, size), in the order of `findings`): the pixels that change by
    more than `min_diff` grey levels when the finding is drawn. All lesions share one random stream, consumed in
    drawing order, so leaving out a finding that is not drawn last re-draws the later ones elsewhere; a finding's
    region is therefore the change it makes on top of the findings drawn before it (same seed, so same anatomy and
    noise: nothing else differs)."""
    order = drawing_order(findings)
    renders = [render_slice(level, order[:i], size, seed, scanner).astype(np.int16) for i in range(len(order) + 1)]
    masks = {id(f): np.abs(renders[i + 1] - renders[i]) > min_diff for i, f in enumerate(order)}
    return [masks[id(f)] for f in findings]


def label_regions(level: str, findings: list[dict], size: int, seed: list[int], label_names: list[str],
                  scanner: Scanner = Scanner(), min_diff: int = MIN_REGION_DIFF) -> dict[str, np.ndarray]:
    """label -> where it is drawn, for the labels of `label_names` that the study has (labels_for): a finding type's
    region is that finding's, pneumonia's the union of its infection patterns'."""
    masks = finding_regions(level, findings, size, seed, scanner, min_diff)
    labels = labels_for(findings, label_names)
    out = {}
    for name in label_names:
        if not labels[name]:
            continue
        types = INFECTION_TYPES if name == "pneumonia" else (name,)
        out[name] = np.any([m for f, m in zip(findings, masks) if f["type"] in types], axis=0)
    return out
