"""synthesize stage: the embedded phantom data set, written as a training set and a shifted incoming batch.

Axial slices (medvlm.data.phantom) by default, 3-D chests (medvlm.data.phantom3d) with synthesize.volumes. Each
batch is a folder with the images or volumes and annotation.jsonl (generic JSONL manifest), one row per study whose
facts (findings, labels, report) are what is drawn and whose render_seed redraws its pixels exactly.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from medvlm.config import Config
from medvlm.data.dicom_write import write_dicom_series
from medvlm.data.phantom import render_slice
from medvlm.data.phantom3d import CHEST_MM, FOV_MM, finding_slices, render_volume
from medvlm.data.phantom_report import write_report
from medvlm.data.phantom_study import (LABELS, Scanner, indication_for, labels_for, sample_study,
                                       sample_volume_study)
from medvlm.errors import ConfigError

PNG_COMPRESS_LEVEL = 3  # zlib level: ~4x faster than Pillow's default 6 for ~10% larger files


def synthesize(cfg: Config) -> dict:
    """Write the phantom training set (synthesize.out_dir) and the shifted incoming batch (synthesize.incoming_dir),
    slices or volumes; returns counts per label and the paths (see synthesize_slices / synthesize_volumes)."""
    if cfg.synthesize.volumes:  # 3-D phantom chests (synthesize.volumes)
        return synthesize_volumes(cfg)
    return synthesize_slices(cfg)


def synthesize_slices(cfg: Config) -> dict:
    """Write the phantom training set (synthesize.out_dir) and the shifted incoming batch (synthesize.incoming_dir).

    Each folder gets images/<prefix>_NNNNN.png and annotation.jsonl (generic JSONL manifest), one row per study:
    study_id, image, images, report, labels (keys = data.label_names), findings [{type, side, zone, distribution,
    extent}], slice_level, render_seed (render_slice(slice_level, findings, size, render_seed, scanner) redraws the
    image), group (= study_id), source_row. Returns counts per label and the paths."""
    return synthesize_batches(cfg, _write_slice_batch, "phantom", "incoming")


def synthesize_volumes(cfg: Config) -> dict:
    """The 3-D counterpart of synthesize_slices: volumes/ + annotation.jsonl in synthesize.out_dir (training set)
    and synthesize.incoming_dir (shifted batch for drift monitoring)."""
    return synthesize_batches(cfg, _write_volume_batch, "phantom3d", "incoming3d")


def synthesize_batches(cfg: Config, write_batch, train_prefix: str, incoming_prefix: str) -> dict:
    """The training set and the shifted incoming batch, written by `write_batch` (2-D slices or 3-D volumes)."""
    unknown = [name for name in cfg.data.label_names if name not in LABELS]
    if unknown:
        raise ConfigError(f"data.label_names: the phantom cannot draw {unknown}; it knows {list(LABELS)}")
    s = cfg.synthesize
    start = time.perf_counter()
    train = write_batch(Path(s.out_dir), train_prefix, s.n_images, s.normal_fraction, 0, Scanner(), cfg)
    incoming = write_batch(Path(s.incoming_dir), incoming_prefix, s.n_incoming, s.incoming_normal_fraction, 1,
                           Scanner(s.incoming_intensity_shift, s.incoming_noise_scale), cfg)
    return dict(train=train, incoming=incoming, seconds=round(time.perf_counter() - start, 2))


def _write_slice_batch(out_dir: Path, prefix: str, n: int, normal_fraction: float, stream: int, scanner: Scanner,
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
        if s.indications:
            rows[-1]["indication"] = indication_for(findings, np.random.default_rng([s.seed, stream, i, 3]))
    tmp = out_dir / "annotation.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out_dir / "annotation.jsonl")
    return dict(dir=str(out_dir), manifest=str(out_dir / "annotation.jsonl"), n=n, normal=len(normal),
                dicom_series=n_dicom, label_counts=counts, spacing_mm=[round(x, 4) for x in spacing])
