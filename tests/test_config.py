"""params.yaml's typed view: profiles merge, overrides apply, mistakes fail at start with one line."""

import pytest
import yaml

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
    cfg = load_config(REPO / "params.yaml", overrides=["train.lora.r=4", "model.discrimination=false", "model.prior_prompt=false"])
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


def _fields(model_cls, prefix=""):
    """(dotted name, FieldInfo, annotation) of every setting, nested sections included."""
    from pydantic import BaseModel

    for name, info in model_cls.model_fields.items():
        dotted = f"{prefix}{info.alias or name}"
        yield dotted, info
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            yield from _fields(kind, dotted + ".")


def test_params_yaml_is_the_only_source_of_values():
    """No setting has a value in code: every field is required, so code and tests built from a partial dict get
    the shipped params.yaml values (they used to get config.py's own, e.g. 96 report tokens against 160)."""
    from medvlm.config import Config, config_from_dict

    with_default = [name for name, info in _fields(Config) if not info.is_required()]
    assert with_default == []
    assert config_from_dict({}) == load_config(REPO / "params.yaml")
    shipped = yaml.safe_load((REPO / "params.yaml").read_text())
    built = config_from_dict({}).model_dump(mode="json", by_alias=True)
    assert built["model"]["max_report_tokens"] == shipped["model"]["max_report_tokens"]
    assert built["train"]["lora"]["target_modules"] == shipped["train"]["lora"]["target_modules"]


def test_a_partial_params_file_keeps_the_shipped_values(tmp_path):
    own = tmp_path / "params.yaml"
    own.write_text("train:\n  epochs: 2\ndata:\n  label_names: [covid]\n  primary_label: covid\n")
    cfg, shipped = load_config(own), load_config(REPO / "params.yaml")
    assert cfg.train.epochs == 2 and cfg.data.label_names == ["covid"]
    assert cfg.train.lr == shipped.train.lr and cfg.model == shipped.model


def test_the_wheel_ships_the_same_settings():
    """A built wheel carries params.yaml as package data (src/medvlm/params.yaml links to the checkout's)."""
    packaged = REPO / "src" / "medvlm" / "params.yaml"
    assert packaged.resolve() == (REPO / "params.yaml").resolve()


def test_a_profile_lists_its_own_ablation_grid(tmp_path):
    """Named entries (experiment.ablations, goals) are replaced as a whole: the grid a profile lists is its grid."""
    overlay = tmp_path / "profile.yaml"
    overlay.write_text("experiment:\n  ablations:\n    mine: {model.clues: true}\n  seeds: [0, 1]\n")
    cfg = load_config(REPO / "params.yaml", overlays=[overlay])
    assert list(cfg.experiment.ablations) == ["mine"] and cfg.experiment.seeds == [0, 1]
    assert cfg.experiment.baselines == load_config(REPO / "params.yaml").experiment.baselines
