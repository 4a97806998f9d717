"""`--model` resolution: what a user types (champion, 3, runs:/..., models:/..., a folder) -> a local model folder.

Works on the tracking store directly (a local sqlite file by default, no server); registered versions are
downloaded once into register.cache_dir (versions are immutable) and renamed into place atomically.

Fast path (what keeps `medvlm generate` at a few seconds): with a sqlite tracking store, an alias or version is
looked up with one read-only SQL query on MLflow's registry tables (`registered_model_aliases`,
`model_versions`); when that version is already in the cache, MLflow is never imported (it alone costs seconds).
The alias is read from the store on every call, so a newly promoted champion is picked up at once; only the
immutable version folder is cached. Anything else (a server URI, a version not downloaded yet, a store the query
cannot read) goes through MLflow as before.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import tempfile
from pathlib import Path

from medvlm.config import Config, default_config
from medvlm.errors import ModelError, RegistryError, first_line
from medvlm.tracking import MESSAGE_CHARS, connect

DELETED_STAGE = "Deleted_Internal"  # MLflow's stage of a soft-deleted version
ARTIFACT_KEY = "model_dir"  # the pyfunc artifact holding the model folder (medvlm.pyfunc_model re-exports it)


def resolve_model(spec: str | Path, cfg: Config | None = None) -> Path:
    """`--model` value -> local folder holding model_config.json (+ weights).

    spec: a local model folder (or a downloaded pyfunc model folder); an alias ("champion", "challenger");
    a version number; "models:/name/3", "models:/name@alias" or "runs:/<run_id>/model".
    Registered versions are downloaded once into register.cache_dir (versions are immutable)."""
    cfg = cfg or default_config()
    local = Path(str(spec)).expanduser()
    if local.is_dir():
        return _model_folder(local, str(spec))
    text = str(spec)
    name = cfg.register.model_name
    if text.startswith("runs:/"):
        uri, cache_key = text, "run-" + re.sub(r"[^\w.-]+", "_", text[len("runs:/"):]).strip("_")
    else:
        if text.startswith("models:/"):
            uri = text
        elif text.isdigit():
            uri = f"models:/{name}/{text}"
        elif re.fullmatch(r"[A-Za-z][\w-]*", text):
            uri = f"models:/{name}@{text}"
        else:
            raise ModelError(f"--model {text}: not a folder, alias, version number, models:/ or runs:/ URI")
        found = _version_from_sqlite(cfg, uri)
        if found is not None and (Path(cfg.register.cache_dir) / f"{found[0]}-v{found[1]}" / "MLmodel").is_file():
            return _model_folder(Path(cfg.register.cache_dir) / f"{found[0]}-v{found[1]}", text)
        client = connect(cfg, create=False)
        version = _version_of(client, uri)
        uri = f"models:/{version.name}/{version.version}"
        cache_key = f"{version.name}-v{version.version}"
    target = Path(cfg.register.cache_dir) / cache_key
    if not (target / "MLmodel").is_file():
        _download(uri, target, cfg)
    return _model_folder(target, text)


def _version_from_sqlite(cfg: Config, uri: str) -> tuple[str, int] | None:
    """(model name, version) of a models:/ URI read straight from a sqlite tracking store, or None when the store
    is not sqlite or the query cannot answer (then MLflow decides, with its own error messages)."""
    tracking = cfg.register.tracking_uri
    if not tracking.startswith("sqlite:///"):
        return None
    db = Path(tracking[len("sqlite:///"):])
    if not db.is_file():
        return None
    body = uri[len("models:/"):]
    try:
        with sqlite3.connect(f"file:{db.resolve()}?mode=ro", uri=True, timeout=5) as con:
            if "@" in body:
                name, alias = body.split("@", 1)
                if alias.lower() == "latest":
                    row = con.execute("SELECT MAX(version) FROM model_versions WHERE name = ? AND current_stage != ?",
                                      (name, DELETED_STAGE)).fetchone()
                else:
                    row = con.execute(
                        "SELECT a.version FROM registered_model_aliases a JOIN model_versions v "
                        "ON v.name = a.name AND v.version = a.version "
                        "WHERE a.name = ? AND a.alias = ? AND v.current_stage != ?", (name, alias, DELETED_STAGE)
                    ).fetchall()
                    row = row[0] if len(row) == 1 else None  # several workspaces: let MLflow decide
            else:
                name, version = body.rsplit("/", 1)
                if not version.isdigit():
                    return None
                row = con.execute("SELECT version FROM model_versions WHERE name = ? AND version = ? "
                                  "AND current_stage != ?", (name, int(version), DELETED_STAGE)).fetchone()
    except (sqlite3.Error, ValueError):
        return None
    if not row or row[0] is None:
        return None
    return name, int(row[0])


def _version_of(client, uri: str):
    from mlflow.exceptions import MlflowException

    body = uri[len("models:/"):]
    try:
        if "@" in body:
            model, alias = body.split("@", 1)
            return client.get_model_version_by_alias(model, alias)
        model, version = body.rsplit("/", 1)
        return client.get_model_version(model, version)
    except (MlflowException, ValueError):
        raise RegistryError(
            f"{uri}: not in the registry at {client.tracking_uri} (run `medvlm register`, or pass --model models/<strategy>)"
        ) from None


def _download(uri: str, target: Path, cfg: Config) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        mlflow.set_tracking_uri(cfg.register.tracking_uri)
        mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(staging))
        if target.exists():  # a concurrent download finished first; versions are immutable, keep theirs
            return
        staging.rename(target)  # atomic: a half-downloaded model is never visible under its final name
    except (MlflowException, OSError) as exc:
        raise RegistryError(f"{uri}: download failed ({first_line(exc, MESSAGE_CHARS)})") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _model_folder(path: Path, spec: str) -> Path:
    if (path / "model_config.json").is_file():
        return path
    if (path / "MLmodel").is_file():  # a downloaded pyfunc model: MLmodel says where the model folder went
        from medvlm.config import read_yaml

        meta = read_yaml((path / "MLmodel").read_text(encoding="utf-8")) or {}
        entry = meta.get("flavors", {}).get("python_function", {}).get("artifacts", {}).get(ARTIFACT_KEY, {})
        inner = path / str(entry.get("path", ""))
        if entry and (inner / "model_config.json").is_file():
            return inner
    raise ModelError(f"--model {spec}: {path} holds no model_config.json (not a medvlm model folder)")
