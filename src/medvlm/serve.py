"""`medvlm serve`: the champion (or any --model) over REST on 127.0.0.1.

    GET  /health   -> {"status": "ok", "model": ..., "labels": [...]}
    POST /predict  -> {"report": str, "probabilities": {label: p}}
         body: JSON {"image": "<base64 image bytes>", "indication": "fever, cough"}  or  multipart/form-data with
         a file field "file" (or "image") and optional text fields
         indication (optional): the clinical indication, used by models trained with model.indication
         explain (query parameter `?explain=true`, JSON field "explain": true or form field explain=true): the
         response also has "heatmaps": {label: "<base64 PNG>"}, per-finding overlays (medvlm.explain; 422 when the
         model has no DEM); for a volume {"<label>_z<slice>": ...} of each finding's top axial slices and
         "heatmap_slices": {label: [{"slice", "mass_share"}]} (medvlm.explain_volume)
         the bytes may also be a NIfTI volume (.nii / .nii.gz) or a zip of one DICOM series (medvlm.uploads: zip-slip
         and zip-bomb guards, serve.max_volume_bytes / max_zip_members / max_zip_ratio)

Bad input is always a 4xx with a one-line message, never a 500: 413 too large (serve.max_bytes, checked before the
body is read when Content-Length says so, and while streaming otherwise), 415 not JSON/multipart or not an image,
400 malformed JSON / base64, 422 missing field, an explain value that is not a boolean or a model that cannot
explain. Uploads are decoded by the one image loader (pixel-bomb guard included); nothing a client sends is ever
unpickled. One predictor, one request at a time (a lock): the model is not re-entrant and a CPU cannot run two
generations faster than one after the other.

The app is plain Starlette (what FastAPI is built on): the two routes take the raw request, so FastAPI's
validation and OpenAPI layer added nothing but 0.7 s of CPU to every `medvlm serve` start (its import), and the
first answer is due within 5 s of the start (docs/operations.md, latency).
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from medvlm.config import Config
from medvlm.errors import DataError
from medvlm.uploads import upload_kind

# base64 grows bytes by 4/3; the JSON or multipart envelope around the image gets this much on top
ENVELOPE_BYTES = 64 * 1024
FILE_FIELDS = ("file", "image")
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def body_limit(max_bytes: int) -> int:
    return max_bytes * 4 // 3 + 4 + ENVELOPE_BYTES


def create_app(predictor: Any, cfg: Config, model_info: dict | None = None) -> Starlette:
    """The REST app around an already loaded predictor (anything with .predict(list[PIL.Image]))."""
    lock = threading.Lock()
    max_bytes = cfg.serve.max_bytes
    info = {"labels": list(cfg.data.label_names), **(model_info or {})}

    def explain_problem() -> str | None:
        """Why this model cannot explain (one line), or None when it can."""
        from medvlm.errors import MedVLMError
        from medvlm.predict import check_explainable

        try:
            check_explainable(predictor)
        except MedVLMError as exc:
            return str(exc)
        return None

    async def _bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", **info})

    async def predict(request: Request) -> JSONResponse:
        data, fields = await _image_bytes(request, max_bytes)
        explain = _flag(request.query_params.get("explain"), fields.get("explain"))
        indication = _indication(fields.get("indication"))
        extra = {"indications": [indication]} if indication else {}
        kind = upload_kind(data)
        if kind is not None:  # a NIfTI volume or a zip of a DICOM series
            image = await run_in_threadpool(_decode_volume, data, kind, predictor, cfg)
        else:
            image = await run_in_threadpool(_decode, data, cfg.validation.max_image_pixels)
        if explain:  # checked before the (slow) generation, after the upload's own checks
            problem = await run_in_threadpool(explain_problem)
            if problem is not None:
                raise BadRequest(422, f"explain: {problem}")

        def _run():
            with lock:
                pred = predictor.predict([image], **extra)[0]
                return pred, (predictor.explain([image])[0] if explain else None)

        pred, explanation = await run_in_threadpool(_run)
        probs = {k: float(v) for k, v in pred.get("probabilities", {}).items()}
        out = {"report": pred["report"], "probabilities": probs}
        if "similar_cases" in pred:  # model.retrieval: the training cases the prompt showed (study id, similarity)
            out["similar_cases"] = pred["similar_cases"]
        if explanation is not None:
            from medvlm.explain import encoded_overlays

            out["heatmaps"] = await run_in_threadpool(encoded_overlays, image, explanation)
            if hasattr(explanation, "ranking"):  # a volume: "<label>_z<slice>" overlays, the slices ranked per label
                out["heatmap_slices"] = explanation.ranking()
        return JSONResponse(out)

    return Starlette(routes=[Route("/health", health, methods=["GET"]), Route("/predict", predict, methods=["POST"])],
                     exception_handlers={BadRequest: _bad_request})


async def _read_capped(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise BadRequest(413, f"request body of {declared} bytes exceeds the limit (serve.max_bytes image bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # chunked uploads have no Content-Length: stop reading as soon as the limit is passed
            raise BadRequest(413, "request body exceeds the limit (serve.max_bytes image bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def _flag(*values: Any) -> bool:
    """The explain option from the query string, the JSON body or the form (any of them true)."""
    on = False
    for value in values:
        if value is None:
            continue
        if isinstance(value, bool):
            on |= value
        elif isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
            on |= value.strip().lower() in TRUE
        else:
            raise BadRequest(422, f"explain must be true or false, not {str(value)[:40]!r}")
    return on


MAX_INDICATION_CHARS = 1000


def _indication(value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(422, "field 'indication' must be a string")
    if len(value) > MAX_INDICATION_CHARS:
        raise BadRequest(422, f"field 'indication' is longer than {MAX_INDICATION_CHARS} characters")
    return value.strip() or None


async def _image_bytes(request: Request, max_bytes: int) -> tuple[bytes, dict]:
    """(image bytes, the other fields of the body: JSON keys or form text fields)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("application/json", "multipart/form-data"):
        raise BadRequest(415, f"content type {content_type or 'none'!r}: send application/json "
                              "{\"image\": <base64>} or multipart/form-data with a file field 'file'")
    body = await _read_capped(request, body_limit(max_bytes))
    if content_type == "application/json":
        data, fields = _from_json(body)
    else:
        data, fields = await _from_multipart(request, body, max_bytes)
    if not data:
        raise BadRequest(422, "the image is empty")
    if len(data) > max_bytes:
        raise BadRequest(413, f"image of {len(data)} bytes exceeds serve.max_bytes ({max_bytes})")
    return data, fields


def _from_json(body: bytes) -> tuple[bytes, dict]:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(400, f"body is not valid JSON ({exc})") from None
    if not isinstance(payload, dict) or "image" not in payload:
        raise BadRequest(422, "missing field 'image' (base64-encoded image bytes)")
    if not isinstance(payload["image"], str):
        raise BadRequest(422, "field 'image' must be a base64 string")
    indication = _indication(payload.get("indication"))
    try:
        data = base64.b64decode(payload["image"], validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(400, "field 'image' is not valid base64") from None
    return data, {k: v for k, v in payload.items() if k != "image"}


async def _from_multipart(request: Request, body: bytes, max_bytes: int) -> tuple[bytes, dict]:
    async def _stream() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(request.headers, _stream(), max_files=1, max_fields=8).parse()
    except MultiPartException as exc:
        raise BadRequest(400, f"malformed multipart body ({exc.message})") from None
    try:
        upload = next((form[f] for f in FILE_FIELDS if f in form and hasattr(form[f], "read")), None)
        if upload is None:
            raise BadRequest(422, "missing file field 'file' in the multipart form")
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        return await upload.read(max_bytes + 1), fields
    finally:
        await form.close()


def _decode_volume(data: bytes, kind: str, predictor: Any, cfg: Config):
    from medvlm.uploads import VolumeUploadError, load_volume_upload

    vision = getattr(getattr(predictor, "model", None), "vision", None)  # a volume encoder takes the volume whole
    model_cfg = getattr(predictor, "cfg", None) or cfg
    guarded = model_cfg.model_copy(update={"serve": cfg.serve})  # this server's upload limits
    try:
        return load_volume_upload(data, kind, guarded, vision)
    except VolumeUploadError as exc:
        raise BadRequest(exc.status, str(exc)) from None


def _decode(data: bytes, max_pixels: int):
    from medvlm.data.images import decode_image_bytes

    try:
        return decode_image_bytes(data, max_pixels)
    except DataError as exc:
        # the loader names its (temporary) file; the client only needs what is wrong with the upload
        reason = str(exc).split(": ", 1)[-1]
        raise BadRequest(415, f"upload is not a readable image: {reason}") from None


def serve(
    cfg: Config,
    model: str = "champion",
    host: str | None = None,
    port: int | None = None,
    *,
    predictor_factory: Callable | None = None,
) -> None:
    """Load the model once, then run uvicorn until interrupted (127.0.0.1 unless serve.host/--host says otherwise)."""
    import uvicorn

    from medvlm.predict import load_predictor
    from medvlm.resolve import resolve_model

    predictor = load_predictor(model, cfg, predictor_factory)
    app = create_app(predictor, cfg, {"model": model, "model_dir": str(resolve_model(model, cfg))})
    uvicorn.run(app, host=host or cfg.serve.host, port=port or cfg.serve.port, log_level="info")
