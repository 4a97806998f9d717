"""Features stage: run the frozen vision trunk once over the split and cache its outputs.

Training then runs only the tunable tail + DEM + Q-Former + LM on these cached tensors: on 2 CPU cores a step with
the whole encoder in the loop costs ~12 s at batch 2 (STACK.md), with cached trunk features a fraction of a second.

Outputs (order = split file order):
  <features.out_dir>/{train,test}.safetensors   tensor "features" (N, *trunk shape); metadata = what made them
  <features.out_dir>/{train,test}.json          study ids + the same metadata, for people and other stages
Studies with several images (views, e.g. IU X-ray frontal + lateral), `features.multi_view`:
  mean    the mean of their views' trunk features: (N, *trunk shape), one visual map per study;
  concat  every view kept: (N, max_views, *trunk shape); the model encodes each view with the tail and concatenates
          the views' visual tokens before the DEM and Q-Former. A study with fewer views repeats them cyclically (a
          single view repeated gives the Q-Former's cross-attention and the DEM's mean pool exactly what the view
          alone gives); a study with more keeps its first max_views (counted in the stage summary).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from medvlm.config import Config
from medvlm.errors import ConfigError, DataError
from medvlm.model.encoder import VisionEncoder
from medvlm.model.vision import build_vision
from medvlm.model.vision3d import EFFICIENTNET_SLICES, VOLUME_ENCODERS, VolumeEncoder
from medvlm.progress import StageProgress

SPLITS = ("train", "test")


# signature keys that older caches lack; absent means this default (so default-settings caches stay valid)
_SIGNATURE_DEFAULTS = {"multi_view": "mean", "max_views": ""}


def feature_signature(cfg: Config) -> dict[str, str]:
    """What the cached tensors depend on; training refuses features made with another signature."""
    signature = {
        "vision": cfg.model.vision,
        "tune_vision_blocks": str(cfg.model.tune_vision_blocks),
        "image_size": str(cfg.features.image_size),
    }
    if cfg.features.multi_view != "mean":
        signature.update(multi_view=cfg.features.multi_view, max_views=str(cfg.features.max_views))
    if cfg.model.vision in VOLUME_ENCODERS:  # only volume encoders' caches carry these (2-D caches stay valid)
        vol = cfg.volume
        signature.update(volume_shape=json.dumps(list(vol.shape)), volume_spacing=json.dumps(vol.spacing and list(vol.spacing)),
                         hu_window=json.dumps(list(vol.hu_window)))
        if cfg.model.vision == EFFICIENTNET_SLICES:
            signature["sampled_slices"] = str(vol.sampled_slices)
    return signature


def combine_views(flat: torch.Tensor, counts: list[int], mode: str, max_views: int) -> torch.Tensor:
    """Per-view trunk features (sum(counts), *trunk) -> per-study features: (N, *trunk) for mean,
    (N, max_views, *trunk) for concat (first max_views views; fewer views repeated cyclically)."""
    out, i = [], 0
    for n in counts:
        views = flat[i : i + n]
        i += n
        if mode == "mean":
            out.append(views.mean(0))
        else:
            out.append(views[[k % n for k in range(max_views)]] if n < max_views else views[:max_views])
    return torch.stack(out)


def study_features(vision: VisionEncoder, studies: list[list[Image.Image]], cfg: Config) -> torch.Tensor:
    """Studies (each a list of view images) -> what the model takes: the features stage and Predictor share this."""
    flat = trunk_features(vision, [img for study in studies for img in study], cfg.features.batch_size)
    return combine_views(flat, [len(s) for s in studies], cfg.features.multi_view, cfg.features.max_views)


@torch.no_grad()
def trunk_features(vision: VisionEncoder, images: list[Image.Image], batch_size: int) -> torch.Tensor:
    """PIL images -> frozen trunk outputs (N, *trunk shape), float32 on CPU."""
    out = []
    for start in range(0, len(images), batch_size):
        out.append(vision.trunk_features(vision.preprocess(images[start : start + batch_size])).float().cpu())
    return torch.cat(out)


def load_view(path: Path, cfg: Config, vision: VisionEncoder | None):
    """One study image as the encoder takes it: a volume encoder gets volumes whole ((1, X, Y, Z) in [0, 1],
    medvlm.data.volumes.load_volume); a 2-D encoder gets a PIL image (of a volume: its middle axial slice)."""
    from medvlm.data.images import load_image
    from medvlm.data.volumes import is_volume_path, load_volume

    if isinstance(vision, VolumeEncoder) and is_volume_path(path):
        return load_volume(path, cfg.volume)
    return load_image(path, max_pixels=cfg.validation.max_image_pixels)


def _load_study_images(row, root: Path, cfg: Config, vision: VisionEncoder | None = None) -> list:
    paths = row["images"] if isinstance(row["images"], list) else [row["images"]]
    if not paths:
        raise DataError(f"study {row['study_id']}: no images")
    return [load_view(root / p, cfg, vision) for p in paths]


def extract_features(cfg: Config) -> dict:
    """Cache trunk features of data/split/{train,test}.jsonl under cfg.features.out_dir."""
    from medvlm.manifest import read_manifest  # pandas: not on the `medvlm generate` path

    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    vision = build_vision(cfg).eval()
    root, out_dir = Path(cfg.data.root), Path(cfg.features.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    signature = feature_signature(cfg)
    summary: dict = {"signature": signature}
    for split in SPLITS:
        rows = read_manifest(Path(cfg.split.out_dir) / f"{split}.jsonl")
        if rows.empty:
            raise DataError(f"{Path(cfg.split.out_dir) / f'{split}.jsonl'}: no rows (run the split stage)")
        feats, n_views = [], []
        with StageProgress(f"features {split}", len(rows)) as bar:
            for start in range(0, len(rows), cfg.features.batch_size):
                chunk = rows.iloc[start : start + cfg.features.batch_size]
                views = [_load_study_images(row, root, cfg, vision) for _, row in chunk.iterrows()]
                feats.append(study_features(vision, views, cfg))
                n_views += [len(v) for v in views]
                bar.advance(len(chunk))
        tensor = torch.cat(feats).contiguous()
        ids = [str(s) for s in rows["study_id"]]
        save_file({"features": tensor}, out_dir / f"{split}.safetensors",
                  metadata={**signature, "study_ids": json.dumps(ids)})
        (out_dir / f"{split}.json").write_text(json.dumps({**signature, "study_ids": ids}, indent=1))
        summary[split] = {"n": len(ids), "shape": list(tensor.shape[1:]),
                          "views_per_study": {str(k): n_views.count(k) for k in sorted(set(n_views))}}
        if cfg.features.multi_view == "concat":
            summary[split]["views_dropped_studies"] = sum(n > cfg.features.max_views for n in n_views)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return summary


def load_features(cfg: Config, split: str) -> tuple[torch.Tensor, list[str]]:
    """Cached trunk features of a split and their study ids; one-line errors when absent or stale."""
    path = Path(cfg.features.out_dir) / f"{split}.safetensors"
    if not path.is_file():
        raise DataError(f"{path}: cached features not found (run `medvlm features` / `dvc repro features`)")
    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata() or {}
        tensor = fh.get_tensor("features")
    expected = {**_SIGNATURE_DEFAULTS, **feature_signature(cfg)}
    found = {**_SIGNATURE_DEFAULTS, **meta}
    stale = {k: (found.get(k), v) for k, v in expected.items() if found.get(k) != v}
    if stale:
        raise ConfigError(f"{path}: features were made with other settings {stale} (re-run `medvlm features`)")
    return tensor, json.loads(meta["study_ids"])


@torch.no_grad()
def embed_images(images: list[Image.Image], cfg: Config, vision: VisionEncoder | None = None) -> np.ndarray:
    """Pretrained visual embeddings (N, width): trunk + tail, mean-pooled over tokens, L2-normalised.

    Used where a fixed, training-independent image representation is wanted (retrieval baseline, drift monitor).
    """
    vision = vision if vision is not None else build_vision(cfg).eval()
    feats = trunk_features(vision, images, cfg.features.batch_size)
    pooled = []
    for start in range(0, len(feats), cfg.features.batch_size):
        pooled.append(vision(feats[start : start + cfg.features.batch_size].to(vision.mean.device)).mean(1).float().cpu())
    emb = torch.cat(pooled) if pooled else torch.zeros(0, vision.width)
    return torch.nn.functional.normalize(emb, dim=-1).numpy()


def embed_features(trunk: torch.Tensor, vision: VisionEncoder, batch_size: int = 64, views: bool = False) -> np.ndarray:
    """Same embedding as `embed_images`, from cached trunk features (no image decoding).

    views=True: trunk is (N, V, *trunk shape) (features.multi_view concat); a study's embedding pools all its views."""
    n_views = trunk.shape[1] if views else 1
    flat = trunk.flatten(0, 1) if views else trunk
    with torch.no_grad():
        pooled = torch.cat([vision(flat[s : s + batch_size]).mean(1) for s in range(0, len(flat), batch_size)])
    pooled = pooled.view(len(trunk), n_views, -1).mean(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()
