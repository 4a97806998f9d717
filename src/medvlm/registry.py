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

import json
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

from medvlm.config import Config
from medvlm.errors import RegistryError, first_line
from medvlm.model_card import model_card, numeric_metrics
from medvlm.selection import (  # noqa: F401 (metric_ci ... split_content_hash: also their old import path)
    artifact_hash,
    candidates,
    decide_promotion,
    metric_ci,
    metric_value,
    pick_best,
    split_content_hash,
    test_data_hash,
)
from medvlm.tracking import MESSAGE_CHARS, connect, sqlite_path

CHAMPION, CHALLENGER = "champion", "challenger"
# pip requirements recorded with the pyfunc model (inferring them would load the model in a subprocess)
RUNTIME_PACKAGES = ("torch", "transformers", "peft", "safetensors", "pillow", "pandas", "numpy", "mlflow", "pydicom")
METRIC_TAG = "metric."  # version tag prefix for metric values


# ---------------------------------------------------------------- promotion lock
def lock_path(cfg: Config) -> Path:
    """The promotion lock lives next to the tracking store; for a remote server, in the local cache folder
    (then only flows on this machine are serialised: run promotions from one orchestrator)."""
    uri = cfg.register.tracking_uri
    db = sqlite_path(uri)
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


def _experiment_id(client, cfg: Config) -> str:
    from mlflow.exceptions import MlflowException

    name = cfg.register.model_name
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    db = sqlite_path(cfg.register.tracking_uri)
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
    from medvlm.pyfunc_model import DEFAULT_FACTORY  # here: it imports mlflow.pyfunc (seconds)

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
        **{METRIC_TAG + k: str(v) for k, v in numeric_metrics(best["metrics"]).items()},
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
            mlflow.log_metrics(numeric_metrics(best["metrics"]))
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
        raise RegistryError(f"{cfg.register.tracking_uri}: registration of {best['strategy']} failed ({first_line(exc, MESSAGE_CHARS)})") from None
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
