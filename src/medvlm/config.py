"""Typed view of params.yaml, the single source of settings.

Every stage receives a `Config`; no stage reads params.yaml itself. Unknown keys are errors
(`extra="forbid"`), so a typo in params.yaml fails at start with one line instead of being ignored.
The section classes (medvlm.config_sections) hold types and ranges only, no values: every value comes from
params.yaml. A partial settings
tree (a user's own params file, an overlay, a test's dict) is laid over the shipped params.yaml (`default_params`),
so code built from `config_from_dict` runs exactly the settings `dvc repro` runs.
"""

from __future__ import annotations

import copy
import functools
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, Field, ValidationError, model_validator

# the sections are part of this module's interface: `from medvlm.config import ModelConfig` keeps working
from medvlm.config_sections import (  # noqa: F401
    CHEXPERT_LABELS, CnnTransformerConfig, DataConfig, EvaluateConfig, ExperimentConfig, FeaturesConfig,
    GenerateConfig, LabelerConfig, ModelConfig, MonitorConfig, MultistageConfig, PretrainConfig, RegisterConfig,
    RetrainConfig, RetrievalConfig, ServeConfig, SplitConfig, Strategy, SynthesizeConfig, TrainConfig,
    ValidateConfig, VolumeConfig, _Section,
)
from medvlm.errors import ConfigError, first_line

# `register` is also the name of ABCMeta.register on the model class; the field is what instances see.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Config(_Section):
    seed: int
    synthesize: SynthesizeConfig
    data: DataConfig
    validate_: ValidateConfig = Field(alias="validate")
    split: SplitConfig
    features: FeaturesConfig
    model: ModelConfig
    train: TrainConfig
    pretrain: PretrainConfig
    generate: GenerateConfig
    labeler: LabelerConfig
    evaluate: EvaluateConfig
    register: RegisterConfig = Field()  # Field(): else the inherited ABCMeta.register would become its default
    monitor: MonitorConfig
    retrain: RetrainConfig
    serve: ServeConfig
    experiment: ExperimentConfig
    volume: VolumeConfig

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True)

    @property
    def validation(self) -> ValidateConfig:
        return self.validate_

    @model_validator(mode="after")
    def _zero_shot_needs_pretraining(self) -> "Config":
        if self.model.clues and self.model.clue_source == "zero_shot" and not self.pretrain.enabled:
            raise ValueError("model.clue_source=zero_shot needs the contrastive encoder: set pretrain.enabled=true")
        if self.model.retrieval.enabled and self.features.multi_view == "concat":
            raise ValueError("model.retrieval embeds one view per study: use features.multi_view=mean with it")
        return self


# Mappings of named entries that a file or tree replaces as a whole instead of adding to: a profile's ablation grid
# is the grid it lists, not the shipped one plus its own.
_REPLACED_WHOLE = {("experiment", "ablations"), ("experiment", "goals")}


def _deep_merge(base: dict[str, Any], override: dict[str, Any], where: tuple[str, ...] = ()) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and (*where, key) not in _REPLACED_WHOLE:
            out[key] = _deep_merge(out[key], value, (*where, key))
        else:
            out[key] = value
    return out


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def load_config(
    path: str | Path = "params.yaml",
    overlays: list[str | Path] | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
) -> Config:
    """Read params.yaml, apply overlay files (profiles) and `key.sub=value` overrides, validate.

    Raises ConfigError with one line naming the file and the offending key.
    """
    raw: dict[str, Any] = default_params()  # keys a file leaves out keep the shipped value
    for source in [path, *(overlays or [])]:
        source = Path(source)
        try:
            loaded = read_yaml(source.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"{source}: params file not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML ({first_line(exc)})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: expected a mapping of sections at the top level")
        raw = _deep_merge(raw, loaded)
    if isinstance(overrides, list):
        pairs = {}
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected key.sub=value")
            key, value = item.split("=", 1)
            pairs[key.strip()] = yaml.safe_load(value)  # "-S 'a.b=1'" quoted with a leading space still works
        overrides = pairs
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return _validated(raw, origin=str(Path(path)))


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from a plain mapping (tests, flows) laid over the shipped params.yaml; same validation as
    load_config."""
    return _validated(_deep_merge(default_params(), raw), origin="config")


def default_config() -> Config:
    """The shipped settings (params.yaml) as a Config."""
    return _default_config()


@functools.lru_cache(maxsize=1)
def _default_config() -> Config:
    return _validated(default_params(), origin=str(_defaults_file()))


def _defaults_file() -> Path:
    """The shipped params.yaml: the checkout's (source / editable install) or the copy packaged in the wheel."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "params.yaml").is_file():
        return checkout / "params.yaml"
    packaged = Path(str(resources.files("medvlm") / "params.yaml"))
    if packaged.is_file():
        return packaged
    raise ConfigError("the shipped params.yaml was not found (neither in the checkout nor in the installed package)")


# libyaml's parser with the safe loader's constructors: the same values as yaml.safe_load in a tenth of the time
# (two params files cost ~0.2 s of every `medvlm generate` in pure Python)
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_yaml(text: str) -> Any:
    """yaml.safe_load of `text`, with libyaml when PyYAML was built with it."""
    return yaml.load(text, Loader=_YAML_LOADER)


@functools.lru_cache(maxsize=1)
def _default_params() -> dict[str, Any]:
    path = _defaults_file()
    loaded = read_yaml(path.read_text(encoding="utf-8"))
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return loaded


def default_params() -> dict[str, Any]:
    """The shipped params.yaml as a plain settings tree (a fresh copy: callers may change it)."""
    return copy.deepcopy(_default_params())


def _validated(raw: dict[str, Any], origin: str) -> Config:
    """Validate a settings tree; the first problem becomes one line naming the key."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{origin}: {where}: {first['msg']}") from None

