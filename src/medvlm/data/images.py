"""Every image a data set can hold -> one 8-bit grayscale PIL image (mode "L").

Lung CT and chest X-ray are grayscale, so colour is dropped on load. Files are decoded by content, not by
extension: COV-CTR ships JPEG bytes under `.png` names. DICOM is recognised by its `DICM` magic (or `.dcm`).
Every failure is an ImageDecodeError with one line "path: what is wrong", so validation can quarantine the row
with that reason instead of crashing halfway through a data set.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medvlm.config import default_config
from medvlm.errors import DataError, ImageDecodeError, first_line

DEFAULT_MAX_PIXELS = default_config().validation.max_image_pixels  # the shipped validate.max_image_pixels
# The standard radiological lung window (HU): shows parenchyma, ground glass and consolidation at once.
LUNG_WINDOW = (-600.0, 1500.0)  # (center, width)
_DICOM_MAGIC_OFFSET = 128  # DICOM part 10: 128-byte preamble, then b"DICM"
_HASH_CHUNK = 1 << 20
# Errors Pillow raises on broken files (SyntaxError and struct.error come from some plugins' header parsers).
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


@dataclass(frozen=True)
class ImageInfo:
    """What validation needs to know about one file, without keeping its pixels."""

    width: int
    height: int
    format: str


def is_dicom(path: str | Path) -> bool:
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return True
    with path.open("rb") as fh:
        head = fh.read(_DICOM_MAGIC_OFFSET + 4)
    return head[_DICOM_MAGIC_OFFSET:] == b"DICM"


def load_image(
    path: str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    ct_window: tuple[float, float] = LUNG_WINDOW,
) -> Image.Image:
    """Decode `path` into an 8-bit grayscale image (mode "L"), EXIF orientation applied.

    16-bit and float images are scaled by their value range; alpha is composited on black (the CT background);
    DICOM: RescaleSlope/Intercept, then `ct_window` (center, width in HU) for CT, min-max otherwise,
    MONOCHROME1 inverted. Raises ImageDecodeError for corrupt, truncated, empty or oversized files.
    A volume (DICOM series folder, NIfTI, NRRD; medvlm.data.volumes) gives its middle axial slice in the lung
    window; volume encoders load the whole volume with medvlm.data.volumes.load_volume instead.
    """
    from medvlm.data.volumes import is_volume_path, volume_preview

    if is_volume_path(path):
        return volume_preview(path)
    path = _existing_file(path)
    if is_dicom(path):
        return _load_dicom(path, max_pixels=max_pixels, ct_window=ct_window)
    im = _open_pil(path, max_pixels)
    try:
        im.load()  # Pillow releases the file of a single-frame image after load
        return _to_gray(ImageOps.exif_transpose(im))
    except _PIL_ERRORS as exc:
        im.close()
        raise ImageDecodeError(f"{path}: cannot decode {im.format or 'image'} ({first_line(exc)})") from None


def probe_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Check that `path` decodes and return its size, cheaply: JPEGs are decoded at reduced scale (draft),
    pixels are dropped at once. Raises ImageDecodeError like load_image."""
    path = _existing_file(path)
    if is_dicom(path):
        im = _load_dicom(path, max_pixels=max_pixels, ct_window=LUNG_WINDOW)
        return ImageInfo(width=im.width, height=im.height, format="DICOM")
    with _open_pil(path, max_pixels) as im:
        width, height, fmt = im.width, im.height, im.format or "unknown"
        if _exif_swaps_sides(im):
            width, height = height, width
        try:
            if fmt == "JPEG":
                # a 1/8-scale decode still reads every entropy-coded segment, so truncation is still caught
                im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
            im.load()
        except _PIL_ERRORS as exc:
            raise ImageDecodeError(f"{path}: cannot decode {fmt} ({first_line(exc)})") from None
    return ImageInfo(width=width, height=height, format=fmt)


def load_images_for_study(
    root: str | Path,
    rel_paths: list[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    ct_window: tuple[float, float] = LUNG_WINDOW,
) -> list[Image.Image]:
    """All views of one study, paths relative to the data root (which they may not leave)."""
    if not rel_paths:
        raise DataError(f"{root}: study has no image paths")
    return [
        load_image(resolve_in_root(root, rel), max_pixels=max_pixels, ct_window=ct_window) for rel in rel_paths
    ]


def decode_image_bytes(data: bytes, max_pixels: int | None = None):
    """Image bytes (REST upload, pyfunc input) -> grayscale PIL image through the one image loader, which sniffs
    DICOM by content and guards against pixel bombs. It reads paths, hence the temporary file."""
    with tempfile.NamedTemporaryFile(suffix=".img") as tmp:
        tmp.write(data)
        tmp.flush()
        return load_image(tmp.name, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)


def decode_base64_image(text: str, max_pixels: int | None = None):
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageDecodeError("image: not valid base64") from None
    if not data:
        raise ImageDecodeError("image: empty after base64 decoding")
    return decode_image_bytes(data, max_pixels)


def resolve_in_root(root: str | Path, rel: str | Path) -> Path:
    """root/rel, refusing absolute paths and `..` that would leave the data root.

    The check is lexical on purpose: a symlink placed inside the root by its owner (DVC cache links) is allowed.
    """
    root_norm = os.path.normpath(os.path.abspath(root))
    rel = str(rel)
    if not rel or os.path.isabs(rel):
        raise DataError(f"{rel or '<empty>'}: image path must be relative to the data root {root}")
    joined = os.path.normpath(os.path.join(root_norm, rel))
    if os.path.commonpath([root_norm, joined]) != root_norm:
        raise DataError(f"{rel}: image path leaves the data root {root}")
    return Path(joined)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def image_hash(paths: list[str | Path]) -> str:
    """Content hash of a study: the file's sha256 for one view (comparable with published checksums);
    for several views the sha256 of their sha256s joined by "\\n", in the study's view order."""
    if not paths:
        raise DataError("image_hash: no image paths given")
    return combine_digests([file_sha256(p) for p in paths])


def combine_digests(digests: list[str]) -> str:
    """One hash for a study from its files' sha256 hex digests (see image_hash)."""
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("\n".join(digests).encode("ascii")).hexdigest()


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ImageDecodeError(f"{path}: image file not found")
    if path.stat().st_size == 0:
        raise ImageDecodeError(f"{path}: empty file (0 bytes)")
    return path


def _open_pil(path: Path, max_pixels: int) -> Image.Image:
    """Open (header only) and refuse decompression bombs before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            # the explicit max_pixels check below is the guard; Pillow's own warning would only repeat it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{path}: not an image Pillow can identify") from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"{path}: too many pixels, possible decompression bomb ({exc})") from None
    except _PIL_ERRORS as exc:
        raise ImageDecodeError(f"{path}: cannot read image header ({first_line(exc)})") from None
    if im.width * im.height > max_pixels:
        size = f"{im.width}x{im.height}"
        im.close()
        raise ImageDecodeError(f"{path}: {size} pixels exceed max_image_pixels {max_pixels} (decompression bomb guard)")
    return im


def _exif_swaps_sides(im: Image.Image) -> bool:
    try:
        orientation = im.getexif().get(0x0112, 1)
    except _PIL_ERRORS:
        return False
    return orientation in (5, 6, 7, 8)


def _to_gray(im: Image.Image) -> Image.Image:
    if im.mode == "L":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _scale_to_uint8(np.asarray(im, dtype=np.float64))
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        black = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(black, im.convert("RGBA"))
    if im.mode not in ("RGB", "RGBA", "L", "1"):
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV
    return im.convert("L")


def _scale_to_uint8(values: np.ndarray, lo: float | None = None, hi: float | None = None) -> Image.Image:
    lo = float(np.min(values)) if lo is None else lo
    hi = float(np.max(values)) if hi is None else hi
    if hi <= lo:
        return Image.fromarray(np.zeros(values.shape, dtype=np.uint8), mode="L")
    scaled = (np.clip(values, lo, hi) - lo) * (255.0 / (hi - lo))
    return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")


def _load_dicom(path: Path, *, max_pixels: int, ct_window: tuple[float, float]) -> Image.Image:
    import pydicom  # imported here: most data sets never need it
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, force=path.suffix.lower() == ".dcm")
    except (InvalidDicomError, OSError, EOFError, ValueError, struct.error, KeyError) as exc:
        raise ImageDecodeError(f"{path}: not a readable DICOM file ({first_line(exc)})") from None
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows * cols > max_pixels:
        raise ImageDecodeError(f"{path}: {cols}x{rows} pixels exceed max_image_pixels {max_pixels}")
    try:
        pixels = np.asarray(ds.pixel_array, dtype=np.float64)
    except (AttributeError, ValueError, RuntimeError, NotImplementedError, OSError, KeyError, TypeError) as exc:
        raise ImageDecodeError(f"{path}: DICOM pixel data cannot be decoded ({first_line(exc)})") from None
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples > 1:
        pixels = pixels.mean(axis=-1)  # colour DICOM (rare for CT): average the channels
    if pixels.ndim == 3:
        pixels = pixels[pixels.shape[0] // 2]  # multi-frame: the middle slice is the representative one
    if pixels.ndim != 2 or pixels.size == 0:
        raise ImageDecodeError(f"{path}: DICOM pixel data has shape {pixels.shape}, expected a 2-D image")
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    pixels = pixels * slope + intercept
    if str(ds.get("Modality", "")).upper() == "CT":
        center, width = ct_window
        image = _scale_to_uint8(pixels, center - width / 2, center + width / 2)
    else:
        image = _scale_to_uint8(pixels)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        image = ImageOps.invert(image)  # MONOCHROME1: low values are bright
    return image


