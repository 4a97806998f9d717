"""Retraining on new data as a Prefect flow (deployment "retrain/medvlm-retrain", cron from retrain.cron):

ingest data/incoming -> validate -> split -> features [-> pretrain_vision] -> train@strategy -> train_labeler -> evaluate -> register
(the registry's gate promotes the new model only if it beats the champion).

The new data are not what params.yaml / dvc.lock describe, so this flow calls the stage functions directly on a
derived configuration whose data and outputs all live under retrain.workdir; the DVC-tracked pipeline outputs are
never overwritten behind DVC's back. Ingestion keeps the test set fixed: the rows of the current DVC split keep
their split and every ingested row goes to training, so the new model is scored on the same studies as the
champion and the gate can compare them (see medvlm.selection.split_content_hash).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flows.pipeline import load_cfg, results_markdown, transient  # noqa: E402
from medvlm.config import Config  # noqa: E402
from medvlm.errors import DataError  # noqa: E402
from medvlm.paths import rebase_outputs  # noqa: E402


def retrain_config(cfg: Config) -> Config:
    """Every input and output of the retraining under retrain.workdir (checkpoints included: a retrain never resumes
    the pipeline's run); the registry stays the shared one."""
    ws = Path(cfg.retrain.workdir)
    moved = rebase_outputs(cfg, ws)
    return moved.model_copy(
        update={
            "data": moved.data.model_copy(update={"root": str(ws / "data"), "manifest": "annotation.jsonl",
                                                  "source": "jsonl", "image_dir": ""}),
            "split": moved.split.model_copy(update={"use_official": True}),
        }
    )


def ingest(cfg: Config, incoming_dir: str | None = None) -> dict:
    """Base data (split as DVC split it) + every batch ingested so far + this batch -> <workdir>/data/annotation.jsonl.

    The base data folder is linked, not copied; a batch is copied (data/incoming is overwritten by the next one)
    into batches/<content hash>, so ingesting the same batch twice changes nothing."""
    from medvlm.data.sources import load_source
    from medvlm.manifest import read_manifest

    incoming = Path(incoming_dir or cfg.monitor.incoming_dir)
    manifest = incoming / "annotation.jsonl"
    if not manifest.is_file():
        raise DataError(f"{manifest}: no annotated batch to ingest (retraining needs reports and labels)")
    root = Path(cfg.retrain.workdir) / "data"
    (root / "batches").mkdir(parents=True, exist_ok=True)
    base_link = root / "base"
    if not base_link.exists():
        base_link.symlink_to((Path(cfg.data.root) / cfg.data.image_dir).resolve(), target_is_directory=True)
    batch_id = hashlib.sha256(manifest.read_bytes()).hexdigest()[:12]
    batch_dir = root / "batches" / batch_id
    if not batch_dir.exists():
        shutil.copytree(incoming, batch_dir.with_suffix(".tmp"), dirs_exist_ok=True)
        batch_dir.with_suffix(".tmp").rename(batch_dir)

    split_of = {}
    for name in ("train", "test"):
        path = Path(cfg.split.out_dir) / f"{name}.jsonl"
        if path.is_file():
            split_of.update({str(s): name for s in read_manifest(path)["study_id"]})
    rows = []
    for _, row in load_source(cfg).iterrows():
        rows.append(_row(row, "base", split_of.get(str(row["study_id"]), "train")))
    for batch in sorted(p for p in (root / "batches").iterdir() if p.is_dir()):
        batch_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(
            update={"root": str(batch), "manifest": "annotation.jsonl", "source": "jsonl", "image_dir": ""})})
        rows += [_row(r, f"batches/{batch.name}", "train", prefix=batch.name) for _, r in load_source(batch_cfg).iterrows()]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (root / "annotation.jsonl").write_text(text, encoding="utf-8")
    return {"rows": len(rows), "batch": batch_id, "batches": len(list((root / "batches").iterdir())),
            "manifest": str(root / "annotation.jsonl")}


def _row(row, folder: str, split: str, prefix: str = "") -> dict:
    images = row["images"] if isinstance(row["images"], list) else [row["images"]]
    return {
        "study_id": f"{prefix}/{row['study_id']}" if prefix else str(row["study_id"]),
        "images": [f"{folder}/{p}" for p in images],
        "report": row["report"],
        "report_zh": row.get("report_zh"),
        "labels": row["labels"],
        "group": f"{prefix}/{row['group']}" if prefix else row["group"],
        "split": split,
    }


def _stage(module: str, name: str) -> Callable:
    def call(*args, **kwargs):
        from importlib import import_module

        return getattr(import_module(module), name)(*args, **kwargs)

    call.__name__ = name
    return call


@dataclass
class RetrainSteps:
    ingest: Callable = ingest
    validate: Callable = _stage("medvlm.data.validate", "run_validation")
    split: Callable = _stage("medvlm.data.split", "run_split")
    features: Callable = _stage("medvlm.features", "extract_features")
    pretrain_vision: Callable = _stage("medvlm.pretrain", "pretrain_vision")
    train: Callable = _stage("medvlm.train", "train")
    train_labeler: Callable = _stage("medvlm.labeler", "train_labeler")
    evaluate: Callable = _stage("medvlm.evaluate", "evaluate")
    register: Callable = _stage("medvlm.registry", "register")


steps = RetrainSteps()


@task(retry_condition_fn=transient, task_run_name="{label}")
def step_task(label: str, fn_name: str, cfg: Config, *args) -> dict:
    return getattr(steps, fn_name)(cfg, *args)


@flow(name="retrain", log_prints=True)
def retrain_flow(params: str = "params.yaml", overrides: list[str] | None = None, incoming_dir: str | None = None) -> dict:
    cfg = load_cfg(params, overrides)
    log = get_run_logger()
    run = step_task.with_options(retries=cfg.retrain.task_retries, retry_delay_seconds=cfg.retrain.retry_delay_s)
    ingested = steps.ingest(cfg, incoming_dir)
    log.info("ingested batch %s: %d rows in %s", ingested["batch"], ingested["rows"], ingested["manifest"])
    rcfg = retrain_config(cfg)
    for label in ("validate", "split", "features"):
        run(label, label, rcfg)
    if rcfg.pretrain.enabled:  # train starts from the pre-trained tail: pre-train on the new data first
        run("pretrain_vision", "pretrain_vision", rcfg)
    for strategy in rcfg.train.strategies:  # one after the other: retraining runs where the GPUs are not shared
        run(f"train@{strategy}", "train", rcfg, strategy)
    run("train_labeler", "train_labeler", rcfg)
    for strategy in rcfg.train.strategies:
        run(f"evaluate@{strategy}", "evaluate", rcfg, strategy)
    registered = run("register", "register", rcfg)
    decision = registered.get("decision", {})
    create_markdown_artifact(
        key="medvlm-retrain",
        markdown=(f"# Retraining on batch {ingested['batch']}\n\n{results_markdown(rcfg, list(rcfg.train.strategies))}\n\n"
                  f"**Registered** v{registered.get('challenger')}: "
                  f"{'promoted to champion' if decision.get('promoted') else 'champion kept'} ({decision.get('reason')})\n"),
    )
    return {"ingested": ingested, "registry": registered}


if __name__ == "__main__":
    print(json.dumps(retrain_flow(), indent=2, default=str))
