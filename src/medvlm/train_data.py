"""What `medvlm train` learns from: the training split's cached trunk features, tokenised reports, labels and (with
model.retrieval / model.indication) leave-group-out similar cases and indications; the IDF weights of the
finding-token loss."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from medvlm.config import Config
from medvlm.errors import DataError
from medvlm.features import load_features
from medvlm.manifest import read_manifest, study_indications
from medvlm.model.medvlm import MedVLM
from medvlm.model.retrieval import RetrievalIndex, embed


@dataclass
class TrainData:
    features: torch.Tensor  # (N, *trunk shape)
    reports: list[list[int]]  # token ids ending with eos
    labels: torch.Tensor  # (N, K) float 0/1
    study_ids: list[str]
    texts: list[str] | None = None  # the reports as written (the retrieval index holds them)
    groups: list[str] | None = None  # split group per study (leave-group-out neighbours)
    contexts: list[str] | None = None  # similar-case prompt text per study (model.retrieval)
    indications: list[str | None] | None = None  # manifest column `indication`, when model.indication is on


def load_train_data(cfg: Config, model: MedVLM, split: str = "train", cached=None) -> TrainData:
    split_file = Path(cfg.split.out_dir) / f"{split}.jsonl"
    rows = read_manifest(split_file)
    features, ids = cached if cached is not None else load_features(cfg, split)
    if list(rows["study_id"].astype(str)) != ids:
        raise DataError(f"{split_file}: rows differ from the cached features' study ids (re-run `medvlm features`)")
    labels = []
    for lineno, row_labels in enumerate(rows["labels"], start=1):
        missing = [n for n in cfg.data.label_names if not isinstance(row_labels, dict) or n not in row_labels]
        if missing:
            raise DataError(f"{split_file}:{lineno}: labels lack {missing}")
        labels.append([float(row_labels[n]) for n in cfg.data.label_names])
    reports = [model.layout.encode_report(str(r)) for r in rows["report"]]
    groups = None
    if cfg.model.retrieval.enabled:
        from medvlm.data.split import split_group_keys  # here: it brings scikit-learn, needed with retrieval only

        groups = split_group_keys(rows, cfg.data.group_by)
    indications = study_indications(rows) if cfg.model.indication else None
    return TrainData(features, reports, torch.tensor(labels), ids, [str(r) for r in rows["report"]], groups,
                     indications=indications)


def token_weights(reports: list[list[int]], vocab_size: int, strength: float) -> torch.Tensor | None:
    """(vocab,) loss weights 1 + strength * idf / max idf (document frequency over the training reports); None
    when strength is 0. A token in every report gets 1; unseen tokens get 1 + strength."""
    if strength <= 0:
        return None
    df = torch.zeros(vocab_size)
    for ids in reports:
        df[torch.tensor(sorted(set(ids)), dtype=torch.long)] += 1
    idf = torch.log(len(reports) / df.clamp(min=1.0))
    return 1.0 + strength * idf / idf.max().clamp(min=1e-9)


def attach_retrieval(model: MedVLM, data: TrainData, cfg: Config) -> None:
    """Build the retrieval index from the training split and every study's leave-group-out similar cases."""
    spec = cfg.model.retrieval
    embeddings = embed(model.retrieval_tail, data.features)
    model.retrieval_index = RetrievalIndex(embeddings, data.study_ids, data.groups, data.texts)
    hits = model.retrieval_index.search(embeddings, spec.k, exclude_groups=data.groups)
    data.contexts = [model.retrieval_index.context(h, spec.report_words) for h in hits]
