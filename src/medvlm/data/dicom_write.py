"""Write a HU volume as a DICOM CT series (one file per axial slice), for phantom data and tests.

Geometry: the volume is indexed (x, y, z) in RAS+ (x grows toward the patient's right, y anterior, z superior, as
MONAI's Orientation("RAS") returns it). DICOM patient coordinates are LPS+, so a RAS point (x, y, z) sits at
(-x, -y, z); the slices use the standard axial orientation [1, 0, 0, 0, 1, 0] (columns toward the patient's left,
rows toward posterior). Stored values are int16 with a rescale slope/intercept, like a scanner.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def write_dicom_series(
    folder: str | Path,
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    series_uid: str | None = None,
    study_uid: str | None = None,
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = -1024.0,
    names: list[str] | None = None,
    positions: list[float] | None = None,
    transfer_syntax: str | None = None,
    patient_id: str = "PHANTOM",
) -> list[Path]:
    """hu (X, Y, Z) in RAS -> one DICOM file per z under `folder`; returns the paths in z order.

    names: file names per slice (default slice_0000.dcm ...); positions: z in mm per slice (default z * spacing);
    transfer_syntax: a UID to encode with (default explicit VR little endian, uncompressed); instance numbers follow
    the file names' order, not the geometry, like some anonymised exports."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    nx, ny, nz = hu.shape
    sx, sy, sz = spacing
    series_uid = series_uid or generate_uid(entropy_srcs=[str(folder), "series"])
    study_uid = study_uid or generate_uid(entropy_srcs=[str(folder), "study"])
    names = names or [f"slice_{k:04d}.dcm" for k in range(nz)]
    positions = positions if positions is not None else [k * sz for k in range(nz)]
    stored = np.clip(np.round((hu - intercept) / slope), -32768, 32767).astype(np.int16)
    name_rank = {name: i for i, name in enumerate(sorted(names))}
    paths = []
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(k)])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / names[k]), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.PatientName = modality, patient_id, patient_id
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SeriesNumber, ds.InstanceNumber = 1, name_rank[names[k]] + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        # LPS of voxel (0, 0, k): RAS x index 0 is the rightmost column after the flip below
        ds.ImagePositionPatient = [-(nx - 1) * sx, -(ny - 1) * sy, float(positions[k])]
        ds.PixelSpacing = [sy, sx]  # row spacing (between rows, along y), column spacing (along x)
        ds.SliceThickness = sz
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "HU"
        # image row r, column c: LPS (x0 + c*sx, y0 + r*sy) = RAS x index nx-1-c, y index ny-1-r
        plane = stored[::-1, ::-1, k].T  # (rows = y, cols = x)
        ds.PixelData = np.ascontiguousarray(plane).tobytes()
        if transfer_syntax and transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax)
        path = folder / names[k]
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
