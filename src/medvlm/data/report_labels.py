"""Rule-based report labelers: findings read from report text, for sources without labels (R2Gen IU X-ray/MIMIC).

Two rule sets, chosen by `data.report_labeler`:
  basic     the original crude keyword set (CT-flavoured names, any label name matches its own words); a sentence
            that names a keyword is positive unless a negation cue precedes it. `normal` = no other label fires.
  chexpert  the 14 CheXpert observations (CHEXPERT_LABELS) with CheXpert-style rules, small on purpose:
            1. mention: a per-label regex over the lower-cased sentence (MENTIONS);
            2. negation: a cue before the mention in the same clause ("no", "without", "negative for", "free of",
               "no evidence of", ...) or after it ("... is not seen", "... has resolved", "... is absent");
            3. uncertainty: a hedge before ("possible", "may", "suspicious for", "cannot exclude", ...) or after
               ("... is not excluded", "... cannot be excluded") the mention; `data.report_uncertain` maps it to 0/1
               (CheXpert itself keeps it as a third value, -1);
            4. a label is positive when any sentence affirms it (a positive mention beats an uncertain one);
            5. no_finding = 1 when no observation except support_devices is positive or uncertain (CheXpert's rule).
            A clause ends at ".", ";", a newline or a contrast word ("but", "however", "although", "except"), so
            "no effusion but a small pneumothorax" negates only the effusion. Commas do not end a clause: "no
            effusion, pneumothorax or consolidation" negates all three, as radiologists write lists.
The rules are a documented approximation of the NIH/CheXpert labeler, not a reimplementation: no dependency
parse, so double negations and long-range scope are read naively. tests/test_report_labels.py pins the behaviour.
"""

from __future__ import annotations

import re
from typing import Any

from medvlm.config import CHEXPERT_LABELS  # noqa: F401 (the label names chexpert reads; defined with the settings)

# Mention patterns (regex over lower-cased text). Chosen from the CheXpert mention lists and IU X-ray phrasing;
# "heart size is normal" or "cardiomediastinal silhouette within normal limits" name no finding and match nothing.
MENTIONS: dict[str, str] = {
    "enlarged_cardiomediastinum": r"widen\w* (?:of the )?(?:superior )?mediastin\w*|mediastin\w* (?:is |appears )?widen"
                                  r"|enlarg\w* (?:of the )?cardiomediastin\w*|cardiomediastinal (?:silhouette|contour)s? "
                                  r"(?:is |are |appears |remains )?(?:mildly |moderately |markedly )?(?:enlarged|widened|prominent)",
    "cardiomegaly": r"cardiomegaly|cardiac enlargement|enlarged (?:heart|cardiac)|heart (?:size )?is (?:mildly |moderately "
                    r"|markedly |severely )?enlarged|(?:heart|cardiac) (?:size|silhouette) (?:is )?(?:mildly |moderately "
                    r"|markedly )?(?:enlarged|increased)",
    "lung_opacity": r"opacit\w*|opacification|infiltrat\w*|airspace (?:disease|process)|air-space disease"
                    r"|ground[- ]glass|hazy|haziness|increased density|interstitial (?:marking|prominence)",
    "lung_lesion": r"nodul\w*|\bmass(?:es)?\b|lesion|neoplasm|tumou?r|carcinoma|malignan\w*|metasta\w*|cavitary",
    "edema": r"o?edema|vascular congestion|pulmonary congestion|\bchf\b|heart failure|cephalization",
    "consolidation": r"consolidat\w*",
    "pneumonia": r"pneumonia|pneumonic|infectious process|\binfection\b",
    "atelectasis": r"atelecta\w*|collapse of the (?:\w+ )?lobe|lob\w* collapse",
    "pneumothorax": r"pneumothora\w*|hydropneumothorax",
    "pleural_effusion": r"(?<!pericardial )effusion|pleural fluid|hydrothorax|hydropneumothorax",
    "pleural_other": r"pleural (?:thickening|plaque|scar\w*|calcification)|fibrothorax|apical (?:pleural )?(?:cap|thickening)",
    "fracture": r"fractur\w*",
    "support_devices": r"\btubes?\b|catheter|\b(?:picc|central venous|port-a-cath|pacemaker|pacer|defibrillator|aicd)\b"
                       r"|\b(?:picc|central|venous|arterial|swan-ganz|midline) line|\bdevices?\b|hardware|\bstents?\b"
                       r"|sternotomy wires|\bwires\b|\bclips?\b|prosthe\w*",
}

_PRE_NEGATION = re.compile(
    r"\b(?:no|not|without|negative for|free of|clear of|absence of|resolution of|rather than|"
    r"resolved|removal of|never)\b")
_POST_NEGATION = re.compile(
    r"^[\w\s-]{0,40}?\b(?:(?:is|are|was|were|has been|have been)\s+)?(?:not (?:seen|identified|present|visualized|"
    r"evident|appreciated|demonstrated|noted)|absent|resolved|cleared|removed|negative)\b")
_PRE_UNCERTAIN = re.compile(
    r"\b(?:possible|possibly|probable|probably|may|might|could|questionable|question of|suspicious for|suspect\w*|"
    r"concern(?:ing)? for|suggest\w*|cannot (?:be )?(?:excluded|exclude|ruled out|rule out)|(?:rule|ruled) out|"
    r"differential|versus|vs|likely|equivocal|borderline|indeterminate|atypical)\b")
_POST_UNCERTAIN = re.compile(
    r"^[\w\s-]{0,40}?\b(?:(?:is|are)\s+)?(?:not (?:excluded|ruled out)|cannot be (?:excluded|ruled out)|"
    r"(?:is |are )?(?:possible|likely|suspected|questioned))\b")
# "no change in the effusion" reports the effusion, it does not negate it (CheXpert's pseudo-negations)
_PSEUDO_NEGATION = re.compile(r"\b(?:no|without) (?:significant |interval |appreciable |definite )?"
                              r"(?:change|increase|decrease|worsening|improvement)\b|\bnot only\b")
_CLAUSE_BREAK = re.compile(r"\b(?:but|however|although|though|except|aside from|apart from|otherwise|whereas)\b")
_SENTENCE_BREAK = re.compile(r"[.;\n。；]|\s\d+\.\s")
_COMPILED = {name: re.compile(pattern) for name, pattern in MENTIONS.items()}


def sentences(report: Any) -> list[str]:
    if not isinstance(report, str):
        return []
    return [s.strip() for s in _SENTENCE_BREAK.split(report.lower()) if s.strip()]


def _clauses(sentence: str) -> list[str]:
    """A sentence cut at contrast words; a negation's scope never crosses one."""
    cuts = [0, *(m.start() for m in _CLAUSE_BREAK.finditer(sentence)), len(sentence)]
    return [sentence[a:b] for a, b in zip(cuts, cuts[1:]) if sentence[a:b].strip()]


def mention_status(clause: str, pattern: re.Pattern) -> int | None:
    """CheXpert's three values for one clause: 1 affirmed, -1 uncertain, 0 negated; None = not mentioned.

    Several mentions in one clause: the most positive one wins (1 > -1 > 0)."""
    best = None
    for match in pattern.finditer(clause):
        before, after = _PSEUDO_NEGATION.sub(" ", clause[: match.start()]), clause[match.end():]
        if _PRE_NEGATION.search(before) or _POST_NEGATION.search(after):
            status = 0
        elif _PRE_UNCERTAIN.search(before) or _POST_UNCERTAIN.search(after):
            status = -1
        else:
            status = 1
        best = status if best is None else max(best, status, key=lambda s: {1: 2, -1: 1, 0: 0}[s])
    return best


def chexpert_status(report: Any) -> dict[str, int | None]:
    """Per CheXpert observation: 1 / -1 / 0 / None (not mentioned), and no_finding 1 or None."""
    out: dict[str, int | None] = {name: None for name in MENTIONS}
    rank = {None: -1, 0: 0, -1: 1, 1: 2}
    for sentence in sentences(report):
        for clause in _clauses(sentence):
            for name, pattern in _COMPILED.items():
                status = mention_status(clause, pattern)
                if rank[status] > rank[out[name]]:
                    out[name] = status
    findings = [v for k, v in out.items() if k != "support_devices"]
    return {"no_finding": 1 if all(v in (None, 0) for v in findings) else None, **out}


def chexpert_labels(report: Any, label_names: list[str], uncertain_as: int = 0) -> dict[str, int]:
    """0/1 per label name (a subset of CHEXPERT_LABELS): positive = affirmed, uncertain -> `uncertain_as`."""
    status = chexpert_status(report)  # no_finding is already 0 when any finding is uncertain (CheXpert's rule)
    values = {name: 1 if s == 1 else (uncertain_as if s == -1 else 0) for name, s in status.items()}
    unknown = [n for n in label_names if n not in values]
    if unknown:
        raise KeyError(f"not CheXpert labels: {unknown}")
    return {name: int(values[name]) for name in label_names}


# ------------------------------------------------------------------------------------------- basic (original)

# The original crude set: a sentence that names a keyword counts as positive unless a negation cue precedes the
# keyword in that sentence. Names missing here match their own words. "normal" is 1 when no other label fires.
KEYWORDS: dict[str, list[str]] = {
    "pneumonia": ["pneumonia", "infection", "infectious", "inflammat"],
    "covid": ["covid", "coronavirus", "viral pneumonia"],
    "ground_glass": ["ground glass", "ground-glass", "groundglass"],
    "consolidation": ["consolidation", "consolidative"],
    "crazy_paving": ["crazy paving", "crazy-paving"],
    "nodule": ["nodule", "nodular", "mass"],
    "effusion": ["effusion"],
    "fibrosis": ["fibrosis", "fibrotic", "fibrous"],
    "cardiomegaly": ["cardiomegaly", "heart is enlarged", "enlarged heart", "enlarged cardiac"],
    "atelectasis": ["atelectasis", "atelectatic"],
    "edema": ["edema", "oedema"],
    "pneumothorax": ["pneumothorax"],
    "opacity": ["opacity", "opacities", "opacification"],
}
_NEGATIONS = re.compile(r"\b(no|not|without|negative for|free of|clear of|resolved)\b")


def basic_labels(report: Any, label_names: list[str]) -> dict[str, int]:
    """0/1 per label name from report keywords (see KEYWORDS); a missing report gives no positives."""
    parts = re.split(r"[.;\n。；]", report.lower()) if isinstance(report, str) else []
    labels = {}
    for name in label_names:
        if name == "normal":
            continue
        words = KEYWORDS.get(name, [name.replace("_", " ")])
        labels[name] = int(any(_affirmed(sentence, word) for sentence in parts for word in words))
    if "normal" in label_names:
        labels["normal"] = int(not any(labels.values()))
    return {name: labels[name] for name in label_names}


def _affirmed(sentence: str, word: str) -> bool:
    at = sentence.find(word)
    return at >= 0 and not _NEGATIONS.search(sentence[:at])


REPORT_LABELERS = ("basic", "chexpert")


def report_labels(report: Any, label_names: list[str], labeler: str = "basic", uncertain_as: int = 0) -> dict[str, int]:
    """The configured rule set (data.report_labeler) applied to one report."""
    if labeler == "chexpert":
        return chexpert_labels(report, label_names, uncertain_as)
    return basic_labels(report, label_names)
