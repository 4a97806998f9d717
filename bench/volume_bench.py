"""Volume encoder benchmark: CPU seconds and peak memory per CT volume for each encoder path.

    python bench/volume_bench.py [--shapes 96x96x24 224x224x160] [--repeats 2] [--threads 2]

Paths: astra-i3resnet152 (the whole 3-D ResNet-152: trunk to layer3, cached by the features stage, and the layer4
tail that training runs, forward and forward+backward) and efficientnet-lite0-slices (volume.sampled_slices slices
through the 2-D trunk, pooled over depth). Also the MONAI load of a phantom NIfTI volume. Memory: peak_rss_mb is the
process's peak resident set during that step (VmHWM, reset before each step; weights included), peak_extra_mb that
minus the resident set before it (memory freed by an earlier step and reused does not count again).
Writes reports/bench/volumes.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def measure(fn, repeats: int) -> dict:
    """Best-of-repeats CPU seconds and wall seconds of fn(), peak extra RSS in MB (first call included)."""
    import resource

    base = _rss_mb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS watermark
    except OSError:
        pass
    cpu, wall = [], []
    for _ in range(repeats):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        fn()
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        cpu.append((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime))
        wall.append(t1 - t0)
    peak = _rss_mb("VmHWM")
    return {"cpu_s": round(min(cpu), 3), "wall_s": round(min(wall), 3), "peak_rss_mb": round(peak, 1),
            "peak_extra_mb": round(peak - base, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["96x96x24", "224x224x160"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "reports" / "bench" / "volumes.json"))
    args = parser.parse_args()

    import torch

    from medvlm.config import config_from_dict
    from medvlm.model.vision import build_vision

    torch.set_num_threads(args.threads)
    results: dict = {"machine": platform.machine(), "threads": args.threads, "torch": torch.__version__,
                     "rows": []}

    cfg = config_from_dict({"synthesize": {"volumes": True, "n_images": 1, "n_incoming": 0, "dicom_every": 0},
                            "volume": {"spacing": [3.75, 3.75, 10.0], "shape": [96, 96, 24]}})
    with tempfile.TemporaryDirectory() as tmp:
        from medvlm.data.phantom3d import render_volume
        from medvlm.data.volumes import load_volume

        import nibabel
        import numpy as np

        hu = render_volume([], 96, 24, [0, 0, 0, 1])
        path = Path(tmp) / "scan.nii.gz"
        nibabel.save(nibabel.Nifti1Image(hu.astype(np.int16), np.diag([3.75, 3.75, 10.0, 1.0])), path)
        load_volume(path, cfg.volume)  # MONAI's first import and reader setup are not per volume
        row = {"path": "monai-load", "shape": "96x96x24", "step": "load_volume (NIfTI, RAS, spacing, window)",
               **measure(lambda: load_volume(path, cfg.volume), args.repeats)}
        results["rows"].append(row)
        print(row, flush=True)

    for name in ("efficientnet-lite0-slices", "astra-i3resnet152"):
        t0 = time.perf_counter()
        enc = build_vision(config_from_dict({"model": {"vision": name}})).eval()
        results[f"{name}_build_s"] = round(time.perf_counter() - t0, 2)
        for shape in args.shapes:
            x, y, z = (int(v) for v in shape.split("x"))
            vol = torch.rand(1, 1, x, y, z)
            feats = enc.trunk_features(vol)
            trunk = measure(lambda: enc.trunk_features(vol), args.repeats)
            row = {"path": name, "shape": shape, "step": "trunk (frozen, cached by features)", **trunk,
                   "trunk_out": list(feats.shape[1:])}
            results["rows"].append(row)
            print(row, flush=True)
            with torch.no_grad():
                tail = measure(lambda: enc(feats), args.repeats)
            tokens = enc(feats)
            results["rows"].append({"path": name, "shape": shape, "step": "tail forward", **tail,
                                    "tokens": list(tokens.shape[1:])})
            print(results["rows"][-1], flush=True)

            def step():
                enc.zero_grad(set_to_none=True)
                enc(feats).float().pow(2).mean().backward()

            results["rows"].append({"path": name, "shape": shape, "step": "tail forward+backward (training)",
                                    **measure(step, args.repeats)})
            print(results["rows"][-1], flush=True)
        results[f"{name}_tail_params"] = sum(p.numel() for p in enc.tail.parameters())
        del enc

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'path':28} {'shape':12} {'step':42} {'cpu s':>7} {'wall s':>7} {'peak RSS MB':>12}")
    for r in results["rows"]:
        print(f"{r['path']:28} {r['shape']:12} {r['step']:42} {r['cpu_s']:7.2f} {r['wall_s']:7.2f} "
              f"{r['peak_rss_mb']:12.0f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
