"""Inference benchmark: model load time, per-image latency and batch throughput on CPU (and GPU when present).

    python bench/inference_bench.py [--model champion|<version>|<folder>] [--images N] [--batch B]

Goals on the CPU default profile: load <= 10 s, <= 2 s per image. Writes reports/bench/inference.json.
Without a trained or registered model it times an untrained model of the same architecture (the cost is the same;
the json says so), so the benchmark runs on a fresh checkout.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from medvlm.config import load_config  # noqa: E402
from medvlm.errors import MedVLMError  # noqa: E402

GOALS = {"load_s": 10.0, "per_image_s": 2.0}


def find_model(spec: str, cfg) -> tuple[Path, str]:
    from medvlm.resolve import resolve_model

    try:
        return resolve_model(spec, cfg), spec
    except MedVLMError:
        pass
    for strategy in cfg.train.strategies:
        folder = Path(cfg.train.out_dir) / strategy
        if (folder / "trainable.safetensors").is_file():
            return folder, str(folder)
    from medvlm.model.medvlm import MedVLM
    from medvlm.train import save_trained

    strategy = cfg.train.strategies[0]
    scratch = Path(tempfile.mkdtemp(prefix="medvlm-bench-")) / strategy
    save_trained(MedVLM(cfg, strategy), cfg, strategy, scratch, [], {"note": "untrained, for timing only"})
    return scratch, f"untrained {strategy} (no trained model found)"


def bench_images(cfg, n: int):
    from PIL import Image

    from medvlm.data.images import load_image

    folder = Path(cfg.data.root) / "images"
    files = sorted(folder.glob("*.png"))[:n] if folder.is_dir() else []
    if len(files) >= n:
        return [load_image(f) for f in files]
    import numpy as np

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (256, 256), dtype=np.uint8), mode="L") for _ in range(n)]


def time_device(model_dir: Path, cfg, device: str, images, batch: int, repeats: int) -> dict:
    import torch

    from medvlm.inference import Predictor

    torch.set_num_threads(torch.get_num_threads())
    start = time.perf_counter()
    predictor = Predictor.load(model_dir, cfg=cfg, device=device)
    load_s = time.perf_counter() - start
    predictor.predict(images[:1])  # warm-up (kernel selection, lazy allocations)
    singles = []
    for im in images[:repeats]:
        t = time.perf_counter()
        predictor.predict([im])
        singles.append(time.perf_counter() - t)
    t = time.perf_counter()
    predictor.predict(images[:batch], batch_size=batch)
    batch_s = time.perf_counter() - t
    start = time.perf_counter()
    Predictor.load(model_dir, cfg=cfg, device=device)
    reload_s = time.perf_counter() - start
    return {
        "device": device,
        "load_s": round(load_s, 2),
        "reload_s": round(reload_s, 2),
        "per_image_s": {"median": round(statistics.median(singles), 3), "max": round(max(singles), 3), "n": len(singles)},
        "batch": {"size": batch, "seconds": round(batch_s, 2), "images_per_s": round(batch / batch_s, 2)},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="champion")
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--images", type=int, default=5, help="single-image predictions timed")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "reports" / "bench" / "inference.json"))
    args = parser.parse_args(argv)
    import torch

    cfg = load_config(args.params)
    model_dir, model_name = find_model(args.model, cfg)
    images = bench_images(cfg, max(args.images, args.batch))
    result = {"model": model_name, "model_dir": str(model_dir), "goals": GOALS,
              "host": {"cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
                       "torch": torch.__version__, "machine": platform.machine()},
              "cpu": time_device(model_dir, cfg, "cpu", images, args.batch, args.images)}
    cpu = result["cpu"]
    result["meets_goals_cpu"] = {"load": cpu["load_s"] <= GOALS["load_s"],
                                 "per_image": cpu["per_image_s"]["median"] <= GOALS["per_image_s"]}
    if torch.cuda.is_available():
        result["gpu"] = {"name": torch.cuda.get_device_name(0),
                         **time_device(model_dir, cfg, "cuda", images, args.batch, args.images)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
