"""3-D phantom chests (findings span their zone's slices, reports say what is drawn, NIfTI and DICOM agree) and
`medvlm generate` on a series folder / a NIfTI file."""

import json

import numpy as np
import pytest

pytest.importorskip("monai")

from medvlm.config import config_from_dict  # noqa: E402
from medvlm.data.phantom3d import finding_slices, render_volume, zone_of_slice  # noqa: E402
from medvlm.data.synthesize import synthesize_volumes  # noqa: E402
from medvlm.data.volumes import load_volume  # noqa: E402


def _cfg(tmp_path, **synth):
    return config_from_dict({
        "synthesize": {"volumes": True, "out_dir": str(tmp_path / "train"), "incoming_dir": str(tmp_path / "inc"),
                       "n_images": 4, "n_incoming": 1, "volume_size": 64, "volume_slices": 9, "dicom_every": 2,
                       "normal_fraction": 0.0, **synth},
        "volume": {"spacing": None, "shape": [64, 64, 9], "min_slices": 3},
    })


def test_findings_span_their_zone_slices_only():
    assert [zone_of_slice(k, 9) for k in (0, 3, 8)] == ["lower", "middle", "upper"]
    f = dict(type="consolidation", side="right", zone="upper", distribution="peripheral", extent="small")
    assert list(finding_slices(f, 9)) == [7] and list(finding_slices({**f, "extent": "extensive"}, 9)) == [6, 7, 8]
    seed = [0, 0, 3, 1]
    with_f = render_volume([{**f, "extent": "patchy"}], 64, 9, seed)
    without = render_volume([], 64, 9, seed)
    differs = [k for k in range(9) if np.abs(with_f[..., k] - without[..., k]).max() > 1e-3]
    assert differs == list(finding_slices({**f, "extent": "patchy"}, 9))
    # the patient's right is RAS +x: the right-sided consolidation raises HU in the upper half of x
    k = differs[0]
    gain = with_f[..., k] - without[..., k]
    assert gain[32:].sum() > 10 * max(gain[:32].sum(), 1.0)


def test_synthesized_volumes_load_and_match_their_rows(tmp_path):
    cfg = _cfg(tmp_path)
    summary = synthesize_volumes(cfg)
    assert summary["train"]["n"] == 4 and summary["train"]["dicom_series"] == 2
    rows = [json.loads(line) for line in (tmp_path / "train" / "annotation.jsonl").read_text().splitlines()]
    dicom = [r for r in rows if not r["image"].endswith(".nii.gz")]
    assert len(dicom) == 2
    for row in rows:
        for f in row["findings"]:
            assert f["zone"] in row["report"] or f["zone"] == "middle"  # middle zone reads as middle lobe / lingula
        hu = render_volume(row["findings"], 64, 9, row["render_seed"])
        x = load_volume(tmp_path / "train" / row["image"], cfg.volume)[0].numpy()
        expected = (np.clip(hu, -1000, 1000) + 1000) / 2000
        assert np.abs(x - expected).max() < 1.5 / 2000 + 1e-6  # int16 storage (slope 0.5 or 1): rounding only


def test_generate_takes_a_series_folder_and_a_nifti_whole(tmp_path):
    import torch

    from medvlm.model.vision3d import I3ResNet, i3resnet_encoder
    from medvlm.predict import collect_images, run_predictions

    cfg = _cfg(tmp_path)
    synthesize_volumes(cfg)
    volumes = tmp_path / "train" / "volumes"
    files, problems = collect_images([volumes])
    assert not problems and len(files) == 4 and sum(p.is_dir() for p in files) == 2  # a series is one input

    class FakePredictor:
        def __init__(self):
            torch.manual_seed(0)
            self.model = type("M", (), {"vision": i3resnet_encoder(I3ResNet((1, 1, 1, 1), 4), 64, "tiny")})()
            self.cfg = cfg
            self.seen = []

        def predict(self, images):
            self.seen += [tuple(v.shape) for v in images]
            return [{"report": "No abnormality.", "probabilities": {"pneumonia": 0.1}} for _ in images]

    fake = FakePredictor()
    outcome = run_predictions(files, fake, cfg)
    assert not outcome.failures and len(outcome.results) == 4
    assert fake.seen == [(1, 64, 64, 9)] * 4
