"""`--model` resolution: what a user types (champion, 3, runs:/..., models:/..., a folder) -> a local model folder.

Works on the tracking store directly (a local sqlite file by default, no server); registered versions are
downloaded once into register.cache_dir (versions are immutable) and renamed into place atomically.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from medvlm.config import Config
from medvlm.errors import ModelError, RegistryError
from medvlm.registry import _first_line, connect


def resolve_model(spec: str | Path, cfg: Config | None = None) -> Path:
    """`--model` value -> local folder holding model_config.json (+ weights).

    spec: a local model folder (or a downloaded pyfunc model folder); an alias ("champion", "challenger");
    a version number; "models:/name/3", "models:/name@alias" or "runs:/<run_id>/model".
    Registered versions are downloaded once into register.cache_dir (versions are immutable)."""
    cfg = cfg or Config()
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
        client = connect(cfg, create=False)
        version = _version_of(client, uri)
        uri = f"models:/{version.name}/{version.version}"
        cache_key = f"{version.name}-v{version.version}"
    target = Path(cfg.register.cache_dir) / cache_key
    if not (target / "MLmodel").is_file():
        _download(uri, target, cfg)
    return _model_folder(target, text)


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
        raise RegistryError(f"{uri}: download failed ({_first_line(exc)})") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _model_folder(path: Path, spec: str) -> Path:
    if (path / "model_config.json").is_file():
        return path
    if (path / "MLmodel").is_file():  # a downloaded pyfunc model: MLmodel says where the model folder went
        import yaml

        from medvlm.pyfunc_model import ARTIFACT_KEY

        meta = yaml.safe_load((path / "MLmodel").read_text(encoding="utf-8")) or {}
        entry = meta.get("flavors", {}).get("python_function", {}).get("artifacts", {}).get(ARTIFACT_KEY, {})
        inner = path / str(entry.get("path", ""))
        if entry and (inner / "model_config.json").is_file():
            return inner
    raise ModelError(f"--model {spec}: {path} holds no model_config.json (not a medvlm model folder)")
