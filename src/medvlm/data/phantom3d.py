"""3-D phantom chests: CT volumes of `synthesize.volume_slices` axial slices whose findings span slices.

The volume runs from the lung bases (z index 0, inferior) to the apices (superior): the lowest third of the slices
is the lower zone, then middle, then upper, each drawn with that level's anatomy (medvlm.data.phantom). A finding
lies in one zone (its lobe) and spans a share of that zone's slices by its extent (small a third, patchy two
thirds, extensive all of them), centred in the zone; within a zone the lesions keep their place from slice to
slice. The report is written from the findings, so it says what is drawn (zone = lobe, side, extent).

Intensities: the 2-D phantom's lung-window grey levels mapped back to HU (window centre -600, width 1500), plus
per-slice noise. Volumes are written as NIfTI (RAS, spacing in the affine) and, for every `dicom_every`-th study,
as a DICOM CT series (int16 with rescale slope/intercept, shuffled file names; medvlm.data.dicom_write).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from medvlm.config import Config
from medvlm.data.dicom_write import write_dicom_series
from medvlm.data.phantom import (
    _DISTRIBUTION_P,
    _EXTENT_P,
    _N_FINDINGS_P,
    _SIDE_P,
    _TYPE_P,
    DISTRIBUTIONS,
    EFFUSION_DISTRIBUTION,
    EXTENTS,
    FINDING_TYPES,
    SIDES,
    ZONES,
    Scanner,
    labels_for,
    render_slice,
    synthesize_batches,
)
from medvlm.data.phantom_report import write_report

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


def sample_volume_study(rng: np.random.Generator, normal: bool) -> list[dict]:
    """Structured findings of one 3-D study; each finding has its own zone (effusions are basal)."""
    if normal:
        return []
    p = np.array([_TYPE_P[t] for t in FINDING_TYPES])
    n = int(rng.choice(3, p=_N_FINDINGS_P)) + 1
    chosen = rng.choice(FINDING_TYPES, size=n, replace=False, p=p / p.sum())
    findings = []
    for t in sorted(chosen, key=FINDING_TYPES.index):
        if t == "effusion":
            zone, dist = "lower", EFFUSION_DISTRIBUTION
        else:
            zone, dist = ZONES[int(rng.integers(3))], DISTRIBUTIONS[int(rng.choice(3, p=_DISTRIBUTION_P[t]))]
        findings.append(dict(type=str(t), side=SIDES[int(rng.choice(3, p=_SIDE_P))], zone=zone,
                             distribution=dist, extent=EXTENTS[int(rng.choice(3, p=_EXTENT_P))]))
    return findings


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


def _write_volume(path_stem: Path, hu: np.ndarray, spacing: tuple[float, float, float], as_dicom: bool,
                  seed: list[int]) -> str:
    import nibabel

    if as_dicom:
        rng = np.random.default_rng([*seed, 7])
        names = [f"IM{int(i):05d}" for i in rng.permutation(hu.shape[2])]  # shuffled: names say nothing of z
        slope = (1.0, 0.5)[int(rng.integers(2))]
        write_dicom_series(path_stem, hu, spacing, names=names, slope=slope, intercept=-1024.0,
                           patient_id=path_stem.name)
        return path_stem.name
    affine = np.diag([*spacing, 1.0])
    image = nibabel.Nifti1Image(np.round(hu).astype(np.int16), affine)
    image.header.set_xyzt_units("mm")
    nibabel.save(image, path_stem.with_name(path_stem.name + ".nii.gz"))
    return path_stem.name + ".nii.gz"


def _write_volume_batch(out_dir: Path, prefix: str, n: int, normal_fraction: float, stream: int, scanner: Scanner,
                        cfg: Config) -> dict:
    s = cfg.synthesize
    folder = out_dir / "volumes"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    size, n_slices = s.volume_size, s.volume_slices
    spacing = (FOV_MM / size, FOV_MM / size, CHEST_MM / n_slices)
    normal = set(np.random.default_rng([s.seed, stream]).permutation(n)[: int(round(n * normal_fraction))].tolist())
    counts = dict.fromkeys(cfg.data.label_names, 0)
    rows, n_dicom = [], 0
    for i in range(n):
        findings = sample_volume_study(np.random.default_rng([s.seed, stream, i, 0]), i in normal)
        seed = [s.seed, stream, i, 1]
        hu = render_volume(findings, size, n_slices, seed, scanner)
        name = f"{prefix}_{i:05d}"
        as_dicom = s.dicom_every > 0 and i % s.dicom_every == s.dicom_every - 1
        n_dicom += as_dicom
        rel = "volumes/" + _write_volume(folder / name, hu, spacing, as_dicom, seed)
        labels = labels_for(findings, cfg.data.label_names)
        for k, v in labels.items():
            counts[k] += v
        rows.append(dict(study_id=name, image=rel, images=[rel],
                         report=write_report(findings, np.random.default_rng([s.seed, stream, i, 2])),
                         labels=labels, findings=findings,
                         finding_slices=[[span.start, span.stop] for span in (finding_slices(f, n_slices) for f in findings)],
                         render_seed=seed, group=name, source_row=i))
    tmp = out_dir / "annotation.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out_dir / "annotation.jsonl")
    return dict(dir=str(out_dir), manifest=str(out_dir / "annotation.jsonl"), n=n, normal=len(normal),
                dicom_series=n_dicom, label_counts=counts, spacing_mm=[round(x, 4) for x in spacing])


def synthesize_volumes(cfg: Config) -> dict:
    """The 3-D counterpart of medvlm.data.phantom.synthesize: volumes/ + annotation.jsonl in synthesize.out_dir
    (training set) and synthesize.incoming_dir (shifted batch for drift monitoring)."""
    return synthesize_batches(cfg, _write_volume_batch, "phantom3d", "incoming3d")
