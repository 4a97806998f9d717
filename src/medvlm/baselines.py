"""Baselines a report generator must beat, producing generations in the same format as models (evaluate scores them).

- retrieval: the report of the most similar training image (cosine of pretrained visual embeddings,
  medvlm.features.embed_features on the cached trunk features); "probabilities" = that neighbour's labels, so the
  DEM_* figures of this row are the nearest-neighbour diagnostic accuracy.
- consensus: the one training report closest to the TF-IDF (1-4-gram) centroid of all cleaned training reports,
  for every image: what a collapsed generator outputs. Boilerplate scores high on n-gram metrics
  (../shared/BASELINES_COV_CTR.md), so this is the bar that shows whether a model uses the image at all.
- cnn_transformer: a small R2Gen-like encoder-decoder trained from scratch (medvlm.cnn_transformer).
- oracle: per test image, the training report with the best nltk sentence BLEU-4 against its references: a ceiling
  for any system that copies one training report (it looks at the references, so it is not a method).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from medvlm.config import Config
from medvlm.errors import DataError, EvaluationError
from medvlm.eval_units import evaluation_units
from medvlm.manifest import read_manifest
from medvlm.metrics import preprocess
from medvlm.progress import StageProgress


def _splits(cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    split_dir = Path(cfg.split.out_dir)
    train, test = read_manifest(split_dir / "train.jsonl"), read_manifest(split_dir / "test.jsonl")
    if train.empty or test.empty:
        raise DataError(f"{split_dir}: train and test splits must both have rows (run `medvlm data split`)")
    return train, test


def _convention(cfg: Config) -> str:
    return "zh_jieba" if cfg.data.report_language == "zh" else cfg.evaluate.preprocessing


def _rows(test: pd.DataFrame, texts: list[str], probabilities: list[dict] | None = None) -> list[dict]:
    probabilities = probabilities or [{}] * len(test)
    return [{"study_id": str(sid), "generated": t, "probabilities": p}
            for sid, t, p in zip(test["study_id"], texts, probabilities)]


def consensus_report(train_reports: list[str], convention: str) -> tuple[int, str]:
    """Index and text of the training report closest (cosine) to the TF-IDF 1-4-gram centroid of all of them."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    cleaned = preprocess(train_reports, convention)
    tfidf = TfidfVectorizer(ngram_range=(1, 4), tokenizer=str.split, token_pattern=None, lowercase=False)
    x = tfidf.fit_transform(cleaned)  # rows are L2-normalised, so x @ centroid ranks by cosine
    centroid = np.asarray(x.mean(axis=0)).ravel()
    best = int(np.argmax(x @ centroid))
    return best, train_reports[best]


def consensus(cfg: Config) -> tuple[list[dict], dict]:
    train, test = _splits(cfg)
    index, text = consensus_report([str(t) for t in train["report"]], _convention(cfg))
    return _rows(test, [text] * len(test)), {"kind": "baseline", "train_row": str(train["study_id"].iloc[index])}


def oracle(cfg: Config) -> tuple[list[dict], dict]:
    import warnings

    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    train, test = _splits(cfg)
    convention = _convention(cfg)
    originals = [str(t) for t in train["report"]]
    unique: dict[str, tuple[list[str], str]] = {}  # identical cleaned training reports need one score only
    for cleaned, original in zip(preprocess(originals, convention), originals):
        unique.setdefault(cleaned, (cleaned.split(), original))
    smooth = SmoothingFunction().method1
    units = evaluation_units(test)
    best_for_unit = {}
    with warnings.catch_warnings(), StageProgress("oracle: best training report", len(units)) as bar:
        warnings.simplefilter("ignore")  # nltk warns about zero n-gram overlaps
        for unit in units:
            refs = [r.split() for r in preprocess(unit["references"], convention)]
            scores = {k: sentence_bleu(refs, tokens, smoothing_function=smooth) for k, (tokens, _) in unique.items()}
            best_for_unit[unit["unit_id"]] = unique[max(scores, key=scores.get)][1]
            bar.advance()
    row_unit = {r: u["unit_id"] for u in units for r in u["row_ids"]}
    texts = [best_for_unit[row_unit[str(sid)]] for sid in test["study_id"]]
    return _rows(test, texts), {"kind": "baseline (ceiling: looks at the references)"}


def retrieval(cfg: Config) -> tuple[list[dict], dict]:
    from medvlm.features import embed_features, load_features
    from medvlm.model.vision import build_vision

    train, test = _splits(cfg)
    vision = build_vision(cfg).eval()
    embedded = {}
    for split, rows in (("train", train), ("test", test)):
        trunk, ids = load_features(cfg, split)
        if [str(i) for i in ids] != [str(i) for i in rows["study_id"]]:
            raise EvaluationError(f"{cfg.features.out_dir}/{split}: cached features are not in the split's study order "
                                  "(re-run `medvlm features`)")
        embedded[split] = embed_features(trunk, vision, views=cfg.features.multi_view == "concat")
    nearest = np.argmax(embedded["test"] @ embedded["train"].T, axis=1)
    names = cfg.data.label_names
    texts = [str(train["report"].iloc[j]) for j in nearest]
    probabilities = [{n: float(train["labels"].iloc[j].get(n, 0)) for n in names} for j in nearest]
    return _rows(test, texts, probabilities), {"kind": "baseline", "embedding": f"{cfg.model.vision} pooled, cosine"}


def cnn_transformer(cfg: Config) -> tuple[list[dict], dict]:
    from medvlm.cnn_transformer import train_and_generate

    train, test = _splits(cfg)
    texts, facts = train_and_generate(cfg, train, test)
    return _rows(test, texts), {"kind": "baseline", **facts}


GENERATORS = {"retrieval": retrieval, "consensus": consensus, "cnn_transformer": cnn_transformer, "oracle": oracle}


def generate_baseline(cfg: Config, name: str) -> tuple[list[dict], dict]:
    if name not in GENERATORS:
        raise EvaluationError(f"unknown baseline {name!r}; known: {sorted(GENERATORS)}")
    started = time.perf_counter()
    rows, facts = GENERATORS[name](cfg)
    return rows, {**facts, "baseline": name, "seconds_generating": round(time.perf_counter() - started, 2)}
