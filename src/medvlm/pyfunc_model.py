"""The MLflow pyfunc face of a medvlm model (what `mlflow models serve` and `mlflow.pyfunc.load_model` run).

Input: a DataFrame with column "image" holding base64-encoded image bytes (PNG, JPEG, TIFF, DICOM...).
Output: a DataFrame with "report" and one "prob_<label>" column per label.
Param "explain" (MLflow params, `model.predict(df, params={"explain": True})`, or "params" next to the data in a
`mlflow models serve` request): also a "heatmaps" column, per row {label: base64 PNG}, the per-finding overlays
the REST server returns (medvlm.explain); a model without DEM stops with one line before generating.
The wrapped model folder (trainable.safetensors + model_config.json) travels as the artifact "model_dir"; the
Predictor is built from it in load_context through an import path, so tests can swap in a tiny fake predictor.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, Callable

import mlflow.pyfunc
import numpy as np
import pandas as pd

from medvlm.data.images import decode_base64_image
from medvlm.errors import ModelError
from medvlm.predict import check_explainable
from medvlm.resolve import ARTIFACT_KEY  # noqa: F401 (defined where `--model` resolution reads it without MLflow)

DEFAULT_FACTORY = "medvlm.inference:Predictor.load"
EXPLAIN_PARAM = "explain"


def load_factory(dotted: str) -> Callable:
    """"package.module:Attr.method" -> the callable (how the pyfunc finds the Predictor without pickling it)."""
    module, _, attr = dotted.partition(":")
    obj: Any = import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def predictions_frame(predictions: list[dict], label_names: list[str]) -> pd.DataFrame:
    columns = ["report", *[f"prob_{n}" for n in label_names]]
    rows = []
    for pred in predictions:
        probs = pred.get("probabilities", {})
        rows.append([str(pred["report"]), *[float(probs.get(n, float("nan"))) for n in label_names]])
    return pd.DataFrame(rows, columns=columns)


def model_signature(label_names: list[str]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Map

    inputs = Schema([ColSpec("string", "image")])
    outputs = Schema([ColSpec("string", "report"), *[ColSpec("double", f"prob_{n}") for n in label_names],
                      ColSpec(Map(DataType.string), "heatmaps", required=False)])
    # MLflow drops (with a warning) any param the signature does not declare
    params = ParamSchema([ParamSpec(EXPLAIN_PARAM, DataType.boolean, False)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def explain_requested(params: dict | None) -> bool:
    """The explain param; ModelError for anything but a boolean (MLflow converts it when the signature has it)."""
    value = (params or {}).get(EXPLAIN_PARAM, False)
    if not isinstance(value, (bool, np.bool_)):
        raise ModelError(f"pyfunc param {EXPLAIN_PARAM!r} must be true or false, not {str(value)[:40]!r}")
    return bool(value)


class MedVLMPyfunc(mlflow.pyfunc.PythonModel):
    def __init__(self, label_names: list[str], predictor_factory: str = DEFAULT_FACTORY):
        self.label_names = list(label_names)
        self.predictor_factory = predictor_factory
        self._predictor = None

    def load_context(self, context):
        self._predictor = load_factory(self.predictor_factory)(context.artifacts[ARTIFACT_KEY])

    def predict(self, context, model_input, params=None):
        if self._predictor is None:
            raise ModelError("pyfunc model used before load_context (load it with mlflow.pyfunc.load_model)")
        frame = pd.DataFrame(model_input)
        if "image" not in frame.columns:
            raise ModelError(f"pyfunc input needs an 'image' column of base64 image bytes, got {list(frame.columns)}")
        explain = explain_requested(params)
        if explain:  # before the (slow) generation, as the REST server does
            check_explainable(self._predictor)
        images = [decode_base64_image(str(b)) for b in frame["image"]]
        out = predictions_frame(self._predictor.predict(images), self.label_names)
        if explain:
            out["heatmaps"] = self._heatmaps(images)
        return out

    def _heatmaps(self, images: list) -> list[dict[str, str]]:
        """Per image {label: base64 PNG overlay}, the REST server's encoding."""
        from medvlm.explain import encoded_overlays  # torch and matplotlib: only when heatmaps are asked for

        return [encoded_overlays(image, exp) for image, exp in zip(images, self._predictor.explain(images))]

    def __getstate__(self):
        # the loaded predictor (torch weights) never goes into the pickle; load_context rebuilds it
        state = dict(self.__dict__)
        state["_predictor"] = None
        return state
