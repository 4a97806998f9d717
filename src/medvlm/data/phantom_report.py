"""Report text for the phantom: COV-CTR's structure (thorax/mediastinum, lung findings, bronchi, pleura) plus an
impression, in clean English.

The facts of a report are fixed by the drawn findings (type, side, zone, distribution, extent); only the wording
varies (seeded synonyms and finding order), so a model can learn wording-invariant content. Each finding type has
one keyword that appears only in its own sentence (`KEYWORDS`), and negative sentences never name a finding type,
so tests and the CheXbert-style labeler can read the facts back from the text.
Sides are the patient's sides (the image shows the patient's right on its left, see phantom.py).
"""

from __future__ import annotations

import numpy as np

# One keyword per finding type, present in the findings text iff the finding is drawn.
KEYWORDS = {
    "ground_glass": "ground-glass",
    "consolidation": "consolidation",
    "crazy_paving": "crazy-paving",
    "nodule": "nodule",
    "effusion": "effusion",
    "fibrosis": "fibrous",
}
IMPRESSION_MARK = "Impression:"

_THORAX = [
    "The thorax is symmetrical, the mediastinal heart shadow is centred, "
    "and no enlarged lymph nodes are seen in the mediastinum.",
    "The thorax is symmetrical and the mediastinum is centred, with no enlarged mediastinal lymph nodes.",
    "The thoracic cage is symmetrical; the heart and mediastinum are midline and no enlarged lymph nodes are seen.",
]
_CLEAR_LUNGS = [
    "The lung markings of both lungs are clear and no abnormal density is seen in the lung fields.",
    "Both lungs are clear, with normal lung markings.",
    "The texture of both lungs is clear and the lung fields show no abnormal density.",
]
_BRONCHI = [
    "The lobar and segmental bronchi are patent.",
    "The bronchi of the lobes and segments are clear.",
    "The bronchi of the lobe segments are unobstructed.",
]
_CLEAR_PLEURA = [
    "No abnormal density is seen in either pleural cavity.",
    "No abnormal density shadow is seen in the bilateral thoracic cavities.",
    "Both pleural cavities are free of abnormal density.",
]
_NORMAL_IMPRESSION = ["No abnormality is seen on this chest CT.", "Normal chest CT.", "No active disease in the chest."]
_SEEN = ["seen", "noted", "present"]

# (subject by extent, singular?) per type; the verb agrees with the subject.
_SUBJECT = {
    "ground_glass": {
        "small": (["A small ground-glass opacity", "A small patch of ground-glass opacity"], True),
        "patchy": (["Patchy ground-glass opacities", "Several patchy ground-glass opacities"], False),
        "extensive": (["Extensive ground-glass opacities", "Large confluent ground-glass opacities"], False),
    },
    "consolidation": {
        "small": (["A small area of consolidation", "A small focus of consolidation"], True),
        "patchy": (["Patchy consolidation", "Patchy areas of consolidation"], None),
        "extensive": (["Extensive consolidation", "Large areas of consolidation"], None),
    },
    "crazy_paving": {
        "small": (["A small area of crazy-paving pattern", "A small crazy-paving focus"], True),
        "patchy": (["Patchy areas of crazy-paving pattern", "Patchy crazy-paving foci"], False),
        "extensive": (["Extensive crazy-paving pattern", "Widespread crazy-paving pattern"], True),
    },
    "nodule": {
        "small": (["A small solid nodule", "A single small solid nodule"], True),
        "patchy": (["A few solid nodules", "Several solid nodules"], False),
        "extensive": (["Multiple solid nodules", "Numerous solid nodules"], False),
    },
    "fibrosis": {
        "small": (["A few thin fibrous stripes", "A couple of thin fibrous stripes"], False),
        "patchy": (["Several fibrous stripes", "Several linear fibrous stripes"], False),
        "extensive": (["Numerous fibrous stripes", "Extensive linear fibrous stripes"], False),
    },
}
_TAIL = {
    "ground_glass": [", with ill-defined margins", ", with blurred margins"],
    "consolidation": [", with air bronchograms within it", ", containing air bronchograms"],
    "crazy_paving": [", showing a reticular grid over a hazy background",
                     ", with interlobular septal thickening over a hazy background"],
    "nodule": [", with well-defined margins", ", with clear margins"],
    "fibrosis": [", with clear margins", ", with sharp margins"],
}
_DISTRIBUTION = {
    "subpleural": ["under the pleura of", "in the subpleural region of"],
    "peripheral": ["in the periphery of", "in the peripheral part of"],
    "central": ["in the central part of", "in the perihilar region of"],
}
_EFFUSION_SIZE = {"small": "small", "patchy": "moderate", "extensive": "large"}


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def location_phrase(zone: str, side: str, rng: np.random.Generator) -> str:
    """Lobe/zone and side; bilateral phrases never contain 'right' or 'left' (tests read sides back)."""
    if zone == "middle":
        options = {
            "right": ["the middle lobe of the right lung", "the right middle lobe"],
            "left": ["the lingula of the left lung", "the lingular segment of the left lung"],
            "bilateral": ["the middle zones of both lungs", "the mid-lung zones of both lungs"],
        }[side]
    elif side == "bilateral":
        options = [f"the {zone} lobes of both lungs", f"both {zone} lobes"]
    else:
        options = [f"the {zone} lobe of the {side} lung", f"the {side} {zone} lobe"]
    return _pick(rng, options)


def side_phrase(side: str) -> str:
    return {"right": "the right lung", "left": "the left lung", "bilateral": "both lungs"}[side]


def finding_sentence(finding: dict, rng: np.random.Generator) -> str:
    kind, extent = finding["type"], finding["extent"]
    if kind == "effusion":
        size, side = _EFFUSION_SIZE[extent], finding["side"]
        if side == "bilateral":
            return _pick(rng, [
                f"Bilateral {size} pleural effusions are seen as crescent-shaped fluid densities "
                "in the dependent parts of both pleural cavities.",
                f"A {size} crescent-shaped fluid density is seen posteriorly in both pleural cavities, "
                "consistent with bilateral pleural effusion.",
            ])
        return _pick(rng, [
            f"A {size} crescent-shaped fluid density is seen in the dependent part of the {side} pleural cavity, "
            "consistent with pleural effusion.",
            f"A {size} {side} pleural effusion is seen posteriorly in the {side} pleural cavity.",
        ])
    subjects, singular = _SUBJECT[kind][extent]
    subject = _pick(rng, subjects)
    if singular is None:  # mass nouns ("patchy consolidation") vs plural forms ("areas of ...")
        singular = not subject.split(" of ")[0].endswith("s")
    verb = "is" if singular else "are"
    where = _pick(rng, _DISTRIBUTION[finding["distribution"]])
    where += " " + location_phrase(finding["zone"], finding["side"], rng)
    return f"{subject} {verb} {_pick(rng, _SEEN)} {where}{_pick(rng, _TAIL[kind])}."


def _union_side(sides: list[str]) -> str:
    found = set(sides)
    if "bilateral" in found or {"right", "left"} <= found:
        return "bilateral"
    return found.pop()


def impression(findings: list[dict], rng: np.random.Generator) -> str:
    if not findings:
        return _pick(rng, _NORMAL_IMPRESSION)
    by_type: dict[str, list[str]] = {}
    for f in findings:
        by_type.setdefault(f["type"], []).append(f["side"])
    parts = []
    infection = [s for t in ("ground_glass", "consolidation", "crazy_paving") for s in by_type.get(t, [])]
    if infection:
        where = side_phrase(_union_side(infection))
        parts.append(_pick(rng, [f"Infectious pneumonia involving {where} is considered.",
                                 f"The findings suggest viral pneumonia of {where}."]))
    if "nodule" in by_type:
        where = side_phrase(_union_side(by_type["nodule"]))
        parts.append(f"Solid pulmonary {KEYWORDS['nodule']}(s) in {where}; follow-up CT is recommended.")
    if "effusion" in by_type:
        side = _union_side(by_type["effusion"])
        parts.append(f"{'Bilateral' if side == 'bilateral' else side.capitalize()} pleural {KEYWORDS['effusion']}.")
    if "fibrosis" in by_type:
        parts.append(f"Old {KEYWORDS['fibrosis']} foci in {side_phrase(_union_side(by_type['fibrosis']))}.")
    return " ".join(parts)


def write_report(findings: list[dict], rng: np.random.Generator) -> str:
    """COV-CTR-like report: thorax, lung findings (shuffled order), bronchi, pleura, then the impression."""
    lung = [f for f in findings if f["type"] != "effusion"]
    pleural = [f for f in findings if f["type"] == "effusion"]
    sentences = [_pick(rng, _THORAX)]
    if lung:
        order = rng.permutation(len(lung))
        sentences += [finding_sentence(lung[i], rng) for i in order]
    else:
        sentences.append(_pick(rng, _CLEAR_LUNGS))
    sentences.append(_pick(rng, _BRONCHI))
    sentences += [finding_sentence(f, rng) for f in pleural] or [_pick(rng, _CLEAR_PLEURA)]
    return " ".join(sentences) + f" {IMPRESSION_MARK} " + impression(findings, rng)
