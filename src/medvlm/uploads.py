"""Volume uploads (REST): a NIfTI file, or a zip of one DICOM series, unpacked under guards.

A zip is never extracted by its own member names: each regular member is written under a fresh temporary folder
as slice_NNNNN (so no name can leave it: no zip-slip through `..`, absolute paths or symlinks), and the bytes
written are counted as they are inflated, not taken from the headers, against serve.max_volume_bytes in total,
serve.max_zip_members members and serve.max_zip_ratio (inflated / compressed) per member: a zip bomb stops at the
first limit it crosses. Every refusal is a VolumeUploadError with one line (the REST layer answers 4xx).
"""

from __future__ import annotations

import io
import stat
import tempfile
import zipfile
from pathlib import Path

from medvlm.config import Config
from medvlm.errors import DataError

ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header, or the end record of an empty zip
GZIP_MAGIC = b"\x1f\x8b"
_NIFTI1_OFFSET, _NIFTI_MAGICS = 344, (b"n+1\0", b"ni1\0")
_CHUNK = 1 << 16


class VolumeUploadError(DataError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def upload_kind(data: bytes) -> str | None:
    """"zip", "nifti" (plain or gzipped) or None (a 2-D image or DICOM file: the image loader's business)."""
    if data[:4] in ZIP_MAGICS:
        return "zip"
    if data[:2] == GZIP_MAGIC or data[_NIFTI1_OFFSET:_NIFTI1_OFFSET + 4] in _NIFTI_MAGICS or data[4:8] == b"n+2\0":
        return "nifti"
    return None


def unpack_series_zip(data: bytes, folder: Path, cfg: Config) -> Path:
    """Members of a zip -> folder/slice_NNNNN, under the guards of the module docstring. Returns folder."""
    scfg = cfg.serve
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError) as exc:
        raise VolumeUploadError(400, f"upload is not a readable zip ({exc})") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if not members:
            raise VolumeUploadError(422, "the zip holds no files (expected the slices of one DICOM series)")
        if len(members) > scfg.max_zip_members:
            raise VolumeUploadError(413, f"the zip has {len(members)} files, more than serve.max_zip_members "
                                         f"({scfg.max_zip_members})")
        total = 0
        for i, member in enumerate(members):
            mode = member.external_attr >> 16  # Unix mode when the zip was made on Unix; type bits 0 = unknown
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
                raise VolumeUploadError(400, f"zip member {member.filename!r} is not a regular file (links refused)")
            if member.flag_bits & 0x1:
                raise VolumeUploadError(400, f"zip member {member.filename!r} is encrypted")
            limit = max(member.compress_size, 1) * scfg.max_zip_ratio
            written = 0
            try:
                with archive.open(member) as src, (folder / f"slice_{i:05d}").open("wb") as dst:
                    while chunk := src.read(_CHUNK):
                        written += len(chunk)
                        total += len(chunk)
                        if total > scfg.max_volume_bytes:
                            raise VolumeUploadError(413, f"the zip inflates past serve.max_volume_bytes "
                                                         f"({scfg.max_volume_bytes}): refused as a zip bomb")
                        if written > limit:
                            raise VolumeUploadError(413, f"zip member {member.filename!r} inflates more than "
                                                         f"serve.max_zip_ratio ({scfg.max_zip_ratio}x): refused as a zip bomb")
                        dst.write(chunk)
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as exc:
                raise VolumeUploadError(400, f"zip member {member.filename!r} cannot be read ({exc})") from None
    return folder


def load_volume_upload(data: bytes, kind: str, cfg: Config, vision):
    """Upload bytes of a volume -> the encoder's input (medvlm.features.load_view), temporary files removed."""
    from medvlm.features import load_view

    with tempfile.TemporaryDirectory(prefix="medvlm-upload-") as tmp:
        if kind == "zip":
            (Path(tmp) / "series").mkdir()
            path = unpack_series_zip(data, Path(tmp) / "series", cfg)
        else:
            path = Path(tmp) / ("scan.nii.gz" if data[:2] == GZIP_MAGIC else "scan.nii")
            path.write_bytes(data)
        try:
            return load_view(path, cfg, vision)
        except DataError as exc:
            reason = str(exc).replace(str(path), "upload").replace(tmp, "upload")
            raise VolumeUploadError(415, f"upload is not a readable volume: {reason}") from None
