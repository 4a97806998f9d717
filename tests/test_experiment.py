"""The experiment grid: cells, rebased outputs, resume by skipping finished cells, aggregation over seeds."""

import json
from pathlib import Path

import pytest

from medvlm import experiment as ex
from medvlm import experiment_cells as xc
from medvlm.config import config_from_dict
from medvlm.errors import ConfigError, EvaluationError


def _cfg(tmp_path, **experiment):
    return config_from_dict({
        "train": {"strategies": ["freeze", "lora"]},
        "evaluate": {"baselines": ["consensus"]},
        "experiment": {"name": "t", "out_root": str(tmp_path), "seeds": [0, 1],
                       "ablations": {"no_disc": {"model.discrimination": False, "model.prior_prompt": False},
                                     "no_prompt": {"model.prompt_template": False}},
                       "ablation_strategies": ["freeze"], **experiment},
    })


def test_grid_cells_and_rebased_paths(tmp_path):
    cfg = _cfg(tmp_path)
    keys = [c.key for c in xc.cells(cfg)]
    # seed-major order: every cell of seed 0 before any of seed 1; ablations only for freeze
    assert keys[:4] == ["freeze/full/seed0", "freeze/no_disc/seed0", "freeze/no_prompt/seed0", "lora/full/seed0"]
    assert len(keys) == 8 and keys[4].endswith("seed1")
    cell = xc.cells(cfg)[1]
    ccfg = xc.cell_config(cfg, cell)
    assert ccfg.model.discrimination is False and ccfg.model.prompt_template is True and ccfg.seed == 0
    root = tmp_path / "t"
    assert Path(ccfg.train.out_dir) == root / "cells/freeze/no_disc/seed0/models"
    assert Path(ccfg.split.out_dir) == root / "data/split" and Path(ccfg.labeler.out_dir) == root / "models/labeler"
    # the profile itself is untouched
    assert cfg.model.discrimination is True and cfg.train.out_dir == "models"


def test_factorial_grid_and_bad_settings(tmp_path):
    cfg = _cfg(tmp_path, factorial=True, seeds=[0])
    assert list(xc.variants(cfg)) == ["full", "no_disc", "no_prompt", "no_disc+no_prompt"]
    both = xc.cell_config(cfg, [c for c in xc.cells(cfg) if c.variant == "no_disc+no_prompt"][0])
    assert both.model.discrimination is False and both.model.prompt_template is False
    with pytest.raises(ConfigError, match="not in the experiment's strategies"):
        xc.cells(_cfg(tmp_path, ablation_strategies=["ptuning_v2"]))
    bad = _cfg(tmp_path, ablations={"typo": {"model.discriminaton": False}})
    with pytest.raises(ConfigError, match="unknown setting 'discriminaton'"):
        xc.cell_config(bad, xc.cells(bad)[1])


def _fake_result(cider, data_hash="h"):
    return {"test_data_hash": data_hash, "n_test": 5,
            "metrics": {"CIDEr": {"value": cider, "ci_low": cider - 0.1, "ci_high": cider + 0.1},
                        "BLEU_4": {"value": cider / 10, "ci_low": None, "ci_high": None}}}


def test_run_skips_finished_cells_and_aggregates_seeds(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    calls = []

    def fake_stage(name):
        def run(c, *args):
            calls.append((name, *args))
            return {}
        return run

    def fake_train(c, strategy):
        calls.append(("train", strategy, c.seed, c.model.discrimination))
        return {}

    def fake_evaluate(c, name):
        calls.append(("evaluate", name))
        path = Path(c.evaluate.out_dir) / "metrics" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        cider = 1.0 + c.seed + (0.5 if name == "lora" else 0.0) - (0.0 if c.model.discrimination else 0.3)
        path.write_text(json.dumps(_fake_result(cider)))
        return {}

    import medvlm.data.split
    import medvlm.data.validate
    import medvlm.evaluate
    import medvlm.features
    import medvlm.labeler
    import medvlm.train

    monkeypatch.setattr(medvlm.data.validate, "run_validation", fake_stage("validate"))
    monkeypatch.setattr(medvlm.data.split, "run_split", fake_stage("split"))
    monkeypatch.setattr(medvlm.features, "extract_features", fake_stage("features"))
    monkeypatch.setattr(medvlm.labeler, "train_labeler", fake_stage("labeler"))
    monkeypatch.setattr(medvlm.train, "train", fake_train)
    monkeypatch.setattr(medvlm.evaluate, "evaluate", fake_evaluate)

    out = ex.run_experiment(cfg, only=["freeze/full", "lora"], log=lambda *_: None)
    assert out["todo"] == ["freeze/full/seed0", "lora/full/seed0", "freeze/full/seed1", "lora/full/seed1"]
    assert [c[0] for c in calls[:4]] == ["validate", "split", "features", "labeler"]
    assert ("train", "freeze", 1, True) in calls

    # a second run re-runs no shared stage and no finished cell
    calls.clear()
    out = ex.run_experiment(cfg, log=lambda *_: None)
    assert out["todo"] == ["freeze/no_disc/seed0", "freeze/no_prompt/seed0", "freeze/no_disc/seed1", "freeze/no_prompt/seed1"]
    assert {c[0] for c in calls} == {"train", "evaluate"}

    results = json.loads((tmp_path / "t/results.json").read_text())
    freeze = results["rows"]["freeze"]["CIDEr"]
    assert freeze["value"] == pytest.approx(1.5) and freeze["n_runs"] == 2  # seeds 0 and 1: 1.0 and 2.0
    assert freeze["ci_low"] < 1.5 < freeze["ci_high"]
    assert results["rows"]["freeze − no_disc"]["CIDEr"]["value"] == pytest.approx(1.2)
    assert results["rows"]["consensus"]["CIDEr"]["value"] == pytest.approx(1.0)  # the baseline, evaluated once
    table = (tmp_path / "t/results.md").read_text()
    assert "| lora | 0,1 | " in table and "| consensus | – | " in table

    # changing a cell's training setting with finished cells refuses too: the old rows would pass for the new ones
    longer = config_from_dict({**cfg.model_dump(mode="json", by_alias=True), "train": {"epochs": 99}})
    with pytest.raises(ConfigError, match=r"freeze/full/seed0.*train\.epochs 10 -> 99"):
        ex.run_experiment(longer, log=lambda *_: None)
    # settings no cell result depends on (another baseline, the list of strategies) leave the cells standing
    calls.clear()
    more = config_from_dict({**cfg.model_dump(mode="json", by_alias=True),
                             "train": {"strategies": ["freeze", "lora", "ptuning_v2"]},
                             "experiment": {**cfg.experiment.model_dump(), "strategies": ["freeze", "lora"]}})
    assert ex.run_experiment(more, log=lambda *_: None)["todo"] == []

    # changing a data setting with finished cells refuses instead of mixing stale and fresh rows
    moved = config_from_dict({**cfg.model_dump(mode="json", by_alias=True), "split": {"test_size": 0.3}})
    with pytest.raises(ConfigError, match="other data/feature/labeler settings"):
        ex.run_experiment(moved, log=lambda *_: None)


def test_a_pretrain_variant_pretrains_in_its_cell_before_training(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, seeds=[0], baselines=[], ablations={"pretrained": {"pretrain.enabled": True}})
    xc.experiment_root(cfg).mkdir(parents=True)
    (xc.experiment_root(cfg) / "shared_stages.json").write_text(json.dumps(ex.shared_signature(xc.shared_config(cfg))))
    calls = []

    def fake_pretrain(c):
        calls.append(("pretrain", c.seed, c.pretrain.out_dir))
        Path(c.pretrain.out_dir).mkdir(parents=True)
        (Path(c.pretrain.out_dir) / "config.json").write_text("{}")

    def fake_train(c, strategy):
        calls.append(("train", strategy, c.pretrain.enabled))

    def fake_evaluate(c, name):
        path = Path(c.evaluate.out_dir) / "metrics" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_fake_result(1.0)))

    import medvlm.evaluate
    import medvlm.pretrain
    import medvlm.train

    monkeypatch.setattr(medvlm.pretrain, "pretrain_vision", fake_pretrain)
    monkeypatch.setattr(medvlm.train, "train", fake_train)
    monkeypatch.setattr(medvlm.evaluate, "evaluate", fake_evaluate)
    ex.run_experiment(cfg, only=["freeze/full", "freeze/pretrained"], log=lambda *_: None)
    cell_models = tmp_path / "t/cells/freeze/pretrained/seed0/models"
    assert calls == [("train", "freeze", False), ("pretrain", 0, str(cell_models / "pretrain_vision")),
                     ("train", "freeze", True)]


def test_results_refuse_mixed_test_splits(tmp_path):
    cfg = _cfg(tmp_path, seeds=[0])
    for cell, data_hash in zip(xc.cells(cfg)[:2], ["a", "b"]):
        path = xc.cell_metrics_path(cfg, cell)
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(_fake_result(1.0, data_hash)))
    with pytest.raises(EvaluationError, match="different test splits"):
        ex.write_results(cfg)


def test_compare_document_checks_goals_and_prints_anchors(tmp_path):
    from medvlm.experiment_report import compare_experiments

    cfg = _cfg(tmp_path, name="a", goals={"a": {"CIDEr": 1.2, "BLEU_4": 0.05}},
               anchors=[{"model": "Paper", "source": "x 2020", "convention": "theirs", "BLEU_4": 0.57}])
    rows = {"freeze": _fake_result(1.5)["metrics"], "lora": _fake_result(1.1)["metrics"],
            "freeze − no_disc": _fake_result(9.0)["metrics"],  # ablation rows are never "the best model"
            "consensus": _fake_result(1.6)["metrics"], "oracle": _fake_result(5.0)["metrics"]}
    (tmp_path / "a").mkdir()
    (tmp_path / "a/results.json").write_text(json.dumps({"rows": rows, "seeds": {"freeze": [0]}, "test_data_hash": "h"}))
    text = compare_experiments(cfg, ["a"], tmp_path / "doc.md", "T").read_text()
    assert "best full model by CIDEr: `freeze`" in text
    assert "| CIDEr >= 1.2 | 1.500 | yes |" in text and "| BLEU_4 >= 0.05 | 0.150 | yes |" in text
    # freeze (1.5) is below the consensus baseline (1.6) on both metrics: said, not hidden
    assert "| above consensus on every metric | not above on: BLEU_4, CIDEr | **no** |" in text
    assert "| Paper | x 2020 | theirs |" in text and "0.570" in text
    with pytest.raises(EvaluationError, match="missing"):
        compare_experiments(cfg, ["absent"], tmp_path / "doc.md", "T")


def test_register_best_picks_the_best_full_cell_of_the_first_seed(tmp_path, monkeypatch):
    import medvlm.registry

    cfg = _cfg(tmp_path, register_best=True)
    for cell in xc.cells(cfg):
        cider = {"freeze/full/seed0": 1.2, "lora/full/seed0": 1.4, "freeze/no_disc/seed0": 9.0,
                 "freeze/full/seed1": 5.0}.get(cell.key)
        if cider is not None:
            path = xc.cell_metrics_path(cfg, cell)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_fake_result(cider)))
    seen = []
    monkeypatch.setattr(medvlm.registry, "register", lambda c: seen.append(c) or {"ok": True})
    assert ex.register_best(cfg) == {"ok": True}
    # ablation variants and later seeds never get registered: lora (1.4) beats freeze (1.2) among seed-0 full models
    assert seen[0].train.strategies == ["lora"]
    assert Path(seen[0].train.out_dir) == tmp_path / "t/cells/lora/full/seed0/models"


def test_settings_added_later_do_not_make_an_experiment_stale():
    stored = {"data": {"root": "d", "source": "jsonl"}, "features": {"image_size": 224}}
    newer = {"data": {"root": "d", "source": "jsonl", "report_labeler": "basic"}, "features": {"image_size": 224}}
    assert xc.restricted(newer, stored) == stored
    changed = {"data": {"root": "other", "source": "jsonl", "report_labeler": "basic"}, "features": {"image_size": 224}}
    assert xc.restricted(changed, stored) != stored
