"""bench/gpu_bench.py without a GPU: the dry run (same code path, tiny config, CPU), the torch-build check, the
FLOP count and the peak table. The GPU is never needed here."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny_medvlm import tiny_config

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "bench" / "gpu_bench.py")
gpu_bench = importlib.util.module_from_spec(spec)
sys.modules["gpu_bench"] = gpu_bench
spec.loader.exec_module(gpu_bench)


def test_dry_run_writes_the_report_for_every_strategy(tmp_path):
    cfg = tiny_config(tmp_path)
    params = tmp_path / "tiny.yaml"
    params.write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True)))
    out = tmp_path / "gpu.json"
    assert gpu_bench.main(["--dry-run", "--params", str(params), "--out", str(out), "--batch-sizes", "1", "2"]) == 0
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["torch"] == torch.__version__ and "flop_formula" in report
    assert [r["strategy"] for r in report["results"]] == ["freeze", "lora", "ptuning_v2"]
    for r in report["results"]:
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"] and r["peak_memory_mb"] > 0
        assert r["model_flops_per_step"] == pytest.approx(sum(r["flops_by_part"].values()))
        assert set(r["flops_by_part"]) >= {"lm_layers", "lm_head", "qformer", "vision"}
    assert set(report["memory_table_mb"]["lora"]) == {"1", "2"}


def test_a_real_run_on_a_cpu_build_stops_with_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert gpu_bench.main(["--strategies", "lora"]) == 2
    assert "is a CPU build" in capsys.readouterr().err
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_bench.main([]) == 2
    assert "sees no GPU" in capsys.readouterr().err


def test_flop_count_frozen_matrices_cost_4NT_trainable_6NT(tmp_path):
    from medvlm.model.medvlm import MedVLM

    model = MedVLM(tiny_config(tmp_path), "lora")
    flops = gpu_bench.flop_count(model, batch=2, seq_tokens=10, report_tokens=4, visual_tokens=4, queries=4)
    lm = [(n, p) for n, p in model.named_parameters() if n.startswith("lm.") and p.ndim == 2 and "embed" not in n]
    frozen = sum(p.numel() for n, p in lm if not p.requires_grad)
    lora = sum(p.numel() for n, p in lm if p.requires_grad)
    assert lora > 0 and flops["by_part"]["lm_layers"] == 2 * 10 * (4 * frozen + 6 * lora)
    vocab, hidden = model.lm.get_output_embeddings().weight.shape
    assert flops["by_part"]["lm_head"] == 4 * vocab * hidden * 2 * 4  # frozen (tied) head, report tokens only


def test_peak_table_prefers_the_specific_name():
    assert gpu_bench.peak_flops("NVIDIA H200")[0] == 989e12
    assert gpu_bench.peak_flops("NVIDIA H100 PCIe")[0] == 756e12
    assert gpu_bench.peak_flops("NVIDIA L40S")[0] == 362e12 and gpu_bench.peak_flops("NVIDIA L4")[0] == 121e12
    with pytest.raises(gpu_bench.BenchError, match="--peak-flops"):
        gpu_bench.peak_flops("Some Future GPU")
