"""Integration: the DVC data stages run in a temporary copy of the repository, and a second repro is a no-op."""

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
    env_path = f"{DVC.parent}:" + subprocess.os.environ["PATH"]
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, env={**subprocess.os.environ, "PATH": env_path})


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
