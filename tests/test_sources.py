"""Loaders: every source lands in the manifest shape; malformed rows are kept with a load_error, never dropped."""

import json

import pytest

from medvlm.config import config_from_dict
from medvlm.data.sources import keyword_labels, load_source, source_paper_key, source_paper_keys
from medvlm.errors import ConfigError, DataError
from medvlm.manifest import COLUMNS


def _cfg(root, source, manifest, **data):
    data = {"source": source, "root": str(root), "manifest": manifest, **data}
    data.setdefault("label_names", ["covid"])
    data.setdefault("primary_label", data["label_names"][0])
    return config_from_dict({"data": data})


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


def test_source_paper_key_examples_of_the_rule():
    assert source_paper_key("2020.01.24.919183-p27-132.png") == "2020.01.24.919183"
    assert source_paper_key("kjr-21-e24-p2-8.png") == "kjr-21-e24"
    assert source_paper_key("2020.02.26.20026989-p34-114_1%0.png") == "2020.02.26.20026989"
    assert source_paper_key("PIIS0140673620302117_2.png") == "PIIS0140673620302117"
    assert source_paper_key("39%3.jpg") == "jpg:39"
    assert source_paper_key("Other-name%2.png") == "Other-name"
    # numeric .png names merge into runs of consecutive integers; .jpg numbers do not
    keys = source_paper_keys(["1210.png", "1211.png", "1212.png", "1215.png", "7.jpg", "8.jpg"])
    assert keys == ["png:1210", "png:1210", "png:1210", "png:1215", "jpg:7", "jpg:8"]


def _cov_row(image_id, label=1, report="Ground glass opacity in the right lower lobe.", **extra):
    return {"image_id": image_id, "image": f"images/{image_id}", "label": label, "report": report,
            "report_zh": "右肺下叶磨玻璃影。", "source_row": extra.pop("source_row", 0), **extra}


def test_cov_ctr_loader(tmp_path):
    rows = [
        _cov_row("2020.01.24.919183-p27-132.png", source_row=0),
        _cov_row("2020.01.24.919183-p27-133.png", source_row=1),
        _cov_row("20.jpg", 0, "First reading of the image.", source_row=2),
        _cov_row("20.jpg", 0, "Second reading of the image.", source_row=3),
        _cov_row("10.png", 0, source_row=4),
        _cov_row("11.png", 0, source_row=5),
        "{not json",
        {"image_id": "12.png", "image": "images/12.png", "label": 2, "source_row": 7},  # no report, bad label
    ]
    _write_jsonl(tmp_path / "annotation.jsonl", rows)
    df = load_source(_cfg(tmp_path, "cov_ctr", "annotation.jsonl"))
    assert list(df.columns) == [*COLUMNS, "load_error"]
    assert len(df) == len(rows)  # nothing dropped
    assert df["study_id"].tolist()[2:4] == ["20.jpg", "20.jpg#1"]
    assert df["report"].tolist()[2:4] == ["First reading of the image.", "Second reading of the image."]
    assert df["group"].tolist()[:6] == ["2020.01.24.919183"] * 2 + ["jpg:20"] * 2 + ["png:10"] * 2
    assert df.loc[0, "labels"] == {"covid": 1} and df.loc[0, "split"] is None
    broken = df.iloc[6]
    assert "not valid JSON" in broken["load_error"] and broken["images"] == [] and broken["source_row"] == 6
    bad = df.iloc[7]
    assert bad["report"] is None and "missing report" in bad["load_error"]
    assert bad["labels"] == {"covid": 2} and bad["group"] == "png:10"  # 12.png joins the 10-11 run

    zh = load_source(_cfg(tmp_path, "cov_ctr", "annotation.jsonl", report_language="zh"))
    assert zh.loc[0, "report"] == "右肺下叶磨玻璃影。"


def test_cov_ctr_needs_one_label_and_a_readable_file(tmp_path):
    _write_jsonl(tmp_path / "annotation.jsonl", [_cov_row("1.png")])
    with pytest.raises(ConfigError, match="one label"):
        load_source(_cfg(tmp_path, "cov_ctr", "annotation.jsonl", label_names=["covid", "nodule"]))
    with pytest.raises(DataError, match="not found"):
        load_source(_cfg(tmp_path, "cov_ctr", "missing.jsonl"))
    (tmp_path / "latin1.jsonl").write_bytes('{"report": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8") as err:
        load_source(_cfg(tmp_path, "cov_ctr", "latin1.jsonl"))
    assert str(err.value).startswith(str(tmp_path / "latin1.jsonl")) and "\n" not in str(err.value)


def test_r2gen_loader_keeps_official_split_and_labels_from_keywords(tmp_path):
    annotation = {
        "train": [
            {"id": "CXR1", "report": "Small right pleural effusion. No pneumothorax.",
             "image_path": ["CXR1/0.png", "CXR1/1.png"]},
            {"id": "CXR2", "report": "The lungs are clear. No effusion or pneumothorax.", "image_path": ["CXR2/0.png"]},
        ],
        "val": [{"id": "CXR3", "report": "Heart size is normal.", "image_path": []}],
        "test": [{"id": "CXR4", "image_path": ["CXR4/0.png"], "subject_id": 17}],
    }
    (tmp_path / "annotation.json").write_text(json.dumps(annotation))
    cfg = _cfg(tmp_path, "r2gen", "annotation.json", image_dir="images",
               label_names=["effusion", "pneumothorax", "normal"], primary_label="effusion")
    df = load_source(cfg)
    assert df["split"].tolist() == ["train", "train", "val", "test"]
    assert df["source_row"].tolist() == [0, 1, 2, 3]
    assert df.loc[0, "images"] == ["images/CXR1/0.png", "images/CXR1/1.png"]
    assert df.loc[0, "labels"] == {"effusion": 1, "pneumothorax": 0, "normal": 0}
    assert df.loc[1, "labels"] == {"effusion": 0, "pneumothorax": 0, "normal": 1}
    assert df.loc[2, "load_error"] == "empty image list"
    assert df.loc[3, "report"] is None and "missing report" in df.loc[3, "load_error"]
    assert df.loc[3, "group"] == "17"  # patient-level group where the source names the patient

    (tmp_path / "broken.json").write_text('{"train": [')
    with pytest.raises(DataError, match="not valid JSON"):
        load_source(_cfg(tmp_path, "r2gen", "broken.json"))
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(DataError, match="train/val/test"):
        load_source(_cfg(tmp_path, "r2gen", "list.json"))


def test_keyword_labels_negation_and_normal():
    names = ["consolidation", "ground_glass", "normal"]
    assert keyword_labels("Patchy ground-glass opacity. No consolidation.", names) == {
        "consolidation": 0, "ground_glass": 1, "normal": 0}
    assert keyword_labels("No consolidation, no ground glass.", names)["normal"] == 1
    assert keyword_labels(None, names) == {"consolidation": 0, "ground_glass": 0, "normal": 1}


def test_csv_loader_label_layouts_and_image_lists(tmp_path):
    (tmp_path / "m.csv").write_text(
        "image,report,label,modality\n"
        "images/a.png,Consolidation in the left lower lobe.,1,CT\n"
        'images/b.png,"Clear lungs, no effusion.",0,X-ray\n'
        "images/c.png,Label is not binary here.,maybe,CT\n"
        ",No image in this row at all.,0,CT\n"
    )
    df = load_source(_cfg(tmp_path, "csv", "m.csv"))
    assert len(df) == 4 and df["labels"].tolist()[:3] == [{"covid": 1}, {"covid": 0}, {"covid": "maybe"}]
    assert df.loc[0, "study_id"] == "images/a.png" and df.loc[0, "group"] == "images/a.png"
    assert df.loc[3, "images"] == [] and df.loc[3, "load_error"] == "empty image list"

    (tmp_path / "multi.csv").write_text(
        "study_id,images,report,nodule,effusion,split\n"
        's1,"[""v/1.png"", ""v/2.png""]",Nodule in the right upper lobe.,1,0,train\n'
        "s2;x,v/3.png; v/4.png,Small effusion.,0,1,test\n"
    )
    cfg = _cfg(tmp_path, "csv", "multi.csv", label_names=["nodule", "effusion"])
    df = load_source(cfg)
    assert df["images"].tolist() == [["v/1.png", "v/2.png"], ["v/3.png", "v/4.png"]]
    assert df["labels"].tolist() == [{"nodule": 1, "effusion": 0}, {"nodule": 0, "effusion": 1}]
    assert df["split"].tolist() == ["train", "test"] and df["study_id"].tolist() == ["s1", "s2;x"]

    (tmp_path / "nolabel.csv").write_text("image,report\na.png,text\n")
    with pytest.raises(DataError, match="no labels"):
        load_source(_cfg(tmp_path, "csv", "nolabel.csv"))
    (tmp_path / "noreport.csv").write_text("image,label\na.png,1\n")
    with pytest.raises(DataError, match="no 'report' column"):
        load_source(_cfg(tmp_path, "csv", "noreport.csv"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="not a readable CSV"):
        load_source(_cfg(tmp_path, "csv", "empty.csv"))


def test_jsonl_loader_reads_the_phantom_layout(tmp_path):
    rows = [
        {"study_id": "p0", "image": "images/p0.png", "report": "Consolidation.", "findings": ["consolidation"],
         "labels": {"pneumonia": 1, "consolidation": 1}, "group": "g0", "source_row": 0},
        {"study_id": "p1", "image": "images/p1.png", "report": "Normal chest CT.",
         "labels": {"pneumonia": 0, "consolidation": 0}, "group": "g1", "source_row": 1},
        {"study_id": "p2", "images": "images/p2.png", "report": "Text.", "labels": "oops", "source_row": 2},
    ]
    _write_jsonl(tmp_path / "annotation.jsonl", rows)
    cfg = _cfg(tmp_path, "jsonl", "annotation.jsonl", label_names=["pneumonia", "consolidation"])
    df = load_source(cfg)
    assert df["study_id"].tolist() == ["p0", "p1", "p2"] and df["group"].tolist() == ["g0", "g1", "p2"]
    assert df.loc[0, "labels"] == {"pneumonia": 1, "consolidation": 1} and df.loc[0, "load_error"] is None
    assert df.loc[2, "images"] == ["images/p2.png"] and "labels is not a JSON object" in df.loc[2, "load_error"]
