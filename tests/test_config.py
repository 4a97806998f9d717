"""params.yaml's typed view: profiles merge, overrides apply, mistakes fail at start with one line."""

import pytest

from conftest import REPO
from medvlm.config import load_config
from medvlm.errors import ConfigError


def test_repo_params_and_profiles_load():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.data.primary_label in cfg.data.label_names
    cov = load_config(REPO / "params.yaml", overlays=[REPO / "params/cov_ctr.yaml"])
    assert cov.data.source == "cov_ctr" and cov.data.label_names == ["covid"]
    assert cov.train.strategies == cfg.train.strategies  # untouched sections survive the overlay
    gpu = load_config(REPO / "params.yaml", overlays=[REPO / "params/gpu.yaml"])
    assert gpu.model.lm_layers == 0


def test_override_sets_nested_value():
    cfg = load_config(REPO / "params.yaml", overrides=["train.lora.r=4", "model.discrimination=false"])
    assert cfg.train.lora.r == 4 and cfg.model.discrimination is False


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.strategies=[bogus]", "train.strategies"),
        ("model.qformer_hidden=30", "qformer_hidden"),
        ("data.primary_label=tumour", "primary_label"),
        ("train.typo_key=1", "typo_key"),
    ],
)
def test_bad_settings_fail_with_one_line(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "params.yaml", overrides=[override])
    message = str(err.value)
    assert needle in message and "\n" not in message and message.split(":")[0].endswith("params.yaml")


def test_missing_and_broken_params_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "p.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
