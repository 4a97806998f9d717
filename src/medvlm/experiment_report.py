"""One results document over several experiments (e.g. COV-CTR random vs source-grouped split), with published
figures beside ours and every goal checked against what was measured.

Reads <out_root>/<name>/results.json written by `medvlm experiment run`; writes the markdown file it is given.
Published figures (experiment.anchors) are printed as their papers report them: other splits, other conventions,
never mixed into our rows. Goals (experiment.goals) are checked mechanically, so the document cannot claim more
than the numbers show.
"""

from __future__ import annotations

import json
from pathlib import Path

from medvlm.config import Config
from medvlm.errors import EvaluationError
from medvlm.report import TABLE_METRICS, _cell, chain_table, collapse_table

NLG = ["BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"]
BASELINES = ("retrieval", "consensus", "cnn_transformer")  # the rows a model must beat (oracle is a ceiling)


def _load(cfg: Config, name: str) -> dict:
    path = Path(cfg.experiment.out_root) / name / "results.json"
    if not path.is_file():
        raise EvaluationError(f"{path}: missing (run `medvlm experiment run` with experiment.name={name} first)")
    return json.loads(path.read_text(encoding="utf-8"))


def _value(metrics: dict, name: str) -> float | None:
    m = metrics.get(name) or {}
    return m.get("value")


def model_rows(result: dict) -> list[str]:
    return [r for r in result["rows"] if r not in (*BASELINES, "oracle")]


def best_model(result: dict, metric: str = "CIDEr") -> str | None:
    rows = [r for r in model_rows(result) if "−" not in r and _value(result["rows"][r], metric) is not None]
    return max(rows, key=lambda r: _value(result["rows"][r], metric)) if rows else None


def goal_checks(result: dict, goals: dict[str, float]) -> list[dict]:
    """Best full model (by CIDEr) against each goal, and against every baseline on every NLG metric."""
    best = best_model(result)
    if best is None:
        return []
    ours = result["rows"][best]
    checks = []
    for metric, target in goals.items():
        value = _value(ours, metric)
        checks.append({"check": f"{metric} >= {target}", "model": best, "value": value,
                       "met": value is not None and value >= target})
    for baseline in BASELINES:
        if baseline not in result["rows"]:
            continue
        below = [m for m in NLG + ["CE_accuracy"] if _value(ours, m) is not None
                 and _value(result["rows"][baseline], m) is not None and _value(ours, m) <= _value(result["rows"][baseline], m)]
        checks.append({"check": f"above {baseline} on every metric", "model": best, "value": ", ".join(below) or None,
                       "met": not below})
    return checks


def compare_experiments(cfg: Config, names: list[str], out: Path, title: str, notes: list[str] | None = None) -> Path:
    lines = [f"# {title}", ""] + [f"{n}\n" for n in notes or []] + [
        "Ours: value [95% bootstrap CI over test images] (several seeds: mean [t-interval over seeds]). "
        "BLEU/METEOR/ROUGE-L/CIDEr: pycocoevalcap on the English reports, R2Gen preprocessing. medvlm_*: the MedVLM "
        "paper's per-report nltk convention applied to our *English* output (the paper's figures are on Chinese "
        "reports). CE_*: the report labeler on the generated text vs the test labels; DEM_*: the discrimination "
        "module's own prediction from the image. `A − x`: strategy A re-trained with switch x flipped.", ""]
    for name in names:
        result = _load(cfg, name)
        rows = result["rows"]
        columns = [m for m in TABLE_METRICS[:5] + ["BLEU_2", "BLEU_3"] if any(m in r for r in rows.values())]
        columns = sorted(columns, key=lambda m: (NLG + TABLE_METRICS).index(m)) + [
            m for m in TABLE_METRICS[5:] if any(m in r for r in rows.values())]
        lines += [f"## `{name}`", "", f"Test data hash `{result['test_data_hash']}`.", "",
                  "| model | seeds | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
        for row, metrics in rows.items():
            seeds = ",".join(map(str, result["seeds"].get(row, []))) or "–"
            lines.append(f"| {row} | {seeds} | " + " | ".join(_cell(metrics.get(m)) for m in columns) + " |")
        goals = cfg.experiment.goals.get(name, {})
        checks = goal_checks(result, goals)
        if checks:
            lines += ["", f"Goals (best full model by CIDEr: `{checks[0]['model']}`):", "",
                      "| goal | ours | met |", "|---|---|---|"]
            for c in checks:
                value = c["value"] if isinstance(c["value"], str) else ("–" if c["value"] is None else f"{c['value']:.3f}")
                if c["check"].startswith("above") and not c["met"]:
                    value = f"not above on: {value}"
                lines.append(f"| {c['check']} | {value} | {'yes' if c['met'] else '**no**'} |")
        results = {row: {"metrics": metrics} for row, metrics in rows.items()}
        lines += chain_table(cfg.data.label_names, list(rows), results) + collapse_table(list(rows), results)
        lines.append("")
    if cfg.experiment.anchors:
        keys = [m for m in NLG + ["medvlm_BLEU_4", "medvlm_METEOR", "accuracy"]
                if any(m in a for a in cfg.experiment.anchors)]
        lines += ["## Published figures (their splits and conventions, not ours)", "",
                  "| model | source | convention | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
        for a in cfg.experiment.anchors:
            cells = ["–" if a.get(k) is None else f"{a[k]:.3f}" for k in keys]
            lines.append(f"| {a.get('model', '?')} | {a.get('source', '')} | {a.get('convention', '')} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")
    return out
