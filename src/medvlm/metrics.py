"""Report-generation metrics: text preprocessing, pycocoevalcap scorers, MedVLM's convention, clinical efficacy.

Numbers in this field are only comparable when the scoring convention is stated, so every preprocessing is a
named function in PREPROCESSING and every results file carries the name and description (CONVENTIONS).

Natural-language-generation metrics follow R2Gen practice: both sides are cleaned the same way, then handed to
pycocoevalcap's Bleu(4), Meteor, Rouge and Cider as `{study_id: [text]}` dicts (no PTBTokenizer). A study may
have several references (COV-CTR images with two report rows). METEOR talks to a Java process over a line
protocol: a newline or a non-ASCII byte in the text desynchronises it and the call hangs forever, so METEOR
text is sanitised and every exchange has a timeout (MeteorScorer).

tests/test_conformance.py checks this module against published numbers (cvt2distilgpt2 and MRG_RL, IU X-Ray).
"""

from __future__ import annotations

import math
import re
import threading
import unicodedata
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from medvlm.errors import EvaluationError
from medvlm.progress import Advance, unwatched

# --------------------------------------------------------------------------------------------- preprocessing

_R2GEN_PUNCT = re.compile(r"[,;:\"'()\[\]{}!?*%^&_+/\\]")


def clean_report(text: str) -> str:
    """R2Gen-style cleaning (../shared/BASELINES_COV_CTR.md): ASCII, lowercase, punctuation stripped, '.' -> ' . '.

    Hyphens are kept (R2Gen's regex keeps them: "low-density"); repeated full stops collapse to one.
    """
    t = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    t = t.lower().replace("\n", " ").replace("\r", " ")
    t = _R2GEN_PUNCT.sub(" ", t)
    t = t.replace(".", " . ")
    t = re.sub(r"\s+", " ", t).strip()
    return re.sub(r"(\. )+\.", ".", t)


def dot_split(text: str) -> str:
    """cvt2distilgpt2's COCOCaptionMetrics step: '.' -> ' .' and runs of spaces collapsed, nothing else."""
    return re.sub(" +", " ", text.replace(".", " ."))


def clean_report_iu_xray(report: str) -> str:
    """R2Gen's `clean_report_iu_xray` (modules/tokenizers.py), ported verbatim, then whitespace collapsed.

    The collapse mirrors R2Gen's tokenize/decode round trip, which never emits two spaces.
    """
    def split_sentences(t: str) -> list[str]:
        for old, new in [("..", "."), ("..", "."), ("..", "."), ("1. ", ""), (". 2. ", ". "), (". 3. ", ". "),
                         (". 4. ", ". "), (". 5. ", ". "), (" 2. ", ". "), (" 3. ", ". "), (" 4. ", ". "),
                         (" 5. ", ". ")]:
            t = t.replace(old, new)
        return t.strip().lower().split(". ")

    def clean_sentence(t: str) -> str:
        t = t.replace('"', "").replace("/", "").replace("\\", "").replace("'", "").strip().lower()
        return re.sub(r"[.,?;*!%^&_+():-\[\]{}]", "", t)

    sentences = [clean_sentence(s) for s in split_sentences(report)]
    return " ".join((" . ".join(sentences) + " .").split())


def _as_is(text: str) -> str:
    return text


def jieba_split(text: str) -> str:
    """Chinese: jieba words joined by spaces (whitespace tokens dropped, punctuation kept) for the n-gram scorers."""
    import jieba

    jieba.setLogLevel(60)  # jieba prints its dictionary load to stderr otherwise
    return " ".join(tok for tok in jieba.lcut(text) if tok.strip())


PREPROCESSING: dict[str, Callable[[str], str]] = {
    "r2gen": clean_report,
    "dot_split": dot_split,
    "iu_xray_r2gen": clean_report_iu_xray,
    "none": _as_is,
    "zh_jieba": jieba_split,
}

CONVENTIONS = {
    "r2gen": "R2Gen-style: NFKD->ASCII, lowercase, punctuation [,;:\"'()[]{}!?*%^&_+/\\] -> space (hyphens kept), "
    "'.' -> ' . ', whitespace collapsed, repeated ' . ' collapsed; pycocoevalcap 1.2 Bleu(4) (closest ref length), "
    "Meteor 1.5 (-l en -norm), Rouge (ROUGE-L, beta 1.2), Cider (CIDEr-D, idf from the test references); "
    "no PTBTokenizer; all references of a study used",
    "dot_split": "cvt2distilgpt2: '.' -> ' .', runs of spaces collapsed; pycocoevalcap 1.2 as for r2gen",
    "iu_xray_r2gen": "R2Gen clean_report_iu_xray verbatim (sentence split, punctuation class removed), "
    "whitespace collapsed; pycocoevalcap 1.2 as for r2gen",
    "none": "text scored as given; pycocoevalcap 1.2 as for r2gen",
    "zh_jieba": "Chinese: jieba.lcut words joined by spaces (punctuation kept); pycocoevalcap 1.2 Bleu/Rouge/Cider; "
    "no METEOR (the 1.5 jar has no Chinese resources)",
    "medvlm": "MedVLM paper convention (secondary): per-report nltk sentence_bleu with weights (0,0,0,1), no "
    "smoothing, averaged over studies; nltk meteor_score averaged, WITHOUT WordNet synonyms (identity WordNet: exact "
    "and Porter-stem matches only; no WordNet data offline); tokens: cleaned text split on spaces (en) or "
    "jieba.lcut with whitespace tokens dropped and punctuation kept (zh)",
    "meteor_bootstrap": "METEOR point estimate = the jar's corpus score; CIs: every resample re-aggregates the "
    "jar's per-study statistics lines with the jar's own EVAL arithmetic (MeteorStats.addStats + computeMetrics, "
    "ported to numpy and checked against the jar to 1e-12), i.e. corpus METEOR per resample, not a mean of segments",
}


def preprocess(texts: list[str], convention: str) -> list[str]:
    try:
        fn = PREPROCESSING[convention]
    except KeyError:
        raise EvaluationError(f"unknown preprocessing {convention!r}; known: {sorted(PREPROCESSING)}") from None
    return [fn(t) for t in texts]


# --------------------------------------------------------------------------------------------- METEOR


def sanitise_for_meteor(text: str) -> str:
    """Text the METEOR jar's line protocol survives: ASCII, no control characters or '|||', one-space separated."""
    t = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    t = "".join(ch if ch.isprintable() else " " for ch in t).replace("|||", " ")
    return " ".join(t.split())


@dataclass
class MeteorResult:
    corpus: float  # the jar's aggregate over all studies (what pycocoevalcap returns)
    segments: np.ndarray  # per-study scores
    stats: list[str] = field(repr=False)  # per-study statistics lines, re-aggregated for bootstrap resamples


class MeteorScorer:
    """One METEOR JVM (pycocoevalcap's Meteor) reused for every call of an evaluation; a context manager.

    The protocol is pycocoevalcap's `Meteor.compute_score`: one SCORE line per study (its own `_stat`), then one
    EVAL line over all statistics. Each exchange runs in a worker thread; when the jar does not answer within
    `timeout_s` the process is killed and EvaluationError raised, so a bad input can never hang a pipeline.
    """

    def __init__(self, timeout_s: float = 300.0):
        from pycocoevalcap.meteor.meteor import Meteor

        self.timeout_s = timeout_s
        self._meteor = Meteor()
        self._proc = self._meteor.meteor_p

    def __enter__(self) -> "MeteorScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.kill()
            self._proc.wait()
        # pycocoevalcap's __del__ takes this lock; a fresh one keeps garbage collection from blocking on a
        # lock left held by a killed exchange.
        self._meteor.lock = threading.Lock()

    def _guarded(self, what: str, fn: Callable[[], object]):
        box: dict[str, object] = {}

        def run() -> None:
            try:
                box["value"] = fn()
            except Exception as exc:  # re-raised in the caller's thread below
                box["error"] = exc

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(self.timeout_s)
        if worker.is_alive():
            self._proc.kill()
            raise EvaluationError(f"METEOR jar did not answer within {self.timeout_s:.0f} s ({what}); process killed")
        if "error" in box:
            err = box["error"]
            raise EvaluationError(f"METEOR jar failed ({what}): {type(err).__name__}: {err}") from err
        return box["value"]

    def _eval(self, stats: list[str]) -> tuple[float, list[float]]:
        proc = self._proc
        proc.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode())
        proc.stdin.flush()
        segments = [float(proc.stdout.readline().strip()) for _ in stats]
        return float(proc.stdout.readline().strip()), segments

    def score(self, gts: dict[str, list[str]], res: dict[str, list[str]]) -> MeteorResult:
        ids = _check_pairs(gts, res)
        clean_gts = {i: [sanitise_for_meteor(r) for r in gts[i]] for i in ids}
        clean_res = {i: sanitise_for_meteor(res[i][0]) for i in ids}

        def exchange():
            stats = [self._meteor._stat(clean_res[i], clean_gts[i]) for i in ids]
            return stats, self._eval(stats)

        stats, (corpus, segments) = self._guarded(f"{len(ids)} studies", exchange)
        return MeteorResult(corpus=corpus, segments=np.asarray(segments), stats=stats)

    def aggregate(self, stats: list[str], counts: np.ndarray) -> float:
        """Corpus METEOR of a resample: each study's statistics repeated `counts[i]` times."""
        lines = [s for s, c in zip(stats, counts) for _ in range(int(c))]
        return self._guarded("bootstrap resample", lambda: self._eval(lines)[0])


# --------------------------------------------------------------------------------------------- pycocoevalcap


def _check_pairs(gts: dict[str, list[str]], res: dict[str, list[str]]) -> list[str]:
    if not gts:
        raise EvaluationError("no studies to score (empty reference set)")
    missing_res = sorted(set(gts) - set(res))
    missing_gts = sorted(set(res) - set(gts))
    if missing_res or missing_gts:
        raise EvaluationError(
            f"generated and reference ids differ: no generation for {missing_res[:10]}, no reference for {missing_gts[:10]}"
        )
    for i in gts:
        if len(res[i]) != 1 or not isinstance(res[i][0], str):
            raise EvaluationError(f"study {i}: expected exactly one generated text, got {res[i]!r}")
        if not gts[i] or not all(isinstance(r, str) for r in gts[i]):
            raise EvaluationError(f"study {i}: expected one or more reference texts, got {gts[i]!r}")
    return list(gts)


NLG_METRICS = ["BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"]


@dataclass
class CocoResult:
    scores: dict[str, float]  # corpus scores, pycocoevalcap's own values
    per_study: dict[str, np.ndarray]  # ROUGE_L, CIDEr, METEOR segment scores (study order of gts)
    meteor_stats: list[str] | None = field(default=None, repr=False)


COCO_SCORERS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr")  # what coco_scores runs, in this order


def coco_scores(
    gts: dict[str, list[str]], res: dict[str, list[str]], meteor: MeteorScorer | None = None,
    advance: Advance = unwatched,
) -> CocoResult:
    """pycocoevalcap corpus scores on already preprocessed text. METEOR only when a scorer (a JVM) is given.
    `advance` hears of every scorer finished (COCO_SCORERS, METEOR only with a scorer)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    _check_pairs(gts, res)
    scores: dict[str, float] = {}
    per_study: dict[str, np.ndarray] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for k, value in enumerate(bleu, start=1):
        scores[f"BLEU_{k}"] = float(value)
    advance(1)
    stats = None
    if meteor is not None:
        result = meteor.score(gts, res)
        scores["METEOR"], per_study["METEOR"], stats = result.corpus, result.segments, result.stats
        advance(1)
    scores["ROUGE_L"], per_study["ROUGE_L"] = _float_and_array(Rouge().compute_score(gts, res))
    advance(1)
    scores["CIDEr"], per_study["CIDEr"] = _float_and_array(Cider().compute_score(gts, res))
    advance(1)
    return CocoResult(scores=scores, per_study=per_study, meteor_stats=stats)


def _float_and_array(pair) -> tuple[float, np.ndarray]:
    return float(pair[0]), np.asarray(pair[1], dtype=float)


# --------------------------------------------------------------------------------------------- MedVLM convention


class _IdentityWordNet:
    """Stands in for nltk's WordNet (no data offline): no synonyms, so METEOR matches exact words and stems only."""

    @staticmethod
    def synsets(word: str) -> list:
        return []


def medvlm_tokens(text: str, language: str) -> list[str]:
    if language == "zh":
        return jieba_split(text).split()
    return clean_report(text).split()


def medvlm_scores(gts: dict[str, list[str]], res: dict[str, list[str]], language: str = "en") -> dict[str, np.ndarray]:
    """Per-study nltk BLEU-4 (weights (0,0,0,1), no smoothing) and METEOR (identity WordNet); means are the scores."""
    import warnings

    from nltk.translate.bleu_score import sentence_bleu
    from nltk.translate.meteor_score import meteor_score

    ids = _check_pairs(gts, res)
    wordnet = _IdentityWordNet()
    bleu4, meteor = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns on every report without a 4-gram match (its score is 0)
        for i in ids:
            refs = [medvlm_tokens(r, language) for r in gts[i]]
            hyp = medvlm_tokens(res[i][0], language)
            bleu4.append(sentence_bleu(refs, hyp, weights=(0, 0, 0, 1)) if hyp else 0.0)
            meteor.append(meteor_score(refs, hyp, wordnet=wordnet) if hyp else 0.0)
    return {"medvlm_BLEU_4": np.asarray(bleu4, dtype=float), "medvlm_METEOR": np.asarray(meteor, dtype=float)}


# --------------------------------------------------------------------------------------------- clinical efficacy


def _weighted_confusion(y_true: np.ndarray, y_pred: np.ndarray, w: np.ndarray) -> tuple[float, float, float, float]:
    tp = float(np.sum(w * (y_true & y_pred)))
    fp = float(np.sum(w * (~y_true & y_pred)))
    fn = float(np.sum(w * (y_true & ~y_pred)))
    tn = float(np.sum(w * (~y_true & ~y_pred)))
    return tp, fp, fn, tn


def _prf(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def weighted_auroc(y_true: np.ndarray, score: np.ndarray, w: np.ndarray) -> float:
    """AUROC with sample weights (ties count one half); NaN when only one class is present."""
    pos, neg = w * y_true, w * ~y_true
    if pos.sum() == 0 or neg.sum() == 0:
        return math.nan
    order = np.argsort(score, kind="mergesort")
    s, p, n = score[order], pos[order], neg[order]
    uniq, start = np.unique(s, return_index=True)
    pos_per = np.add.reduceat(p, start)
    neg_per = np.add.reduceat(n, start)
    neg_below = np.concatenate([[0.0], np.cumsum(neg_per)[:-1]])
    return float(np.sum(pos_per * (neg_below + 0.5 * neg_per)) / (pos.sum() * neg.sum()))


def clinical_efficacy(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    label_names: list[str],
    primary_label: str,
    threshold: float | Sequence[float] = 0.5,
    weights: np.ndarray | None = None,
    per_label: bool = True,
) -> dict[str, float]:
    """Primary-label accuracy/precision/recall/F1/AUROC, micro/macro P/R/F1 over all labels, the macro AUROC, and
    per-label P/R/F1/AUROC.

    y_true: (n, L) 0/1; y_prob: (n, L) probabilities; `threshold` one for all labels or one per label (e.g. chosen
    on the training split). `weights` (bootstrap multiplicities) default to ones.
    """
    y_true = np.asarray(y_true).astype(bool)
    y_prob = np.asarray(y_prob, dtype=float)
    if y_true.shape != y_prob.shape or y_true.ndim != 2 or y_true.shape[1] != len(label_names):
        raise EvaluationError(
            f"clinical efficacy: labels {y_true.shape} and probabilities {y_prob.shape} must both be (n, {len(label_names)})"
        )
    w = np.ones(len(y_true)) if weights is None else np.asarray(weights, dtype=float)
    cut = np.broadcast_to(np.asarray(threshold, dtype=float), (len(label_names),))
    y_pred = y_prob > cut
    out: dict[str, float] = {}
    p = label_names.index(primary_label)
    tp, fp, fn, tn = _weighted_confusion(y_true[:, p], y_pred[:, p], w)
    out["CE_accuracy"] = (tp + tn) / w.sum()
    out["CE_precision"], out["CE_recall"], out["CE_f1"] = _prf(tp, fp, fn)
    out["CE_auroc"] = weighted_auroc(y_true[:, p], y_prob[:, p], w)
    totals = np.zeros(3)
    macro = np.zeros(3)
    aurocs = []
    for j, name in enumerate(label_names):
        tp, fp, fn, _ = _weighted_confusion(y_true[:, j], y_pred[:, j], w)
        totals += (tp, fp, fn)
        prf = _prf(tp, fp, fn)
        macro += prf
        auroc = out["CE_auroc"] if j == p else weighted_auroc(y_true[:, j], y_prob[:, j], w)
        if not math.isnan(auroc):
            aurocs.append(auroc)
        if per_label:
            out[f"CE_{name}_precision"], out[f"CE_{name}_recall"], out[f"CE_{name}_f1"] = prf
            out[f"CE_{name}_auroc"] = auroc
    out["CE_micro_precision"], out["CE_micro_recall"], out["CE_micro_f1"] = _prf(*totals)
    out["CE_macro_precision"], out["CE_macro_recall"], out["CE_macro_f1"] = (macro / len(label_names)).tolist()
    out["CE_macro_auroc"] = float(np.mean(aurocs)) if aurocs else math.nan
    return out
