"""Progress of the long stages (medvlm.progress): a bar on a terminal, a few plain lines in a log, never stdout;
and a stage (features, on tiny images) drives its bar to completion."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image
from rich.console import Console
from tiny_medvlm import REPORTS, tiny_config

from medvlm.progress import LOG_LINES, StageProgress


def test_bar_on_a_terminal_reaches_its_total_and_leaves_stdout_alone(capsys):
    err = io.StringIO()
    with StageProgress("tiny stage", 5, console=Console(file=err, force_terminal=True, width=100)) as bar:
        for _ in range(5):
            bar.advance()
    task = bar.bar.tasks[0]
    assert task.completed == task.total == 5 and task.finished
    assert "tiny stage" in err.getvalue() and "5/5" in err.getvalue()
    assert capsys.readouterr().out == ""


def test_in_a_log_a_line_per_quarter_and_no_bar(capsys):
    err = io.StringIO()
    with StageProgress("logged", 8, console=Console(file=err, width=100)) as bar:
        for _ in range(8):
            bar.advance()
    lines = err.getvalue().splitlines()
    assert len(lines) == LOG_LINES and [line.split(" (")[0] for line in lines] == [
        "logged: 2/8", "logged: 4/8", "logged: 6/8", "logged: 8/8"]
    assert "\x1b" not in err.getvalue() and "━" not in err.getvalue()  # plain text: no redraws, no bar glyphs
    with StageProgress("off", 3, console=Console(file=err), disable=True) as bar:
        bar.advance(3)
    assert len(err.getvalue().splitlines()) == LOG_LINES
    assert capsys.readouterr().out == ""


def test_features_stage_drives_its_bar_to_the_end(tmp_path, monkeypatch, capsys):
    from medvlm.features import extract_features

    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # stderr counts as a terminal: the stage draws its rich bar
    monkeypatch.setenv("COLUMNS", "120")
    cfg = tiny_config(tmp_path, features={"batch_size": 2})
    (tmp_path / "data" / "images").mkdir(parents=True)
    for split, n in (("train", 5), ("test", 2)):
        rows = []
        for i in range(n):
            name = f"images/{split}{i}.png"
            Image.fromarray(np.full((72, 72), 40 * i, dtype=np.uint8)).save(tmp_path / "data" / name)
            rows.append({"study_id": f"{split}{i}", "images": [name], "report": REPORTS[i % 4], "labels": {}})
        (tmp_path / "split").mkdir(exist_ok=True)
        (tmp_path / "split" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = extract_features(cfg)
    assert summary["train"]["n"] == 5 and summary["test"]["n"] == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "features train" in err and "5/5" in err and "features test" in err and "2/2" in err
