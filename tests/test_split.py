"""Split: stratified, grouped (no image or group on both sides), deterministic, official split kept."""

import json

import numpy as np
import pandas as pd
import pytest

from medvlm.config import config_from_dict
from medvlm.data.split import run_split, split_groups
from medvlm.errors import DataError
from medvlm.manifest import read_manifest, write_manifest


def _cfg(tmp_path, group_by="image_hash", seed=0, use_official=True, test_size=0.2):
    return config_from_dict({
        "data": {"label_names": ["covid"], "primary_label": "covid", "group_by": group_by},
        "validate": {"manifest_dir": str(tmp_path / "manifest")},
        "split": {"test_size": test_size, "seed": seed, "use_official": use_official,
                  "out_dir": str(tmp_path / "split")},
    })


def _validated(tmp_path, n_images=100, seed=0, split=None):
    """n_images distinct images, 40% positive; every 10th image has a second report row; groups of 1-6 images."""
    rng = np.random.default_rng(seed)
    rows, group, left = [], 0, 0
    for i in range(n_images):
        if left == 0:
            group, left = group + 1, int(rng.integers(1, 7))
        left -= 1
        label = int(group % 5 < 2)  # labels constant within a source group, as in COV-CTR
        copies = 2 if i % 10 == 0 else 1
        for k in range(copies):
            rows.append({"study_id": f"img{i}" + (f"#{k}" if k else ""), "images": [f"images/{i}.png"],
                         "report": f"report {i} {k}", "report_zh": None, "labels": {"covid": label},
                         "split": split(i) if split else None, "group": f"paper{group}", "source_row": len(rows),
                         "image_hash": f"h{i:04d}"})
    df = pd.DataFrame(rows)
    write_manifest(df, tmp_path / "manifest" / "validated.jsonl")
    return df


def _sides(tmp_path):
    return read_manifest(tmp_path / "split" / "train.jsonl"), read_manifest(tmp_path / "split" / "test.jsonl")


def test_image_hash_split_is_stratified_and_leak_free(tmp_path):
    df = _validated(tmp_path)
    summary = run_split(_cfg(tmp_path))
    train, test = _sides(tmp_path)
    assert len(train) + len(test) == len(df)
    assert not set(train["image_hash"]) & set(test["image_hash"])
    assert summary["images"]["test"] == 20  # exactly test_size of the distinct images
    units = df.drop_duplicates("image_hash")
    expected_pos = units["labels"].map(lambda d: d["covid"]).mean() * 20
    test_pos = test.drop_duplicates("image_hash")["labels"].map(lambda d: d["covid"]).sum()
    assert abs(test_pos - expected_pos) <= 1
    assert summary["leakage"] == {"shared_groups": 0, "shared_image_hashes": 0}
    assert set(summary["labels"]["test"]) == {"covid"}


def test_split_is_deterministic_and_seeded(tmp_path):
    _validated(tmp_path)
    run_split(_cfg(tmp_path, seed=3))
    first = (tmp_path / "split" / "test.jsonl").read_bytes()
    run_split(_cfg(tmp_path, seed=3))
    assert (tmp_path / "split" / "test.jsonl").read_bytes() == first
    run_split(_cfg(tmp_path, seed=4))
    assert (tmp_path / "split" / "test.jsonl").read_bytes() != first


def test_source_groups_never_straddle(tmp_path):
    df = _validated(tmp_path, n_images=150)
    # an image that appears in two papers ties both papers together
    extra = df.iloc[[0]].copy()
    extra["group"], extra["study_id"], extra["source_row"] = "paper_far_away", "img0#far", len(df)
    df = pd.concat([df, extra], ignore_index=True)
    write_manifest(df, tmp_path / "manifest" / "validated.jsonl")
    units = split_groups(df, "source")
    assert units[0] == units[len(df) - 1]
    summary = run_split(_cfg(tmp_path, group_by="source"))
    train, test = _sides(tmp_path)
    assert not set(train["group"]) & set(test["group"])
    assert not set(train["image_hash"]) & set(test["image_hash"])
    assert (train["group"] == "paper_far_away").any() == (train["group"] == "paper1").any()
    assert 0.1 < summary["test_fraction_rows"] < 0.3
    pos = summary["labels"]["test"]["covid"]["fraction"]
    assert abs(pos - df["labels"].map(lambda d: d["covid"]).mean()) < 0.15


def test_official_split_is_kept_val_goes_to_train(tmp_path):
    _validated(tmp_path, split=lambda i: ["train", "val", "test"][i % 3])
    summary = run_split(_cfg(tmp_path))
    train, test = _sides(tmp_path)
    assert set(test["split"]) == {"test"} and set(train["split"]) == {"train", "val"}
    assert summary["method"].startswith("official")
    run_split(_cfg(tmp_path, use_official=False))
    train, test = _sides(tmp_path)
    assert set(test["split"]) != {"test"}  # ignored on request


def test_partial_official_split_is_ignored_with_a_note(tmp_path):
    _validated(tmp_path, split=lambda i: "test" if i < 5 else None)
    summary = run_split(_cfg(tmp_path))
    assert "official split ignored" in summary["notes"][0] and not summary["method"].startswith("official")


def test_missing_or_empty_input(tmp_path):
    with pytest.raises(DataError, match="not found"):
        run_split(_cfg(tmp_path))
    (tmp_path / "manifest").mkdir()
    (tmp_path / "manifest" / "validated.jsonl").write_text("")
    with pytest.raises(DataError, match="no validated rows"):
        run_split(_cfg(tmp_path))
    (tmp_path / "manifest" / "validated.jsonl").write_text(json.dumps({"study_id": "a", "labels": {}}) + "\n")
    with pytest.raises(DataError, match="image_hash"):
        run_split(_cfg(tmp_path))
