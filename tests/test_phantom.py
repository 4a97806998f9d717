"""The embedded phantom: deterministic, labels/reports equal to what is drawn, a shifted incoming batch."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from medvlm.config import config_from_dict
from medvlm.data.phantom import render_slice
from medvlm.data.phantom_report import IMPRESSION_MARK, KEYWORDS
from medvlm.data.phantom_study import INFECTION_TYPES, Scanner
from medvlm.data.synthesize import synthesize
from medvlm.errors import ConfigError

LABELS = ["pneumonia", "ground_glass", "consolidation", "crazy_paving", "nodule", "effusion", "fibrosis"]
SIDE_WORDS = {"right": "right", "left": "left", "bilateral": r"both|bilateral"}


def make_cfg(tmp_path: Path, n=24, size=256, seed=0, n_incoming=20, labels=LABELS):
    return config_from_dict({
        "synthesize": {"out_dir": str(tmp_path / "phantom"), "incoming_dir": str(tmp_path / "incoming"),
                       "n_images": n, "n_incoming": n_incoming, "image_size": size, "seed": seed,
                       "normal_fraction": 0.3, "incoming_normal_fraction": 0.05},
        "data": {"label_names": labels},
    })


def read_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "annotation.jsonl").read_text().splitlines()]


def pixels(folder: Path, row: dict) -> np.ndarray:
    return np.asarray(Image.open(folder / row["image"]))


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("phantom")
    cfg = make_cfg(tmp, n=60, n_incoming=40)
    summary = synthesize(cfg)
    return cfg, summary, tmp / "phantom", tmp / "incoming"


def test_layout_counts_and_label_keys(batch):
    cfg, summary, out, incoming = batch
    rows = read_rows(out)
    assert len(rows) == 60 and len(read_rows(incoming)) == 40
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"phantom_{i:05d}.png" for i in range(60)]
    for i, row in enumerate(rows):
        assert row["study_id"] == row["group"] == f"phantom_{i:05d}" and row["source_row"] == i
        assert row["image"] == f"images/phantom_{i:05d}.png" and row["images"] == [row["image"]]
        assert list(row["labels"]) == cfg.data.label_names
        img = Image.open(out / row["image"])
        assert img.mode == "L" and img.size == (256, 256)
    assert sum(not r["findings"] for r in rows) == round(60 * 0.3)
    assert summary["train"]["label_counts"] == {k: sum(r["labels"][k] for r in rows) for k in LABELS}


def test_labels_equal_drawn_findings(batch):
    rows = read_rows(batch[2])
    for row in rows:
        types = {f["type"] for f in row["findings"]}
        for name in LABELS[1:]:
            assert row["labels"][name] == int(name in types), row["study_id"]
        assert row["labels"]["pneumonia"] == int(bool(types & set(INFECTION_TYPES)))
        for f in row["findings"]:
            assert f["zone"] == row["slice_level"]
    assert any(r["labels"]["pneumonia"] for r in rows) and any(not r["labels"]["pneumonia"] for r in rows)


def test_manifest_row_fully_describes_its_image(batch):
    _, _, out, _ = batch
    for row in read_rows(out)[:8]:
        again = render_slice(row["slice_level"], row["findings"], 256, row["render_seed"])
        assert np.array_equal(again, pixels(out, row))


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = synthesize(make_cfg(tmp_path / "a", n=6, size=96, n_incoming=2))
    b = synthesize(make_cfg(tmp_path / "b", n=6, size=96, n_incoming=2))
    c = synthesize(make_cfg(tmp_path / "c", n=6, size=96, n_incoming=2, seed=1))
    pa, pb, pc = (Path(s["train"]["dir"]) for s in (a, b, c))
    for i in range(6):
        name = f"images/phantom_{i:05d}.png"
        assert (pa / name).read_bytes() == (pb / name).read_bytes()
    assert (pa / "annotation.jsonl").read_text() == (pb / "annotation.jsonl").read_text()
    assert any((pa / f"images/phantom_{i:05d}.png").read_bytes() != (pc / f"images/phantom_{i:05d}.png").read_bytes()
               for i in range(6))
    assert [r["report"] for r in read_rows(pa)] != [r["report"] for r in read_rows(pc)]
    # the incoming batch has its own seed stream: no training image reappears there
    train_bytes = {p.read_bytes() for p in (pa / "images").iterdir()}
    assert not train_bytes & {p.read_bytes() for p in (Path(a["incoming"]["dir"]) / "images").iterdir()}


def test_rerun_is_idempotent_and_drops_stale_images(tmp_path):
    synthesize(make_cfg(tmp_path, n=5, size=64, n_incoming=3))
    synthesize(make_cfg(tmp_path, n=2, size=64, n_incoming=1))
    assert len(list((tmp_path / "phantom" / "images").iterdir())) == 2
    assert len(read_rows(tmp_path / "phantom")) == 2
    assert len(list((tmp_path / "incoming" / "images").iterdir())) == 1


def _bright_blobs_in_lungs(row) -> int:
    """Bright pixels in the lungs that survive an opening wider than any vessel (vessels are <= ~2 px)."""
    img, lungs = render_slice(row["slice_level"], row["findings"], 256, row["render_seed"], return_lungs=True)
    lung = ndimage.binary_erosion(lungs["right"] | lungs["left"], iterations=3)
    disk = np.hypot(*np.mgrid[-3:4, -3:4]) <= 3
    return int((ndimage.binary_opening(img > 150, structure=disk) & lung).sum())


def test_normal_lungs_hold_only_vessels_and_dense_findings_show(batch):
    rows = read_rows(batch[2])
    normal = [r for r in rows if not r["findings"]]
    dense = [r for r in rows if {f["type"] for f in r["findings"]} & {"nodule", "consolidation"}]
    assert normal and dense
    assert all(_bright_blobs_in_lungs(r) == 0 for r in normal)
    assert all(_bright_blobs_in_lungs(r) > 20 for r in dense)


def test_effusion_is_a_dependent_bright_region_on_the_patients_side():
    seed = [5, 0, 0, 1]
    clear = render_slice("middle", [], 128, seed).astype(int)
    for side, image_half in (("right", slice(0, 64)), ("left", slice(64, 128))):
        other = slice(64, 128) if side == "right" else slice(0, 64)
        fluid = dict(type="effusion", side=side, zone="middle", distribution="dependent", extent="patchy")
        diff = render_slice("middle", [fluid], 128, seed).astype(int) - clear
        # patient's right = image left (radiological convention); fluid only there, and posterior (lower rows)
        assert (diff[:, image_half] > 40).sum() > 50 and np.abs(diff[:, other]).max() == 0
        rows = np.nonzero((diff > 40).any(axis=1))[0]
        assert rows.mean() > 64


def test_effusion_rows_have_bright_posterior_lung_band(batch):
    rows = read_rows(batch[2])

    def band_brightness(row, side):
        img, lungs = render_slice(row["slice_level"], row["findings"], 256, row["render_seed"], return_lungs=True)
        lung = ndimage.binary_erosion(lungs[side], iterations=2)  # skip the blurred pleural edge
        ys = np.nonzero(lung)[0]
        band = lung & (np.arange(256)[:, None] >= np.percentile(ys, 80))
        return float((img[band] > 150).mean())

    effusion = [(r, s) for r in rows for f in r["findings"] if f["type"] == "effusion"
                for s in (("right", "left") if f["side"] == "bilateral" else (f["side"],))]
    normal = [(r, s) for r in rows if not r["findings"] for s in ("right", "left")]
    assert effusion and normal
    assert min(band_brightness(r, s) for r, s in effusion) > 0.2
    assert max(band_brightness(r, s) for r, s in normal) < 0.1


def test_report_states_exactly_the_drawn_findings_and_sides(batch):
    for row in read_rows(batch[2]):
        findings_text, impression = row["report"].split(IMPRESSION_MARK)
        sentences = [s for s in re.split(r"(?<=\.)\s+", findings_text) if s]
        types = {f["type"] for f in row["findings"]}
        for kind, word in KEYWORDS.items():
            assert (word in findings_text) == (kind in types), (row["study_id"], kind, row["report"])
        for f in row["findings"]:
            [sentence] = [s for s in sentences if KEYWORDS[f["type"]] in s]
            for side, pattern in SIDE_WORDS.items():
                assert bool(re.search(pattern, sentence, re.I)) == (side == f["side"]), (sentence, f)
            if f["type"] != "effusion":
                zone = {"upper": "upper", "lower": "lower", "middle": r"middle|lingula|mid-lung"}[f["zone"]]
                assert re.search(zone, sentence)
                where = {"subpleural": "pleura", "peripheral": "periphe", "central": "central|perihilar"}
                assert re.search(where[f["distribution"]], sentence)
        assert ("pneumonia" in impression) == bool(row["labels"]["pneumonia"])


def test_report_wording_varies_but_facts_do_not(batch):
    rows = [r for r in read_rows(batch[2]) if not r["findings"]]
    assert len({r["report"] for r in rows}) > 1  # paraphrases of the same (normal) facts


def test_incoming_batch_has_another_scanner_and_prevalence(batch):
    _, summary, out, incoming = batch
    train_rows, new_rows = read_rows(out), read_rows(incoming)
    assert summary["incoming"]["normal"] < summary["train"]["normal"]
    assert sum(not r["findings"] for r in new_rows) == round(40 * 0.05)
    air = lambda img: img[:24, :24].astype(float)  # noqa: E731 - corner outside the body: scanner offset and noise
    train_air = np.stack([air(pixels(out, r)) for r in train_rows])
    new_air = np.stack([air(pixels(incoming, r)) for r in new_rows])
    assert new_air.mean() > train_air.mean() + 15
    assert new_air.std(axis=(1, 2)).mean() > 1.8 * train_air.std(axis=(1, 2)).mean()
    assert render_slice("upper", [], 64, [1], Scanner(0.12, 2.5)).mean() > render_slice("upper", [], 64, [1]).mean()


def test_label_names_subset_and_unknown(tmp_path):
    cfg = make_cfg(tmp_path, n=3, size=64, n_incoming=0, labels=["pneumonia", "nodule"])
    synthesize(cfg)
    assert all(list(r["labels"]) == ["pneumonia", "nodule"] for r in read_rows(tmp_path / "phantom"))
    with pytest.raises(ConfigError, match="cannot draw"):
        synthesize(make_cfg(tmp_path, n=3, size=64, labels=["pneumonia", "cardiomegaly"]))
