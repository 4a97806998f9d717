"""The ablation table reads the full model and each variant, and refuses rows scored on different test splits."""

import json

import pytest

from medvlm.config import config_from_dict
from medvlm.errors import EvaluationError
from medvlm.report import build_ablation_table


def _metrics(path, cider, data_hash="h1"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"test_data_hash": data_hash,
                                "metrics": {"CIDEr": {"value": cider, "ci_low": cider - 0.1, "ci_high": cider + 0.1}}}))


def test_ablation_table_rows_and_hash_check(tmp_path):
    cfg = config_from_dict({"evaluate": {"out_dir": str(tmp_path)}})
    runs = tmp_path / "runs"  # a variant is a run of `medvlm --out-root runs/<variant>`
    _metrics(tmp_path / "metrics/freeze.json", 1.5)
    _metrics(runs / "no_disc/reports/metrics/freeze.json", 1.1)
    text = build_ablation_table(cfg, "freeze", ["no_disc"], runs).read_text()
    assert "| full | 1.500 [1.400, 1.600] |" in text and "| no_disc | 1.100 [1.000, 1.200] |" in text

    _metrics(runs / "no_prompt/reports/metrics/freeze.json", 1.2, data_hash="other")
    with pytest.raises(EvaluationError, match="different test splits"):
        build_ablation_table(cfg, "freeze", ["no_disc", "no_prompt"], runs)
    with pytest.raises(EvaluationError, match="missing"):
        build_ablation_table(cfg, "freeze", ["absent"], runs)
