"""Model registry: the best trained strategy -> MLflow pyfunc model -> registered version -> alias gate.

Every registered version gets the alias "challenger". It becomes "champion" only if it beats the current champion
on the primary metric (tie-break second) by `register.promotion_margin`, measured on the same test set (the
test-split hash is a version tag). Promotion is one alias swap done under a file lock next to the tracking store
with the state re-read inside the lock, so two racing flows end with exactly one, the better, champion, and a
repeated promotion changes nothing. The alias is the only promotion state; tags and descriptions are the record
of why, written after the swap (still inside the lock, like reports/registry.json), so a crash can never leave a
"half-promoted" model, and the champion is the one version tagged gate=promoted without a superseded_by.

`medvlm.resolve.resolve_model(spec)` turns what a user types after `--model` into a local model folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

from medvlm.config import Config
from medvlm.errors import RegistryError
from medvlm.manifest import read_manifest

CHAMPION, CHALLENGER = "champion", "challenger"
# pip requirements recorded with the pyfunc model (inferring them would load the model in a subprocess)
RUNTIME_PACKAGES = ("torch", "transformers", "peft", "safetensors", "pillow", "pandas", "numpy", "mlflow", "pydicom")
METRIC_TAG = "metric."  # version tag prefix for metric values
log = logging.getLogger(__name__)


# ---------------------------------------------------------------- metrics of the candidates
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


# ---------------------------------------------------------------- tracking store
def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    return None


def lock_path(cfg: Config) -> Path:
    """The promotion lock lives next to the tracking store; for a remote server, in the local cache folder
    (then only flows on this machine are serialised: run promotions from one orchestrator)."""
    uri = cfg.register.tracking_uri
    db = _sqlite_path(uri)
    if db is not None:
        return db.with_name(db.name + ".lock")
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path or uri).with_name(Path(parsed.path or uri).name + ".lock")
    return Path(cfg.register.cache_dir) / "registry.lock"


@contextmanager
def promotion_lock(cfg: Config):
    from filelock import FileLock, Timeout

    path = lock_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(path), timeout=cfg.register.lock_timeout_s):
            yield
    except Timeout:
        raise RegistryError(f"{path}: another registration holds the lock for over {cfg.register.lock_timeout_s} s") from None


def connect(cfg: Config, *, create: bool = True):
    """MlflowClient on register.tracking_uri, checked to answer. RegistryError (one line) when it does not."""
    uri = cfg.register.tracking_uri
    if uri.strip().lower() in ("", "none", "off"):
        raise RegistryError("register.tracking_uri is off: the registry needs a tracking store (default sqlite:///mlruns.db)")
    db = _sqlite_path(uri)
    if db is not None:
        if not create and not db.is_file():
            raise RegistryError(f"{uri}: no tracking store here yet (run `medvlm register` first)")
        if not db.parent.is_dir():
            raise RegistryError(f"{uri}: folder {db.parent} does not exist")
    elif urlparse(uri).scheme in ("http", "https"):
        _check_server(uri)
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_registered_models(max_results=1)
    except (MlflowException, OSError) as exc:
        raise RegistryError(f"{uri}: tracking store unusable ({_first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy/driver errors have no common base MLflow re-exports
        if type(exc).__module__.split(".")[0] not in ("sqlalchemy", "alembic", "requests", "urllib3"):
            raise
        raise RegistryError(f"{uri}: tracking store unusable ({_first_line(exc)})") from None
    return client


def _check_server(uri: str) -> None:
    import httpx

    try:
        httpx.get(uri.rstrip("/") + "/health", timeout=5.0).raise_for_status()
    except httpx.HTTPError as exc:
        raise RegistryError(f"{uri}: MLflow tracking server unreachable ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _experiment_id(client, cfg: Config) -> str:
    from mlflow.exceptions import MlflowException

    name = cfg.register.model_name
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    db = _sqlite_path(cfg.register.tracking_uri)
    # artefacts beside the sqlite file, not in whatever folder the process happens to run from
    location = (db.resolve().parent / "mlartifacts").as_uri() if db is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created by a racing process in between
        return client.get_experiment_by_name(name).experiment_id


def _alias_version(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _gate_view(version, cfg: Config) -> dict | None:
    """A registered version as the gate sees it (metric values and test-set hash are version tags)."""
    if version is None:
        return None
    tags = version.tags or {}

    def num(key: str) -> float:
        try:
            return float(tags.get(METRIC_TAG + key, "nan"))
        except ValueError:
            return float("nan")

    return {
        "version": str(version.version),
        "primary": num(cfg.register.primary_metric),
        "tie_break": num(cfg.register.tie_break),
        "data_hash": tags.get("data_hash"),
        "strategy": tags.get("strategy"),
    }


# ---------------------------------------------------------------- registration and promotion
def register(cfg: Config, *, predictor_factory: str | None = None) -> dict:
    """Register the best trained strategy as challenger; promote it if it beats the champion. Writes reports/registry.json."""
    from medvlm.pyfunc_model import DEFAULT_FACTORY

    found = candidates(cfg)
    best = pick_best(found)
    client = connect(cfg)
    name = cfg.register.model_name
    with promotion_lock(cfg):
        version, run_id, reused = _register_version(client, cfg, best, found, predictor_factory or DEFAULT_FACTORY)
        client.set_registered_model_alias(name, CHALLENGER, version.version)
        decision = _swap_if_better(client, cfg, version)
        champion = _alias_version(client, name, CHAMPION)
        summary = {
            "model_name": name,
            "tracking_uri": cfg.register.tracking_uri,
            "registered": {
                "version": str(version.version),
                "strategy": best["strategy"],
                "run_id": run_id,
                "reused_existing_version": reused,
                "data_hash": best["data_hash"],
                cfg.register.primary_metric: best["primary"],
                cfg.register.tie_break: best["tie_break"],
            },
            "decision": decision,
            "champion": _gate_view(champion, cfg),
            "challenger": str(version.version),
            "candidates": [{"strategy": c["strategy"], cfg.register.primary_metric: c["primary"],
                            cfg.register.tie_break: c["tie_break"]} for c in found],
        }
        _write_summary(cfg, summary)  # inside the lock: a racing promotion cannot write between swap and file
    return summary


def _register_version(client, cfg: Config, best: dict, found: list[dict], factory: str):
    """A new model version for `best`, or the existing one holding the same weights scored on the same test set."""
    import mlflow

    from medvlm.pyfunc_model import ARTIFACT_KEY, MedVLMPyfunc, model_signature

    name = cfg.register.model_name
    weights = artifact_hash(best["model_dir"])
    for existing in client.search_model_versions(f"name='{name}'"):
        tags = existing.tags or {}
        if tags.get("artifact_hash") == weights and tags.get("data_hash") == best["data_hash"]:
            return existing, existing.run_id, True
    card = model_card(cfg, best, found)
    tags = {
        "strategy": best["strategy"],
        "data_hash": best["data_hash"],
        "artifact_hash": weights,
        **{METRIC_TAG + k: str(v) for k, v in _numeric_metrics(best["metrics"]).items()},
        METRIC_TAG + cfg.register.primary_metric: str(best["primary"]),
        METRIC_TAG + cfg.register.tie_break: str(best["tie_break"]),
    }
    from mlflow.exceptions import MlflowException

    try:
        with tempfile.TemporaryDirectory(prefix="medvlm-card-") as run_tmp, mlflow.start_run(
            experiment_id=_experiment_id(client, cfg), run_name=f"register-{best['strategy']}"
        ) as run:
            mlflow.set_tags({"stage": "register", "strategy": best["strategy"], "data_hash": best["data_hash"]})
            mlflow.log_params(_flat_params(cfg, best["strategy"]))
            mlflow.log_metrics(_numeric_metrics(best["metrics"]))
            mlflow.log_text(card, "model_card.md")
            mlflow.log_dict(best["metrics"], "metrics.json")
            card_dir = Path(run_tmp)
            (card_dir / "model_card.md").write_text(card, encoding="utf-8")
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=MedVLMPyfunc(cfg.data.label_names, factory),
                # the card travels inside the registered model, next to the weights it describes
                artifacts={ARTIFACT_KEY: best["model_dir"], "model_card": str(card_dir / "model_card.md")},
                signature=model_signature(cfg.data.label_names),
                pip_requirements=_pip_requirements(),
            )
        try:
            client.create_registered_model(name, description="MedVLM radiology report generator (see each version's model card)")
        except MlflowException:
            pass  # exists already
        version = client.create_model_version(name, info.model_uri, run_id=run.info.run_id, tags=tags, description=card)
    except MlflowException as exc:
        raise RegistryError(f"{cfg.register.tracking_uri}: registration of {best['strategy']} failed ({_first_line(exc)})") from None
    return version, run.info.run_id, False


def _swap_if_better(client, cfg: Config, version) -> dict:
    """Inside the lock: re-read the champion, apply the gate, swap the alias, then record why."""
    name = cfg.register.model_name
    champion = _alias_version(client, name, CHAMPION)
    challenger_view = _gate_view(client.get_model_version(name, str(version.version)), cfg)
    promote, reason = decide_promotion(challenger_view, _gate_view(champion, cfg), cfg.register.promotion_margin)
    if promote:
        _make_champion(client, name, version, champion, reason)
    else:
        client.set_model_version_tag(name, str(version.version), "gate", "kept_champion")
        client.set_model_version_tag(name, str(version.version), "gate_reason", reason)
    return {"promoted": promote, "reason": reason,
            "previous_champion": None if champion is None else str(champion.version)}


def _make_champion(client, name: str, version, previous, reason: str) -> None:
    """Inside the lock: the one state change (the alias), then the tags that record it, so that exactly the
    champion is tagged gate=promoted without a superseded_by (a version promoted again loses its old one)."""
    number = str(version.version)
    client.set_registered_model_alias(name, CHAMPION, number)
    if previous is not None:
        client.set_model_version_tag(name, str(previous.version), "superseded_by", number)
    if "superseded_by" in (client.get_model_version(name, number).tags or {}):
        client.delete_model_version_tag(name, number, "superseded_by")
    client.set_model_version_tag(name, number, "gate", "promoted")
    client.set_model_version_tag(name, number, "gate_reason", reason)


def promote(cfg: Config, version: str | int, *, gate: bool = False) -> dict:
    """Make `version` the champion (a human decision unless gate=True). Idempotent; safe against racing promotions."""
    from mlflow.exceptions import MlflowException

    name = cfg.register.model_name
    client = connect(cfg, create=False)
    with promotion_lock(cfg):
        try:
            target = client.get_model_version(name, str(version))
        except MlflowException:
            raise RegistryError(f"{cfg.register.tracking_uri}: model {name!r} has no version {version}") from None
        current = _alias_version(client, name, CHAMPION)
        if current is not None and str(current.version) == str(target.version):
            decision = {"promoted": False, "changed": False, "reason": f"version {version} is already champion"}
        elif gate:
            decision = {**_swap_if_better(client, cfg, target)}
            decision["changed"] = decision["promoted"]
        else:
            _make_champion(client, name, target, current, "promoted by hand")
            decision = {"promoted": True, "changed": True, "reason": "promoted by hand",
                        "previous_champion": None if current is None else str(current.version)}
        champion = _alias_version(client, name, CHAMPION)
        summary = {"model_name": name, "version": str(version), "decision": decision,
                   "champion": _gate_view(champion, cfg)}
        _write_summary(cfg, {**_read_summary(cfg), **summary})  # inside the lock, like the swap
    return summary


def champion_version(cfg: Config) -> str | None:
    client = connect(cfg, create=False)
    found = _alias_version(client, cfg.register.model_name, CHAMPION)
    return None if found is None else str(found.version)


def _write_summary(cfg: Config, summary: dict) -> None:
    path = Path(cfg.evaluate.out_dir) / "registry.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")


def _read_summary(cfg: Config) -> dict:
    path = Path(cfg.evaluate.out_dir) / "registry.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _numeric_metrics(metrics: dict) -> dict[str, float]:
    out = {}
    for scope in (metrics, metrics.get("metrics", {}), metrics.get("nlg", {})):
        if not isinstance(scope, dict):
            continue
        for key in scope:
            value = metric_value(scope, key)
            if value is not None and re.fullmatch(r"[\w\-. /]+", key):
                out.setdefault(key, value)
    return out


def _flat_params(cfg: Config, strategy: str) -> dict[str, str]:
    params = {"strategy": strategy, **{f"model.{k}": v for k, v in cfg.model.model_dump().items() if k != "prompts"}}
    params.update({f"train.{k}": v for k, v in cfg.train.model_dump().items() if not isinstance(v, dict)})
    strategy_params = getattr(cfg.train, strategy, None)
    if strategy_params is not None:
        params.update({f"train.{strategy}.{k}": v for k, v in strategy_params.model_dump().items()})
    return {k: str(v)[:500] for k, v in params.items()}


def _pip_requirements() -> list[str]:
    reqs = []
    for package in RUNTIME_PACKAGES:
        try:
            reqs.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    return reqs


# ---------------------------------------------------------------- model card
def model_card(cfg: Config, best: dict, found: list[dict]) -> str:
    metrics = best["metrics"]
    rows = []
    for name, value in _numeric_metrics(metrics).items():
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
