"""The one training loop (medvlm.engine): what every trainer's steps go through, and that every trainer uses it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from medvlm.engine import Loop, StepOut, load_checkpoint, lr_schedule, save_checkpoint

SRC = Path(__file__).resolve().parents[1] / "src" / "medvlm"


def _linear(seed: int = 0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(3, 1)
    return layer, torch.optim.SGD(layer.parameters(), lr=0.1)


def test_the_schedules_warm_up_then_decay_to_zero():
    _, opt = _linear()
    cosine = lr_schedule(opt, 10, warmup=2)
    rates = []
    for _ in range(10):
        rates.append(cosine.get_last_lr()[0])
        opt.step()
        cosine.step()
    assert rates[:3] == pytest.approx([0.05, 0.1, 0.1])  # two warmup steps, then the base rate
    assert all(a >= b for a, b in zip(rates[1:], rates[2:])) and rates[-1] < 0.01
    _, opt = _linear()
    linear = lr_schedule(opt, 4, shape="linear")
    rates = []
    for _ in range(4):
        rates.append(linear.get_last_lr()[0])
        opt.step()
        linear.step()
    assert rates == pytest.approx([0.1, 0.075, 0.05, 0.025])


def test_a_step_that_returns_none_counts_but_does_not_learn():
    layer, opt = _linear()
    before = layer.weight.detach().clone()
    seen = []

    def step(epoch, in_epoch):
        seen.append((epoch, in_epoch))
        return None

    with Loop("t", 4, per_epoch=2) as loop:
        assert loop.run(step, opt) is False
    assert seen == [(0, 0), (0, 1), (1, 0), (1, 1)] and loop.step == 4 and loop.last is None
    assert torch.equal(layer.weight, before)


def test_clip_runs_between_backward_and_the_optimizer_step_and_gradients_are_cleared():
    layer, opt = _linear()
    events = []

    def step(epoch, in_epoch):
        assert all(p.grad is None for p in layer.parameters())  # cleared after the previous step
        loss = (layer(torch.ones(2, 3)) ** 2).mean() * 100
        loss.backward()
        events.append("backward")
        return StepOut(float(loss.detach()), 2)

    def clip():
        events.append("clip")
        torch.nn.utils.clip_grad_norm_(list(layer.parameters()), 1e-3)

    before = layer.weight.detach().clone()
    with Loop("t", 2, per_epoch=2) as loop:
        loop.run(step, opt, clip=clip)
    assert events == ["backward", "clip", "backward", "clip"]
    # clipped to norm 1e-3 at lr 0.1, two steps: the weights moved by at most 2e-4
    assert 0 < float((layer.weight.detach() - before).norm()) <= 2e-4 + 1e-9


def test_a_stopped_loop_resumes_at_the_same_position_of_the_same_epoch():
    """after_step returning True stops (a kill); a Loop built with done=k continues at divmod(k, per_epoch)."""
    positions = []

    def step(epoch, in_epoch):
        positions.append((epoch, in_epoch))
        return None

    _, opt = _linear()
    with Loop("t", 7, per_epoch=3) as loop:
        assert loop.run(step, opt, after_step=lambda done: done.step == 4) is True
    assert loop.step == 4
    with Loop("t", 7, per_epoch=3, done=loop.step) as again:
        again.run(step, opt)
    assert positions == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]


def test_logged_steps_follow_the_cadence_and_print_a_line_in_a_log(capsys):
    _, opt = _linear()
    logged = []
    with Loop("train t", 5, per_epoch=5, log_every=2) as loop:
        loop.run(lambda e, i: StepOut(1.5, 4), opt, after_step=lambda done: logged.append((done.step, done.logged)))
    assert logged == [(1, False), (2, True), (3, False), (4, True), (5, True)]  # and always the last step
    err = capsys.readouterr()
    assert err.out == ""  # stdout stays for the CLI's JSON
    lines = [line for line in err.err.splitlines() if line.startswith("train t step")]
    assert [line.split()[3] for line in lines] == ["2/5", "4/5", "5/5"] and "loss 1.5000" in lines[0]


def test_a_checkpoint_of_another_signature_is_not_resumed(tmp_path):
    path = tmp_path / "ckpt" / "checkpoint.pt"
    assert load_checkpoint(path, "abc") == (None, "no checkpoint")
    save_checkpoint(path, {"signature": "abc", "step": 3})
    state, why = load_checkpoint(path, "abc")
    assert state["step"] == 3 and why == "resumable"
    assert load_checkpoint(path, "other") == (None, "made with other settings")
    assert not path.with_suffix(".tmp").exists()


def _calls(tree: ast.AST) -> set[str]:
    return {f"{node.func.value.id}.{node.func.attr}" for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)}


def test_every_trainer_steps_through_the_engine():
    """The four trainers build their optimizer but never step it or build a schedule themselves; each runs a Loop."""
    trainers = ["train.py", "pretrain.py", "labeler_finetune.py", "cnn_transformer.py"]
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "engine.py":
            continue
        source = path.read_text()
        calls = _calls(ast.parse(source))
        assert not {"optimizer.step", "scheduler.step"} & calls, f"{path.name} steps an optimizer outside medvlm.engine"
        assert "LambdaLR" not in source, f"{path.name} builds an LR schedule outside medvlm.engine"
        if path.name in trainers:
            assert "Loop(" in source, f"{path.name} trains without medvlm.engine.Loop"
