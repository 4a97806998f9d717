"""`medvlm generate` logic: folders, DICOM, broken files, formats, exit codes (on a fake predictor)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from lifecycle_fakes import FakePredictor, make_model_dir, write_png
from medvlm.config import config_from_dict
from medvlm.predict import collect_images, generate_reports


def write_dicom(path: Path, hu: int = 40, size: int = 32) -> Path:
    """A minimal CT DICOM (explicit VR little endian, 16-bit, HU via RescaleIntercept)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, meta.MediaStorageSOPInstanceUID, "CT"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = np.full((size, size), hu + 1024, dtype=np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


@pytest.fixture
def setup(tmp_path):
    cfg = config_from_dict({"data": {"label_names": ["pneumonia", "nodule"], "primary_label": "pneumonia"},
                            "generate": {"batch_size": 2}})
    model = make_model_dir(tmp_path / "model", bias=0.0)
    folder = tmp_path / "scans"
    for i, value in enumerate((30, 220, 120)):
        write_png(folder / "sub" / f"img{i}.png", value=value, seed=i)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    write_dicom(folder / "series" / "IM0001")  # no extension: found by its DICM magic
    (folder / "notes.txt").write_text("not an image, not picked up")
    return cfg, model, folder


def run(paths, model, cfg, fmt="json", out=None):
    stdout, err = io.StringIO(), io.StringIO()
    code = generate_reports(paths, str(model), cfg, fmt, out, predictor_factory=FakePredictor.load,
                            stdout=stdout, console=Console(file=err, width=200))
    return code, stdout.getvalue(), err.getvalue()


def test_collect_images(setup):
    _, _, folder = setup
    files, problems = collect_images([folder, folder / "sub" / "img0.png", folder / "missing.png"])
    names = sorted(p.name for p in files)
    assert names == ["IM0001", "broken.png", "img0.png", "img1.png", "img2.png"]
    assert problems == [f"{folder / 'missing.png'}: no such file or folder"]


def test_folder_with_broken_file_processes_the_rest(setup):
    cfg, model, folder = setup
    code, out, err = run([folder], model, cfg)
    assert code == 1
    results = json.loads(out)
    assert len(results) == 4  # three PNGs + the DICOM
    by_name = {Path(r["path"]).name: r for r in results}
    assert "consolidation" in by_name["img1.png"]["report"] and "no acute" in by_name["img0.png"]["report"]
    assert set(by_name["IM0001"]["probabilities"]) == {"pneumonia", "nodule"}
    failure_lines = [line for line in err.splitlines() if "broken.png" in line]
    assert len(failure_lines) == 1 and "skipped" in failure_lines[0]


def test_all_good_exit_zero_and_formats(setup, tmp_path):
    cfg, model, folder = setup
    code, out, _ = run([folder / "sub"], model, cfg, fmt="text")
    assert code == 0 and out.count("== ") == 3 and "probabilities: pneumonia=" in out
    target = tmp_path / "out" / "reports.md"
    code, out, err = run([folder / "series" / "IM0001"], model, cfg, fmt="markdown", out=target)
    assert code == 0 and out == "" and target.read_text().startswith("# MedVLM reports")


def test_nothing_readable_and_bad_format(setup, tmp_path):
    cfg, model, folder = setup
    code, out, err = run([folder / "broken.png"], model, cfg)
    assert code == 2 and json.loads(out) == []
    code, _, err = run([tmp_path / "empty-nothing"], model, cfg)
    assert code == 2 and "no image files" in err
    from medvlm.errors import DataError

    with pytest.raises(DataError, match="--format"):
        run([folder], model, cfg, fmt="xml")
