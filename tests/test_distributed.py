"""Data-parallel training: `medvlm train` in two CPU processes (torchrun, gloo) against one process.

What is checked (tiny config, 8 training studies, global batch 4 = batch_size 1 x 2 processes x grad_accum 2):
- every epoch, the two ranks train on disjoint halves of the data that together cover it (train.rank_log);
- after every optimizer step both ranks hold the same trainable weights (digest per step);
- the final weights equal those of one process at batch_size 2 x grad_accum 2 (the same global batch, the same
  learning rate) within ATOL, while one process at the wrong global batch (batch_size 1) ends far outside it;
- a run stopped after step 3 (checkpoint at step 2) resumes in two processes and ends bit-identical.
Dropout is 0 and every report has the same token count, so the comparison with one process is exact up to float
summation order: the LM loss is a token mean per micro-batch, which weighs samples differently when micro-batches
hold different numbers of report tokens (then the match is approximate only).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_medvlm import REPORTS, tiny_config, write_cached_split

from medvlm.errors import ConfigError
from medvlm.engine import rank_batch
from medvlm.train import train

REPO = Path(__file__).resolve().parents[1]
# Tolerances, 4 AdamW steps at lr 1e-3. Losses agree to 1e-5. Weights: Adam divides by the root of the squared
# gradient, so float summation-order noise on near-zero gradients becomes up to ~10% of one lr step.
ATOL = 1e-3  # max |w_ddp - w_single| (measured 1.1e-4; one process at the wrong global batch: 6.7e-3)
RTOL = 1e-2  # |w_ddp - w_single| / |w_single - w_init| over all trainable weights (measured 5e-4; wrong batch: 1.4)
LORA = {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
NO_DROPOUT = {"qformer_dropout": 0.0}  # with the LoRA dropout at 0: nothing random in a training step


def _config(tmp: Path, **train_changes):
    cfg = tiny_config(tmp, train={"rank_log": True, "lora": LORA, **train_changes})
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update=NO_DROPOUT)})
    write_cached_split(cfg)
    split = Path(cfg.split.out_dir) / "train.jsonl"  # two reports of 8 words each: equal token counts
    rows = [json.loads(line) for line in split.read_text().splitlines()]
    for i, row in enumerate(rows):
        row["report"] = REPORTS[0] if i % 2 == 0 else REPORTS[3]
    split.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return cfg


def _launch(cfg, tmp: Path, *extra: str) -> str:
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "medvlm.cli", "-p", str(params), "train", "--strategy", "lora", *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _ranks(cfg, n: int = 2) -> list[list[dict]]:
    logs = []
    for r in range(n):
        rows = [json.loads(line) for line in (Path(cfg.train.out_dir) / "lora" / "ranks" / f"rank{r}.jsonl").open()]
        logs.append(list({row["step"]: row for row in rows}.values()))  # a resumed run re-logs the lost steps
    return logs


def _weights(cfg):
    return load_file(f"{cfg.train.out_dir}/lora/trainable.safetensors")


def _max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _distance(a, b) -> float:
    return float(torch.cat([(a[k] - b[k]).flatten() for k in a]).norm())


def _initial_weights(cfg):
    from medvlm.model.medvlm import MedVLM

    torch.manual_seed(cfg.seed)  # as train() does before building the model
    return {k: v.float() for k, v in MedVLM(cfg, "lora").trainable_state_dict().items()}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    cfg = _config(tmp, batch_size=1, grad_accum=2, checkpoint_every=2)
    out = _launch(cfg, tmp)
    return cfg, tmp, out


@pytest.mark.slow
def test_two_processes_split_the_data_stay_in_sync_and_match_one_process(ddp_run, tmp_path):
    cfg, _, stdout = ddp_run
    summary = json.loads(stdout[stdout.index("{"):])  # printed once (rank 0), not once per process
    assert summary["steps"] == summary["total_steps"] == 4  # 8 studies / global batch 4 * 2 epochs
    rank0, rank1 = _ranks(cfg)
    assert [r["step"] for r in rank0] == [r["step"] for r in rank1] == [1, 2, 3, 4]
    all_ids = {f"train_{i}" for i in range(8)}
    for epoch in (0, 1):
        seen = [{i for row in log if row["epoch"] == epoch for i in row["ids"]} for log in (rank0, rank1)]
        assert not seen[0] & seen[1], f"epoch {epoch}: both ranks trained on {seen[0] & seen[1]}"
        assert seen[0] | seen[1] == all_ids and len(seen[0]) == len(seen[1]) == 4
    assert [r["weights"] for r in rank0] == [r["weights"] for r in rank1]  # in sync after every step

    single = _config(tmp_path / "single", batch_size=2, grad_accum=2)  # the same global batch, one process
    train(single, "lora")
    (one,) = _ranks(single, 1)
    assert [set(r["ids"]) for r in one] == [set(a["ids"]) | set(b["ids"]) for a, b in zip(rank0, rank1)]
    ddp_w, single_w, init_w = _weights(cfg), _weights(single), _initial_weights(single)
    assert _max_diff(ddp_w, single_w) < ATOL
    moved = _distance(single_w, init_w)
    assert moved > 0.1 and _distance(ddp_w, single_w) / moved < RTOL
    ddp_log = (Path(cfg.train.out_dir) / "lora" / "train_log.csv").read_text().splitlines()
    one_log = (Path(single.train.out_dir) / "lora" / "train_log.csv").read_text().splitlines()
    losses = lambda lines: [float(line.split(",")[2]) for line in lines[1:]]  # the global batch's mean loss
    assert losses(ddp_log) == pytest.approx(losses(one_log), abs=1e-4)

    wrong = _config(tmp_path / "wrong", batch_size=1, grad_accum=2)  # half the global batch: twice the steps
    train(wrong, "lora")
    wrong_w = _weights(wrong)  # the tolerances tell a wrong setup apart
    assert _max_diff(ddp_w, wrong_w) > 3 * ATOL and _distance(ddp_w, wrong_w) / moved > 30 * RTOL


@pytest.mark.slow
def test_two_processes_resume_after_a_stop_bit_identical(ddp_run, tmp_path):
    whole, _, _ = ddp_run
    cfg = _config(tmp_path, batch_size=1, grad_accum=2, checkpoint_every=2)
    _launch(cfg, tmp_path, "--stop-after", "3")  # step 3 is lost: the last checkpoint is step 2
    ckpt = torch.load(Path(cfg.train.checkpoint_dir) / "lora" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and len(ckpt["rng_ranks"]) == 2  # each rank's own RNG state
    assert not torch.equal(ckpt["rng_ranks"][0], ckpt["rng_ranks"][1])  # per-rank dropout streams
    out = _launch(cfg, tmp_path)
    assert json.loads(out[out.index("{"):])["resumed_from"] == 2
    a, b = _weights(whole), _weights(cfg)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["weights"] for r in _ranks(cfg)[1]] == [r["weights"] for r in _ranks(whole)[1]]


def test_multistage_is_refused_under_data_parallel(tmp_path, monkeypatch):
    import accelerate

    class TwoProcesses:  # what Accelerator reports in a two-process launch
        num_processes, process_index = 2, 0

        def __init__(self, **kwargs):
            pass

    monkeypatch.setattr(accelerate, "Accelerator", TwoProcesses)
    cfg = tiny_config(tmp_path, train={"multistage": {"enabled": True}})
    with pytest.raises(ConfigError, match="single-process only"):
        train(cfg, "lora")


def test_rank_batch_splits_a_global_micro_batch_and_pads_a_short_last_one():
    order = torch.tensor([5, 3, 0, 7, 1, 6, 2, 4, 8])
    parts = [rank_batch(order, 4, 2, 2, r).tolist() for r in (0, 1)]
    assert parts == [[1, 2], [6, 4]]  # order[4:8], every second sample
    assert [rank_batch(order, 8, 2, 2, r).tolist() for r in (0, 1)] == [[8], [5]]  # padded from the start
    assert rank_batch(order, 10, 2, 2, 0).tolist() == []  # past the end: every rank skips
    assert rank_batch(order, 2, 3, 1, 0).tolist() == [0, 7, 1]  # one process: a plain slice
