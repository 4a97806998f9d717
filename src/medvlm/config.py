"""Typed view of params.yaml, the single source of settings.

Every stage receives a `Config`; no stage reads params.yaml itself. Unknown keys are errors
(`extra="forbid"`), so a typo in params.yaml fails at start with one line instead of being ignored.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medvlm.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class SynthesizeConfig(_Section):
    out_dir: str = "data/phantom"
    incoming_dir: str = "data/incoming"
    n_images: int = Field(400, ge=1)
    n_incoming: int = Field(80, ge=0)
    image_size: int = Field(256, ge=64)
    seed: int = 0
    normal_fraction: float = Field(0.35, ge=0.0, le=1.0)
    incoming_normal_fraction: float = Field(0.10, ge=0.0, le=1.0)
    incoming_intensity_shift: float = 0.12
    incoming_noise_scale: float = Field(2.5, gt=0.0)
    indications: bool = False  # write a clinical `indication` per study, correlated with its findings


class DataConfig(_Section):
    source: Literal["cov_ctr", "r2gen", "csv", "jsonl"] = "jsonl"
    root: str = "data/phantom"
    manifest: str = "annotation.jsonl"
    report_language: Literal["en", "zh"] = "en"
    label_names: list[str] = Field(default_factory=lambda: ["pneumonia"])
    primary_label: str = "pneumonia"
    group_by: Literal["image_hash", "source"] = "image_hash"
    # folder under root that the manifest's image paths are relative to ("" = root itself; R2Gen: "images")
    image_dir: str = ""
    # rules that read labels from report text where the source has none (R2Gen): basic keywords | chexpert (14
    # CheXpert observations with negation/uncertainty, medvlm.data.report_labels); uncertain mentions -> 0 or 1
    report_labeler: Literal["basic", "chexpert"] = "basic"
    report_uncertain: Literal["negative", "positive"] = "negative"

    @model_validator(mode="after")
    def _primary_in_labels(self) -> "DataConfig":
        if not self.label_names:
            raise ValueError("data.label_names must name at least one label")
        if self.report_labeler == "chexpert":
            from medvlm.data.report_labels import CHEXPERT_LABELS

            unknown = [n for n in self.label_names if n not in CHEXPERT_LABELS]
            if unknown:
                raise ValueError(f"data.report_labeler chexpert knows {CHEXPERT_LABELS}, not {unknown}")
        if self.primary_label not in self.label_names:
            raise ValueError(f"data.primary_label {self.primary_label!r} is not in data.label_names {self.label_names}")
        return self


class ValidateConfig(_Section):
    min_report_chars: int = 10
    max_report_chars: int = 4000
    min_image_side: int = 32
    max_image_pixels: int = 89_478_485
    max_bad_fraction: float = Field(0.10, ge=0.0, le=1.0)
    out_dir: str = "reports/validation"
    manifest_dir: str = "data/manifest"  # validated.jsonl + quarantine.csv


class SplitConfig(_Section):
    test_size: float = Field(0.2, gt=0.0, lt=1.0)
    seed: int = 0
    use_official: bool = True
    out_dir: str = "data/split"


class FeaturesConfig(_Section):
    image_size: int = Field(224, ge=32)
    batch_size: int = Field(32, ge=1)
    out_dir: str = "data/features"
    # several images per study (IU X-ray frontal + lateral): mean = one averaged trunk map per study; concat = each
    # view encoded on its own, their visual tokens concatenated before the DEM / Q-Former (R2Gen's way)
    multi_view: Literal["mean", "concat"] = "mean"
    max_views: int = Field(2, ge=1)  # concat: views kept per study (first ones); fewer views are repeated to fill


class ModelConfig(_Section):
    vision: str = "efficientnet-lite0"
    tune_vision_blocks: int = Field(1, ge=0)
    discrimination: bool = True
    label_embed_dim: int = Field(64, ge=1)
    disc_loss_weight: float = Field(0.5, ge=0.0)
    qformer_queries: int = Field(16, ge=1)
    qformer_layers: int = Field(2, ge=1)
    qformer_hidden: int = Field(256, ge=8)
    qformer_heads: int = Field(4, ge=1)
    lm: str = "smollm2-135m-instruct"
    lm_layers: int = Field(4, ge=0)
    prompt_template: bool = True
    system_prompt: str = "You are a radiologist."  # short: the LM's default system prompt costs ~20 tokens per step
    prompts: list[str] = Field(default_factory=lambda: ["Describe the findings of this chest CT."])
    max_report_tokens: int = Field(96, ge=4)
    # Closed report vocabulary (R2Gen-style): the LM head scores only tokens that occur in training reports.
    # The 49k-token head is most of a CPU step and of every decoding step; the price: no unseen words.
    closed_vocab: bool = False
    # Disease clues (TRRG): K = len(data.label_names) learned clue embeddings, each scaled by its predicted
    # probability, feed a cross-modal interaction before the Q-Former and/or extra LM input tokens.
    clues: bool = False
    # Where the clue probabilities come from. "classifier": the discrimination module's classifier when
    # model.discrimination is on, else a linear head owned by the clue module, trained with the same BCE loss.
    # "zero_shot": image-text similarity of the contrastive encoder (pretrain_vision stage, pretrain.enabled) to a
    # positive and a negative prompt per label (pretrain.label_prompt / negative_prompt); no label supervision.
    clue_source: Literal["classifier", "zero_shot"] = "classifier"
    clue_dim: int = Field(64, ge=1)  # width of a clue embedding
    clue_heads: int = Field(4, ge=1)  # heads of the visual-token -> clue cross-attention (must divide the visual width)
    clue_interaction: bool = True  # with clues on: cross-attention visual tokens -> clues before the Q-Former
    clue_tokens: bool = True  # with clues on: the K scaled clues as extra LM input tokens after the query tokens
    # Prior-knowledge prompt (ClinicalBLIP): the user turn also lists the findings the classifier predicts
    # ("Suspected: pneumonia 0.83, ground glass 0.61."), labels with probability above prior_threshold.
    prior_prompt: bool = False
    prior_threshold: float = Field(0.5, ge=0.0, lt=1.0)
    # Clinical indication in the prompt (MAIRA-2, LLaVA-Rad): the user turn adds "Indication: <text>." where a study
    # has one (manifest column `indication`, `medvlm generate --indication`, REST field `indication`).
    indication: bool = False

    @model_validator(mode="after")
    def _sizes(self) -> "ModelConfig":
        if self.qformer_hidden % self.qformer_heads:
            raise ValueError(
                f"model.qformer_hidden ({self.qformer_hidden}) must be divisible by model.qformer_heads ({self.qformer_heads})"
            )
        if self.prompt_template and not self.prompts:
            raise ValueError("model.prompts is empty but model.prompt_template is on")
        if self.clues and not (self.clue_interaction or self.clue_tokens):
            raise ValueError("model.clues is on but clue_interaction and clue_tokens are both off: "
                             "the clues would go nowhere")
        if self.prior_prompt and not (self.discrimination or self.clues):
            raise ValueError("model.prior_prompt needs predicted findings: turn on model.discrimination or model.clues")
        return self


class FreezeConfig(_Section):
    trainable_lm_layers: list[int] = Field(default_factory=lambda: [-1])
    lm_lr: float | None = Field(None, gt=0)  # learning rate of this strategy's LM-side parameters; None = train.lm_lr


class LoraConfig(_Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    lm_lr: float | None = Field(None, gt=0)


class PTuningConfig(_Section):
    num_virtual_tokens: int = Field(16, ge=1)
    lm_lr: float | None = Field(None, gt=0)  # prefixes usually want a larger rate than weights (P-Tuning v2: 5e-3..1e-2)
    prefix_projection: bool = False  # reparameterise the prefixes through a 2-layer MLP (P-Tuning v2's option)


class MultistageConfig(_Section):
    """ClinicalBLIP-style staged fine-tuning inside one `medvlm train` run (any strategy, meant for lora)."""

    enabled: bool = False
    stage1_epochs: int = Field(3, ge=1)  # vision tail + discrimination module + Q-Former + projections; LM frozen
    stage2_epochs: int = Field(3, ge=1)  # + the strategy's LM-side parameters (LoRA adapters); fresh optimizer


Strategy = Literal["freeze", "lora", "ptuning_v2"]


class TrainConfig(_Section):
    strategies: list[Strategy] = Field(default_factory=lambda: ["freeze", "lora", "ptuning_v2"])
    epochs: int = Field(6, ge=1)
    max_steps: int = Field(0, ge=0)  # optimizer steps; 0 = as many as `epochs` take
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-4, gt=0)
    lm_lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(50, ge=1)
    checkpoint_dir: str = "checkpoints"  # checkpoints/<strategy>/ (resume after a kill; DVC persistent output)
    log_every: int = Field(10, ge=1)
    out_dir: str = "models"
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    ptuning_v2: PTuningConfig = Field(default_factory=PTuningConfig)
    # when enabled, the run lasts stage1_epochs + stage2_epochs and `epochs` is not used
    multistage: MultistageConfig = Field(default_factory=MultistageConfig)


class PretrainConfig(_Section):
    """CLIP-style contrastive pre-training of the vision tail against frozen MiniLM report embeddings (TRRG)."""

    enabled: bool = False  # run the pretrain_vision stage and start `medvlm train` from its vision tail
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=2)  # in-batch negatives: InfoNCE needs at least two pairs
    lr: float = Field(1e-3, gt=0)  # projection heads and temperature
    vision_lr: float = Field(1e-4, gt=0)  # the pretrained (ImageNet) vision tail: smaller steps
    weight_decay: float = Field(0.01, ge=0)
    embed_dim: int = Field(256, ge=8)  # shared image-text embedding width
    temperature: float = Field(0.07, gt=0, le=1)  # initial softmax temperature (CLIP's)
    learn_temperature: bool = True
    label_prompt: str = "findings of {label}"  # zero-shot label prompt; {label} = label name, '_' -> ' '
    negative_prompt: str = "no findings of {label}"  # its counterpart: p = softmax over the pair (CLIP binary zero-shot)
    out_dir: str = "models/pretrain_vision"
    metrics_file: str = "reports/pretrain/pretrain_vision.json"

    @model_validator(mode="after")
    def _prompt_has_slot(self) -> "PretrainConfig":
        for key in ("label_prompt", "negative_prompt"):
            if "{label}" not in getattr(self, key):
                raise ValueError(f"pretrain.{key} {getattr(self, key)!r} has no {{label}} slot")
        return self


class GenerateConfig(_Section):
    num_beams: int = Field(3, ge=1)
    max_new_tokens: int = Field(96, ge=1)
    repetition_penalty: float = Field(1.1, gt=0)
    batch_size: int = Field(16, ge=1)


class LabelerConfig(_Section):
    """all-MiniLM-L6-v2 (mean+max pooled tokens) + one head per label: frozen encoder + logistic heads, or the
    encoder fine-tuned with a linear head (BCE over labels). Evaluation reads either the same way."""

    mode: Literal["frozen", "finetune"] = "frozen"
    finetune_epochs: int = Field(3, ge=1)
    finetune_max_steps: int = Field(0, ge=0)  # optimizer steps; 0 = as many as finetune_epochs take
    finetune_batch_size: int = Field(16, ge=1)
    finetune_lr: float = Field(5e-5, gt=0)  # encoder
    finetune_head_lr: float = Field(1e-3, gt=0)  # the new classification head learns from scratch: larger rate

    batch_size: int = Field(32, ge=1)  # encoder forward batch
    max_length: int = Field(192, ge=8)
    C: float = Field(10.0, gt=0)  # inverse L2 strength of the logistic heads
    max_iter: int = Field(2000, ge=10)
    out_dir: str = "models/labeler"
    threshold: float = Field(0.5, gt=0, lt=1)  # probability above which a label counts as present


class CnnTransformerConfig(_Section):
    """The from-scratch R2Gen-like baseline: small conv net + transformer decoder over a word vocabulary."""

    image_size: int = Field(64, ge=16)
    d_model: int = Field(128, ge=8)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_word_count: int = Field(2, ge=1)
    max_tokens: int = Field(80, ge=4)


class EvaluateConfig(_Section):
    bootstrap_iterations: int = Field(1000, ge=10)
    bootstrap_seed: int = 0
    confidence: float = Field(0.95, gt=0, lt=1)
    out_dir: str = "reports"
    baselines: list[Literal["retrieval", "consensus", "cnn_transformer", "oracle"]] = Field(
        default_factory=lambda: ["retrieval", "consensus", "cnn_transformer", "oracle"]
    )
    preprocessing: Literal["r2gen", "dot_split", "iu_xray_r2gen", "none"] = "r2gen"
    meteor_timeout_s: float = Field(300.0, gt=0)  # a METEOR JVM that stops answering fails the stage instead of hanging
    examples_thumbnail: int = Field(128, ge=16)  # px of the longest side in reports/examples.html
    # also score clinical efficacy CheXbert-style: the rule labeler (data.report_labeler) reads the generated AND the
    # reference reports, P/R/F1 per label + micro/macro (RULE_* metrics; PromptMRG's convention with rules for CheXbert)
    rule_ce: bool = False
    cnn_transformer: CnnTransformerConfig = Field(default_factory=CnnTransformerConfig)


class RegisterConfig(_Section):
    model_name: str = "medvlm"
    primary_metric: str = "CIDEr"
    tie_break: str = "BLEU_4"
    promotion_margin: float = Field(0.0, ge=0)
    tracking_uri: str = "sqlite:///mlruns.db"
    lock_timeout_s: float = Field(60.0, gt=0)  # wait this long for a concurrent promotion before failing
    cache_dir: str = ".cache/registry"  # where registered versions are downloaded for --model / serving


class MonitorConfig(_Section):
    reference: Literal["train", "test"] = "train"
    incoming_dir: str = "data/incoming"
    drift_share: float = Field(0.3, gt=0, le=1)
    pca_components: int = Field(5, ge=1)
    out_dir: str = "reports/drift"
    predict_diagnosis: bool = True  # run the champion on the batch to compare predicted vs training prevalence


class RetrainConfig(_Section):
    cron: str = "0 3 * * 1"
    workdir: str = "runs/retrain"  # ingested data and retrained outputs, apart from the DVC-tracked pipeline outputs
    deployment: str = "retrain/medvlm-retrain"  # <flow name>/<deployment name> the drift monitor triggers
    task_retries: int = Field(2, ge=0)  # Prefect retries of a task that failed for a transient reason
    retry_delay_s: float = Field(10.0, ge=0)


class ServeConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_bytes: int = Field(20_000_000, ge=1024)  # largest accepted image (decoded bytes); larger -> 413


class ExperimentConfig(_Section):
    """`medvlm experiment run`: strategy x ablation variant x seed on the current profile (see experiment.py)."""

    name: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$")
    out_root: str = "runs/experiments"  # the experiment's outputs go to <out_root>/<name>/
    strategies: list[str] = Field(default_factory=list)  # [] = train.strategies
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)  # training seeds; the split stays fixed
    ablations: dict[str, dict[str, Any]] = Field(default_factory=dict)  # variant name -> {dotted.setting: value}
    ablation_strategies: list[str] = Field(default_factory=list)  # strategies that get the ablations ([] = all)
    factorial: bool = False  # every combination of the ablations instead of one switch at a time
    baselines: list[Literal["retrieval", "consensus", "cnn_transformer", "oracle"]] = Field(
        default_factory=lambda: ["retrieval", "consensus", "cnn_transformer", "oracle"])
    register_best: bool = False  # register the best full model of the first seed (register.model_name) when done
    goals: dict[str, dict[str, float]] = Field(default_factory=dict)  # experiment name -> {metric: minimum}
    anchors: list[dict[str, Any]] = Field(default_factory=list)  # published figures printed beside ours


# `register` is also the name of ABCMeta.register on the model class; the field is what instances see.
warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)


class Config(_Section):
    seed: int = 0
    synthesize: SynthesizeConfig = Field(default_factory=SynthesizeConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    split: SplitConfig = Field(default_factory=SplitConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    labeler: LabelerConfig = Field(default_factory=LabelerConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    register: RegisterConfig = Field(default_factory=RegisterConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True)

    @property
    def validation(self) -> ValidateConfig:
        return self.validate_

    @model_validator(mode="after")
    def _zero_shot_needs_pretraining(self) -> "Config":
        if self.model.clues and self.model.clue_source == "zero_shot" and not self.pretrain.enabled:
            raise ValueError("model.clue_source=zero_shot needs the contrastive encoder: set pretrain.enabled=true")
        return self


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
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
    raw: dict[str, Any] = {}
    for source in [path, *(overlays or [])]:
        source = Path(source)
        try:
            loaded = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"{source}: params file not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML ({str(exc).splitlines()[0]})") from None
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
    """Build a Config from a plain mapping (tests, flows); same validation as load_config."""
    return _validated(raw, origin="config")


def _validated(raw: dict[str, Any], origin: str) -> Config:
    """Validate a settings tree; the first problem becomes one line naming the key."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{origin}: {where}: {first['msg']}") from None
