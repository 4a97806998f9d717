"""Image decoding: every format a data set may hold, and every way a file can be broken."""

import hashlib

import numpy as np
import pytest
from PIL import Image

from medvlm.data.images import (
    file_sha256,
    image_hash,
    is_dicom,
    load_image,
    load_images_for_study,
    probe_image,
    resolve_in_root,
)
from medvlm.errors import DataError, ImageDecodeError


def _noise(size=(48, 32), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4}.get(mode)
    shape = (size[1], size[0], channels) if channels else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def _write_dicom(path, stored, *, modality="CT", slope=1.0, intercept=-1024.0, photometric="MONOCHROME2"):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("JPEG", ".jpg"), ("TIFF", ".tif"), ("BMP", ".bmp")])
def test_common_formats_load_as_grayscale(tmp_path, fmt, suffix):
    path = tmp_path / f"x{suffix}"
    _noise().save(path, format=fmt)
    im = load_image(path)
    assert im.mode == "L" and im.size == (48, 32)
    assert probe_image(path).format == fmt


def test_sixteen_bit_png_is_scaled_by_its_range(tmp_path):
    values = np.linspace(1000, 5000, 64 * 16).reshape(16, 64).astype(np.uint16)
    path = tmp_path / "ct16.png"
    Image.fromarray(values).save(path)  # 16-bit grayscale PNG
    assert Image.open(path).mode.startswith("I")
    pixels = np.asarray(load_image(path))
    assert pixels.min() == 0 and pixels.max() == 255
    assert np.all(np.diff(pixels.ravel().astype(int)) >= 0)  # order of intensities kept


def test_palette_and_rgba_and_cmyk(tmp_path):
    pal = Image.new("P", (20, 20))
    pal.putpalette([0, 0, 0, 200, 200, 200] + [0] * (256 * 3 - 6))
    pal.paste(1, (0, 0, 10, 20))
    pal.save(tmp_path / "pal.png")
    pixels = np.asarray(load_image(tmp_path / "pal.png"))
    assert pixels[0, 0] == 200 and pixels[0, 15] == 0

    # fully transparent white composites on black (the CT background), opaque white stays white
    rgba = np.zeros((10, 20, 4), dtype=np.uint8)
    rgba[..., :3] = 255
    rgba[:, 10:, 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    pixels = np.asarray(load_image(tmp_path / "a.png"))
    assert pixels[0, 0] == 0 and pixels[0, 15] == 255

    Image.new("CMYK", (16, 16), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")  # CMYK all zero = white
    im = load_image(tmp_path / "cmyk.jpg")
    assert im.mode == "L" and np.asarray(im).mean() > 200


def test_exif_orientation_is_applied(tmp_path):
    im = _noise((40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = tmp_path / "rot.jpg"
    im.save(path, exif=exif.tobytes())
    assert load_image(path).size == (20, 40)
    info = probe_image(path)
    assert (info.width, info.height) == (20, 40)


def test_decoded_by_content_not_extension(tmp_path):
    path = tmp_path / "really_a_jpeg.png"  # as 34 COV-CTR files are
    _noise().save(path, format="JPEG")
    assert load_image(path).size == (48, 32)
    assert probe_image(path).format == "JPEG"


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("this is a radiology report, not an image"), "not an image"),
        (lambda p: None, "not found"),
    ],
)
def test_broken_files_raise_one_line(tmp_path, make, message):
    path = tmp_path / "broken.png"
    make(path)
    for loader in (load_image, probe_image):
        with pytest.raises(ImageDecodeError) as err:
            loader(path)
        text = str(err.value)
        assert text.startswith(str(path)) and message in text and "\n" not in text


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_caught(tmp_path, fmt):
    full = tmp_path / "full"
    _noise((200, 200)).save(full, format=fmt)
    data = full.read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    for loader in (load_image, probe_image):
        with pytest.raises(ImageDecodeError, match="cannot decode"):
            loader(path)


def test_decompression_bomb_guard(tmp_path):
    path = tmp_path / "big.png"
    _noise((100, 100)).save(path)
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        load_image(path, max_pixels=5000)
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        probe_image(path, max_pixels=5000)
    assert load_image(path, max_pixels=10_000).size == (100, 100)


def test_dicom_ct_rescale_and_lung_window(tmp_path):
    # stored 0 / 424 / 1174 / 2000 with intercept -1024 -> -1024 / -600 / 150 / 976 HU
    stored = np.array([[0, 424, 1174, 2000]] * 4)
    path = _write_dicom(tmp_path / "slice.img", stored)  # no .dcm: found by the DICM magic
    assert is_dicom(path)
    row = np.asarray(load_image(path))[0]
    # window center -600, width 1500 -> [-1350, 150] HU mapped to 0..255
    assert row.tolist() == [55, 128, 255, 255]


def test_dicom_slope_monochrome1_and_non_ct(tmp_path):
    stored = np.array([[0, 10, 20]] * 3)
    path = _write_dicom(tmp_path / "xr.dcm", stored, modality="CR", slope=2.0, intercept=0, photometric="MONOCHROME1")
    row = np.asarray(load_image(path))[0]
    assert row.tolist() == [255, 127, 0]  # min-max (0, 20, 40 -> 0, 128, 255), then inverted


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns while it tries to parse the garbage
def test_corrupt_dicom(tmp_path):
    path = tmp_path / "bad.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00garbage")
    with pytest.raises(ImageDecodeError) as err:
        load_image(path)
    assert str(err.value).startswith(str(path))


def test_resolve_in_root_rejects_escapes(tmp_path):
    assert resolve_in_root(tmp_path, "images/a/../b.png") == tmp_path / "images" / "b.png"
    for bad in ["../outside.png", "images/../../x.png", "/etc/passwd", ""]:
        with pytest.raises(DataError):
            resolve_in_root(tmp_path, bad)


def test_hashes_and_study_loading(tmp_path):
    (tmp_path / "views").mkdir()
    _noise(seed=1).save(tmp_path / "views" / "a.png")
    _noise(seed=2).save(tmp_path / "views" / "b.png")
    a, b = tmp_path / "views" / "a.png", tmp_path / "views" / "b.png"
    assert file_sha256(a) == hashlib.sha256(a.read_bytes()).hexdigest()
    assert image_hash([a]) == file_sha256(a)
    both = image_hash([a, b])
    assert both not in (file_sha256(a), file_sha256(b)) and both != image_hash([b, a])
    images = load_images_for_study(tmp_path, ["views/a.png", "views/b.png"])
    assert [im.mode for im in images] == ["L", "L"]
    with pytest.raises(DataError):
        load_images_for_study(tmp_path, ["../a.png"])
    with pytest.raises(DataError):
        load_images_for_study(tmp_path, [])
