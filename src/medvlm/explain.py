"""Per-finding heatmaps: where in the image the model saw each finding it scores.

For every label the discrimination module (DEM) scores, a class-activation map (Grad-CAM, captum's LayerGradCam)
of that label's DEM logit on the vision tail's output feature map (B, W, h, w): the feature map weighted by the
spatially averaged gradient of the logit, summed over channels, ReLU (only evidence *for* the finding), upsampled
bilinearly to the image's own size and divided by its maximum, so 1 = the strongest evidence and 0 = none (a map
with no positive evidence stays all zero). The DEM classifies the mean-pooled visual tokens with a linear layer,
so this equals the classic CAM (classifier weights times feature map): it explains the label probabilities the
model prints and feeds to the report, not the words of the report themselves.

The forward path is the one the model runs: preprocessed image -> frozen trunk -> vision tail -> token mean ->
DEM classifier (MedVLM.visual_queries). A multi-view study (features.multi_view concat) gets one map per view:
its DEM pools all views' tokens linearly, so a view's map of the study logit is that view's own map up to a
factor, and each map is normalised on its own. Volumes (3-D CT): medvlm.explain_volume, the same CAM on the volume
encoder's map, reported as the top axial slices per finding. Only models with a DEM can be explained (ModelError
otherwise).

Sanity measure (phantom data, `medvlm explain-phantom`): the phantom knows where it drew each finding
(medvlm.data.phantom.label_regions), and `region_score` says how much of a map's mass falls there compared with
the region's share of the image (or of the lungs).
"""

from __future__ import annotations

import base64
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from medvlm.errors import DataError, ModelError
from medvlm.progress import Advance, unwatched

COLORMAP = "jet"
OVERLAY_ALPHA = 0.5  # colour weight where the map is 1; where it is 0 the image shows plain grey


@dataclass
class Explanation:
    """Heatmaps of one image: maps[k] is label_names[k]'s map (H, W) in [0, 1] at the image's size."""

    label_names: list[str]
    probabilities: dict[str, float]
    maps: np.ndarray

    def map(self, label: str) -> np.ndarray:
        return self.maps[self.label_names.index(label)]


def check_explainable(model) -> None:
    """One-line ModelError unless the model has a DEM and an encoder with a map to explain (2-D, or a volume
    encoder medvlm.explain_volume handles)."""
    from medvlm.model.vision3d import VolumeEncoder

    if getattr(model, "dem", None) is None:
        raise ModelError("explanations need the discrimination module (model.discrimination true): this model has "
                         "no DEM, so there are no per-finding logits to explain")
    if isinstance(model.vision, VolumeEncoder):
        from medvlm.explain_volume import volume_explainable

        problem = volume_explainable(model.vision)
        if problem is not None:
            raise ModelError(f"explanations: {problem}")


def _check_2d(model) -> None:
    """check_explainable, and a 2-D image encoder (the per-image maps here; volumes: medvlm.explain_volume)."""
    from medvlm.model.vision3d import VolumeEncoder

    check_explainable(model)
    if isinstance(model.vision, VolumeEncoder):
        raise ModelError(f"per-image maps are for 2-D image encoders; model.vision {model.vision.name!r} encodes "
                         "volumes whole (medvlm.explain_volume maps its slices)")


class _FeatureMap(nn.Module):
    """Identity on the tail's feature map (B, W, h, w): the layer LayerGradCam attributes to."""

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return fmap


class _DemLogits(nn.Module):
    """Trunk features (B, *trunk shape) -> DEM logits (B, K) through the vision tail, exactly as visual_queries
    computes them, with the tail's tokens passed through a (B, W, h, w) feature map on the way."""

    def __init__(self, model):
        super().__init__()
        self.tail, self.classifier, self.feature_map = model.vision.tail, model.dem.classifier, _FeatureMap()

    def forward(self, trunk: torch.Tensor) -> torch.Tensor:
        tokens = self.tail(trunk)  # (B, T, W)
        batch, n_tokens, width = tokens.shape
        side = math.isqrt(n_tokens)
        extra = n_tokens - side * side  # e.g. a ViT's class token: pooled by the DEM, not on the spatial grid
        if side == 0 or extra > 1:
            raise ModelError(f"explanations need a square grid of visual tokens; the tail gives {n_tokens}")
        fmap = self.feature_map(tokens[:, extra:].transpose(1, 2).reshape(batch, width, side, side))
        pooled = (fmap.flatten(2).sum(2) + tokens[:, :extra].sum(1)) / n_tokens  # = tokens.mean(1)
        return self.classifier(pooled)


def cam_grids(model, trunk_features: torch.Tensor,
              labels: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM of DEM logits on the tail's feature map: (maps (B, L, h, w) >= 0, float32 on CPU, at the feature
    map's resolution; probabilities (B, K)). `labels`: indices of the labels to map (default all K).
    trunk_features (B, *trunk shape), or (B, V, *trunk shape) for features.multi_view concat (the first view)."""
    from captum.attr import LayerGradCam

    _check_2d(model)
    if model.cfg.features.multi_view == "concat" and trunk_features.dim() == 5:
        trunk_features = trunk_features[:, 0]
    labels = list(range(model.n_labels)) if labels is None else list(labels)
    head = _DemLogits(model)
    param = next(model.vision.tail.parameters(), None)
    device = param.device if param is not None else model.dem.classifier.weight.device
    dtype = param.dtype if param is not None else model.dem.classifier.weight.dtype
    feats = trunk_features.to(device, dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = head(feats).detach()
            # one backward for all labels: every image repeated once per label, each copy with its own target
            inputs = feats.repeat_interleave(len(labels), dim=0).requires_grad_(True)
            targets = labels * len(feats)
            cams = LayerGradCam(head, head.feature_map).attribute(inputs, target=targets, relu_attributions=True)
    finally:
        model.train(was_training)
    cams = cams.detach().float().cpu().reshape(len(feats), len(labels), *cams.shape[-2:])
    return cams, torch.sigmoid(logits.float()).cpu()


def upsample(grid: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """A (h, w) map -> (H, W) for an image of PIL size (W, H): bilinear, then divided by its maximum ([0, 1])."""
    from captum.attr import LayerAttribution

    grid = torch.as_tensor(np.asarray(grid, dtype=np.float32))
    width, height = size
    up = LayerAttribution.interpolate(grid[None, None], (height, width), interpolate_mode="bilinear")[0, 0]
    up = up.clamp(min=0)
    peak = float(up.max())
    return (up / peak).numpy() if peak > 0 else np.zeros((height, width), np.float32)


def explain_images(model, images: list[Image.Image], label_names: list[str], batch_size: int = 8) -> list[Explanation]:
    """One Explanation per image (each a study of its own): preprocess -> trunk -> tail -> DEM, maps per label."""
    from medvlm.features import trunk_features

    _check_2d(model)
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        feats = trunk_features(model.vision, chunk, batch_size)
        grids, probs = cam_grids(model, feats)
        for image, grid, p in zip(chunk, grids, probs):
            maps = np.stack([upsample(g, image.size) for g in grid])
            out.append(Explanation(list(label_names), {n: float(v) for n, v in zip(label_names, p.tolist())}, maps))
    return out


def top_label_grids(model, trunk_features: torch.Tensor, label_names: list[str], batch_size: int = 16,
                    advance: Advance = unwatched) -> list[dict] | None:
    """Per study of cached trunk features, the map of its most probable label at the feature map's resolution:
    {"label", "probability", "grid": (h, w) nested list in [0, 1]} (small: the evaluate stage stores it with the
    generations and the report stage draws it over the thumbnail). None when the model cannot be explained.
    `advance` hears of every batch mapped."""
    try:
        _check_2d(model)
        out = []
        for start in range(0, len(trunk_features), batch_size):
            grids, probs = cam_grids(model, trunk_features[start : start + batch_size])
            for grid, p in zip(grids, probs):
                k = int(p.argmax())
                g = grid[k]
                g = g / g.max() if float(g.max()) > 0 else g
                out.append({"label": label_names[k], "probability": round(float(p[k]), 4),
                            "grid": np.round(g.numpy(), 3).tolist()})
            advance(len(grids))
        return out
    except ModelError:
        return None


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = OVERLAY_ALPHA, cmap: str = COLORMAP) -> Image.Image:
    """The image in grey with the map (H, W in [0, 1], resized to the image if needed) as colour on top, weighted by
    the map itself: no evidence leaves the grey image, the strongest evidence is `alpha` colour."""
    from matplotlib import colormaps

    grey = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    if heat.shape != grey.shape:
        heat = np.asarray(Image.fromarray(np.asarray(heat, np.float32)).resize(image.size, Image.Resampling.BILINEAR))
    heat = np.clip(heat, 0.0, 1.0)
    colour = colormaps[cmap](heat)[..., :3]
    weight = alpha * heat[..., None]
    rgb = (1.0 - weight) * grey[..., None] + weight * colour
    return Image.fromarray(np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buf.getvalue()


def overlays(image, explanation) -> dict[str, Image.Image]:
    """label -> overlay image of that label's map; a volume's (medvlm.explain_volume.VolumeExplanation):
    "<label>_z<slice>" -> overlay of each kept slice."""
    if not isinstance(explanation, Explanation):  # per label, its kept slices, highest mass first
        from medvlm.explain_volume import slice_image

        return {f"{name}_z{z}": overlay(slice_image(image, z), heat)
                for name, chosen, maps in zip(explanation.label_names, explanation.slices, explanation.maps)
                for z, heat in zip(chosen, maps)}
    return {name: overlay(image, m) for name, m in zip(explanation.label_names, explanation.maps)}


def encoded_overlays(image, explanation) -> dict[str, str]:
    """label -> base64 PNG of that label's overlay: what the REST server and the MLflow pyfunc return."""
    return {name: base64.b64encode(encode(img, "PNG")).decode("ascii")
            for name, img in overlays(image, explanation).items()}


def safe_name(text: str) -> str:
    """A label as a file-name part: anything but letters, digits, '-', '_' and '.' becomes '_'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "label"


def write_overlays(image, explanation, out_dir: str | Path, stem: str) -> dict[str, str]:
    """<out_dir>/<stem>_<label>.png for every label (a volume: <stem>_<label>_z<slice>.png per kept slice); returns
    the overlays' names (as overlays() gives them) -> path."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{out_dir}: cannot create the heatmap folder ({exc.strerror or exc})") from None
    written = {}
    for name, img in overlays(image, explanation).items():
        path = out_dir / f"{stem}_{safe_name(name)}.png"
        img.save(path, format="PNG")
        written[name] = str(path)
    return written


# ---- sanity measure ------------------------------------------------------------------------------------------
def region_score(heat: np.ndarray, region: np.ndarray, within: np.ndarray | None = None) -> dict:
    """How much of a map (H, W, >= 0) lies in a region (H, W bool), optionally counting only pixels `within` a mask
    (e.g. the lungs, where every finding lies):
      mass_share  share of the map's mass inside the region (a map that is 1 there and 0 elsewhere: 1.0);
      area_share  the region's share of the pixels counted (what a uniform map's mass_share is);
      hit         mass_share > area_share: the map prefers the region to chance;
      pointing    the map's maximum (its first pixel in row-major order) lies in the region.
    A map without mass (all zero) scores mass_share 0 and neither hit nor pointing."""
    heat, region = np.asarray(heat, dtype=np.float64), np.asarray(region, dtype=bool)
    if heat.shape != region.shape:
        raise ValueError(f"map {heat.shape} and region {region.shape} differ in shape")
    if within is not None:
        within = np.asarray(within, dtype=bool)
        heat, region = heat[within], region[within]
    heat, region = heat.ravel(), region.ravel()
    if not region.size:
        raise ValueError("no pixels to score")
    area = float(region.mean())
    mass = float(heat.sum())
    share = float(heat[region].sum() / mass) if mass > 0 else 0.0
    return {"mass_share": share, "area_share": area, "hit": bool(mass > 0 and share > area),
            "pointing": bool(mass > 0 and region[int(np.argmax(heat))])}


def _phantom_rows(manifest: str | Path, root: str | Path, annotation: str) -> list[dict]:
    """Rows of a manifest with their phantom drawing facts; rows of a split file (which drop them) are completed
    from the phantom's own manifest (<root>/<annotation>) by study id."""
    import json

    rows = [json.loads(line) for line in Path(manifest).read_text(encoding="utf-8").splitlines() if line.strip()]
    if rows and any("render_seed" not in r for r in rows):
        source = Path(root) / annotation
        if not source.is_file():
            raise DataError(f"{manifest}: rows lack findings/render_seed and {source} is absent")
        drawn = {}
        for line in source.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                drawn[str(r["study_id"])] = r
        rows = [{**drawn.get(str(r["study_id"]), {}), **r} for r in rows]
    return rows


def phantom_hit_rates(predictor, manifest: str | Path, root: str | Path, annotation: str = "annotation.jsonl",
                      limit: int | None = None, min_diff: int | None = None) -> dict:
    """Per label, how well the heatmaps of `predictor` (a loaded Predictor) fall on what the phantom drew, over the
    rows of `manifest` where the label is drawn. Each image is re-rendered from its row and must equal the file
    (else the row is skipped as `not_reproduced`: other generator settings or a shifted scanner). Rows without
    drawing facts (a split file) are completed from <root>/<annotation>, the phantom's own manifest.

    Per label: n, hit_rate (mass share > area share of the image), lung_hit_rate (the same counting only lung
    pixels: beating a map that merely outlines the lungs), pointing_rate (maximum inside the region),
    mean_mass_share, mean_area_share, mean_probability; control_* the same for maps of other images (see
    summarise_cases); `chance` says what a uniform map would score."""
    from medvlm.data.images import load_image
    from medvlm.data.phantom import MIN_REGION_DIFF, label_regions, render_slice

    cfg = predictor.cfg
    root = Path(root)
    min_diff = MIN_REGION_DIFF if min_diff is None else min_diff
    names = predictor.label_names
    rows = [r for r in _phantom_rows(manifest, root, annotation) if r.get("findings")]
    rows = rows[:limit] if limit else rows
    cases: dict[str, list[tuple]] = {n: [] for n in names}  # label -> (map, region, lungs, probability)
    skipped = {"not_reproduced": 0, "no_drawing_facts": 0}
    batch = cfg.features.batch_size
    for start in range(0, len(rows), batch):
        chunk, images = [], []
        for row in rows[start : start + batch]:
            if "render_seed" not in row or "slice_level" not in row:
                skipped["no_drawing_facts"] += 1
                continue
            path = root / (row["images"][0] if isinstance(row.get("images"), list) else row["image"])
            image = load_image(path)
            pixels = np.asarray(image.convert("L"))
            rendered, lungs = render_slice(row["slice_level"], row["findings"], pixels.shape[0], row["render_seed"],
                                           return_lungs=True)
            if pixels.shape[0] != pixels.shape[1] or not np.array_equal(rendered, pixels):
                skipped["not_reproduced"] += 1
                continue
            chunk.append((row, np.any(list(lungs.values()), axis=0)))
            images.append(image)
        for (row, lung), exp in zip(chunk, predictor.explain(images)):
            regions = label_regions(row["slice_level"], row["findings"], exp.maps.shape[1], row["render_seed"],
                                    names, min_diff=min_diff)
            for name, region in regions.items():
                if region.any():
                    cases[name].append((exp.map(name).astype(np.float16), region, lung | region,
                                        exp.probabilities[name]))
    per_label = {name: summarise_cases(items) for name, items in cases.items() if items}
    return {"manifest": str(manifest), "images": len(rows) - sum(skipped.values()), "skipped": skipped,
            "region_min_diff": min_diff, "per_label": per_label,
            "chance": "a uniform map: mass share = area share, hit rate 0; pointing rate = mean area share",
            "control": "control_*: each map scored on the region of the next image with the same label (a map that "
                       "only knows where findings usually are scores as well there as on its own image)"}


def summarise_cases(items: list[tuple]) -> dict:
    """Rates over (map, region, lungs, probability) cases of one label, and the same figures for the control: each
    map scored on the next case's region (the maps of other images; needs two cases or more)."""

    def rates(pairs) -> dict:
        scored = [(region_score(m, r), region_score(m, r, within=lung)) for m, r, lung in pairs]
        return {"hit_rate": _mean(s["hit"] for s, _ in scored),
                "lung_hit_rate": _mean(s["hit"] for _, s in scored),
                "pointing_rate": _mean(s["pointing"] for s, _ in scored),
                "mean_mass_share": _mean(s["mass_share"] for s, _ in scored),
                "mean_area_share": _mean(s["area_share"] for s, _ in scored)}

    out = {"n": len(items), **rates((m, r, lung) for m, r, lung, _ in items),
           "mean_probability": _mean(p for *_, p in items)}
    if len(items) > 1:
        shifted = items[1:] + items[:1]
        control = rates((m, r, lung) for (m, *_), (_, r, lung, _) in zip(items, shifted))
        out.update({f"control_{k}": control[k] for k in ("hit_rate", "lung_hit_rate", "pointing_rate",
                                                         "mean_mass_share")})
    return out


def _mean(values) -> float:
    return round(float(np.mean([float(v) for v in values])), 4)
