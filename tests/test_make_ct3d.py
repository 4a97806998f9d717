"""`make ct3d` runs the experiment, whose stages write under runs/experiments/<name>/; the monitor step after it must
read that experiment's training split, not the top-level data/split that no stage of the target wrote."""

import re
from pathlib import Path

from medvlm.config import load_config
from medvlm.experiment_cells import shared_config

REPO = Path(__file__).resolve().parents[1]


def _recipe(target: str) -> list[str]:
    lines = (REPO / "Makefile").read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith(f"{target}:")))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_ct3d_monitor_reads_the_experiments_split():
    cfg = load_config(REPO / "params.yaml", overlays=[REPO / "params/ct3d.yaml"])
    written = Path(shared_config(cfg).split.out_dir)  # where the experiment's split stage writes
    monitor = [line for line in _recipe("ct3d") if re.search(r"\bmonitor\b", line)]
    assert len(monitor) == 1, monitor
    found = re.search(r"-S\s+split\.out_dir=(\S+)", monitor[0])
    read = Path(found.group(1)) if found else Path(cfg.split.out_dir)
    assert read == written, f"make ct3d monitors {read}, the experiment wrote its split to {written}"
