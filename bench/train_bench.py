"""Training throughput per strategy on this machine -> reports/bench/train.json.

Measures the real training step (cached trunk features -> tail + DEM + Q-Former + LM, backward, AdamW) with the
params.yaml model (SmolLM2 truncated to model.lm_layers) on synthetic features and phantom-length reports, so it
needs neither data nor earlier stages. Reports samples/s, tokens/s, peak memory and, on CUDA, MFU (6 * trainable-path
FLOPs approximation: 6 * N_params_in_forward * tokens / step time / peak bf16 FLOP/s).

    python bench/train_bench.py [--params params.yaml] [--overlay params/gpu.yaml] [--steps 5] [--strategies lora]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from medvlm.config import load_config  # noqa: E402
from medvlm.model.medvlm import MedVLM  # noqa: E402
from medvlm.train import build_optimizer  # noqa: E402

REPORT = ("The thorax is symmetrical and the mediastinum is centred, with no enlarged mediastinal lymph nodes. "
          "Patchy ground-glass opacities are seen in the periphery of the right lower lobe. The lobar and segmental "
          "bronchi are patent. No abnormal density is seen in either pleural cavity. Impression: The findings "
          "suggest viral pneumonia of the right lung.")  # ~90 tokens: the phantom mean
H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 SXM; other GPUs: pass --peak-flops


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_strategy(cfg, strategy: str, steps: int, device: str, peak_flops: float) -> dict:
    torch.manual_seed(cfg.seed)
    model = MedVLM(cfg, strategy).to(device)
    model.train()
    optimizer = build_optimizer(model, cfg)
    b = cfg.train.batch_size
    trunk_shape = model.vision.trunk_features(model.vision.preprocess([__import__("PIL.Image").Image.new("L", (8, 8))])).shape[1:]
    feats = torch.randn(b, *trunk_shape, device=device).abs()
    reports = [model.layout.encode_report(REPORT)] * b
    if cfg.model.closed_vocab:  # as medvlm.train does; the vocabulary of the phantom reports is ~10x this one's
        model.set_output_vocab(reports[0])
    labels = torch.zeros(b, len(cfg.data.label_names), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, tokens = [], 0
    for i in range(steps + 1):  # first step is warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            out = model(feats, reports, labels)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
            tokens = int(out["tokens"])
    clue_tokens = model.clues.n_tokens if model.clues is not None else 0
    seq = len(model.layout.pre) + cfg.model.qformer_queries + clue_tokens + len(model.layout.posts[0]) + len(reports[0])
    step = sorted(times)[len(times) // 2]  # median: other processes share the CPU
    result = {
        "strategy": strategy, "batch_size": b, "sequence_tokens": seq, "step_seconds_median": round(step, 4),
        "step_seconds_min": round(min(times), 4), "samples_per_s": round(b / step, 2),
        "tokens_per_s": round(b * seq / step, 1), "report_tokens_per_s": round(tokens / step, 1),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if device == "cuda":
        forward_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("vision.trunk."))
        result["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["mfu"] = round(6 * forward_params * b * seq / step / peak_flops, 4)
    else:
        result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--overlay", action="append", default=[])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--strategies", nargs="*")
    parser.add_argument("--peak-flops", type=float, default=H100_BF16_FLOPS)
    parser.add_argument("--out", default=str(REPO / "reports" / "bench" / "train.json"))
    args = parser.parse_args()
    cfg = load_config(args.params, overlays=args.overlay)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = [bench_strategy(cfg, s, args.steps, device, args.peak_flops) for s in (args.strategies or cfg.train.strategies)]
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "platform": platform.platform(), "torch": torch.__version__, "lm": cfg.model.lm, "lm_layers": cfg.model.lm_layers,
        "overlays": args.overlay, "steps": args.steps, "results": results,
        "note": "CPU timings are noisy when other processes share the cores; median of the measured steps",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
