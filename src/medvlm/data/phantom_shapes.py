"""Drawing primitives of the phantom (medvlm.data.phantom): elliptic radii with lobulated outlines, windows so small
shapes cost only their bounding box, point rasterising for vessels and stripes, low-frequency texture noise.
All float32 numpy; pure functions of their arguments (and of the numpy Generator they are handed)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    axis = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0)
    return np.meshgrid(axis, axis)  # X (columns), Y (rows)


def rho(X, Y, cx, cy, ax, ay, angle=0.0, lobes=None):
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


def window(size, cx, cy, half):
    """Row/column slices of the image square around (cx, cy) +- half: small shapes are computed only there."""
    lo = lambda c: max(int((c - half + 1) * 0.5 * size), 0)  # noqa: E731
    hi = lambda c: min(int((c + half + 1) * 0.5 * size) + 2, size)  # noqa: E731
    return slice(lo(cy), hi(cy)), slice(lo(cx), hi(cx))


def lobes(rng, strength):
    return rng.uniform(0, strength, 3), rng.uniform(0, 2 * np.pi, 3)


def rasterize(size, points, weights):
    """Accumulate weighted points (half-image units) into an image: cheap vectorised line/dot drawing."""
    acc = np.zeros((size, size), np.float32)
    ij = np.clip(((points + 1.0) * 0.5 * size).astype(int), 0, size - 1)
    np.maximum.at(acc, (ij[:, 1], ij[:, 0]), weights.astype(np.float32))
    return acc


def segments(starts, ends, rng, size, bend=0.15):
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


def smooth_noise(rng, size, std, cell=8):
    """Low-frequency noise (parenchymal texture, uneven lesion density): a coarse grid of random values,
    bilinearly enlarged, which is far cheaper than blurring full-size white noise."""
    coarse = rng.standard_normal((size // cell + 1, size // cell + 1), np.float32)
    fine = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR))
    return fine * np.float32(std / max(float(fine.std()), 1e-6))


def shape(size, cx, cy, ax, ay, angle=0.0, reach=1.4):
    """An ellipse's window and normalised radius there: small organs cost only their bounding box."""
    X, Y = grid(size)
    win = window(size, cx, cy, max(ax, ay) * reach)
    return win, rho(X[win], Y[win], cx, cy, ax, ay, angle)


def paint(img, shape, value, below=1.0, extra=None):
    win, rho = shape
    mask = rho < below if extra is None else (rho < below) & extra[win]
    img[win][mask] = value


def carve(carve, shape, below):
    win, rho = shape
    carve[win] |= rho < below
