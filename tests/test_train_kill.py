"""Resume after a real kill: `medvlm train` runs as a process and is SIGKILLed, once after a checkpoint was written
and once in the middle of writing one; re-runs end bit for bit where an uninterrupted run ends."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO
from tiny_medvlm import tiny_config, write_cached_split

pytestmark = pytest.mark.slow  # four `medvlm train` processes

TRAIN = {"epochs": 6, "batch_size": 1, "grad_accum": 2, "checkpoint_every": 4}  # 8 studies: 24 steps, lora dropout on

# `medvlm` whose first checkpoint write stops halfway: half the bytes reach the file, then the process SIGKILLs itself
TORN_WRITE = """
import io, os, signal, sys, torch
real_save = torch.save
def torn_save(obj, f, *args, **kwargs):
    buf = io.BytesIO()
    real_save(obj, buf, *args, **kwargs)
    with open(f, "wb") as fh:
        fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        fh.flush()
        os.fsync(fh.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = torn_save
from medvlm.cli import app
sys.exit(app())
"""


def _setup(tmp: Path):
    cfg = tiny_config(tmp, train=TRAIN)
    write_cached_split(cfg)
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True)))
    return cfg, params


def _command(params: Path, torn: bool = False) -> list[str]:
    prefix = [sys.executable, "-c", TORN_WRITE] if torn else [sys.executable, "-m", "medvlm.cli"]
    return prefix + ["-p", str(params), "train", "--strategy", "lora"]


def _env() -> dict:
    pythonpath = ":".join(p for p in [str(REPO / "src"), os.environ.get("PYTHONPATH")] if p)
    return {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}


def _run(params: Path, torn: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(_command(params, torn), capture_output=True, text=True, env=_env(), timeout=600)


def _step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["step"]


def _log(cfg) -> list[str]:
    text = (Path(cfg.train.out_dir) / "lora" / "train_log.csv").read_text()
    return [line.rsplit(",", 1)[0] for line in text.splitlines()]  # samples/s is timing


def test_sigkill_and_torn_checkpoint_then_resume_end_bit_identical(tmp_path):
    whole, whole_params = _setup(tmp_path / "whole")
    done = _run(whole_params)
    assert done.returncode == 0, done.stderr[-3000:]

    killed, params = _setup(tmp_path / "killed")
    ckpt_dir = Path(killed.train.checkpoint_dir) / "lora"
    ckpt, weights = ckpt_dir / "checkpoint.pt", Path(killed.train.out_dir) / "lora" / "trainable.safetensors"
    proc = subprocess.Popen(_command(params), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        while not ckpt.is_file() and proc.poll() is None:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)  # a checkpoint exists, training goes on: kill it there
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill: {err[-2000:]}"
    assert not weights.exists()
    first = _step(ckpt)
    assert 0 < first < 24

    torn = _run(params, torn=True)  # resumes, then dies in the middle of writing its first checkpoint
    assert torn.returncode == -signal.SIGKILL, torn.stderr[-3000:]
    assert f"at step {first}/24" in torn.stdout + torn.stderr
    assert _step(ckpt) == first  # the last complete checkpoint survives the torn write
    leftovers = [p.name for p in ckpt_dir.iterdir() if p != ckpt]
    assert leftovers, "the torn write left no partial file: this test no longer tests one"

    done = _run(params)  # the partial file must not break the resume
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in ckpt_dir.iterdir()] == ["checkpoint.pt"]
    summary = yaml.safe_load((weights.parent / "model_config.json").read_text())["train_summary"]
    assert summary["resumed_from"] == first and summary["steps"] == 24
    a, b = load_file(Path(whole.train.out_dir) / "lora" / "trainable.safetensors"), load_file(weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _log(whole) == _log(killed)
