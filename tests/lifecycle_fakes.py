"""Tiny stand-ins for the lifecycle tests (registry, monitor, predict, serve, flows): no training needed.

FakePredictor mimics medvlm.inference.Predictor (load(model_dir, cfg=None, device=None), predict(images)); its
output depends on the image's mean intensity and the model folder's "bias", so tests can tell models apart.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

LABELS = ["pneumonia", "nodule"]
FACTORY = "lifecycle_fakes:FakePredictor.load"


class FakePredictor:
    def __init__(self, bias: float, labels: list[str]):
        self.bias = bias
        self.labels = labels
        self.calls = 0

    @classmethod
    def load(cls, model_dir, cfg=None, device=None) -> "FakePredictor":
        conf = json.loads((Path(model_dir) / "model_config.json").read_text())
        return cls(conf.get("bias", 0.0), conf.get("labels", LABELS))

    def predict(self, images: list[Image.Image]) -> list[dict]:
        self.calls += 1
        out = []
        for im in images:
            mean = float(np.asarray(im.convert("L"), dtype=np.float64).mean()) / 255.0
            p = float(np.clip(mean + self.bias, 0.0, 1.0))
            finding = "consolidation in the right lower lobe" if p > 0.5 else "no acute finding"
            out.append({"report": f"CT: {finding}.", "probabilities": {lab: p for lab in self.labels}})
        return out


def make_model_dir(path: Path, bias: float = 0.0, labels: list[str] = LABELS) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "model_config.json").write_text(json.dumps({"bias": bias, "labels": labels}))
    (path / "trainable.safetensors").write_bytes(f"weights-{bias}".encode())
    return path


def write_png(path: Path, value: int = 128, size: int = 48, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(value, 10, (size, size)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="L").save(path)
    return path
