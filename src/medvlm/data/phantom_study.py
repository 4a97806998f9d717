"""What a phantom study holds, before anything is drawn: its findings, their labels, the scanner of its batch.

Shared by the 2-D slices (medvlm.data.phantom) and the 3-D chests (medvlm.data.phantom3d): the finding vocabulary,
how abnormal studies are sampled (how many findings, which types, sides, extents; distributions per type), the
labels a study's findings imply (pneumonia = any infection pattern), and the scanner differences between batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FINDING_TYPES = ("ground_glass", "consolidation", "crazy_paving", "nodule", "effusion", "fibrosis")
INFECTION_TYPES = ("ground_glass", "consolidation", "crazy_paving")  # pneumonia = any of these
LABELS = ("pneumonia",) + FINDING_TYPES
SIDES, ZONES = ("right", "left", "bilateral"), ("upper", "middle", "lower")
DISTRIBUTIONS, EXTENTS = ("peripheral", "subpleural", "central"), ("small", "patchy", "extensive")
EFFUSION_DISTRIBUTION = "dependent"  # effusions always lie posteriorly (supine patient)

# Sampling of abnormal studies: how many findings, which types, sides, extents; distributions per type.
_N_FINDINGS_P = (0.55, 0.32, 0.13)
_TYPE_P = dict(ground_glass=0.26, consolidation=0.16, crazy_paving=0.12, nodule=0.18, effusion=0.12, fibrosis=0.16)
_SIDE_P, _EXTENT_P = (0.35, 0.30, 0.35), (0.35, 0.40, 0.25)
_DISTRIBUTION_P = dict(ground_glass=(0.35, 0.45, 0.20), consolidation=(0.40, 0.35, 0.25),
                       crazy_paving=(0.40, 0.40, 0.20),
                       nodule=(0.34, 0.33, 0.33), fibrosis=(0.35, 0.50, 0.15))


@dataclass(frozen=True)
class Scanner:
    """Acquisition differences between batches: brightness shift (share of 255) and noise multiplier."""

    intensity_shift: float = 0.0
    noise_scale: float = 1.0


def sample_study(rng: np.random.Generator, normal: bool) -> tuple[str, list[dict]]:
    """Slice level and structured findings of one study (zone = level for every finding)."""
    level = ZONES[int(rng.integers(3))]
    if normal:
        return level, []
    types = [t for t in FINDING_TYPES if not (t == "effusion" and level == "upper")]  # effusions are basal/dependent
    p = np.array([_TYPE_P[t] for t in types])
    n = int(rng.choice(3, p=_N_FINDINGS_P)) + 1
    chosen = rng.choice(types, size=n, replace=False, p=p / p.sum())
    findings = []
    for t in sorted(chosen, key=FINDING_TYPES.index):
        dist = EFFUSION_DISTRIBUTION if t == "effusion" else DISTRIBUTIONS[int(rng.choice(3, p=_DISTRIBUTION_P[t]))]
        findings.append(dict(type=str(t), side=SIDES[int(rng.choice(3, p=_SIDE_P))], zone=level,
                             distribution=dist, extent=EXTENTS[int(rng.choice(3, p=_EXTENT_P))]))
    return level, findings


def labels_for(findings: list[dict], label_names: list[str]) -> dict[str, int]:
    present = {f["type"] for f in findings}
    full = {name: int(name in present) for name in FINDING_TYPES}
    full["pneumonia"] = int(bool(present & set(INFECTION_TYPES)))
    return {name: full[name] for name in label_names}


# Indications a requesting clinician might write, by the finding that explains them; a normal study gets a
# screening / rule-out one. INDICATION_NOISE of the studies get one drawn from any finding's list (clinical
# suspicion is not always right), so an indication is a clue, not the answer.
INDICATIONS = {
    "infection": ["fever, cough for {d} days", "fever and productive cough for {d} days",
                  "suspected pneumonia, SpO2 {s}%", "cough and fever, CRP raised"],
    "nodule": ["incidental nodule on prior imaging, follow-up", "smoker, {y} pack-years, screening",
               "weight loss, history of smoking"],
    "effusion": ["dyspnoea, reduced breath sounds at the base", "heart failure, increasing dyspnoea",
                 "pleuritic chest pain and dyspnoea"],
    "fibrosis": ["progressive exertional dyspnoea for {m} months", "dry cough, bibasal crackles",
                 "known interstitial lung disease, follow-up"],
    "normal": ["pre-operative assessment", "chest pain, rule out pathology", "routine screening",
               "trauma, rule out injury"],
}
INDICATION_NOISE = 0.2


def indication_for(findings: list[dict], rng: np.random.Generator) -> str:
    """A clinical indication that correlates with the findings (see INDICATIONS)."""
    present = {f["type"] for f in findings}
    keys = ([k for k, types in (("infection", INFECTION_TYPES), ("nodule", ("nodule",)), ("effusion", ("effusion",)),
                                ("fibrosis", ("fibrosis",))) if present & set(types)] or ["normal"])
    key = str(rng.choice(list(INDICATIONS))) if rng.random() < INDICATION_NOISE else keys[int(rng.integers(len(keys)))]
    options = INDICATIONS[key]
    text = options[int(rng.integers(len(options)))]
    return text.format(d=int(rng.integers(2, 11)), s=int(rng.integers(86, 95)), y=int(rng.integers(15, 60)),
                       m=int(rng.integers(3, 25)))


def sample_volume_study(rng: np.random.Generator, normal: bool) -> list[dict]:
    """Structured findings of one 3-D study; each finding has its own zone (effusions are basal)."""
    if normal:
        return []
    p = np.array([_TYPE_P[t] for t in FINDING_TYPES])
    n = int(rng.choice(3, p=_N_FINDINGS_P)) + 1
    chosen = rng.choice(FINDING_TYPES, size=n, replace=False, p=p / p.sum())
    findings = []
    for t in sorted(chosen, key=FINDING_TYPES.index):
        if t == "effusion":
            zone, dist = "lower", EFFUSION_DISTRIBUTION
        else:
            zone, dist = ZONES[int(rng.integers(3))], DISTRIBUTIONS[int(rng.choice(3, p=_DISTRIBUTION_P[t]))]
        findings.append(dict(type=str(t), side=SIDES[int(rng.choice(3, p=_SIDE_P))], zone=zone,
                             distribution=dist, extent=EXTENTS[int(rng.choice(3, p=_EXTENT_P))]))
    return findings
