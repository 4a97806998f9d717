"""Validation of volume rows: series problems and volume expectations quarantine their row, with the same
rows-in = kept + quarantined accounting as 2-D rows."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

pytest.importorskip("monai")

from medvlm.config import config_from_dict  # noqa: E402
from medvlm.data.dicom_write import write_dicom_series  # noqa: E402
from medvlm.data.validate import run_validation  # noqa: E402
from medvlm.manifest import read_manifest  # noqa: E402

REPORT = "Patchy ground glass opacity in the right lower lobe."


def _chest(nx=40, ny=40, nz=10, seed=0):
    rng = np.random.default_rng(seed)
    hu = np.full((nx, ny, nz), -1000.0, np.float32)
    hu[4:-4, 4:-4] = -850.0 + rng.normal(0, 20, (nx - 8, ny - 8, nz))
    hu[18:22, 10:14] = 40.0
    return hu


def _nifti(path, hu, spacing=(1.0, 1.0, 2.5)):
    import nibabel

    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(nibabel.Nifti1Image(hu, np.diag([*spacing, 1.0])), path)


def test_volume_rows_kept_or_quarantined_with_reasons(tmp_path):
    root = tmp_path / "data"
    _nifti(root / "vol" / "good.nii.gz", _chest())
    write_dicom_series(root / "vol" / "series_good", _chest(seed=1), (0.8, 0.8, 2.5),
                       names=[f"x{k}" for k in np.random.default_rng(0).permutation(10)])
    write_dicom_series(root / "vol" / "series_gap", _chest(seed=2), (0.8, 0.8, 2.5),
                       positions=[0, 2.5, 5, 7.5, 12.5, 15, 17.5, 20, 22.5, 25])
    write_dicom_series(root / "vol" / "series_two", _chest(seed=3), (0.8, 0.8, 2.5), series_uid="1.2.3.4")
    write_dicom_series(root / "vol" / "series_two", _chest(seed=4), (0.8, 0.8, 2.5), series_uid="1.2.3.5",
                       names=[f"b{k}.dcm" for k in range(10)])
    write_dicom_series(root / "vol" / "series_mr", _chest(seed=5), (0.8, 0.8, 2.5), modality="MR")
    _nifti(root / "vol" / "few.nii.gz", _chest(nz=4, seed=6))
    _nifti(root / "vol" / "thick.nii.gz", _chest(seed=7), spacing=(1.0, 1.0, 12.0))
    _nifti(root / "vol" / "not_hu.nii.gz", (_chest(seed=8) + 1000) / 2000)
    _nifti(root / "vol" / "narrow.nii.gz", _chest(nx=16, ny=40, seed=9))
    _nifti(root / "vol" / "huge.nii.gz", _chest(nx=64, ny=64, nz=40, seed=10))
    (root / "img").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48), dtype=np.uint8)).save(root / "img" / "a.png")
    rows = {"good_nii": "vol/good.nii.gz", "good_dicom": "vol/series_good", "png": "img/a.png",
            "gap": "vol/series_gap", "two": "vol/series_two", "mr": "vol/series_mr", "few": "vol/few.nii.gz",
            "thick": "vol/thick.nii.gz", "not_hu": "vol/not_hu.nii.gz", "narrow": "vol/narrow.nii.gz",
            "huge": "vol/huge.nii.gz"}
    with (root / "annotation.jsonl").open("w") as fh:
        for i, (sid, image) in enumerate(rows.items()):
            fh.write(json.dumps({"study_id": sid, "image": image, "report": REPORT, "source_row": i,
                                 "labels": {"pneumonia": 1}}) + "\n")
    cfg = config_from_dict({
        "data": {"source": "jsonl", "root": str(root), "manifest": "annotation.jsonl", "label_names": ["pneumonia"],
                 "primary_label": "pneumonia"},
        "validate": {"max_bad_fraction": 1.0, "out_dir": str(tmp_path / "reports"),
                     "manifest_dir": str(tmp_path / "manifest")},
        "volume": {"max_voxels": 100_000, "min_slices": 8, "max_spacing_mm": 10.0, "min_side": 32},
    })
    summary = run_validation(cfg)
    assert summary["rows_in"] == 11 == summary["rows_kept"] + summary["rows_quarantined"]
    kept = read_manifest(tmp_path / "manifest" / "validated.jsonl")
    assert sorted(kept["study_id"]) == ["good_dicom", "good_nii", "png"]
    assert kept["image_hash"].notna().all()
    q = pd.read_csv(tmp_path / "manifest" / "quarantine.csv", keep_default_na=False).set_index("study_id")["reason"]
    assert q["gap"].startswith("image_undecodable: vol/series_gap/slice_0004.dcm: 1 missing slice")
    assert "image_undecodable: vol/series_two: 2 DICOM series in one folder" in q["two"]
    assert "image_undecodable: vol/series_mr/slice_0000.dcm: modality MR, expected CT" in q["mr"]
    assert "exceed volume.max_voxels 100000" in q["huge"] and q["huge"].startswith("image_undecodable: vol/huge.nii.gz")
    assert q["few"].startswith("volume_slices: 40x40x4 voxels")
    assert q["thick"].startswith("volume_spacing: ") and "x12 mm" in q["thick"]
    assert q["not_hu"].startswith("volume_hu_range: ")
    assert "volume_shape: 16x40x10 voxels" in q["narrow"]
    assert all("\n" not in reason for reason in q)
    assert summary["reasons"]["volume_spacing"] == 1  # two spacing expectations, one row, counted once
