"""Predictor: a trained MedVLM rebuilt from its model folder, for single images or cached features.

A model folder (models/<strategy>/) holds only what training changed (trainable.safetensors) and the config
snapshot (model_config.json); the pretrained parts (vision encoder, LM) come from their packages / the LM cache,
so loading is a few seconds on CPU once the LM cache exists.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from medvlm.config import Config, config_from_dict
from medvlm.errors import ModelError
from medvlm.features import study_features
from medvlm.generation import generate_reports
from medvlm.model.medvlm import MedVLM
from medvlm.model.retrieval import RetrievalIndex
from medvlm.progress import Advance, unwatched


class Predictor:
    def __init__(self, model: MedVLM, cfg: Config, meta: dict):
        self.model, self.cfg, self.meta = model.eval(), cfg, meta
        self.label_names = list(meta["label_names"])
        self.strategy = meta["strategy"]

    @classmethod
    def load(cls, model_dir: str | Path, cfg: Config | None = None, device: str | None = None,
             runtime: bool = False) -> "Predictor":
        """Rebuild from <model_dir>/{model_config.json, trainable.safetensors}.

        runtime: the plain-torch inference twins of the LM and Q-Former (model/runtime.py), which load in a fraction
        of the time because transformers is never imported (what `medvlm generate` / `serve` use). Off by default:
        evaluation keeps the training modules, so the pipeline's numbers do not move by a float rounding.

        The architecture always comes from the snapshot; `cfg` (when given) supplies the decoding settings
        (cfg.generate) and feature batch size, so evaluation can vary beams without retraining.
        """
        model_dir = Path(model_dir)
        if model_dir.as_posix().startswith(("runs:/", "models:/")):
            raise ModelError(f"{model_dir}: MLflow URIs are resolved by medvlm.registry; pass a local folder here")
        config_file, weights = model_dir / "model_config.json", model_dir / "trainable.safetensors"
        for path in (config_file, weights):
            if not path.is_file():
                raise ModelError(f"{path}: not found (train the model first: `medvlm train --strategy ...`)")
        started = time.perf_counter()
        meta = json.loads(config_file.read_text())
        trained = config_from_dict(meta["config"])
        if cfg is not None:
            trained = trained.model_copy(update={"generate": cfg.generate, "features": trained.features.model_copy(
                update={"batch_size": cfg.features.batch_size})})
        torch.manual_seed(trained.seed)  # untrained buffers/params are overwritten; seed keeps init cheap and fixed
        model = MedVLM(trained, meta["strategy"], runtime=runtime)
        model.load_trainable_state_dict(load_file(weights))
        model.set_output_vocab(meta.get("output_vocab"))
        model.set_label_thresholds(meta.get("dem_thresholds"))
        if trained.model.retrieval.enabled:
            model.retrieval_index = RetrievalIndex.load(model_dir)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
        meta["load_seconds"] = round(time.perf_counter() - started, 2)
        return cls(model, trained, meta)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _rows(self, reports: list[str], probs: torch.Tensor | None, similar: list[list] | None = None) -> list[dict]:
        out = []
        for i, report in enumerate(reports):
            p = {name: float(probs[i, k]) for k, name in enumerate(self.label_names)} if probs is not None else {}
            row = {"report": report, "probabilities": p}
            if similar is not None:  # model.retrieval: the training cases the prompt showed
                row["similar_cases"] = [{"study_id": n.study_id, "similarity": n.similarity} for n in similar[i]]
            out.append(row)
        return out

    def predict_features(self, features: torch.Tensor, batch_size: int | None = None,
                         indications: list[str | None] | None = None, advance: Advance = unwatched) -> list[dict]:
        """Reports for cached trunk features (N, *trunk shape) from the features stage; `indications` (one per
        study or None) reach the prompt when the model was trained with model.indication; `advance` hears of
        every batch generated."""
        features = features.to(self.device)
        contexts, similar = self.model.retrieval_contexts(features)  # one index search: the prompts and the listing
        reports, probs = generate_reports(self.model, features, self.cfg.generate, batch_size, contexts, indications,
                                          advance)
        return self._rows(reports, probs, similar)

    def predict(self, images: list[Image.Image], batch_size: int | None = None,
                indications: list[str | None] | None = None) -> list[dict]:
        """Reports for raw images, one study per image: [{"report": str, "probabilities": {label: p}}] (empty dict
        with the DEM off). A multi-view model (features.multi_view concat) sees the one view repeated."""
        return self.predict_studies([[image] for image in images], batch_size, indications)

    def predict_studies(self, studies: list[list[Image.Image]], batch_size: int | None = None,
                        indications: list[str | None] | None = None) -> list[dict]:
        """One report per study; a study is the list of its views (e.g. frontal + lateral), combined the way the
        model was trained (features.multi_view of its snapshot: mean of views or concatenated view tokens)."""
        if not studies:
            return []
        if any(not views for views in studies):
            raise ModelError("a study without images cannot be reported")
        cfg = self.cfg
        if batch_size:
            cfg = cfg.model_copy(update={"features": cfg.features.model_copy(update={"batch_size": batch_size})})
        feats = study_features(self.model.vision, [list(v) for v in studies], cfg)
        return self.predict_features(feats, batch_size, indications)

    def check_explainable(self) -> None:
        """One-line ModelError unless this model can be explained (a DEM and an encoder with a map)."""
        from medvlm.explain import check_explainable

        check_explainable(self.model)

    def explain(self, images: list) -> list:
        """Per-label heatmaps of each image (medvlm.explain.Explanation: maps at the image's size, in [0, 1]); of
        each volume for a volume encoder (medvlm.explain_volume.VolumeExplanation: the top axial slices per label);
        one-line ModelError for a model without DEM."""
        from medvlm.model.vision3d import VolumeEncoder

        if isinstance(self.model.vision, VolumeEncoder):
            from medvlm.explain_volume import explain_volume

            return [explain_volume(self.model, self.model.vision.preprocess([v])[0], self.label_names) for v in images]
        from medvlm.explain import explain_images

        return explain_images(self.model, images, self.label_names, self.cfg.features.batch_size)
