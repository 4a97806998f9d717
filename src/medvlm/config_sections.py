"""The sections of the settings (one class per params.yaml section, with its nested blocks): types and ranges only.

Every value comes from params.yaml (medvlm.config lays any partial tree over it and builds `Config` from these);
unknown keys are errors (`extra="forbid"`), so a typo fails at start with one line instead of being ignored.
The strategies' blocks train.<name> are their modules' Settings (medvlm.strategies: one module per strategy).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, create_model, model_validator

from medvlm.settings_base import Section as _Section
from medvlm.strategies import REGISTRY

# The 14 CheXpert observations: the label names data.report_labeler chexpert can read (medvlm.data.report_labels).
CHEXPERT_LABELS = [
    "no_finding", "enlarged_cardiomediastinum", "cardiomegaly", "lung_opacity", "lung_lesion", "edema",
    "consolidation", "pneumonia", "atelectasis", "pneumothorax", "pleural_effusion", "pleural_other", "fracture",
    "support_devices",
]


class SynthesizeConfig(_Section):
    out_dir: str
    incoming_dir: str
    n_images: int = Field(ge=1)
    n_incoming: int = Field(ge=0)
    image_size: int = Field(ge=64)
    seed: int
    normal_fraction: float = Field(ge=0.0, le=1.0)
    incoming_normal_fraction: float = Field(ge=0.0, le=1.0)
    incoming_intensity_shift: float
    incoming_noise_scale: float = Field(gt=0.0)
    # 3-D phantom chests instead of slices (medvlm.data.phantom3d): NIfTI volumes, every dicom_every-th a DICOM series
    volumes: bool
    volume_size: int = Field(ge=64)  # in-plane voxels
    volume_slices: int = Field(ge=3)  # axial slices, lower / middle / upper zone thirds
    dicom_every: int = Field(ge=0)  # 0 = NIfTI only
    indications: bool  # write a clinical `indication` per study, correlated with its findings


class DataConfig(_Section):
    source: Literal["cov_ctr", "r2gen", "csv", "jsonl"]
    root: str
    manifest: str
    report_language: Literal["en", "zh"]
    label_names: list[str]
    primary_label: str
    group_by: Literal["image_hash", "source"]
    # folder under root that the manifest's image paths are relative to ("" = root itself; R2Gen: "images")
    image_dir: str
    # rules that read labels from report text where the source has none (R2Gen): basic keywords | chexpert (14
    # CheXpert observations with negation/uncertainty, medvlm.data.report_labels); uncertain mentions -> 0 or 1
    report_labeler: Literal["basic", "chexpert"]
    report_uncertain: Literal["negative", "positive"]

    @model_validator(mode="after")
    def _primary_in_labels(self) -> "DataConfig":
        if not self.label_names:
            raise ValueError("data.label_names must name at least one label")
        if self.report_labeler == "chexpert":
            unknown = [n for n in self.label_names if n not in CHEXPERT_LABELS]
            if unknown:
                raise ValueError(f"data.report_labeler chexpert knows {CHEXPERT_LABELS}, not {unknown}")
        if self.primary_label not in self.label_names:
            raise ValueError(f"data.primary_label {self.primary_label!r} is not in data.label_names {self.label_names}")
        return self


class ValidateConfig(_Section):
    min_report_chars: int
    max_report_chars: int
    min_image_side: int
    max_image_pixels: int
    max_bad_fraction: float = Field(ge=0.0, le=1.0)
    out_dir: str
    manifest_dir: str  # validated.jsonl + quarantine.csv


class SplitConfig(_Section):
    test_size: float = Field(gt=0.0, lt=1.0)
    seed: int
    use_official: bool
    out_dir: str


class FeaturesConfig(_Section):
    image_size: int = Field(ge=32)
    batch_size: int = Field(ge=1)
    out_dir: str
    # several images per study (IU X-ray frontal + lateral): mean = one averaged trunk map per study; concat = each
    # view encoded on its own, their visual tokens concatenated before the DEM / Q-Former (R2Gen's way)
    multi_view: Literal["mean", "concat"]
    max_views: int = Field(ge=1)  # concat: views kept per study (first ones); fewer views are repeated to fill


class RetrievalConfig(_Section):
    """Retrieval-augmented generation: the k most similar training studies (cosine of the pretrained visual
    embedding) written into the prompt as similar cases; training uses leave-group-out neighbours."""
    enabled: bool
    k: int = Field(ge=1)  # neighbours per image
    report_words: int = Field(ge=1)  # words kept of each neighbour's report


class ModelConfig(_Section):
    vision: str
    tune_vision_blocks: int = Field(ge=0)
    discrimination: bool
    label_embed_dim: int = Field(ge=1)
    disc_loss_weight: float = Field(ge=0.0)
    qformer_queries: int = Field(ge=1)
    qformer_layers: int = Field(ge=1)
    qformer_hidden: int = Field(ge=8)
    qformer_heads: int = Field(ge=1)
    qformer_dropout: float = Field(ge=0.0, lt=1.0)  # hidden and attention dropout of the Q-Former (BLIP-2's 0.1)
    lm: str
    lm_layers: int = Field(ge=0)
    prompt_template: bool
    system_prompt: str  # short: the LM's default system prompt costs ~20 tokens per step
    prompts: list[str]
    max_report_tokens: int = Field(ge=4)
    # Closed report vocabulary (R2Gen-style): the LM head scores only tokens that occur in training reports.
    # The 49k-token head is most of a CPU step and of every decoding step; the price: no unseen words.
    closed_vocab: bool
    # Disease clues (TRRG): K = len(data.label_names) learned clue embeddings, each scaled by its predicted
    # probability, feed a cross-modal interaction before the Q-Former and/or extra LM input tokens.
    clues: bool
    # Where the clue probabilities come from. "classifier": the discrimination module's classifier when
    # model.discrimination is on, else a linear head owned by the clue module, trained with the same BCE loss.
    # "zero_shot": image-text similarity of the contrastive encoder (pretrain_vision stage, pretrain.enabled) to a
    # positive and a negative prompt per label (pretrain.label_prompt / negative_prompt); no label supervision.
    clue_source: Literal["classifier", "zero_shot"]
    clue_dim: int = Field(ge=1)  # width of a clue embedding
    clue_heads: int = Field(ge=1)  # heads of the visual-token -> clue cross-attention (must divide the visual width)
    clue_interaction: bool  # with clues on: cross-attention visual tokens -> clues before the Q-Former
    clue_tokens: bool  # with clues on: the K scaled clues as extra LM input tokens after the query tokens
    # Prior-knowledge prompt (ClinicalBLIP): the user turn also lists the findings the classifier predicts
    # ("Suspected: pneumonia 0.83, ground glass 0.61."), labels with probability above prior_threshold.
    prior_prompt: bool
    prior_threshold: float = Field(ge=0.0, lt=1.0)
    # What fills the prior prompt in training. "predicted": the module's own (detached) probabilities, as at test
    # time. "labels": the true findings (names only), so the LM learns to write exactly the listed findings; at
    # test time the module's findings above its per-label thresholds (chosen on the training split) fill it.
    prior_source: Literal["predicted", "labels"]
    # BCE of the label classifier weighted per label by negatives/positives of the training split (capped at this
    # ratio; 0 = unweighted), so rare findings are not learned as "always absent".
    disc_pos_weight_max: float = Field(ge=0.0)
    retrieval: RetrievalConfig
    # Report-token loss weight 1 + finding_token_weight * idf(token) / max idf over the training reports: tokens in
    # every report (boilerplate) keep weight 1, rare ones (the findings) weigh more, so the few tokens that decide
    # what a report says are not drowned by the sentences every report repeats. 0 = plain mean.
    finding_token_weight: float = Field(ge=0.0)
    # Clinical indication in the prompt (MAIRA-2, LLaVA-Rad): the user turn adds "Indication: <text>." where a study
    # has one (manifest column `indication`, `medvlm generate --indication`, REST field `indication`).
    indication: bool

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
            raise ValueError("model.prior_prompt needs predicted findings: turn on model.discrimination or model.clues, "
                             "or set model.prior_prompt=false")
        return self


class MultistageConfig(_Section):
    """ClinicalBLIP-style staged fine-tuning inside one `medvlm train` run (any strategy, meant for lora)."""

    enabled: bool
    stage1_epochs: int = Field(ge=1)  # vision tail + discrimination module + Q-Former + projections; LM frozen
    stage2_epochs: int = Field(ge=1)  # + the strategy's LM-side parameters (LoRA adapters); fresh optimizer


# the strategy modules (medvlm.strategies) name the strategies and their sections train.<name>
Strategy = Literal[tuple(REGISTRY)]
Baseline = Literal["retrieval", "consensus", "cnn_transformer", "oracle"]


class _TrainCommon(_Section):
    """The train section less the strategies' own blocks, which TrainConfig adds below."""

    strategies: list[Strategy]
    epochs: int = Field(ge=1)
    max_steps: int = Field(ge=0)  # optimizer steps; 0 = as many as `epochs` take
    batch_size: int = Field(ge=1)
    grad_accum: int = Field(ge=1)
    lr: float = Field(gt=0)
    lm_lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    warmup_ratio: float = Field(ge=0, lt=1)
    max_grad_norm: float = Field(gt=0)
    checkpoint_every: int = Field(ge=1)
    checkpoint_dir: str  # checkpoints/<strategy>/ (resume after a kill; DVC persistent output)
    log_every: int = Field(ge=1)
    out_dir: str
    # when enabled, the run lasts stage1_epochs + stage2_epochs and `epochs` is not used
    multistage: MultistageConfig
    # per-rank record of every optimizer step (study ids each rank trained on + a digest of its trainable weights)
    # in <out_dir>/<strategy>/ranks/rank<k>.jsonl: what shows that data-parallel ranks split the data and stay in sync
    rank_log: bool


# train.<name> of every strategy: its module's Settings
TrainConfig = create_model("TrainConfig", __base__=_TrainCommon, __module__=__name__,
                           **{name: (module.Settings, ...) for name, module in REGISTRY.items()})


class PretrainConfig(_Section):
    """CLIP-style contrastive pre-training of the vision tail against frozen MiniLM report embeddings (TRRG)."""

    enabled: bool  # run the pretrain_vision stage and start `medvlm train` from its vision tail
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=2)  # in-batch negatives: InfoNCE needs at least two pairs
    lr: float = Field(gt=0)  # projection heads and temperature
    vision_lr: float = Field(gt=0)  # the pretrained (ImageNet) vision tail: smaller steps
    weight_decay: float = Field(ge=0)
    embed_dim: int = Field(ge=8)  # shared image-text embedding width
    temperature: float = Field(gt=0, le=1)  # initial softmax temperature (CLIP's)
    learn_temperature: bool
    label_prompt: str  # zero-shot label prompt; {label} = label name, '_' -> ' '
    negative_prompt: str  # its counterpart: p = softmax over the pair (CLIP binary zero-shot)
    out_dir: str
    metrics_file: str

    @model_validator(mode="after")
    def _prompt_has_slot(self) -> "PretrainConfig":
        for key in ("label_prompt", "negative_prompt"):
            if "{label}" not in getattr(self, key):
                raise ValueError(f"pretrain.{key} {getattr(self, key)!r} has no {{label}} slot")
        return self


class GenerateConfig(_Section):
    num_beams: int = Field(ge=1)
    max_new_tokens: int = Field(ge=1)
    repetition_penalty: float = Field(gt=0)
    batch_size: int = Field(ge=1)


class LabelerConfig(_Section):
    """all-MiniLM-L6-v2 (mean+max pooled tokens) + one head per label: frozen encoder + logistic heads, or the
    encoder fine-tuned with a linear head (BCE over labels). Evaluation reads either the same way."""

    mode: Literal["frozen", "finetune"]
    finetune_epochs: int = Field(ge=1)
    finetune_max_steps: int = Field(ge=0)  # optimizer steps; 0 = as many as finetune_epochs take
    finetune_batch_size: int = Field(ge=1)
    finetune_lr: float = Field(gt=0)  # encoder
    finetune_head_lr: float = Field(gt=0)  # the new classification head learns from scratch: larger rate

    batch_size: int = Field(ge=1)  # encoder forward batch
    max_length: int = Field(ge=8)
    C: float = Field(gt=0)  # inverse L2 strength of the logistic heads
    max_iter: int = Field(ge=10)
    ngram_max: int = Field(ge=0, le=4)  # TF-IDF word 1..n-gram head averaged with the embedding head; 0 = off
    ngram_C: float = Field(gt=0)  # inverse L2 strength of the n-gram heads
    out_dir: str
    threshold: float = Field(gt=0, lt=1)  # probability above which a label counts as present


class CnnTransformerConfig(_Section):
    """The from-scratch R2Gen-like baseline: small conv net + transformer decoder over a word vocabulary."""

    image_size: int = Field(ge=16)
    d_model: int = Field(ge=8)
    layers: int = Field(ge=1)
    heads: int = Field(ge=1)
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    min_word_count: int = Field(ge=1)
    max_tokens: int = Field(ge=4)


class EvaluateConfig(_Section):
    bootstrap_iterations: int = Field(ge=10)
    bootstrap_seed: int
    confidence: float = Field(gt=0, lt=1)
    out_dir: str
    baselines: list[Baseline]
    preprocessing: Literal["r2gen", "dot_split", "iu_xray_r2gen", "none"]
    meteor_timeout_s: float = Field(gt=0)  # a METEOR JVM that stops answering fails the stage instead of hanging
    examples_thumbnail: int = Field(ge=16)  # px of the longest side in reports/examples.html
    # also score clinical efficacy CheXbert-style: the rule labeler (data.report_labeler) reads the generated AND the
    # reference reports, P/R/F1 per label + micro/macro (RULE_* metrics; PromptMRG's convention with rules for CheXbert)
    rule_ce: bool
    cnn_transformer: CnnTransformerConfig


class RegisterConfig(_Section):
    model_name: str
    primary_metric: str
    tie_break: str
    promotion_margin: float = Field(ge=0)
    tracking_uri: str
    lock_timeout_s: float = Field(gt=0)  # wait this long for a concurrent promotion before failing
    cache_dir: str  # where registered versions are downloaded for --model / serving


class MonitorConfig(_Section):
    reference: Literal["train", "test"]
    incoming_dir: str
    drift_share: float = Field(gt=0, le=1)
    pca_components: int = Field(ge=1)
    out_dir: str
    predict_diagnosis: bool  # run the champion on the batch to compare predicted vs training prevalence


class RetrainConfig(_Section):
    cron: str
    workdir: str  # ingested data and retrained outputs, apart from the DVC-tracked pipeline outputs
    deployment: str  # <flow name>/<deployment name> the drift monitor triggers
    task_retries: int = Field(ge=0)  # Prefect retries of a task that failed for a transient reason
    retry_delay_s: float = Field(ge=0)


class ServeConfig(_Section):
    host: str
    port: int = Field(ge=1, le=65535)
    max_bytes: int = Field(ge=1024)  # largest accepted image (decoded bytes); larger -> 413
    # volume uploads (a NIfTI file or a zip of one DICOM series; medvlm.uploads): zip-bomb guards
    max_volume_bytes: int = Field(ge=1024)  # bytes a zip may inflate to, counted while inflating
    max_zip_members: int = Field(ge=1)
    max_zip_ratio: int = Field(ge=2)  # inflated / compressed bytes of one member


class ExperimentConfig(_Section):
    """`medvlm experiment run`: strategy x ablation variant x seed on the current profile (see experiment.py)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    out_root: str  # the experiment's outputs go to <out_root>/<name>/
    strategies: list[str]  # [] = train.strategies
    seeds: list[int] = Field(min_length=1)  # training seeds; the split stays fixed
    ablations: dict[str, dict[str, Any]]  # variant name -> {dotted.setting: value}
    ablation_strategies: list[str]  # strategies that get the ablations ([] = all)
    factorial: bool  # every combination of the ablations instead of one switch at a time
    baselines: list[Baseline]
    register_best: bool  # register the best full model of the first seed (register.model_name) when done
    # cells in parallel (medvlm.grid): > 1 = a local Dask cluster of this many worker processes, each cell a Prefect
    # task; cluster_address (e.g. tcp://scheduler:8786) = an existing Dask cluster instead. 1 and "": one by one here.
    workers: int = Field(ge=1)
    cluster_address: str
    goals: dict[str, dict[str, float]]  # experiment name -> {metric: minimum}
    anchors: list[dict[str, Any]]  # published figures printed beside ours


class VolumeConfig(_Section):
    """CT volumes (DICOM series folder, NIfTI, NRRD): how they are loaded (MONAI) and what validation accepts."""

    reader: Literal["auto", "itk", "pydicom"]  # auto: ITK when installed, else pydicom / nibabel / pynrrd
    hu_window: tuple[float, float]  # (low, high) HU -> [0, 1] (Merlin's convention), clipped
    spacing: tuple[float, float, float] | None  # mm (RAS x, y, z) to resample to; null = native
    shape: tuple[int, int, int]  # voxels (x, y, z) after resampling: centre crop / pad with air
    max_voxels: int = Field(ge=1)  # decompression-bomb guard, checked on the headers before pixels
    # validation expectations (rows outside are quarantined)
    min_slices: int = Field(ge=1)
    max_slices: int = Field(ge=1)
    min_spacing_mm: float = Field(gt=0)
    max_spacing_mm: float = Field(gt=0)
    min_side: int = Field(ge=1)  # smallest in-plane size (voxels)
    min_hu: float  # the lowest voxel must lie in [min_hu, air_hu]: a CT of a chest contains air
    air_hu: float
    max_hu: float
    spacing_tolerance: float = Field(gt=0, lt=0.5)  # relative slice-gap deviation still counted as regular
    # model.vision efficientnet-lite0-slices: slices sampled evenly along z, encoded in 2-D, pooled over depth
    sampled_slices: int = Field(ge=1)

    @model_validator(mode="after")
    def _ranges(self) -> "VolumeConfig":
        if self.hu_window[0] >= self.hu_window[1]:
            raise ValueError(f"volume.hu_window {list(self.hu_window)} must be (low, high) with low < high")
        if self.min_slices > self.max_slices:
            raise ValueError("volume.min_slices must not exceed volume.max_slices")
        return self
