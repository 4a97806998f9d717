"""evaluate() end to end on a tiny fake generation set, report building, and bad-input errors."""

import json

import pytest

from medvlm.config import config_from_dict
from medvlm.errors import EvaluationError
from medvlm.evaluate import check_generations, evaluate, evaluation_units
from medvlm.report import build_report

NAMES = ["pneumonia", "nodule"]
REPORTS = [
    ("s0", "h0", "Ground-glass opacity in the right lower lobe. No effusion.", {"pneumonia": 1, "nodule": 0}),
    ("s1", "h1", "A small solid nodule in the left upper lobe. Lungs otherwise clear.", {"pneumonia": 0, "nodule": 1}),
    ("s2", "h2", "Both lungs are clear. No nodule or consolidation.", {"pneumonia": 0, "nodule": 0}),
    ("s2#1", "h2", "Lungs clear, no focal lesion.", {"pneumonia": 0, "nodule": 0}),  # second report of one image
    ("s3", "h3", "Patchy consolidation in both lower lobes, suggesting pneumonia.", {"pneumonia": 1, "nodule": 0}),
]


def make_cfg(tmp_path, **evaluate):
    split = tmp_path / "split"
    split.mkdir()
    rows = [{"study_id": s, "images": [f"images/{h}.png"], "image_hash": h, "report": r, "labels": y, "source_row": i}
            for i, (s, h, r, y) in enumerate(REPORTS)]
    (split / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return config_from_dict({
        "data": {"label_names": NAMES, "root": str(tmp_path / "data")},
        "split": {"out_dir": str(split)},
        "labeler": {"out_dir": str(tmp_path / "no_labeler")},
        "train": {"out_dir": str(tmp_path / "models")},
        "evaluate": {"out_dir": str(tmp_path / "reports"), "bootstrap_iterations": 200, **evaluate},
        "register": {"tracking_uri": "none"},
    })


def fake_generations():
    return [
        {"study_id": "s0", "generated": "Ground-glass opacity in the right lower lobe.", "probabilities": {"pneumonia": 0.9, "nodule": 0.1}},
        {"study_id": "s1", "generated": "A nodule in the left upper lobe.", "probabilities": {"pneumonia": 0.2, "nodule": 0.7}},
        {"study_id": "s2", "generated": "Both lungs are clear.", "probabilities": {"pneumonia": 0.1, "nodule": 0.2}},
        {"study_id": "s3", "generated": "Consolidation in both lower lobes.", "probabilities": {"pneumonia": 0.6, "nodule": 0.3}},
    ]


def test_units_group_reports_of_one_image(tmp_path):
    from medvlm.manifest import read_manifest

    cfg = make_cfg(tmp_path)
    units = evaluation_units(read_manifest(tmp_path / "split" / "test.jsonl"))
    assert [u["unit_id"] for u in units] == ["s0", "s1", "s2", "s3"]
    assert units[2]["row_ids"] == ["s2", "s2#1"] and len(units[2]["references"]) == 2


def test_evaluate_writes_every_declared_file(tmp_path):
    cfg = make_cfg(tmp_path)
    heat = {"label": "pneumonia", "probability": 0.9, "grid": [[0.0, 1.0], [0.5, 0.0]]}  # medvlm.explain, models only
    result = evaluate(cfg, "fake", [{**g, **({"heatmap": heat} if g["study_id"] == "s0" else {})}
                                    for g in fake_generations()])
    reports = tmp_path / "reports"
    written = json.loads((reports / "metrics" / "fake.json").read_text())
    assert written["n_test"] == 4 and written["n_test_rows"] == 5 and len(written["test_data_hash"]) == 64
    for name in ["BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "medvlm_BLEU_4", "DEM_accuracy", "DEM_auroc"]:
        m = written["metrics"][name]
        assert m["n"] == 4 and m["value"] is not None, name
    assert written["metrics"]["DEM_accuracy"]["value"] == 1.0  # probabilities > 0.5 exactly where pneumonia
    assert "no heads.npz" in written["clinical_efficacy"]["labeler"]
    assert "r2gen" in json.dumps(written["conventions"]).lower() or "R2Gen" in written["conventions"]["nlg"]
    gens = [json.loads(line) for line in (reports / "generations" / "fake.jsonl").read_text().splitlines()]
    assert [g["study_id"] for g in gens] == ["s0", "s1", "s2", "s3"] and len(gens[2]["references"]) == 2
    assert gens[0]["heatmap"] == heat and "heatmap" not in gens[1]
    assert result["metrics"]["BLEU_4"] == written["metrics"]["BLEU_4"]

    evaluate(cfg, "other", [{**g, "generated": "lungs clear ."} for g in fake_generations()])
    built = build_report(cfg)
    table = (reports / "results.md").read_text()
    assert "| fake |" in table and "| other |" in table and written["test_data_hash"] in table
    assert (reports / "examples.html").read_text().count("<tr>") == 4
    assert built["plots"] and all((tmp_path / "reports" / "plots").joinpath(p.split("/")[-1]).is_file() for p in built["plots"])
    summary = json.loads((reports / "summary.json").read_text())
    assert summary["fake"]["CIDEr"] > summary["other"]["CIDEr"]


@pytest.mark.parametrize(
    "generations,message",
    [
        ([], r"no generation for test studies \['s0'"),
        (fake_generations()[:3], r"no generation for test studies \['s3'\]"),
        ([*fake_generations()[:3], {"study_id": "s3", "generated": "  "}], r"empty generated report .*\['s3'\]"),
        ([*fake_generations(), {"study_id": "zz", "generated": "x"}], r"not in the test split: \['zz'\]"),
        ([*fake_generations(), fake_generations()[0]], r"more than once: \['s0'\]"),
    ],
)
def test_bad_generations_name_the_ids(tmp_path, generations, message):
    from medvlm.manifest import read_manifest

    make_cfg(tmp_path)
    units = evaluation_units(read_manifest(tmp_path / "split" / "test.jsonl"))
    with pytest.raises(EvaluationError, match=message):
        check_generations(units, generations)


def test_unknown_name_and_empty_report_dir(tmp_path):
    cfg = make_cfg(tmp_path)
    with pytest.raises(EvaluationError, match="neither a baseline"):
        evaluate(cfg, "nonexistent")
    with pytest.raises(EvaluationError, match="no evaluated models"):
        build_report(cfg)


def test_rule_labeler_scores_generated_against_reference_reports_per_label(tmp_path):
    cfg = make_cfg(tmp_path, rule_ce=True)
    written = evaluate(cfg, "fake", fake_generations())["metrics"]
    # basic rules: references read pneumonia only in s3 ("suggesting pneumonia"), nodule only in s1 ("no nodule" in
    # s2 is negated); generated texts name the s1 nodule but not the s3 pneumonia
    assert written["RULE_nodule_precision"]["value"] == 1.0 and written["RULE_nodule_recall"]["value"] == 1.0
    assert written["RULE_pneumonia_f1"]["value"] == 0.0 and written["RULE_accuracy"]["value"] == 0.75
    assert written["RULE_micro_precision"]["value"] == 1.0 and written["RULE_micro_recall"]["value"] == 0.5
    assert written["RULE_micro_f1"]["value"] == pytest.approx(2 / 3) and written["RULE_macro_f1"]["value"] == 0.5
    assert written["RULE_micro_f1"]["ci_low"] is not None  # bootstrapped like the other families
    assert "DEM_pneumonia_f1" in written and "CE_micro_f1" not in written  # no trained labeler here
    build_report(cfg)
    table = (tmp_path / "reports" / "results.md").read_text()
    assert "RULE_micro_f1" in table and "Per-label clinical efficacy: rule labeler" in table
    assert "| nodule | 1.00 / 1.00 / 1.00 |" in table and "| **micro** | 1.00 / 0.50 / 0.67 |" in table
