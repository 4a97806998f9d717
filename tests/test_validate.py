"""Validation: each expectation fires on a crafted bad row, and every row ends up kept or quarantined."""

import hashlib
import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medvlm.config import config_from_dict
from medvlm.data.validate import run_validation
from medvlm.errors import ValidationFailed
from medvlm.manifest import read_manifest

LABELS = ["pneumonia", "nodule"]
GOOD_REPORT = "Patchy ground glass opacity in the right lower lobe."


def _png(path, size=(64, 48), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)).save(path)


def _row(study_id, image, report=GOOD_REPORT, labels=None, **extra):
    row = {"study_id": study_id, "image": image, "report": report,
           "labels": labels if labels is not None else {"pneumonia": 1, "nodule": 0}, **extra}
    return row


def _dataset(root):
    """Six good rows and one crafted bad row per rule; returns {study_id: expected reason or None}."""
    for i in range(6):
        _png(root / "images" / f"good{i}.png", seed=i)
    for i in range(7):  # bad rows get their own images here (bad twins: test_bad_twins_do_not_quarantine_good_rows)
        _png(root / "images" / f"other{i}.png", seed=20 + i)
    _png(root / "images" / "shared.png", seed=10)
    _png(root / "images" / "conflict.png", seed=11)
    _png(root / "images" / "tiny.png", size=(8, 8))
    (root / "images" / "text.png").write_text("not an image")
    _png(root.parent / "outside.png", seed=12)
    rows = [_row(f"good{i}", f"images/good{i}.png") for i in range(6)]
    rows += [
        # same image, two different reports, same labels: legitimate, both kept
        _row("shared_a", "images/shared.png", "First radiologist: small nodule in the left upper lobe."),
        _row("shared_b", "images/shared.png", "Second radiologist: a nodule of the left upper lobe is seen."),
        # same image, conflicting labels: both quarantined
        _row("conflict_a", "images/conflict.png", labels={"pneumonia": 1, "nodule": 0}),
        _row("conflict_b", "images/conflict.png", labels={"pneumonia": 0, "nodule": 0}),
        _row("missing", "images/nowhere.png"),
        _row("undecodable", "images/text.png"),
        _row("small", "images/tiny.png"),
        _row("escape", "../outside.png"),
        _row("short", "images/other0.png", "ok"),
        _row("long", "images/other1.png", "x" * 501),
        _row("bad_value", "images/other2.png", labels={"pneumonia": 2, "nodule": 0}),
        _row("bad_keys", "images/other3.png", labels={"pneumonia": 1, "covid": 1}),
        _row("good0", "images/other4.png"),  # second use of an existing study id
        _row("bad_split", "images/other5.png", split="holdout"),
        {"study_id": "no_report", "image": "images/other6.png", "labels": {"pneumonia": 0, "nodule": 0}},
    ]
    expected = {
        "conflict_a": "duplicate_image_label_conflict", "conflict_b": "duplicate_image_label_conflict",
        "missing": "image_missing", "undecodable": "image_undecodable", "small": "image_too_small",
        "escape": "image_outside_root", "short": "report_length", "long": "report_length",
        "bad_value": "label_value", "bad_keys": "label_keys", "bad_split": "split_value",
        "no_report": "report_missing",
    }
    with (root / "annotation.jsonl").open("w") as fh:
        for i, row in enumerate(rows):
            fh.write(json.dumps({**row, "source_row": i}) + "\n")
    return rows, expected


def _cfg(tmp_path, root, max_bad_fraction=1.0):
    return config_from_dict({
        "data": {"source": "jsonl", "root": str(root), "manifest": "annotation.jsonl",
                 "label_names": LABELS, "primary_label": "pneumonia"},
        "validate": {"min_report_chars": 10, "max_report_chars": 500, "min_image_side": 32,
                     "max_bad_fraction": max_bad_fraction, "out_dir": str(tmp_path / "reports"),
                     "manifest_dir": str(tmp_path / "manifest")},
    })


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("validate")
    root = tmp_path / "data"
    rows, expected = _dataset(root)
    summary = run_validation(_cfg(tmp_path, root))
    return tmp_path, rows, expected, summary


def test_each_rule_quarantines_its_row(validated):
    tmp_path, rows, expected, summary = validated
    quarantine = pd.read_csv(tmp_path / "manifest" / "quarantine.csv", keep_default_na=False)
    assert list(quarantine.columns) == ["source_row", "study_id", "file", "reason"]
    # the repeated study id is the second "good0" (source_row 18), not the first
    repeat = quarantine[quarantine["reason"].str.contains("duplicate_study_id")]
    assert repeat["source_row"].tolist() == [18]
    by_id = {sid: reason for sid, reason in zip(quarantine["study_id"], quarantine["reason"]) if sid != "good0"}
    assert set(by_id) == set(expected)
    for study_id, reason in expected.items():
        assert reason in by_id[study_id], (study_id, by_id[study_id])
    assert "text.png" in by_id["undecodable"] and "not an image" in by_id["undecodable"]
    assert quarantine.set_index("study_id").loc["escape", "file"] == "../outside.png"


def test_counts_add_up_and_outputs_exist(validated):
    tmp_path, rows, expected, summary = validated
    assert summary["rows_in"] == len(rows) == summary["rows_kept"] + summary["rows_quarantined"]
    assert summary["rows_quarantined"] == len(expected) + 1
    assert summary["reasons"]["report_length"] == 2 and summary["reasons"]["duplicate_image_label_conflict"] == 2
    failed = {e["reason"] for e in summary["expectations"] if not e["success"]}
    assert failed == set(expected.values()) | {"duplicate_study_id", "load_error"}  # no_report also has load_error
    assert (tmp_path / "reports" / "docs" / "index.html").is_file()
    on_disk = json.loads((tmp_path / "reports" / "summary.json").read_text())
    assert on_disk["rows_kept"] == summary["rows_kept"]


def test_kept_rows_carry_image_hash_and_duplicates_are_reported(validated):
    tmp_path, rows, expected, summary = validated
    kept = read_manifest(tmp_path / "manifest" / "validated.jsonl")
    assert sorted(kept["study_id"]) == sorted([f"good{i}" for i in range(6)] + ["shared_a", "shared_b"])
    shared = tmp_path / "data" / "images" / "shared.png"
    digest = hashlib.sha256(shared.read_bytes()).hexdigest()
    assert kept.set_index("study_id").loc["shared_a", "image_hash"] == digest
    groups = {g["image_hash"]: g for g in summary["duplicate_images"]}
    assert groups[digest]["reports_differ"] and not groups[digest]["labels_conflict"]
    assert any(g["labels_conflict"] for g in groups.values())


def test_too_many_bad_rows_fail_with_one_line(tmp_path):
    root = tmp_path / "data"
    _dataset(root)
    with pytest.raises(ValidationFailed) as err:
        run_validation(_cfg(tmp_path, root, max_bad_fraction=0.1))
    message = str(err.value)
    assert "\n" not in message and "13 of 21 rows quarantined" in message and "max_bad_fraction" in message
    assert (tmp_path / "manifest" / "quarantine.csv").is_file()  # written before failing, to be read


def test_bad_twins_do_not_quarantine_good_rows(tmp_path):
    """A new user's mixed folder: good images reused in rows with their own defect (a label "yes" or 2, an empty
    report, unknown label keys). Those rows are quarantined for their defect; their good twins are all kept, and
    only rows that pass their own checks take part in the same-image label-conflict decision."""
    root = tmp_path / "data"
    for i in range(12):
        _png(root / "images" / f"scan{i}.png", seed=100 + i)
    _png(root / "images" / "disputed.png", seed=200)
    good = [_row(f"good{i}", f"images/scan{i}.png") for i in range(12)]
    bad = [
        _row("yes_label", "images/scan0.png", labels={"pneumonia": "yes", "nodule": 0}),
        _row("two_label", "images/scan1.png", labels={"pneumonia": 2, "nodule": 0}),
        _row("empty_report", "images/scan2.png", "", labels={"pneumonia": 0, "nodule": 0}),
        _row("good11", "images/scan5.png", "   "),  # a blank report under a good row's study id, listed first
        _row("empty_and_yes", "images/scan3.png", "", labels={"pneumonia": "yes", "nodule": 1}),
        _row("bad_keys", "images/scan4.png", labels={"pneumonia": 0, "covid": 1}),
        _row("yes_again", "images/scan0.png", labels={"pneumonia": 0, "nodule": "yes"}),
    ]
    # two good rows of one image that disagree: still a real conflict, both quarantined
    disputed = [_row("disputed_a", "images/disputed.png", labels={"pneumonia": 1, "nodule": 0}),
                _row("disputed_b", "images/disputed.png", labels={"pneumonia": 0, "nodule": 0})]
    rows = good[:6] + bad[:4] + good[6:] + bad[4:] + disputed
    with (root / "annotation.jsonl").open("w") as fh:
        for i, row in enumerate(rows):
            fh.write(json.dumps({**row, "source_row": i}) + "\n")

    summary = run_validation(_cfg(tmp_path, root))

    kept = read_manifest(tmp_path / "manifest" / "validated.jsonl")
    quarantine = pd.read_csv(tmp_path / "manifest" / "quarantine.csv", keep_default_na=False)
    assert sorted(kept["study_id"]) == sorted(f"good{i}" for i in range(12))  # every good row kept
    assert summary["rows_in"] == len(rows) == summary["rows_kept"] + summary["rows_quarantined"]
    assert sorted(kept["source_row"]) == sorted(rows.index(r) for r in good)  # the later good11 too
    why = dict(zip(quarantine["study_id"], quarantine["reason"]))
    assert set(why) == {r["study_id"] for r in bad + disputed}
    assert why["good11"].startswith("report_length") and "duplicate_study_id" not in why["good11"]
    for study_id in ("yes_label", "two_label", "yes_again"):
        assert why[study_id].startswith("label_value"), why[study_id]
    assert why["empty_report"].startswith("report_length") and why["bad_keys"].startswith("label_keys")
    own = {r["study_id"] for r in bad}
    assert not any("duplicate_image_label_conflict" in why[s] for s in own)  # blamed for their own defect only
    assert why["disputed_a"] == why["disputed_b"] == "duplicate_image_label_conflict"
    assert summary["reasons"]["duplicate_image_label_conflict"] == 2
    # the summary still lists every reused image, with all its rows, bad twins included
    groups = {tuple(sorted(g["study_ids"])): g for g in summary["duplicate_images"]}
    assert ("good0", "yes_again", "yes_label") in groups and ("empty_report", "good2") in groups
    assert not groups[("good0", "yes_again", "yes_label")]["labels_conflict"]
    src = {r["study_id"]: i for i, r in enumerate(rows)}
    assert sorted(groups[("good0", "yes_again", "yes_label")]["own_defect_rows"]) == sorted(
        [src["yes_label"], src["yes_again"]])
    assert groups[("disputed_a", "disputed_b")]["labels_conflict"]


def test_data_docs_load_nothing_from_the_network(validated):
    """The Data Docs render offline: no http(s) stylesheet, script or image, and every local file a page or its
    stylesheets use exists (GX's own pages link a CDN for each of them)."""
    tmp_path, rows, expected, summary = validated
    docs = tmp_path / "reports" / "docs"
    pages = sorted(docs.rglob("*.html"))
    assert len(pages) >= 4  # index, two suites, their validation results
    checked = 0
    for page in pages:
        html = page.read_text("utf-8")
        assert not re.search(r"<(?:link|script|img)\b[^>]*?(?<![\w-])(?:href|src)=\"https?:", html), page
        assert not re.search(r"url\(['\"]?https?:", html), page
        for ref in re.findall(r"(?<![\w-])(?:href|src)=\"([^\"#?]+)", html) + re.findall(r"url\('([^')]+)'\)", html):
            if re.match(r"(https?|mailto|javascript|data):", ref):
                continue
            assert (page.parent / ref).is_file(), f"{page.relative_to(docs)} -> {ref}"
            checked += 1
    for css in (docs / "static" / "vendor").rglob("*.css"):
        for ref in re.findall(r"url\(['\"]?([^'\")?#]+)", css.read_text("utf-8")):
            assert not ref.startswith(("http:", "https:", "//")), css
            if not ref.startswith("data:"):
                assert (css.parent / ref).is_file(), f"{css.relative_to(docs)} -> {ref}"
    index = (docs / "index.html").read_text("utf-8")
    for local in ("vendor/bootstrap/css/bootstrap.min.css", "vendor/jquery/jquery.min.js",
                  "vendor/bootstrap/js/bootstrap.bundle.min.js", "vendor/font-awesome/css/all.min.css",
                  "vendor/medvlm/data_docs_table.js"):
        assert f'"static/{local}"' in index
    assert checked > 20
    assert "vega" not in index  # no chart on these pages, so Vega is not loaded
