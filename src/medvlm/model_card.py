"""The model card registered with each version (and logged with its MLflow run): what the model is, the data and
test set it was scored on, its metrics with CIs, the candidates it was chosen from, conventions and limits."""

from __future__ import annotations

import re

from medvlm.config import Config
from medvlm.selection import metric_ci, metric_value


def numeric_metrics(metrics: dict) -> dict[str, float]:
    """Every numeric metric of a metrics file (top level, "metrics", "nlg"), by name; the first one wins."""
    out = {}
    for scope in (metrics, metrics.get("metrics", {}), metrics.get("nlg", {})):
        if not isinstance(scope, dict):
            continue
        for key in scope:
            value = metric_value(scope, key)
            if value is not None and re.fullmatch(r"[\w\-. /]+", key):
                out.setdefault(key, value)
    return out


def model_card(cfg: Config, best: dict, found: list[dict]) -> str:
    metrics = best["metrics"]
    rows = []
    for name, value in numeric_metrics(metrics).items():
        ci = metric_ci(metrics, name)
        ci_text = f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "n/a"
        rows.append(f"| {name} | {value:.4f} | {ci_text} |")
    others = "\n".join(f"| {c['strategy']} | {c['primary']:.4f} | {c['tie_break']:.4f} |" for c in found)
    conventions = metrics.get("conventions") if isinstance(metrics.get("conventions"), dict) else {}
    convention = conventions.get("nlg") or metrics.get("preprocessing") or getattr(cfg.evaluate, "preprocessing", "n/a")
    strategy_cfg = getattr(cfg.train, best["strategy"], None)
    return f"""# MedVLM model card: {cfg.register.model_name} ({best['strategy']})

Radiology report generation for lung CT / chest X-ray images: vision encoder `{cfg.model.vision}` ->
discrimination-enhanced module ({'on' if cfg.model.discrimination else 'off'}) -> Q-Former
({cfg.model.qformer_queries} queries) -> causal LM `{cfg.model.lm}` (first {cfg.model.lm_layers or 'all'} layers),
fine-tuned with **{best['strategy']}** {strategy_cfg.model_dump() if strategy_cfg is not None else ''}.

## Data
- test-set hash (sha256): `{best['data_hash']}`
- data source: `{cfg.data.source}` at `{cfg.data.root}`, report language `{cfg.data.report_language}`
- labels: {', '.join(cfg.data.label_names)} (primary: {cfg.data.primary_label})

## Metrics on the test split ({cfg.evaluate.confidence:.0%} bootstrap CIs, {cfg.evaluate.bootstrap_iterations} resamples)
| metric | value | CI |
|---|---|---|
{chr(10).join(rows) or '| (none) | | |'}

Selection: highest `{cfg.register.primary_metric}` (tie-break `{cfg.register.tie_break}`) among:

| strategy | {cfg.register.primary_metric} | {cfg.register.tie_break} |
|---|---|---|
{others}

## Conventions
- text metrics: pycocoevalcap corpus BLEU/METEOR/ROUGE-L/CIDEr, preprocessing `{convention}`; decoding
  beam {cfg.generate.num_beams}, at most {cfg.generate.max_new_tokens} new tokens.
- input: one grayscale image (PNG/JPEG/TIFF/DICOM; CT DICOM windowed to the lung window); output: a report and
  one probability per label.
- pyfunc input: DataFrame column `image` = base64 image bytes; output: `report`, `prob_<label>`.

## Limits
- Research software, not a medical device: every report needs a radiologist's review.
- Trained on `{cfg.data.source}` data only; the default profile uses synthetic phantom images, whose reports
  say nothing about real patients. Expect drift on other scanners, populations and languages (see `medvlm monitor`).
- Metrics compare models on one test set; versions scored on different test sets are not ranked by the gate.
"""
