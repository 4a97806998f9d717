"""Integration: the DVC data stages run in a temporary copy of the repository, and a second repro is a no-op; the
train stage (dvc.yaml's own definition, tiny model) re-trains from step 0 after its training data change."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.integration

DVC = Path(sys.executable).with_name("dvc")


def _copy_repo(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    for rel in ["dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore"]:  # also when not yet committed
        if (REPO / rel).exists():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)
    (dst / "dvc.lock").unlink(missing_ok=True)


def _run(args, cwd):
    env = subprocess.os.environ
    env_path = f"{DVC.parent}:" + env["PATH"]
    pythonpath = ":".join(p for p in [str(REPO / "src"), env.get("PYTHONPATH")] if p)  # this checkout's medvlm
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True,
                          env={**env, "PATH": env_path, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"})


def test_data_stages_reproduce_and_second_run_is_noop(tmp_path):
    _copy_repo(tmp_path)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["synthesize"].update(n_images=40, n_incoming=8)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)

    first = _run([str(DVC), "repro", "split"], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    train = (tmp_path / "data/split/train.jsonl").read_text().splitlines()
    test = (tmp_path / "data/split/test.jsonl").read_text().splitlines()
    assert len(train) + len(test) == 40 and len(test) == 8
    assert (tmp_path / "reports/validation/docs/index.html").is_file()
    assert (tmp_path / "reports/validation/summary.json").is_file()

    second = _run([str(DVC), "repro", "split"], tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "didn't change, skipping" in second.stdout
    assert "Running stage" not in second.stdout


def test_train_stage_retrains_after_the_training_data_change(tmp_path):
    """`checkpoints/<strategy>` is a persistent DVC output: after a new split with as many rows, `dvc repro` must
    train from step 0 on the new data, not resume the old run at step == total and save its weights again."""
    import json

    import torch
    from safetensors.torch import load_file
    from tiny_medvlm import tiny_config, write_cached_split

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stages["train"]}}, sort_keys=False))
    for rel in [".dvc/config", ".dvcignore"]:
        if (REPO / rel).exists():
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, tmp_path / rel)
    shutil.copytree(REPO / "src" / "medvlm", tmp_path / "src" / "medvlm", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "models" / "pretrain_vision").mkdir(parents=True)
    (tmp_path / "models" / "pretrain_vision" / "disabled.json").write_text("{}")
    cfg = tiny_config(tmp_path, split={"out_dir": str(tmp_path / "data/split")},
                      features={"out_dir": str(tmp_path / "data/features")}, train={"strategies": ["freeze"]})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True)))
    write_cached_split(cfg)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)

    def repro():
        done = _run([str(DVC), "repro", "train@freeze"], tmp_path)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        meta = json.loads((tmp_path / "models/freeze/model_config.json").read_text())
        return done.stdout, meta["train_summary"], load_file(tmp_path / "models/freeze/trainable.safetensors")

    _, first, old = repro()
    assert first["resumed_from"] is None and first["steps"] == first["total_steps"] == 8
    write_cached_split(cfg, seed=1, offset=1)  # other images and reports, same 8 rows
    out, again, new = repro()
    assert "Running stage 'train@freeze'" in out
    assert again["resumed_from"] is None and again["steps"] == again["total_steps"] == 8
    assert not all(torch.equal(old[k], new[k]) for k in old)
