"""The training loop: outputs, determinism, resume after a kill, Predictor round trip, early config errors."""

import csv
from pathlib import Path
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_medvlm import REPORTS, TRUNK_SHAPE, tiny_config, write_cached_split

from medvlm.errors import ConfigError, DataError
from medvlm.inference import Predictor
from medvlm.train import train


def _with_train(path, **changes):
    cfg = tiny_config(path)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=changes)})


def _weights(cfg, strategy):
    return load_file(f"{cfg.train.out_dir}/{strategy}/trainable.safetensors")


@pytest.mark.parametrize("strategy", ["freeze", "lora", "ptuning_v2"])
def test_train_writes_only_trainable_weights_and_a_log(tmp_path, strategy):
    cfg = tiny_config(tmp_path)
    write_cached_split(cfg)
    summary = train(cfg, strategy)
    assert summary["steps"] == summary["total_steps"] == 8  # 8 studies / batch 2 * 2 epochs
    out = tmp_path / "models" / strategy
    weights = _weights(cfg, strategy)
    assert 0 < len(weights) and all(not k.startswith("vision.trunk.") for k in weights)
    assert not any(k == "lm.model.embed_tokens.weight" for k in weights)
    meta = json.loads((out / "model_config.json").read_text())
    assert meta["strategy"] == strategy and meta["label_names"] == ["pneumonia", "effusion"]
    rows = list(csv.DictReader((out / "train_log.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert {"loss", "lm_loss", "disc_loss", "lr", "samples_per_s"} <= set(rows[0])
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    runs = []
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        cfg = tiny_config(tmp_path / name, seed=seed)
        write_cached_split(cfg)
        train(cfg, "lora")
        runs.append(_weights(cfg, "lora"))
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


@pytest.mark.parametrize("strategy", ["lora", "ptuning_v2"])
def test_resume_after_kill_ends_bit_identical(tmp_path, strategy):
    """2 steps + kill + resume == 4 uninterrupted steps (dropout on, so the RNG state must be restored too)."""
    changes = {"max_steps": 4, "checkpoint_every": 2, "grad_accum": 2, "batch_size": 1}
    whole, killed = _with_train(tmp_path / "whole", **changes), _with_train(tmp_path / "killed", **changes)
    write_cached_split(whole)
    train(whole, strategy)
    write_cached_split(killed)
    assert train(killed, strategy, stop_after=3)["stopped_early"]  # step 3 is lost: last checkpoint is step 2
    summary = train(killed, strategy)
    assert summary["resumed_from"] == 2
    a, b = _weights(whole, strategy), _weights(killed, strategy)
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_a = (tmp_path / "whole/models" / strategy / "train_log.csv").read_text()
    log_b = (tmp_path / "killed/models" / strategy / "train_log.csv").read_text()
    strip = lambda text: [line.rsplit(",", 1)[0] for line in text.splitlines()]  # samples/s is timing
    assert strip(log_a) == strip(log_b)


def test_changed_settings_do_not_resume_a_stale_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path)
    write_cached_split(cfg)
    train(cfg, "lora", stop_after=2)
    other = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 5e-4})})
    assert train(other, "lora")["resumed_from"] is None


def test_changed_training_data_retrains_from_step_zero(tmp_path):
    """Same settings, same number of rows, other data (a new split, new features): the checkpoint of the old data is
    not resumed (it would resume at step == total, train nothing and save the old weights again)."""
    cfg = tiny_config(tmp_path)
    write_cached_split(cfg)
    first = train(cfg, "lora")
    old = _weights(cfg, "lora")
    write_cached_split(cfg, seed=1, offset=1)
    again = train(cfg, "lora")
    assert again["resumed_from"] is None and again["steps"] == again["total_steps"] == first["total_steps"]
    new = _weights(cfg, "lora")
    assert old.keys() == new.keys() and not all(torch.equal(old[k], new[k]) for k in old)


def test_signature_covers_the_training_data_not_only_settings(tmp_path):
    from medvlm.train import run_signature

    cfg = tiny_config(tmp_path)
    write_cached_split(cfg)
    feats = torch.ones(2, 3)
    base = run_signature(cfg, "lora", feats)
    assert run_signature(cfg, "lora", feats) == base
    assert run_signature(cfg, "lora", feats + 1) != base  # other images (features), same split file
    write_cached_split(cfg, offset=1)  # other reports and labels, same features
    assert run_signature(cfg, "lora", feats) != base


@pytest.mark.parametrize("strategy, closed", [("freeze", False), ("ptuning_v2", True)])
def test_predictor_round_trip_gives_identical_outputs(tmp_path, strategy, closed):
    cfg = tiny_config(tmp_path, model={"closed_vocab": closed})
    write_cached_split(cfg)
    train(cfg, strategy)
    first = Predictor.load(tmp_path / "models" / strategy)
    second = Predictor.load(tmp_path / "models" / strategy, cfg=cfg)
    feats = torch.randn(3, *TRUNK_SHAPE).abs()
    a, b = first.predict_features(feats), second.predict_features(feats)
    assert a == b and len(a) == 3
    assert set(a[0]["probabilities"]) == {"pneumonia", "effusion"}
    trained = _weights(cfg, strategy)
    loaded = first.model.trainable_state_dict()
    assert all(torch.equal(trained[k], loaded[k]) for k in trained)
    images = [Image.new("L", (80, 90), color=c) for c in (20, 200)]
    out = first.predict(images)
    assert len(out) == 2 and all(isinstance(o["report"], str) for o in out)
    assert len(first.model.tokenizer(out[0]["report"])["input_ids"]) <= cfg.generate.max_new_tokens
    vocab = json.loads((tmp_path / "models" / strategy / "model_config.json").read_text())["output_vocab"]
    if closed:
        from medvlm.generation import generate_ids

        ids, _ = generate_ids(first.model, feats, first.cfg.generate)
        assert all(set(x) <= set(vocab) for x in ids) and any(ids)
        assert set(vocab) <= {t for r in REPORTS for t in first.model.layout.encode_report(r)}
    else:
        assert vocab is None


def test_bad_strategy_fails_before_any_work(tmp_path):
    cfg = tiny_config(tmp_path)  # no features written: a bad strategy must be reported first
    with pytest.raises(ConfigError, match="unknown"):
        train(cfg, "qlora")
    with pytest.raises(DataError, match="features"):
        train(cfg, "lora")


def test_stale_features_are_refused(tmp_path):
    cfg = tiny_config(tmp_path)
    write_cached_split(cfg)
    other = tiny_config(tmp_path, features={"image_size": 96})
    with pytest.raises(ConfigError, match="other settings"):
        train(other, "lora")


def test_mlflow_run_logs_params_and_metrics(tmp_path):
    pytest.importorskip("mlflow")
    cfg = _with_train(tmp_path, max_steps=2)
    cfg = cfg.model_copy(update={"register": cfg.register.model_copy(
        update={"tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}"})})
    write_cached_split(cfg)
    train(cfg, "lora")
    import mlflow

    mlflow.set_tracking_uri(cfg.register.tracking_uri)
    runs = mlflow.search_runs(experiment_names=["medvlm"])
    assert len(runs) == 1 and runs.iloc[0]["params.strategy"] == "lora"
    assert "metrics.loss" in runs.columns
    meta = json.loads((tmp_path / "models" / "lora" / "model_config.json").read_text())
    assert meta["train_summary"]["run_id"] == runs.iloc[0]["run_id"]


@pytest.mark.slow
def test_real_weights_smoke(tmp_path):
    """SmolLM2 (4 layers) + EfficientNet-Lite0: a few real steps, then a report from a raw image."""
    from medvlm.config import load_config
    from conftest import REPO

    base = load_config(REPO / "params.yaml")
    raw = base.model_dump(by_alias=True)
    raw["data"]["label_names"], raw["data"]["primary_label"] = ["pneumonia", "effusion"], "pneumonia"
    raw["features"].update(image_size=64, out_dir=str(tmp_path / "features"))
    raw["split"]["out_dir"] = str(tmp_path / "split")
    raw["train"].update(max_steps=3, batch_size=2, out_dir=str(tmp_path / "models"),
                        checkpoint_dir=str(tmp_path / "ckpt"))
    raw["generate"].update(max_new_tokens=8, num_beams=2)
    raw["register"]["tracking_uri"] = "none"
    from medvlm.config import config_from_dict

    cfg = config_from_dict(raw)
    write_cached_split(cfg, n=4)
    summary = train(cfg, "lora")
    assert summary["steps"] == 3
    predictor = Predictor.load(tmp_path / "models" / "lora")
    out = predictor.predict([Image.new("L", (128, 128), 60)])
    assert isinstance(out[0]["report"], str) and set(out[0]["probabilities"]) == {"pneumonia", "effusion"}


def test_prompt_template_off_trains_with_several_prompts_listed(tmp_path):
    """Regression: with the template off there is one input layout even when model.prompts lists several."""
    cfg = tiny_config(tmp_path, model={"prompt_template": False})
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"prompts": ["a question", "another question"]})})
    write_cached_split(cfg)
    summary = train(cfg, "freeze")
    assert summary["steps"] == summary["total_steps"]


# ---------------------------------------------------------------- multistage (ClinicalBLIP): one loop, two stages
MULTISTAGE = {"multistage": {"enabled": True, "stage1_epochs": 1, "stage2_epochs": 1}}


def _initial_trainable(cfg, strategy):
    """The weights train() starts from (same seed, same construction order)."""
    from medvlm.model.medvlm import MedVLM

    torch.manual_seed(cfg.seed)
    return MedVLM(cfg, strategy).trainable_state_dict()


@pytest.mark.parametrize("strategy", ["lora", "freeze"])
def test_multistage_freezes_the_lm_side_in_stage_one_only(tmp_path, strategy):
    cfg = tiny_config(tmp_path, train=MULTISTAGE)  # 8 studies / batch 2: 4 steps per stage
    write_cached_split(cfg)
    init = _initial_trainable(cfg, strategy)
    lm_side = [k for k in init if k.startswith("lm.")]
    assert lm_side and (strategy != "lora" or all("lora_" in k for k in lm_side))
    assert train(cfg, strategy, stop_after=4)["stopped_early"]  # checkpoint at the stage boundary
    stage1 = torch.load(tmp_path / "checkpoints" / strategy / "checkpoint.pt", weights_only=True)
    assert stage1["step"] == 4 and stage1["stage"] == 0 and stage1["trainable"].keys() == init.keys()
    assert all(torch.equal(stage1["trainable"][k], init[k]) for k in lm_side)  # LoRA / LM layer untouched
    changed = {k for k in init if not torch.equal(stage1["trainable"][k], init[k])}
    assert any(k.startswith("vision.tail.") for k in changed) and any(k.startswith("bridge.") for k in changed)
    summary = train(cfg, strategy)
    assert summary["resumed_from"] == 4 and summary["steps"] == summary["total_steps"] == 8
    assert [s["steps"] for s in summary["stages"]] == [4, 4]
    final = _weights(cfg, strategy)
    assert all(not torch.equal(final[k], stage1["trainable"][k]) for k in lm_side)  # stage 2 trains the LM side


@pytest.fixture(scope="module")
def multistage_whole(tmp_path_factory):
    """6 uninterrupted lora steps over a stage boundary at step 4 (batch 1 x accumulation 2, 8 studies)."""
    tmp = tmp_path_factory.mktemp("whole")
    cfg = tiny_config(tmp, train={**MULTISTAGE, "max_steps": 6, "checkpoint_every": 2, "grad_accum": 2, "batch_size": 1})
    write_cached_split(cfg)
    train(cfg, "lora")
    return cfg


@pytest.mark.parametrize("stop_after, resumed_from", [(3, 2), (5, 4)])  # resume inside stage 1 / at the boundary
def test_multistage_resume_across_the_boundary_ends_bit_identical(tmp_path, multistage_whole, stop_after, resumed_from):
    killed = tiny_config(tmp_path, train={**MULTISTAGE, "max_steps": 6, "checkpoint_every": 2, "grad_accum": 2,
                                          "batch_size": 1})
    write_cached_split(killed)
    assert train(killed, "lora", stop_after=stop_after)["stopped_early"]
    summary = train(killed, "lora")
    assert summary["resumed_from"] == resumed_from and summary["steps"] == 6
    a, b = _weights(multistage_whole, "lora"), _weights(killed, "lora")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = lambda cfg: [line.rsplit(",", 1)[0] for line in (Path(cfg.train.out_dir) / "lora" / "train_log.csv").read_text().splitlines()]
    assert log(multistage_whole) == log(killed)


def test_multistage_settings_change_the_signature_only_when_enabled(tmp_path):
    from medvlm.train import run_signature

    base = tiny_config(tmp_path)
    off = tiny_config(tmp_path, train={"multistage": {"enabled": False, "stage1_epochs": 7}})
    on = tiny_config(tmp_path, train=MULTISTAGE)
    feats = torch.zeros(1)
    write_cached_split(base)  # the three share their paths
    assert run_signature(base, "lora", feats) == run_signature(off, "lora", feats) != run_signature(on, "lora", feats)
