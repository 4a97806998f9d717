"""Several images per study (IU X-ray frontal + lateral): features.multi_view concat, end to end on a tiny R2Gen
fixture written into tmp_path (synthetic images, labels read from the reports by the CheXpert rules)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from medvlm.data.report_labels import CHEXPERT_LABELS
from medvlm.errors import ConfigError
from medvlm.features import combine_views
from tiny_medvlm import REPORTS, TRUNK_SHAPE, tiny_config


def test_combine_views_mean_and_concat():
    flat = torch.arange(5, dtype=torch.float32).view(5, 1)  # studies of 1, 3 and 1 views
    assert combine_views(flat, [1, 3, 1], "mean", 2).flatten().tolist() == [0.0, 2.0, 4.0]
    concat = combine_views(flat, [1, 3, 1], "concat", 2)
    assert concat.shape == (3, 2, 1)
    assert concat[:, :, 0].tolist() == [[0.0, 0.0], [1.0, 2.0], [4.0, 4.0]]  # repeated / first max_views


def _model(tmp_path, multi_view):
    from medvlm.model.medvlm import MedVLM

    cfg = tiny_config(tmp_path, features={"multi_view": multi_view})
    torch.manual_seed(0)
    return MedVLM(cfg, "freeze").eval()


def test_concat_model_sees_every_view(tmp_path):
    concat, mean = _model(tmp_path, "concat"), _model(tmp_path, "mean")
    mean.load_state_dict(concat.state_dict())
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.randn((2, *TRUNK_SHAPE), generator=gen).abs() for _ in range(2))
    with torch.no_grad():
        # one view repeated is exactly that view alone (duplicated keys do not change attention or the mean pool)
        q_rep, p_rep = concat.visual_queries(torch.stack([a, a], dim=1))
        q_one, p_one = mean.visual_queries(a)
        assert torch.allclose(q_rep, q_one, atol=1e-5) and torch.allclose(p_rep, p_one, atol=1e-5)
        # two different views: the DEM and the Q-Former read the tokens of both views side by side (2 x 4 tokens)
        q_two, _ = concat.visual_queries(torch.stack([a, b], dim=1))
        assert not torch.equal(q_two, q_rep)
        tokens = torch.cat([concat.vision(a), concat.vision(b)], dim=1)
        assert tokens.shape == (2, 2 * TRUNK_SHAPE[1] * TRUNK_SHAPE[2], concat.vision.width)
        tokens, _ = concat.dem(tokens)
        assert torch.allclose(q_two, concat.bridge(tokens), atol=1e-6)


def _write_r2gen(root, counts=(("train", 6), ("val", 1), ("test", 3))):
    """R2Gen annotation.json, two synthetic views (frontal, lateral) per study, no labels (read from the reports)."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    data, k = {}, 0
    for split, n in counts:
        entries = []
        for _ in range(n):
            paths = []
            for view in ("0", "1"):
                rel = f"CXR{k}/{view}.png"
                (root / "images" / f"CXR{k}").mkdir(exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (72, 64 if view == "1" else 72), dtype=np.uint8)).save(
                    root / "images" / rel)
                paths.append(rel)
            entries.append({"id": f"CXR{k}", "report": REPORTS[k % len(REPORTS)], "image_path": paths, "split": split})
            k += 1
        data[split] = entries
    (root / "annotation.json").write_text(json.dumps(data))


def _r2gen_cfg(tmp_path, **features):
    return tiny_config(
        tmp_path,
        data={"source": "r2gen", "manifest": "annotation.json", "image_dir": "images", "report_labeler": "chexpert",
              "label_names": CHEXPERT_LABELS, "primary_label": "lung_opacity"},
        validate={"out_dir": str(tmp_path / "validation"), "manifest_dir": str(tmp_path / "manifest")},
        features={"multi_view": "concat", "max_views": 2, **features},
        train={"max_steps": 2},
    )


def test_r2gen_two_views_end_to_end(tmp_path):
    from medvlm.data.split import run_split
    from medvlm.data.validate import run_validation
    from medvlm.features import extract_features, load_features
    from medvlm.inference import Predictor
    from medvlm.predict import generate_reports
    from medvlm.train import train

    _write_r2gen(tmp_path / "data")
    cfg = _r2gen_cfg(tmp_path)
    run_validation(cfg)
    validated = [json.loads(line) for line in (tmp_path / "manifest" / "validated.jsonl").read_text().splitlines()]
    assert len(validated) == 10 and all(len(r["images"]) == 2 for r in validated)
    first = validated[0]["labels"]  # "no abnormality is seen in either lung ." -> only no_finding
    assert set(first) == set(CHEXPERT_LABELS) and first["no_finding"] == 1 and sum(first.values()) == 1
    assert validated[1]["labels"]["lung_opacity"] == 1  # "ground glass opacity in the right lower lobe ."
    assert validated[2]["labels"]["pleural_effusion"] == 1 and validated[2]["labels"]["consolidation"] == 1

    split = run_split(cfg)
    assert split["rows"] == {"train": 7, "test": 3} and split["method"].startswith("official")
    summary = extract_features(cfg)
    assert summary["train"]["shape"] == [2, *TRUNK_SHAPE] and summary["train"]["views_per_study"] == {"2": 7}
    feats, ids = load_features(cfg, "test")
    assert feats.shape == (3, 2, *TRUNK_SHAPE) and not torch.allclose(feats[:, 0], feats[:, 1])
    with pytest.raises(ConfigError, match="multi_view"):  # a mean-mode run refuses the concatenated cache
        load_features(cfg.model_copy(update={"features": cfg.features.model_copy(update={"multi_view": "mean"})}), "test")

    assert train(cfg, "freeze")["steps"] == 2
    predictor = Predictor.load(tmp_path / "models" / "freeze", cfg=cfg)
    from_cache = predictor.predict_features(feats)
    assert len(from_cache) == 3 and set(from_cache[0]["probabilities"]) == set(CHEXPERT_LABELS)
    test_row = json.loads((tmp_path / "split" / "test.jsonl").read_text().splitlines()[0])
    images = [Image.open(tmp_path / "data" / p) for p in test_row["images"]]
    from_images = predictor.predict_studies([images])[0]
    assert from_images["report"] == from_cache[0]["report"]
    assert from_images["probabilities"] == pytest.approx(from_cache[0]["probabilities"], abs=1e-4)

    out = tmp_path / "study.json"
    code = generate_reports([tmp_path / "data" / p for p in test_row["images"]], str(tmp_path / "models" / "freeze"),
                            cfg, "json", out, study=True)
    written = json.loads(out.read_text())
    assert code == 0 and len(written) == 1 and written[0]["views"] == 2
    assert written[0]["report"] == from_cache[0]["report"]
