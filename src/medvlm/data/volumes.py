"""CT volumes as study images: a DICOM series folder, a NIfTI file (.nii / .nii.gz) or an NRRD file.

Loading is MONAI's: LoadImage (ITK when installed, else pydicom for DICOM, nibabel for NIfTI, pynrrd for NRRD),
EnsureChannelFirst, Orientation to RAS, Spacing to `volume.spacing`, ScaleIntensityRange over `volume.hu_window`
(HU -> [0, 1], clipped), then a centre crop / pad with air to `volume.shape`. Compressed DICOM transfer syntaxes
decode through pydicom's pylibjpeg plugins.

What MONAI does not judge is checked here on the DICOM headers alone, before any pixel is decoded, each failure
one line naming the file (VolumeError, so validation quarantines the row with that reason):
  one series per folder, CT modality, the slices' position along the slice normal (not file names or instance
  numbers) with no missing slice and a regular gap, one in-plane size and spacing, and the voxel-count guard
  (`volume.max_voxels`). The series is then stacked in that position order.
"""

from __future__ import annotations

import logging
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medvlm.config import VolumeConfig, default_config
from medvlm.errors import ImageDecodeError, first_line

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr")
_DICOM_ERRORS = (OSError, EOFError, ValueError, struct.error, KeyError, TypeError, AttributeError)


class VolumeError(ImageDecodeError):
    """A volume that cannot be used as it is; the message is one line naming the file."""


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series, its files sorted by position along the slice normal (inferior -> superior)."""

    files: tuple[Path, ...]
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    slice_gap: float
    series_uid: str


@dataclass(frozen=True)
class VolumeInfo:
    """What validation needs to know about one volume, without keeping its voxels (native grid, RAS)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    hu_min: float
    hu_max: float
    format: str

    @property
    def n_slices(self) -> int:
        return self.shape[2]


def is_volume_path(path: str | Path) -> bool:
    """A DICOM series folder or a NIfTI / NRRD file (by name; the contents are checked when it is loaded)."""
    path = Path(path)
    return path.is_dir() or path.name.lower().endswith(VOLUME_SUFFIXES)


def is_series_folder(path: str | Path) -> bool:
    """A folder whose own files (not subfolders) include at least two cross-sectional DICOM slices (with an
    ImagePositionPatient): one volume, not a folder of separate images. Headers only."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    if not path.is_dir():
        return False
    slices = 0
    for child in sorted(p for p in path.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(child, stop_before_pixels=True, specific_tags=["ImagePositionPatient"])
        except (InvalidDicomError, *_DICOM_ERRORS):
            continue
        slices += "ImagePositionPatient" in ds
        if slices >= 2:
            return True
    return False


def volume_format(path: str | Path) -> str:
    name = Path(path).name.lower()
    if Path(path).is_dir():
        return "DICOM"
    if name.endswith((".nii", ".nii.gz")):
        return "NIfTI"
    if name.endswith((".nrrd", ".nhdr")):
        return "NRRD"
    raise VolumeError(f"{path}: not a volume (expected a DICOM series folder, .nii, .nii.gz, .nrrd or .nhdr)")


def inspect_series(folder: str | Path, *, max_voxels: int, spacing_tolerance: float = 0.1) -> SeriesInfo:
    """Read the headers of a DICOM series folder and check it is one complete, regular CT series."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    candidates = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    headers = []
    for path in candidates:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            continue  # not DICOM (a README, a DICOMDIR-less index): not a slice
        except _DICOM_ERRORS as exc:
            raise VolumeError(f"{path}: unreadable DICOM header ({first_line(exc)})") from None
        if "PixelData" not in ds and "Rows" not in ds:
            continue  # DICOMDIR or another non-image object
        headers.append((path, ds))
    if not headers:
        raise VolumeError(f"{folder}: no DICOM slices in the folder")
    series: dict[str, list] = {}
    for path, ds in headers:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    if len(series) > 1:
        first = {uid: members[0][0].name for uid, members in series.items()}
        listed = ", ".join(f"{name} ({len(series[uid])} slices)" for uid, name in first.items())
        raise VolumeError(f"{folder}: {len(series)} DICOM series in one folder ({listed}); one series per study")
    (uid, members), = series.items()
    rows, cols = int(members[0][1].get("Rows", 0) or 0), int(members[0][1].get("Columns", 0) or 0)
    n = len(members)
    if rows * cols * n > max_voxels:
        raise VolumeError(f"{folder}: {cols}x{rows}x{n} voxels exceed volume.max_voxels {max_voxels} "
                          "(decompression bomb guard)")
    for path, ds in members:
        modality = str(ds.get("Modality", "")).upper()
        if modality != "CT":
            raise VolumeError(f"{path}: modality {modality or 'missing'}, expected CT")
    if n < 2:
        raise VolumeError(f"{members[0][0]}: a series of one slice is not a volume")
    ref_spacing = _pixel_spacing(*members[0])
    positions = []
    normal = None
    for path, ds in members:
        if int(ds.get("Rows", 0) or 0) != rows or int(ds.get("Columns", 0) or 0) != cols:
            raise VolumeError(f"{path}: slice size {ds.get('Columns')}x{ds.get('Rows')} differs from the series' "
                              f"{cols}x{rows}")
        if not np.allclose(_pixel_spacing(path, ds), ref_spacing, rtol=1e-3):
            raise VolumeError(f"{path}: pixel spacing {list(_pixel_spacing(path, ds))} differs from the series' "
                              f"{list(ref_spacing)} (inconsistent spacing)")
        orientation, position = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient")
        if orientation is None or position is None or len(orientation) != 6 or len(position) != 3:
            raise VolumeError(f"{path}: no ImagePositionPatient / ImageOrientationPatient, the slice cannot be placed")
        row_dir, col_dir = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
        this_normal = np.cross(row_dir, col_dir)
        if normal is None:
            normal = this_normal
        elif not np.allclose(this_normal, normal, atol=1e-3):
            raise VolumeError(f"{path}: slice orientation differs from the rest of the series")
        positions.append(float(np.dot(np.asarray(position, float), normal)))
    order = np.argsort(positions, kind="stable")
    pos = np.asarray(positions)[order]
    files = [members[i][0] for i in order]
    gaps = np.diff(pos)
    if np.any(gaps <= 1e-4):
        k = int(np.argmax(gaps <= 1e-4))
        raise VolumeError(f"{files[k + 1]}: same slice position as {files[k].name} (duplicate slice)")
    step = float(np.median(gaps))
    for k, gap in enumerate(gaps):
        ratio = gap / step
        if abs(ratio - 1) <= spacing_tolerance:
            continue
        if round(ratio) >= 2 and abs(ratio - round(ratio)) <= spacing_tolerance:
            raise VolumeError(f"{files[k + 1]}: {round(ratio) - 1} missing slice(s) before it (gap {gap:.3g} mm "
                              f"after {files[k].name}, slice spacing {step:.3g} mm)")
        raise VolumeError(f"{files[k + 1]}: slice gap {gap:.3g} mm after {files[k].name} differs from the series' "
                          f"{step:.3g} mm (inconsistent spacing)")
    return SeriesInfo(tuple(files), rows, cols, ref_spacing, step, uid)


def _pixel_spacing(path: Path, ds) -> tuple[float, float]:
    spacing = ds.get("PixelSpacing")
    if spacing is None or len(spacing) != 2:
        raise VolumeError(f"{path}: no PixelSpacing")
    return float(spacing[0]), float(spacing[1])


def _reader(path: Path, fmt: str, vcfg: VolumeConfig, series: SeriesInfo | None):
    """A MONAI reader instance for this file (ITK when asked for or, with `auto`, installed)."""
    from monai.data import NibabelReader, NrrdReader

    if vcfg.reader == "itk" or (vcfg.reader == "auto" and _has_itk()):
        from monai.data import ITKReader

        return ITKReader()
    if fmt == "DICOM":
        return _position_sorted_reader(series)
    return NibabelReader() if fmt == "NIfTI" else NrrdReader()


def _has_itk() -> bool:
    import importlib.util

    return importlib.util.find_spec("itk") is not None


def _position_sorted_reader(series: SeriesInfo | None):
    """MONAI's PydicomReader, stacking the slices in the position order inspect_series found.

    PydicomReader orders a series by InstanceNumber, which scanners and anonymisers do not always keep in step
    with the geometry; the slice order is set from the checked positions instead (in memory, files untouched)."""
    from monai.data import PydicomReader

    rank = {str(p.resolve()): i for i, p in enumerate(series.files)} if series else {}

    class _Reader(PydicomReader):
        def _combine_dicom_series(self, data, filenames):
            for ds, name in zip(data, filenames):
                key = str(Path(name).resolve())
                if key in rank:
                    ds.InstanceNumber = rank[key] + 1
            return super()._combine_dicom_series(data, filenames)

    return _Reader(fname_regex=None)  # None: every file pydicom recognises as DICOM, not every file


def _load_native(path: Path, vcfg: VolumeConfig):
    """LoadImage + EnsureChannelFirst + Orientation RAS: a MetaTensor (1, X, Y, Z) in HU on the native grid."""
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation

    fmt = volume_format(path)
    series = None
    if fmt == "DICOM":
        series = inspect_series(path, max_voxels=vcfg.max_voxels, spacing_tolerance=vcfg.spacing_tolerance)
    else:
        _check_header_voxels(path, fmt, vcfg.max_voxels)
    # LoadImage builds every reader MONAI knows; its GPU DICOM decoder logs (and warns) on each volume that it has
    # no GPU here. The CPU readers above do the work, so that line is noise.
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*nvImageCodec", category=UserWarning)
            chain = Compose([
                LoadImage(reader=_reader(path, fmt, vcfg, series), image_only=True, dtype=np.float32),
                EnsureChannelFirst(),
                Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            ])
            volume = chain(str(path))
    except VolumeError:
        raise
    except Exception as exc:  # MONAI wraps reader errors in RuntimeError with the whole chain's trace
        raise VolumeError(f"{path}: cannot load {fmt} volume ({first_line(_root_cause(exc))})") from None
    if volume.ndim != 4 or volume.shape[0] != 1:
        raise VolumeError(f"{path}: {fmt} data has shape {tuple(volume.shape)}, expected one 3-D volume")
    return volume, fmt


def _check_header_voxels(path: Path, fmt: str, max_voxels: int) -> None:
    """The voxel-count guard on the file header, before any voxel is decoded."""
    try:
        if fmt == "NIfTI":
            import nibabel

            shape = nibabel.load(str(path)).header.get_data_shape()
        else:
            import nrrd

            shape = tuple(nrrd.read_header(str(path))["sizes"])
    except Exception as exc:  # nibabel / pynrrd raise their own error types
        raise VolumeError(f"{path}: not a readable {fmt} file ({first_line(exc)})") from None
    n = int(np.prod([int(s) for s in shape])) if shape else 0
    if n > max_voxels:
        raise VolumeError(f"{path}: {'x'.join(map(str, shape))} voxels exceed volume.max_voxels {max_voxels} "
                          "(decompression bomb guard)")
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] != 1):
        raise VolumeError(f"{path}: {fmt} data has shape {tuple(shape)}, expected one 3-D volume")


def probe_volume(path: str | Path, vcfg: VolumeConfig | None = None) -> VolumeInfo:
    """Load a volume on its native grid (RAS) and report shape, spacing and HU range. Raises VolumeError."""
    vcfg = vcfg or default_config().volume
    volume, fmt = _load_native(Path(path), vcfg)
    spacing = tuple(float(s) for s in volume.pixdim[:3])
    array = volume.array if hasattr(volume, "array") else np.asarray(volume)
    return VolumeInfo(tuple(int(s) for s in volume.shape[1:]), spacing, float(array.min()), float(array.max()), fmt)


def load_volume(path: str | Path, vcfg: VolumeConfig | None = None):
    """The model's input: a float32 tensor (1, X, Y, Z) in [0, 1] (RAS, `volume.spacing`, `volume.shape`)."""
    import torch
    from monai.transforms import Compose, ResizeWithPadOrCrop, ScaleIntensityRange, Spacing

    vcfg = vcfg or default_config().volume
    volume, _ = _load_native(Path(path), vcfg)
    low, high = vcfg.hu_window
    steps = [Spacing(pixdim=vcfg.spacing, mode="bilinear")] if vcfg.spacing else []
    steps += [
        ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
        ResizeWithPadOrCrop(spatial_size=vcfg.shape, mode="constant", value=0.0),  # pad = air (the window's low end)
    ]
    out = Compose(steps)(volume)
    return (out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out)).float().contiguous()


def volume_preview(path: str | Path, vcfg: VolumeConfig | None = None,
                   window: tuple[float, float] = (-600.0, 1500.0)):
    """The middle axial slice of a volume as an 8-bit PIL image in the radiological view (patient's right on the
    image left, anterior up), lung window (center, width) by default: what 2-D consumers of a volume see."""
    from PIL import Image

    volume, _ = _load_native(Path(path), vcfg or default_config().volume)
    array = volume.array if hasattr(volume, "array") else np.asarray(volume)
    plane = array[0, :, :, array.shape[-1] // 2][::-1, ::-1].T  # RAS (x, y) -> rows anterior->posterior
    center, width = window
    scaled = (np.clip(plane, center - width / 2, center + width / 2) - (center - width / 2)) * (255.0 / width)
    return Image.fromarray(np.ascontiguousarray(np.round(scaled).astype(np.uint8)), mode="L")


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


