"""evaluate@name: one trained strategy (models/<name>) or one baseline, scored on the test split the same way.

Writes reports/generations/<name>.jsonl (what was generated, per test study; for a model with a DEM also the
low-resolution heatmap of the study's most probable finding, medvlm.explain, drawn by the examples page) and
reports/metrics/<name>.json (point estimates, bootstrap CIs, the scoring conventions, the test-set hash, the labeler's own quality next to the
clinical-efficacy figures, and for models the discrimination module's own accuracy from the image). Everything is
logged to MLflow, into the model's training run when its id is recorded in the model folder.

Unit of evaluation: one image. Test rows that share an image (COV-CTR has a few images with two reports) form one
unit whose reports are all references (multi-reference, as pycocoevalcap supports), so no image counts twice.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from medvlm.bootstrap import (
    bleu_family,
    bootstrap_intervals,
    cider_family,
    clinical_family,
    mean_family,
    meteor_family,
)
from medvlm.chain_metrics import collapse_metrics, follow_rates, threshold_vector
from medvlm.config import Config
from medvlm.errors import EvaluationError
from medvlm.eval_units import evaluation_units
from medvlm.labeler import Labeler
from medvlm.manifest import read_manifest, study_indications
from medvlm.metrics import (
    COCO_SCORERS,
    CONVENTIONS,
    MeteorScorer,
    clinical_efficacy,
    coco_scores,
    medvlm_scores,
    preprocess,
)
from medvlm.progress import StageProgress

log = logging.getLogger(__name__)

BASELINES = ("retrieval", "consensus", "cnn_transformer", "oracle")


def check_generations(units: list[dict], generations: list[dict]) -> dict[str, dict]:
    """Generations keyed by unit id; EvaluationError naming the ids when any test study lacks a usable one."""
    by_id: dict[str, dict] = {}
    duplicated = []
    for g in generations:
        sid = str(g.get("study_id"))
        if sid in by_id:
            duplicated.append(sid)
        by_id[sid] = g
    if duplicated:
        raise EvaluationError(f"generations: study ids appear more than once: {sorted(set(duplicated))[:10]}")
    row_to_unit = {r: u["unit_id"] for u in units for r in u["row_ids"]}
    unknown = sorted(set(by_id) - set(row_to_unit))
    if unknown:
        raise EvaluationError(f"generations for ids not in the test split: {unknown[:10]} ({len(unknown)} in all)")
    out, missing, empty = {}, [], []
    for u in units:
        found = [by_id[r] for r in u["row_ids"] if r in by_id]
        if not found:
            missing.append(u["unit_id"])
            continue
        text = found[0].get("generated", found[0].get("report"))
        if not isinstance(text, str) or not text.strip():
            empty.append(u["unit_id"])
            continue
        out[u["unit_id"]] = {**found[0], "generated": text}
    if missing:
        raise EvaluationError(f"no generation for test studies {missing[:10]} ({len(missing)} of {len(units)})")
    if empty:
        raise EvaluationError(f"empty generated report for test studies {empty[:10]} ({len(empty)} of {len(units)})")
    return out


def score(cfg: Config, units: list[dict], generated: dict[str, dict], dem_thresholds: dict[str, float] | None = None,
          train_reports: list[str] | None = None) -> dict:
    """Point estimates and bootstrap CIs of every metric over all units.

    `dem_thresholds`: the model's per-label cuts (chosen on the training split) for the DEM_* figures and for what
    counts as "detected" in the follow_* rates; 0.5 where absent. `train_reports`: for the collapse_* figures."""
    ev, names = cfg.evaluate, cfg.data.label_names
    zh = cfg.data.report_language == "zh"
    convention = "zh_jieba" if zh else ev.preprocessing
    ids = [u["unit_id"] for u in units]
    gts = {u["unit_id"]: preprocess(u["references"], convention) for u in units}
    res = {i: preprocess([generated[i]["generated"]], convention) for i in ids}
    started = time.perf_counter()
    notes = {}
    scorers = len(COCO_SCORERS) - 1 if zh else len(COCO_SCORERS)  # no METEOR for Chinese (below)
    with StageProgress("evaluate: metrics", scorers + 1) as bar:  # + the medvlm convention's scores
        if zh:  # the METEOR jar only knows European languages; sanitising would delete every Chinese character
            result = coco_scores(gts, res, advance=bar.advance)
            notes["METEOR"] = "not computed for Chinese (METEOR 1.5 has no zh resources)"
        else:
            with MeteorScorer(ev.meteor_timeout_s) as meteor:
                result = coco_scores(gts, res, meteor, bar.advance)
        medvlm = medvlm_scores({u["unit_id"]: u["references"] for u in units},
                               {i: [generated[i]["generated"]] for i in ids}, cfg.data.report_language)
        bar.advance()
    point = dict(result.scores)
    point.update({k: float(v.mean()) for k, v in medvlm.items()})
    families = [bleu_family(gts, res), cider_family(gts, res),
                mean_family({"ROUGE_L": result.per_study["ROUGE_L"], **medvlm})]
    if result.meteor_stats is not None:
        families.append(meteor_family(result.meteor_stats))
    y_true = np.asarray([[float(u["labels"].get(n, 0)) for n in names] for u in units])
    clinical: dict = {"labels_from": "test split labels (ground truth)", "threshold": cfg.labeler.threshold}
    labeler_dir = Path(cfg.labeler.out_dir)
    y_lab = None
    if (labeler_dir / "heads.npz").is_file():
        labeler = Labeler.load(labeler_dir)
        with StageProgress("evaluate: labeler", len(ids)) as bar:
            y_lab = labeler.predict_proba([generated[i]["generated"] for i in ids], bar.advance)
        ce = clinical_efficacy(y_true, y_lab, names, cfg.data.primary_label, cfg.labeler.threshold)
        point.update({k: v for k, v in ce.items()})
        families.append(clinical_family(y_true, y_lab, names, cfg.data.primary_label, cfg.labeler.threshold))
        clinical["labeler_reference_quality"] = Labeler.recorded_quality(labeler_dir)
        clinical["generated_labels"] = "labeler applied to the generated reports"
    else:
        clinical["labeler"] = f"not trained ({labeler_dir} has no heads.npz): CE_* metrics omitted"
    if ev.rule_ce:
        y_ref, y_gen = rule_labels(cfg, units, generated)
        ce = clinical_efficacy(y_ref, y_gen, names, cfg.data.primary_label, 0.5)
        point.update({k.replace("CE_", "RULE_", 1): v for k, v in ce.items()})
        families.append(clinical_family(y_ref, y_gen, names, cfg.data.primary_label, 0.5, "RULE_"))
        clinical["rule_labeler"] = (f"RULE_* = the {cfg.data.report_labeler!r} report rules (uncertain -> "
                                    f"{cfg.data.report_uncertain}) on the generated vs the reference reports")
    probs = [generated[i].get("probabilities") or {} for i in ids]
    if all(all(n in p for n in names) for p in probs):
        y_dem = np.asarray([[float(p[n]) for n in names] for p in probs])
        cuts = threshold_vector(dem_thresholds, names)
        dem = clinical_efficacy(y_true, y_dem, names, cfg.data.primary_label, cuts)
        point.update({k.replace("CE_", "DEM_", 1): v for k, v in dem.items()})
        families.append(clinical_family(y_true, y_dem, names, cfg.data.primary_label, cuts, "DEM_"))
        clinical["discrimination_module"] = ("DEM_* = the model's own label probabilities from the image, cut at "
                                             + ("per-label thresholds chosen on the training split"
                                                if dem_thresholds else "0.5"))
        if dem_thresholds:
            clinical["dem_thresholds"] = dem_thresholds
        if y_lab is not None:
            point.update(follow_rates(y_dem > cuts, y_lab > cfg.labeler.threshold, names))
    if train_reports is not None:
        point.update(collapse_metrics([res[i][0] for i in ids], preprocess(train_reports, convention)))
    with StageProgress("evaluate: bootstrap", ev.bootstrap_iterations) as bar:
        intervals = bootstrap_intervals(families, len(ids), point, ev.bootstrap_iterations, ev.bootstrap_seed,
                                        ev.confidence, advance=bar.advance)
    metrics = {k: intervals.get(k, {"value": v, "ci_low": None, "ci_high": None, "n_resamples": 0}) for k, v in point.items()}
    for k, m in metrics.items():  # every metric covers every unit: the bootstrap draws from all of them
        m["n"] = len(ids)
    return {"metrics": metrics, "clinical_efficacy": clinical, "preprocessing": convention, "notes": notes,
            "seconds_scoring": round(time.perf_counter() - started, 2)}


def rule_labels(cfg: Config, units: list[dict], generated: dict[str, dict]) -> tuple[np.ndarray, np.ndarray]:
    """(reference, generated) 0/1 label matrices from the rule labeler: both sides read by the same labeler, as
    CheXbert-based clinical efficacy does. A unit with several references is positive where any reference is."""
    from medvlm.data.report_labels import report_labels

    names, uncertain = cfg.data.label_names, int(cfg.data.report_uncertain == "positive")

    def read(text: str) -> list[int]:
        labels = report_labels(text, names, cfg.data.report_labeler, uncertain)
        return [labels[n] for n in names]

    y_ref = np.asarray([np.max([read(r) for r in u["references"]], axis=0) for u in units], dtype=float)
    y_gen = np.asarray([read(generated[u["unit_id"]]["generated"]) for u in units], dtype=float)
    return y_ref, y_gen


def produce(cfg: Config, name: str) -> tuple[list[dict], dict]:
    """Generations of a strategy (models/<name>) or a baseline, in split order, plus facts about the producer."""
    if name in BASELINES:
        from medvlm.baselines import generate_baseline

        return generate_baseline(cfg, name)
    model_dir = Path(cfg.train.out_dir) / name
    if not (model_dir / "model_config.json").is_file():
        raise EvaluationError(f"{name}: neither a baseline {list(BASELINES)} nor a trained model ({model_dir} is empty)")
    from medvlm.features import load_features
    from medvlm.inference import Predictor

    predictor = Predictor.load(model_dir, cfg)
    features, ids = load_features(cfg, "test")
    indications = None
    if predictor.cfg.model.indication:  # the model was trained with the indication in its prompt
        rows = read_manifest(Path(cfg.split.out_dir) / "test.jsonl")
        by_id = dict(zip(rows["study_id"].astype(str), study_indications(rows)))
        indications = [by_id.get(str(sid)) for sid in ids]
    with StageProgress("evaluate: generate", len(features)) as bar:
        rows = predictor.predict_features(features, indications=indications, advance=bar.advance)
    gens = [{"study_id": sid, "generated": r["report"], "probabilities": r["probabilities"]} for sid, r in zip(ids, rows)]
    # the heatmap of each study's most probable finding, for the examples page (models with a DEM only)
    for g, heat in zip(gens, _top_label_heatmaps(predictor, features, cfg, ids)):
        g["heatmap"] = heat
    facts = {"kind": "model", "model_dir": str(model_dir), "strategy": predictor.strategy}
    if predictor.meta.get("dem_thresholds"):
        facts["dem_thresholds"] = predictor.meta["dem_thresholds"]
    return gens, facts


def _top_label_heatmaps(predictor, features, cfg: Config | None = None, ids: list | None = None) -> list:
    """medvlm.explain.top_label_grids under a bar; [] for a model that cannot be explained (and no bar for it).
    A volume model: medvlm.explain_volume.top_label_slices, the finding's map on its top axial slice (the sampled
    slice encoder reloads the test volumes of `ids` from the split, `cfg`; its cache holds only their average)."""
    from medvlm.errors import ModelError
    from medvlm.explain import check_explainable, top_label_grids
    from medvlm.model.vision3d import VolumeEncoder

    try:
        check_explainable(predictor.model)
    except ModelError:
        return []
    vision = predictor.model.vision
    if isinstance(vision, VolumeEncoder):
        from medvlm.explain_volume import top_label_slices
        from medvlm.model.vision3d import _I3Tail

        if cfg is None or (ids is None and not isinstance(vision.tail, _I3Tail)):
            return []
        volumes = None if isinstance(vision.tail, _I3Tail) else _test_volumes(cfg, ids, vision)
        feats = features[:, 0] if cfg.features.multi_view == "concat" and features.dim() == 6 else features
        try:
            with StageProgress("evaluate: heatmaps", len(features)) as bar:
                return top_label_slices(predictor.model, feats, predictor.label_names, tuple(cfg.volume.shape),
                                        volumes, bar.advance)
        except ModelError as exc:
            log.warning("evaluate: no volume heatmaps (%s)", exc)
            return []
    with StageProgress("evaluate: heatmaps", len(features)) as bar:
        return top_label_grids(predictor.model, features, predictor.label_names, advance=bar.advance) or []


def _test_volumes(cfg: Config, ids: list, vision):
    """The first view of each test study in `ids`, loaded as the features stage loads it, one at a time."""
    from medvlm.features import load_view

    rows = read_manifest(Path(cfg.split.out_dir) / "test.jsonl")
    images = {str(s): (i if isinstance(i, list) else [i]) for s, i in zip(rows["study_id"], rows["images"])}
    root = Path(cfg.data.root)
    for sid in ids:
        yield load_view(root / images[str(sid)][0], cfg, vision)


def evaluate(cfg: Config, name: str, generations: list[dict] | None = None) -> dict:
    """Score `name` on the test split; `generations` (study_id, generated, probabilities) skips producing them."""
    from medvlm.registry import split_content_hash

    started = time.perf_counter()
    test_path = Path(cfg.split.out_dir) / "test.jsonl"
    test = read_manifest(test_path)
    if test.empty:
        raise EvaluationError(f"{test_path}: the test split is empty")
    units = evaluation_units(test)
    producer = {"kind": "given"}
    if generations is None:
        generations, producer = produce(cfg, name)
    generated = check_generations(units, generations)
    train_path = Path(cfg.split.out_dir) / "train.jsonl"
    train_reports = [str(r) for r in read_manifest(train_path)["report"]] if train_path.is_file() else None
    scored = score(cfg, units, generated, producer.get("dem_thresholds"), train_reports)
    out = Path(cfg.evaluate.out_dir)
    gen_path, metrics_path = out / "generations" / f"{name}.jsonl", out / "metrics" / f"{name}.json"
    gen_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    with gen_path.open("w", encoding="utf-8") as fh:
        for u in units:
            g = generated[u["unit_id"]]
            fh.write(json.dumps({"study_id": u["unit_id"], "row_ids": u["row_ids"], "references": u["references"],
                                 "generated": g["generated"], "probabilities": g.get("probabilities") or {},
                                 "labels": u["labels"], **({"heatmap": g["heatmap"]} if g.get("heatmap") else {})},
                                ensure_ascii=False) + "\n")
    result = {
        "name": name,
        "producer": producer,
        "n_test": len(units),
        "n_test_rows": len(test),
        "test_data_hash": split_content_hash(test_path),
        "conventions": {"nlg": CONVENTIONS.get(scored["preprocessing"], scored["preprocessing"]),
                        "medvlm": CONVENTIONS["medvlm"], "meteor_bootstrap": CONVENTIONS["meteor_bootstrap"],
                        "unit": "one image; all its reports are references"},
        "bootstrap": {"iterations": cfg.evaluate.bootstrap_iterations, "seed": cfg.evaluate.bootstrap_seed,
                      "confidence": cfg.evaluate.confidence, "method": "percentile, studies resampled with replacement"},
        **scored,
    }
    result["seconds"] = round(time.perf_counter() - started, 2)
    result["mlflow_run_id"] = _log_to_mlflow(cfg, name, result, [gen_path])
    metrics_path.write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
    return result


def recorded_run_id(model_dir: Path) -> str | None:
    """The training run of a model, when the model folder records it (run_info.json or model_config.json)."""
    for file in ("run_info.json", "model_config.json"):
        path = model_dir / file
        if path.is_file():
            meta = json.loads(path.read_text())
            for scope in (meta, meta.get("train_summary") or {}):
                if isinstance(scope, dict) and isinstance(scope.get("run_id"), str):
                    return scope["run_id"]
    return None


def _log_to_mlflow(cfg: Config, name: str, result: dict, artifacts: list[Path]) -> str | None:
    from medvlm.tracking import log_artifacts, log_metrics, mlflow_run, tracking_enabled

    if not tracking_enabled(cfg):
        return None
    flat = {}
    for k, m in result["metrics"].items():
        for field, key in (("value", f"test_{k}"), ("ci_low", f"test_{k}_ci_low"), ("ci_high", f"test_{k}_ci_high")):
            if m.get(field) is not None:
                flat[key] = m[field]
    run_id = recorded_run_id(Path(cfg.train.out_dir) / name) if name not in BASELINES else None
    if run_id:
        import mlflow

        mlflow.set_tracking_uri(cfg.register.tracking_uri)
        with mlflow.start_run(run_id=run_id) as run:
            log_metrics(run, flat)
            log_artifacts(run, [str(p) for p in artifacts], "evaluation")
            return run.info.run_id
    with mlflow_run(cfg, f"evaluate-{name}", {"stage": "evaluate", "evaluated": name,
                                              "test_data_hash": result["test_data_hash"]}) as run:
        log_metrics(run, flat)
        log_artifacts(run, [str(p) for p in artifacts], "evaluation")
        return run.info.run_id if run else None
