"""3-D phantom chests: CT volumes of `synthesize.volume_slices` axial slices whose findings span slices.

The volume runs from the lung bases (z index 0, inferior) to the apices (superior): the lowest third of the slices
is the lower zone, then middle, then upper, each drawn with that level's anatomy (medvlm.data.phantom). A finding
lies in one zone (its lobe) and spans a share of that zone's slices by its extent (small a third, patchy two
thirds, extensive all of them), centred in the zone; within a zone the lesions keep their place from slice to
slice. The report is written from the findings, so it says what is drawn (zone = lobe, side, extent).

Intensities: the 2-D phantom's lung-window grey levels mapped back to HU (window centre -600, width 1500), plus
per-slice noise. medvlm.data.synthesize writes the volumes as NIfTI (RAS, spacing in the affine) and, for every
`dicom_every`-th study, as a DICOM CT series (int16 with rescale slope/intercept, shuffled file names;
medvlm.data.dicom_write).
"""

from __future__ import annotations

import numpy as np

from medvlm.data.phantom import render_slice
from medvlm.data.phantom_study import ZONES, Scanner

WINDOW_CENTER, WINDOW_WIDTH = -600.0, 1500.0  # the 2-D phantom's grey levels are this lung window
FOV_MM = 360.0  # in-plane field of view; slice gap = CHEST_MM / slices
CHEST_MM = 240.0
SLICE_NOISE_HU = 8.0
_SPAN = {"small": 1 / 3, "patchy": 2 / 3, "extensive": 1.0}


def zone_of_slice(k: int, n: int) -> str:
    """Zone of axial slice k of n (k = 0 inferior): lower, middle, upper thirds."""
    return ("lower", "middle", "upper")[min(2, 3 * k // n)]


def finding_slices(finding: dict, n: int) -> range:
    """The slices a finding spans: a centred share (by extent) of its zone's slices."""
    zone_slices = [k for k in range(n) if zone_of_slice(k, n) == finding["zone"]]
    span = max(1, int(round(len(zone_slices) * _SPAN[finding["extent"]])))
    start = zone_slices[0] + (len(zone_slices) - span) // 2
    return range(start, start + span)


def render_volume(findings: list[dict], size: int, n_slices: int, seed: list[int],
                  scanner: Scanner = Scanner()) -> np.ndarray:
    """HU volume (size, size, n_slices) in RAS, float32. A pure function of its arguments."""
    volume = np.empty((size, size, n_slices), np.float32)
    spans = [finding_slices(f, n_slices) for f in findings]
    cache: dict[tuple, np.ndarray] = {}
    noise_rng = np.random.default_rng([*seed, 99])
    for k in range(n_slices):
        zone = zone_of_slice(k, n_slices)
        present = tuple(i for i, (f, span) in enumerate(zip(findings, spans)) if f["zone"] == zone and k in span)
        key = (zone, present)
        if key not in cache:
            grey = render_slice(zone, [findings[i] for i in present], size, [*seed, ZONES.index(zone)], scanner)
            hu = grey.astype(np.float32) * (WINDOW_WIDTH / 255.0) + (WINDOW_CENTER - WINDOW_WIDTH / 2)
            cache[key] = hu[::-1, ::-1].T  # radiological view (rows posterior-down, patient's right left) -> RAS
        volume[..., k] = cache[key] + noise_rng.normal(0.0, SLICE_NOISE_HU, (size, size)).astype(np.float32)
    return np.clip(volume, -1024.0, 3071.0)
