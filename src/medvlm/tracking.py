"""Small MLflow helper shared by training and the model lifecycle (registry).

`mlflow_run(cfg, run_name, tags)` opens a run in experiment "medvlm" at cfg.register.tracking_uri (a local sqlite
file by default). A tracking_uri of "" or "none" turns tracking off: the context then yields None, so callers write
`if run: ...` / use `log_metrics(run, ...)`, which are no-ops without a run (unit tests, quick experiments).

`connect(cfg)` is the checked MlflowClient on the same store, for the registry and `--model` resolution.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from medvlm.config import Config
from medvlm.errors import RegistryError, first_line

MESSAGE_CHARS = 300  # MLflow messages can carry whole stack dumps: quote at most this much

EXPERIMENT = "medvlm"


def tracking_enabled(cfg: Config) -> bool:
    return cfg.register.tracking_uri.strip().lower() not in ("", "none", "off")


@contextlib.contextmanager
def mlflow_run(cfg: Config, run_name: str, tags: dict[str, str] | None = None) -> Iterator[Any]:
    if not tracking_enabled(cfg):
        yield None
        return
    import mlflow

    mlflow.set_tracking_uri(cfg.register.tracking_uri)
    try:
        mlflow.set_experiment(EXPERIMENT)
    except mlflow.exceptions.MlflowException as exc:
        raise RegistryError(f"MLflow at {cfg.register.tracking_uri}: {first_line(exc)}") from None
    with mlflow.start_run(run_name=run_name, tags=tags or {}) as run:
        yield run


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"train.lora.r": 16, ...} (MLflow params are flat)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def log_params(run, params: dict[str, Any]) -> None:
    if run is None:
        return
    import mlflow

    # MLflow caps a param value at 6000 characters; lists of prompts stay well below.
    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})


def log_metrics(run, metrics: dict[str, float], step: int | None = None) -> None:
    if run is None:
        return
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_artifacts(run, paths: list[str], artifact_path: str | None = None) -> None:
    if run is None:
        return
    import mlflow

    for path in paths:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


# ---------------------------------------------------------------- the tracking store
def sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    return None


def connect(cfg: Config, *, create: bool = True):
    """MlflowClient on register.tracking_uri, checked to answer. RegistryError (one line) when it does not."""
    uri = cfg.register.tracking_uri
    if uri.strip().lower() in ("", "none", "off"):
        raise RegistryError("register.tracking_uri is off: the registry needs a tracking store (default sqlite:///mlruns.db)")
    db = sqlite_path(uri)
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
        raise RegistryError(f"{uri}: tracking store unusable ({first_line(exc, MESSAGE_CHARS)})") from None
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy/driver errors have no common base MLflow re-exports
        if type(exc).__module__.split(".")[0] not in ("sqlalchemy", "alembic", "requests", "urllib3"):
            raise
        raise RegistryError(f"{uri}: tracking store unusable ({first_line(exc, MESSAGE_CHARS)})") from None
    return client


def _check_server(uri: str) -> None:
    import httpx

    try:
        httpx.get(uri.rstrip("/") + "/health", timeout=5.0).raise_for_status()
    except httpx.HTTPError as exc:
        raise RegistryError(f"{uri}: MLflow tracking server unreachable ({first_line(exc, MESSAGE_CHARS)})") from None


