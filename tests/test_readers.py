"""Tests for pneumoseg.data.readers: DICOM radiographs (incl. compressed), PNG/JPEG, NIfTI, dispatch."""

from __future__ import annotations

import glob
import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.data.data_manager import DATA_ROOT
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from pneumoseg.data.readers import (
    ImageReadError,
    LoadChestImage,
    LoadChestImaged,
    LoadNifti,
    LoadNiftid,
    LoadRadiograph,
    LoadRadiographd,
)


def bundled(name: str) -> str:
    """A test file shipped inside the pydicom wheel (never downloaded: tests run offline)."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not bundled with this pydicom"
    return path


def bundled_files_with_pixels() -> list[str]:
    """pydicom's bundled *.dcm holding pixel data.

    ``get_testdata_files("*.dcm")`` is not used: it also tries to download pydicom-data's extra files.
    """
    found = []
    for path in sorted(glob.glob(os.path.join(DATA_ROOT, "test_files", "*.dcm"))):
        try:
            ds = pydicom.dcmread(path, force=True, defer_size="1 KB")
        except Exception:  # unreadable even forced: cannot tell whether it holds pixels
            continue
        if "PixelData" in ds:
            found.append(path)
    return found


PIXEL_FILES = bundled_files_with_pixels()


def make_radiograph(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    signed: bool = False,
    **elements,
) -> Dataset:
    """A minimal single-frame CR dataset with ``pixels`` ``[Rows, Columns]`` as stored values."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def save(ds: Dataset, path: Path) -> str:
    ds.save_as(path, enforce_file_format=True)
    return os.fspath(path)


def ramp(rows: int = 8, cols: int = 11, top: int = 4095) -> np.ndarray:
    rng = np.random.default_rng(rows * cols)
    return rng.integers(0, top + 1, size=(rows, cols))


# --- every bundled pydicom file with pixel data ----------------------------------------------------


def test_bundled_file_list_is_not_empty():
    assert len(PIXEL_FILES) > 40


@pytest.mark.parametrize("path", PIXEL_FILES, ids=os.path.basename)
def test_bundled_file_loads_or_fails_clearly(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the deliberately odd files
        try:
            img = LoadRadiograph()(path)
        except ImageReadError as e:
            assert path in str(e)
            return
    ds = pydicom.dcmread(path)
    assert isinstance(img, MetaTensor)
    assert img.dtype == torch.float32
    assert tuple(img.shape) == (1, ds.Rows, ds.Columns)
    assert torch.isfinite(img).all()
    assert img.meta["filename_or_obj"] == path
    assert len(img.meta["spacing"]) == 2 and (np.asarray(img.meta["spacing"]) > 0).all()
    for key in ("Modality", "SeriesInstanceUID", "SOPInstanceUID", "PhotometricInterpretation", "affine"):
        assert key in img.meta


# the list of transfer syntaxes that must decode, with a bundled example of each
MUST_DECODE = {
    "SC_rgb_jpeg_dcmtk.dcm": "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "JPGExtended.dcm": "1.2.840.10008.1.2.4.51",  # JPEG Extended, 12-bit
    "SC_rgb_jpeg_gdcm.dcm": "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "MR_small_jpeg_ls_lossless.dcm": "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "JPEGLSNearLossless_16.dcm": "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless, 16-bit
    "MR_small_jp2klossless.dcm": "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "JPEG2000.dcm": "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "MR_small_RLE.dcm": "1.2.840.10008.1.2.5",  # RLE Lossless
    "image_dfl.dcm": "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
}


@pytest.mark.parametrize("name", sorted(MUST_DECODE))
def test_compressed_transfer_syntaxes_decode(name):
    path = bundled(name)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == MUST_DECODE[name]
    img = LoadRadiograph()(path)
    assert img.meta["TransferSyntaxUID"] == MUST_DECODE[name]
    assert float(img.max()) > float(img.min())  # decoded to a real image, not a constant


@pytest.mark.parametrize(
    "reference, compressed, tolerance",
    [
        ("MR_small.dcm", "MR_small_RLE.dcm", 0),
        ("MR_small.dcm", "MR_small_jp2klossless.dcm", 0),
        ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm", 0),
        ("SC_rgb_rle.dcm", "SC_rgb_jpeg_gdcm.dcm", 0),  # JPEG Lossless SV1
        ("SC_rgb_rle.dcm", "SC_rgb_gdcm_KY.dcm", 0),  # JPEG 2000
        ("SC_rgb_rle.dcm", "SC_rgb_jpeg_dcmtk.dcm", 8),  # JPEG Baseline is lossy: close, not equal
    ],
)
def test_compressed_equals_uncompressed_reference(reference, compressed, tolerance):
    ref = LoadRadiograph()(bundled(reference))
    out = LoadRadiograph()(bundled(compressed))
    assert ref.shape == out.shape
    assert float((ref - out).abs().max()) <= tolerance


def test_jpeg_lossy_12bit_file_fails_with_transfer_syntax_named():
    # pydicom's JPEG-lossy.dcm has a stream no installed plugin accepts (libjpeg: misplaced marker;
    # GDCM/Pillow: no 12-bit support); JPGExtended.dcm proves 12-bit JPEG Extended itself decodes
    path = bundled("JPEG-lossy.dcm")
    try:
        LoadRadiograph()(path)
    except ImageReadError as e:
        assert path in str(e)
        assert "1.2.840.10008.1.2.4.51" in str(e) and "JPEG Extended" in str(e)


@pytest.mark.parametrize(
    "syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless, DeflatedExplicitVRLittleEndian], ids=str
)
def test_synthetic_12bit_monochrome1_radiograph_compressed_roundtrip(tmp_path, syntax):
    pixels = ramp(64, 48)  # J2K encoder needs >= 32 px per side for its default resolutions
    ds = make_radiograph(pixels, photometric="MONOCHROME1", PixelSpacing=[0.2, 0.3])
    reference = LoadRadiograph()(save(ds, tmp_path / "ref.dcm"))
    if syntax == DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = syntax
    else:
        ds.compress(syntax)
    out = LoadRadiograph()(save(ds, tmp_path / "compressed.dcm"))
    assert pydicom.dcmread(tmp_path / "compressed.dcm").file_meta.TransferSyntaxUID == syntax
    assert torch.equal(out, reference)
    np.testing.assert_array_equal(reference[0].numpy(), 4095 - pixels)


def test_deflated_equals_explicit_little_endian(tmp_path):
    ds = pydicom.dcmread(bundled("MR_small.dcm"))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = LoadRadiograph()(save(ds, tmp_path / "deflated.dcm"))
    assert torch.equal(out, LoadRadiograph()(bundled("MR_small.dcm")))


# --- intensities -----------------------------------------------------------------------------------


def test_pydicom_itself_leaves_monochrome1_uninverted(tmp_path):
    pixels = ramp()
    ds = pydicom.dcmread(save(make_radiograph(pixels, photometric="MONOCHROME1"), tmp_path / "m1.dcm"))
    np.testing.assert_array_equal(apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds), pixels)


def test_monochrome1_inverted_within_bit_depth(tmp_path):
    pixels = ramp()
    m1 = LoadRadiograph()(save(make_radiograph(pixels, photometric="MONOCHROME1"), tmp_path / "m1.dcm"))
    m2 = LoadRadiograph()(save(make_radiograph(pixels, photometric="MONOCHROME2"), tmp_path / "m2.dcm"))
    np.testing.assert_array_equal(m2[0].numpy(), pixels)
    np.testing.assert_array_equal(m1[0].numpy(), 4095 - pixels)
    assert m1.meta["PhotometricInterpretation"] == "MONOCHROME1"


def test_monochrome1_inverted_within_window_output_range(tmp_path):
    pixels = ramp()
    window = {"WindowCenter": 2000, "WindowWidth": 1000, "RescaleSlope": 1, "RescaleIntercept": 0}
    m1 = LoadRadiograph()(save(make_radiograph(pixels, "MONOCHROME1", **window), tmp_path / "m1.dcm"))
    m2 = LoadRadiograph()(save(make_radiograph(pixels, "MONOCHROME2", **window), tmp_path / "m2.dcm"))
    # pydicom windows into [0, 4095] for 12-bit unsigned: the inversion maps that range onto itself
    assert float(m2.min()) == 0 and float(m2.max()) == 4095
    np.testing.assert_allclose(m1[0].numpy(), 4095 - m2[0].numpy(), atol=1e-3)
    # brighter = more attenuation: the highest stored MONOCHROME1 value is the darkest pixel
    assert m1[0].numpy()[pixels == pixels.max()].max() == 0


def test_monochrome1_with_voi_lut_sequence_inverted_within_lut_range(tmp_path):
    pixels = ramp(top=255)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 10]
    lut = np.linspace(0, 1023, 256).astype(int)
    item.add_new(0x00283006, "US", [int(v) for v in lut])  # LUT Data; its VR (US or OW) is ambiguous
    ds = make_radiograph(pixels, "MONOCHROME1", bits_stored=8)
    ds.VOILUTSequence = [item]
    out = LoadRadiograph()(save(ds, tmp_path / "lut.dcm"))
    expected = 1023 - lut[pixels]
    np.testing.assert_array_equal(out[0].numpy(), expected)


def test_modality_lut_applied(tmp_path):
    pixels = ramp()
    ds = make_radiograph(pixels, RescaleSlope=2, RescaleIntercept=-100)
    out = LoadRadiograph()(save(ds, tmp_path / "rescale.dcm"))
    np.testing.assert_array_equal(out[0].numpy(), 2 * pixels - 100)


def test_monochrome2_pydicom_file_untouched():
    path = bundled("MR_small.dcm")
    ds = pydicom.dcmread(path)
    expected = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    np.testing.assert_allclose(LoadRadiograph()(path)[0].numpy(), expected, rtol=1e-6)


def test_bits_stored_respected(tmp_path):
    pixels = ramp()
    garbage = pixels | 0xF000  # e.g. overlay bits above BitsStored = 12
    out = LoadRadiograph()(save(make_radiograph(garbage), tmp_path / "bits.dcm"))
    np.testing.assert_array_equal(out[0].numpy(), pixels)


def test_rgb_converted_to_luminance():
    path = bundled("SC_rgb_rle.dcm")
    rgb = pydicom.dcmread(path).pixel_array.astype(np.float64)
    expected = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    np.testing.assert_allclose(LoadRadiograph()(path)[0].numpy(), expected, rtol=1e-5)


# --- geometry --------------------------------------------------------------------------------------


def test_orientation_marker_at_row_2_col_5(tmp_path):
    pixels = np.zeros((7, 9), dtype=np.uint16)
    pixels[2, 5] = 4000
    path = save(make_radiograph(pixels), tmp_path / "marker.dcm")
    out = LoadRadiograph()(path)
    assert tuple(out.shape) == (1, 7, 9)
    assert np.unravel_index(int(out.argmax()), out.shape) == (0, 2, 5)


def test_monai_pydicom_reader_is_transposed_relative_to_us(tmp_path):
    # documents the convention difference (docs/data.md): MONAI's PydicomReader gives [W, H]
    from monai.transforms import LoadImage

    pixels = np.zeros((7, 9), dtype=np.uint16)
    pixels[2, 5] = 4000
    path = save(make_radiograph(pixels), tmp_path / "marker.dcm")
    monai_img = LoadImage(reader="PydicomReader", image_only=True)(path)
    assert tuple(monai_img.shape[:2]) == (9, 7)
    assert np.unravel_index(int(monai_img.argmax()), monai_img.shape)[:2] == (5, 2)


@pytest.mark.parametrize(
    "elements, spacing, missing",
    [
        ({"PixelSpacing": [0.2, 0.3], "ImagerPixelSpacing": [0.5, 0.5]}, (0.2, 0.3), False),
        ({"ImagerPixelSpacing": [0.15, 0.25]}, (0.15, 0.25), False),
        ({"PixelSpacing": [0, 0], "ImagerPixelSpacing": [0.4, 0.4]}, (0.4, 0.4), False),
        ({"PixelSpacing": [0, 0]}, (1.0, 1.0), True),
        ({}, (1.0, 1.0), True),
    ],
)
def test_pixel_spacing(tmp_path, elements, spacing, missing):
    out = LoadRadiograph()(save(make_radiograph(ramp(), **elements), tmp_path / "sp.dcm"))
    np.testing.assert_allclose(out.meta["spacing"], spacing)
    assert out.meta["spacing_missing"] is missing
    np.testing.assert_allclose(np.diag(out.affine.numpy())[:2], spacing)


def test_meta_names_the_dicom_identifiers(tmp_path):
    ds = make_radiograph(ramp())
    out = LoadRadiograph()(save(ds, tmp_path / "ids.dcm"))
    assert out.meta["SOPInstanceUID"] == ds.SOPInstanceUID
    assert out.meta["SeriesInstanceUID"] == ds.SeriesInstanceUID
    assert out.meta["Modality"] == "CR"
    assert out.meta["BodyPartExamined"] == "CHEST"


# --- multi-frame, errors ---------------------------------------------------------------------------


def test_multiframe_needs_frame_index():
    path = bundled("rtdose.dcm")
    with pytest.raises(ImageReadError, match="multi-frame") as info:
        LoadRadiograph()(path)
    assert path in str(info.value)
    ds = pydicom.dcmread(path)
    expected = apply_voi_lut(apply_modality_lut(ds.pixel_array[3], ds), ds)
    out = LoadRadiograph(frame=3)(path)
    np.testing.assert_allclose(out[0].numpy(), expected, rtol=1e-6)
    assert out.meta["frame"] == 3
    with pytest.raises(ImageReadError, match="out of range"):
        LoadRadiograph(frame=15)(path)


def test_not_a_dicom_file_names_the_file(tmp_path):
    path = tmp_path / "garbage.dcm"
    path.write_text("not dicom")
    with pytest.raises(ImageReadError) as info:
        LoadRadiograph()(path)
    assert str(path) in str(info.value)


def test_undecodable_pixel_data_names_file_and_transfer_syntax(tmp_path):
    ds = make_radiograph(ramp())
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless  # header says J2K, data is raw: cannot decode
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])
    path = save(ds, tmp_path / "broken_j2k.dcm")
    with pytest.raises(ImageReadError) as info:
        LoadRadiograph()(path)
    message = str(info.value)
    assert path in message and "1.2.840.10008.1.2.4.90" in message and "JPEG 2000" in message


# --- PNG / JPEG ------------------------------------------------------------------------------------


def test_png_grayscale_8_and_16_bit(tmp_path):
    marker = np.zeros((7, 9), dtype=np.uint16)
    marker[2, 5] = 60000
    Image.fromarray(marker).save(tmp_path / "m16.png")
    Image.fromarray((marker // 256).astype(np.uint8)).save(tmp_path / "m8.png")
    out16 = LoadRadiograph()(tmp_path / "m16.png")
    out8 = LoadRadiograph()(tmp_path / "m8.png")
    np.testing.assert_array_equal(out16[0].numpy(), marker)
    np.testing.assert_array_equal(out8[0].numpy(), marker // 256)
    assert np.unravel_index(int(out8.argmax()), out8.shape) == (0, 2, 5)
    assert out16.meta["spacing_missing"] is True


def test_rgb_png_and_jpeg_to_luminance(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(6, 10, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    out = LoadRadiograph()(tmp_path / "rgb.png")
    np.testing.assert_allclose(out[0].numpy(), rgb.astype(float) @ [0.299, 0.587, 0.114], rtol=1e-5)
    gray = np.full((6, 10), 128, dtype=np.uint8)
    gray[2, 5] = 255
    Image.fromarray(gray).save(tmp_path / "gray.jpg", quality=100)
    out = LoadRadiograph()(tmp_path / "gray.jpg")
    assert tuple(out.shape) == (1, 6, 10)
    assert np.unravel_index(int(out.argmax()), out.shape) == (0, 2, 5)


# --- NIfTI -----------------------------------------------------------------------------------------


def test_nifti_voxel_order_and_affine(tmp_path):
    data = np.random.default_rng(1).normal(size=(5, 6, 4)).astype(np.float32)
    affine = np.array([[-0.7, 0, 0, 10], [0, -0.8, 0, 20], [0, 0, 2.5, -30], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "vol.nii.gz")
    out = LoadNifti()(tmp_path / "vol.nii.gz")
    assert tuple(out.shape) == (1, 5, 6, 4) and out.dtype == torch.float32
    np.testing.assert_allclose(out[0].numpy(), data)
    np.testing.assert_allclose(out.affine.numpy(), affine, atol=1e-5)
    np.testing.assert_allclose(out.meta["spacing"], [0.7, 0.8, 2.5], atol=1e-5)
    assert out.meta["filename_or_obj"] == str(tmp_path / "vol.nii.gz")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nifti_with_nan_or_inf_raises_naming_file(tmp_path, bad):
    data = np.zeros((3, 3, 3), dtype=np.float32)
    data[1, 1, 1] = bad
    path = tmp_path / "bad.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with pytest.raises(ImageReadError, match="NaN or infinite") as info:
        LoadNifti()(path)
    assert str(path) in str(info.value)


# --- dictionary forms and dispatch -----------------------------------------------------------------


def test_dictionary_forms(tmp_path):
    dcm = save(make_radiograph(ramp()), tmp_path / "a.dcm")
    nib.save(nib.Nifti1Image(np.ones((2, 3, 4), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    d = LoadRadiographd(keys="image")({"image": dcm, "has_pneumothorax": 1})
    assert tuple(d["image"].shape) == (1, 8, 11) and d["has_pneumothorax"] == 1
    d = LoadNiftid(keys=["image", "label"], allow_missing_keys=True)({"image": tmp_path / "v.nii.gz"})
    assert tuple(d["image"].shape) == (1, 2, 3, 4)


def test_load_chest_image_dispatches_on_path(tmp_path):
    from test_series import write_series  # synthetic CT series writer

    dcm = save(make_radiograph(ramp()), tmp_path / "noext")
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(tmp_path / "x.png")
    nib.save(nib.Nifti1Image(np.ones((2, 3, 4), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    write_series(tmp_path / "ct", n_slices=3)
    load = LoadChestImage()
    assert tuple(load(dcm).shape) == (1, 8, 11)
    assert tuple(load(tmp_path / "x.png").shape) == (1, 4, 5)
    assert tuple(load(str(tmp_path / "v.nii.gz")).shape) == (1, 2, 3, 4)
    ct = load(tmp_path / "ct")
    assert ct.ndim == 4 and ct.shape[-1] == 3
    d = LoadChestImaged(keys="image")({"image": tmp_path / "x.png"})
    assert tuple(d["image"].shape) == (1, 4, 5)
