"""The pipeline flow's stage order is read from dvc.yaml (foreach stages expand as DVC expands them), not kept as
a second copy: checked against DVC's own stage list and graph."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def test_stage_order_is_read_from_dvc_yaml():
    """Every stage `dvc stage list` names, once, in an order that respects DVC's own graph (`dvc dag --dot`)."""
    from flows import pipeline

    cfg = pipeline.load_cfg()
    order = pipeline.dvc_stage_order(cfg)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc = str(Path(sys.executable).parent / "dvc")
    listed = subprocess.run([dvc, "stage", "list", "--name-only"], cwd=REPO, env=env, capture_output=True,
                            text=True, check=True).stdout.split()
    assert sorted(order) == sorted(listed) and len(order) == len(set(order))
    dot = subprocess.run([dvc, "dag", "--dot"], cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    edges = re.findall(r'"([^"]+)" -> "([^"]+)"', dot)
    assert len(edges) > 10
    for upstream, downstream in edges:  # DVC draws an edge from a stage to the stage that uses its outputs
        assert order.index(upstream) < order.index(downstream), (upstream, downstream)


def test_stage_order_sorts_stages_and_expands_foreach(tmp_path):
    """A dvc.yaml listing a stage before the stage it reads from; foreach over a list, a mapping and a list of
    mappings expands as DVC does (name@item, name@key, name@index)."""
    from flows import pipeline

    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "report": {"cmd": "r", "deps": ["reports/metrics"], "outs": ["reports/results.md"]},
        "score": {"foreach": "${train.strategies}", "do": {"cmd": "s", "deps": ["models/${item}"],
                                                           "metrics": [{"reports/metrics/${item}.json": {}}]}},
        "fit": {"foreach": {"freeze": 1, "lora": 2}, "do": {"cmd": "f", "deps": ["data"], "outs": ["models/${key}"]}},
        "prep": {"foreach": [{"n": 1}, {"n": 2}], "do": {"cmd": "p", "outs": ["data/part${item.n}"]}},
    }}))
    cfg = pipeline.load_cfg(overrides=["train.strategies=[freeze, lora]"])
    order = pipeline.dvc_stage_order(cfg, tmp_path / "dvc.yaml")
    assert sorted(order) == sorted(["report", "score@freeze", "score@lora", "fit@freeze", "fit@lora", "prep@0",
                                    "prep@1"])
    before = [("prep@0", "fit@freeze"), ("prep@1", "fit@lora"), ("fit@freeze", "score@freeze"),
              ("fit@lora", "score@lora"), ("score@freeze", "report"), ("score@lora", "report")]
    for upstream, downstream in before:
        assert order.index(upstream) < order.index(downstream), (upstream, downstream, order)
    assert order.index("prep@0") < order.index("prep@1")  # independent stages keep the file's order
