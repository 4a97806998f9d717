"""CT volumes: DICOM series (sorted by position, rescaled, checked), NIfTI orientation and the HU window (MONAI)."""

import numpy as np
import pytest

pytest.importorskip("monai")

from medvlm.config import config_from_dict  # noqa: E402


from medvlm.data.dicom_write import write_dicom_series  # noqa: E402
from medvlm.data.volumes import VolumeError, inspect_series, is_volume_path, load_volume, probe_volume  # noqa: E402



def VolumeConfig(**settings):  # noqa: N802 - the shipped volume settings with these changed
    return config_from_dict({"volume": settings}).volume


NATIVE = VolumeConfig(spacing=None, shape=(12, 10, 6), min_slices=2)


def _phantom(nx=12, ny=10, nz=6):
    """Air with a marker that tells every axis apart: x index 1-2, y index 7-8, from slice 4 up."""
    hu = np.full((nx, ny, nz), -1000.0, np.float32)
    hu[1:3, 7:9, 4:] = 40.0
    hu[..., 0] = -600.0  # the lowest slice is lung-like, so z order is visible
    return hu


def _shuffled_names(n, seed=0):
    order = np.random.default_rng(seed).permutation(n)
    return [f"IM{int(k):04d}" for k in order]  # file-name order != z order, instance numbers follow names


def test_series_sorted_by_position_and_rescaled(tmp_path):
    hu = _phantom()
    write_dicom_series(tmp_path / "s", hu, (0.7, 0.8, 2.5), names=_shuffled_names(6), slope=2.0, intercept=-1024.0)
    info = probe_volume(tmp_path / "s", NATIVE)
    assert info.shape == (12, 10, 6) and info.format == "DICOM"
    assert np.allclose(info.spacing, (0.7, 0.8, 2.5))
    assert (info.hu_min, info.hu_max) == (-1000.0, 40.0)  # stored (hu + 1024) / 2, read back through slope 2
    x = load_volume(tmp_path / "s", NATIVE)[0].numpy()
    expected = (np.clip(hu, -1000, 1000) + 1000) / 2000
    assert np.allclose(x, expected, atol=1e-6)  # RAS axes and slice order exactly as written


def test_series_quarantine_reasons_name_the_file(tmp_path):
    hu = _phantom()
    write_dicom_series(tmp_path / "gap", hu, (1, 1, 2), positions=[0, 2, 4, 8, 10, 12])
    with pytest.raises(VolumeError, match=r"slice_0003\.dcm: 1 missing slice"):
        inspect_series(tmp_path / "gap", max_voxels=10**6)
    write_dicom_series(tmp_path / "uneven", hu, (1, 1, 2), positions=[0, 2, 4, 6, 7.2, 9.2])
    with pytest.raises(VolumeError, match=r"slice_0004\.dcm: slice gap 1\.2 mm .*inconsistent spacing"):
        inspect_series(tmp_path / "uneven", max_voxels=10**6)
    write_dicom_series(tmp_path / "two", hu, (1, 1, 2), series_uid="1.2.3.1")
    write_dicom_series(tmp_path / "two", hu[..., :3], (1, 1, 2), series_uid="1.2.3.2",
                       names=[f"b{k}.dcm" for k in range(3)])
    with pytest.raises(VolumeError, match=r"two: 2 DICOM series in one folder .*one series per study"):
        inspect_series(tmp_path / "two", max_voxels=10**6)
    write_dicom_series(tmp_path / "mr", hu, (1, 1, 2), modality="MR")
    with pytest.raises(VolumeError, match=r"slice_0000\.dcm: modality MR, expected CT"):
        inspect_series(tmp_path / "mr", max_voxels=10**6)
    with pytest.raises(VolumeError, match=r"12x10x6 voxels exceed volume.max_voxels 100"):
        inspect_series(tmp_path / "mr", max_voxels=100)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a slice")
    with pytest.raises(VolumeError, match="no DICOM slices"):
        probe_volume(tmp_path / "empty", NATIVE)


def test_compressed_series_decodes(tmp_path):
    pytest.importorskip("openjpeg")
    from pydicom.uid import JPEG2000Lossless

    hu = _phantom(40, 36, 6)  # JPEG 2000's default 6 resolution levels need tiles of at least 32 px
    write_dicom_series(tmp_path / "j2k", hu, (1, 1, 2), names=_shuffled_names(6, 1), transfer_syntax=JPEG2000Lossless)
    import pydicom

    assert pydicom.dcmread(next((tmp_path / "j2k").iterdir())).file_meta.TransferSyntaxUID == JPEG2000Lossless
    x = load_volume(tmp_path / "j2k", VolumeConfig(spacing=None, shape=(40, 36, 6)))[0].numpy()
    assert np.allclose(x, (np.clip(hu, -1000, 1000) + 1000) / 2000, atol=1e-6)


def test_nifti_orientation_hu_window_and_guards(tmp_path):
    import nibabel

    hu = _phantom()
    # stored LPS-flipped (x and y reversed): Orientation RAS must undo it
    affine = np.diag([-0.7, -0.8, 2.5, 1.0])
    nibabel.save(nibabel.Nifti1Image(hu[::-1, ::-1].copy(), affine), tmp_path / "scan.nii.gz")
    assert is_volume_path(tmp_path / "scan.nii.gz") and is_volume_path(tmp_path) and not is_volume_path("a.png")
    info = probe_volume(tmp_path / "scan.nii.gz", NATIVE)
    assert info.shape == (12, 10, 6) and np.allclose(info.spacing, (0.7, 0.8, 2.5)) and info.format == "NIfTI"
    window = VolumeConfig(spacing=None, shape=(12, 10, 6), hu_window=(-1000.0, 0.0))
    x = load_volume(tmp_path / "scan.nii.gz", window)[0].numpy()
    assert np.allclose(x, np.clip((hu + 1000) / 1000, 0, 1), atol=1e-6)  # 40 HU clips to 1, -600 -> 0.4
    resampled = load_volume(tmp_path / "scan.nii.gz", VolumeConfig(spacing=(1.4, 1.6, 5.0), shape=(8, 8, 4)))
    assert resampled.shape == (1, 8, 8, 4) and 0.0 <= float(resampled.min()) <= float(resampled.max()) <= 1.0
    with pytest.raises(VolumeError, match=r"scan\.nii\.gz: 12x10x6 voxels exceed volume.max_voxels 99"):
        probe_volume(tmp_path / "scan.nii.gz", VolumeConfig(max_voxels=99))
    (tmp_path / "broken.nii").write_bytes(b"not nifti at all" * 30)
    with pytest.raises(VolumeError, match=r"broken\.nii: not a readable NIfTI file"):
        probe_volume(tmp_path / "broken.nii", NATIVE)


def test_loading_logs_no_gpu_decoder_warning(tmp_path, caplog):
    """MONAI's LoadImage builds every reader it knows, and its GPU DICOM decoder warns once per volume that no GPU
    decoder is there: hundreds of identical lines in a features run on a CPU machine."""
    import logging

    hu = _phantom()
    write_dicom_series(tmp_path / "s", hu, (0.7, 0.8, 2.5), names=_shuffled_names(6), slope=2.0, intercept=-1024.0)
    with caplog.at_level(logging.WARNING):
        load_volume(tmp_path / "s", NATIVE)
    assert not [r for r in caplog.records if "nvImageCodec" in r.getMessage()]
