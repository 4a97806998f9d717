"""What the registry chooses between, and the gate: every trained strategy with metrics (`candidates`), the best
of them (`pick_best`), and whether a challenger replaces the champion (`decide_promotion`, only on the same test
set: `test_data_hash`). Pure functions of metrics files and model folders; medvlm.registry applies them to MLflow.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from medvlm.config import Config
from medvlm.errors import RegistryError
from medvlm.manifest import read_manifest

log = logging.getLogger(__name__)


def metric_value(metrics: dict, name: str) -> float | None:
    """A metric from a reports/metrics/<name>.json, whichever nesting evaluate chose: top level or under
    "metrics"/"nlg", as a number or a {"value"|"mean"|"point": x, ...} dict."""
    for scope in (metrics, metrics.get("metrics", {}), metrics.get("nlg", {})):
        if isinstance(scope, dict) and name in scope:
            value = scope[name]
            if isinstance(value, dict):
                value = next((value[k] for k in ("value", "mean", "point", "estimate") if k in value), None)
            if isinstance(value, (int, float)) and value == value:
                return float(value)
    return None


def metric_ci(metrics: dict, name: str) -> tuple[float, float] | None:
    for scope in (metrics, metrics.get("metrics", {}), metrics.get("nlg", {}), metrics.get("ci", {})):
        if not isinstance(scope, dict):
            continue
        value = scope.get(name)
        if isinstance(value, dict):
            if "ci" in value and isinstance(value["ci"], (list, tuple)) and len(value["ci"]) == 2:
                return float(value["ci"][0]), float(value["ci"][1])
            lo, hi = value.get("ci_low", value.get("low")), value.get("ci_high", value.get("high"))
            if lo is not None and hi is not None:
                return float(lo), float(hi)
        if isinstance(value, (list, tuple)) and len(value) == 2 and scope is metrics.get("ci"):
            return float(value[0]), float(value[1])
        pair = scope.get(f"{name}_ci")
        if isinstance(pair, (list, tuple)) and len(pair) == 2:
            return float(pair[0]), float(pair[1])
    return None


def test_data_hash(cfg: Config, metrics: dict) -> str:
    """Which test set the metrics were measured on: the hash evaluate recorded, else the test split's sha256."""
    for key in ("test_data_hash", "data_hash", "test_hash", "split_hash"):
        if isinstance(metrics.get(key), str) and metrics[key]:
            return metrics[key]
    return split_content_hash(Path(cfg.split.out_dir) / "test.jsonl")


def split_content_hash(path: Path) -> str:
    """sha256 of a split's (image hash, report) pairs, sorted: the same studies give the same hash wherever
    their files live and whatever the row order (a retrain that keeps the test set stays comparable)."""
    if not path.is_file():
        return "unknown"
    rows = read_manifest(path)
    if rows.empty:
        return "unknown"
    image_key = rows["image_hash"] if "image_hash" in rows else rows["images"].map(json.dumps)
    pairs = sorted(f"{img}\t{report}" for img, report in zip(image_key, rows["report"]))
    return hashlib.sha256("\n".join(pairs).encode("utf-8")).hexdigest()


def candidates(cfg: Config) -> list[dict]:
    """Every trained strategy with a model folder and a metrics file, with its primary and tie-break metric."""
    found = []
    for strategy in cfg.train.strategies:
        model_dir = Path(cfg.train.out_dir) / strategy
        metrics_file = Path(cfg.evaluate.out_dir) / "metrics" / f"{strategy}.json"
        if not (model_dir / "model_config.json").is_file() or not metrics_file.is_file():
            log.info("register: %s skipped (no %s or %s)", strategy, model_dir / "model_config.json", metrics_file)
            continue
        try:
            metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{metrics_file}: not valid JSON ({exc.msg})") from None
        primary = metric_value(metrics, cfg.register.primary_metric)
        if primary is None:
            raise RegistryError(f"{metrics_file}: has no metric {cfg.register.primary_metric!r} (register.primary_metric)")
        found.append(
            {
                "strategy": strategy,
                "model_dir": str(model_dir),
                "metrics_file": str(metrics_file),
                "metrics": metrics,
                "primary": primary,
                "tie_break": metric_value(metrics, cfg.register.tie_break) or 0.0,
                "data_hash": test_data_hash(cfg, metrics),
            }
        )
    return found


def pick_best(found: list[dict]) -> dict:
    if not found:
        raise RegistryError("no trained model with metrics: run `dvc repro evaluate` (models/<strategy>/ + reports/metrics/<strategy>.json)")
    return max(found, key=lambda c: (c["primary"], c["tie_break"]))


def decide_promotion(challenger: dict, champion: dict | None, margin: float) -> tuple[bool, str]:
    """The gate. Both dicts: {"version", "primary", "tie_break", "data_hash"} (champion None = there is none)."""
    if champion is None:
        return True, "no champion yet"
    if str(champion["version"]) == str(challenger["version"]):
        return False, f"version {challenger['version']} is already champion"
    if champion.get("data_hash") != challenger.get("data_hash"):
        return False, (
            f"not comparable: champion v{champion['version']} was scored on test set {str(champion.get('data_hash'))[:12]}, "
            f"challenger on {str(challenger.get('data_hash'))[:12]}; promote by hand (`medvlm promote {challenger['version']}`)"
        )
    gain = challenger["primary"] - champion["primary"]
    if gain > margin or (gain == margin == 0 and challenger["tie_break"] > champion["tie_break"]):
        return True, f"beats champion v{champion['version']}: primary {challenger['primary']:.4f} vs {champion['primary']:.4f}"
    return False, (
        f"does not beat champion v{champion['version']} by margin {margin}: primary "
        f"{challenger['primary']:.4f} vs {champion['primary']:.4f} (tie-break {challenger['tie_break']:.4f} vs {champion['tie_break']:.4f})"
    )


def artifact_hash(model_dir: str | Path) -> str:
    """Content hash of a model folder: registering the same weights twice reuses the version instead of adding one."""
    digest = hashlib.sha256()
    root = Path(model_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode("utf-8") + b"\0")
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
