"""REST volume uploads: a NIfTI file or a zip of a DICOM series in, a report out; zip-slip and zip-bomb refused."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

pytest.importorskip("monai")

import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from medvlm.config import config_from_dict  # noqa: E402
from medvlm.data.dicom_write import write_dicom_series  # noqa: E402
from medvlm.model.vision3d import I3ResNet, i3resnet_encoder  # noqa: E402
from medvlm.serve import create_app  # noqa: E402


class VolumePredictor:
    def __init__(self, cfg):
        torch.manual_seed(0)
        self.model = type("M", (), {"vision": i3resnet_encoder(I3ResNet((1, 1, 1, 1), 4), 32, "tiny")})()
        self.cfg = cfg
        self.seen = []

    def predict(self, images):
        self.seen += [tuple(v.shape) for v in images]
        return [{"report": "No abnormality.", "probabilities": {"pneumonia": 0.2}} for _ in images]


def _hu():
    hu = np.full((32, 32, 8), -1000.0, np.float32)
    hu[8:24, 8:24] = -800.0
    return hu


@pytest.fixture
def setup(tmp_path):
    cfg = config_from_dict({"data": {"label_names": ["pneumonia"], "primary_label": "pneumonia"},
                            "serve": {"max_bytes": 2_000_000, "max_volume_bytes": 1_000_000, "max_zip_members": 64,
                                      "max_zip_ratio": 50},
                            "volume": {"spacing": None, "shape": [32, 32, 8], "min_slices": 2}})
    predictor = VolumePredictor(cfg)
    return TestClient(create_app(predictor, cfg, {"model": "fake"})), predictor, tmp_path


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _symlink_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        link = zipfile.ZipInfo("slice0")
        link.external_attr = (0o120777 << 16)  # a symbolic link to /etc/passwd
        zf.writestr(link, "/etc/passwd")
    return buf.getvalue()


def test_nifti_and_series_zip_round_trip(setup):
    import nibabel

    client, predictor, tmp = setup
    nibabel.save(nibabel.Nifti1Image(_hu(), np.diag([1.0, 1.0, 2.5, 1.0])), tmp / "scan.nii.gz")
    r = client.post("/predict", files={"file": ("scan.nii.gz", (tmp / "scan.nii.gz").read_bytes())})
    assert r.status_code == 200, r.text
    paths = write_dicom_series(tmp / "series", _hu(), (1.0, 1.0, 2.5), names=[f"x{k}" for k in (3, 1, 7, 0, 5, 2, 6, 4)])
    # member names try to leave the extraction folder; they are never used as paths
    entries = {("../" * 3 + f"evil{k}" if k % 2 else f"/abs/dir/s{k}"): p.read_bytes() for k, p in enumerate(paths)}
    r = client.post("/predict", files={"file": ("series.zip", _zip(entries))})
    assert r.status_code == 200, r.text
    assert predictor.seen == [(1, 32, 32, 8)] * 2
    assert not list(tmp.parent.glob("evil*")) and not list(tmp.glob("evil*"))


def test_bad_zips_are_4xx_with_one_line(setup):
    client, _, tmp = setup
    cases = {
        "bomb": (_zip({"a.dcm": b"\0" * 400_000}), 413, "zip bomb"),
        "members": (_zip({f"s{k}": b"x" for k in range(65)}), 413, "max_zip_members"),
        "not_dicom": (_zip({"readme.txt": b"hello " * 10}), 415, "no DICOM slices"),
        "empty": (_zip({}), 422, "holds no files"),
        "symlink": (_symlink_zip(), 400, "links refused"),
        "broken": (b"PK\x03\x04" + b"\x00" * 64, 400, "not a readable zip"),
    }
    for name, (data, status, needle) in cases.items():
        r = client.post("/predict", files={"file": (f"{name}.zip", data)})
        assert r.status_code == status, (name, r.status_code, r.text)
        assert needle in r.json()["error"] and "\n" not in r.json()["error"], (name, r.json())
