"""Tests for pneumoseg.infer.writers: atomic writes, masks, overlay, DICOM SEG (read back with highdicom)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from pneumoseg.data import phantoms
from pneumoseg.infer.writers import (
    TMP_PREFIX,
    atomic_write,
    file_digest,
    remove_stale_temporaries,
    sanitize_source_header,
    write_dicom_seg,
    write_mask_nifti,
    write_mask_png,
    write_overlay_png,
)


def _mask(shape, seed=0) -> np.ndarray:
    m = np.zeros(shape, bool)
    rng = np.random.default_rng(seed)
    sl = tuple(slice(int(rng.integers(0, s // 2)), int(rng.integers(s // 2 + 1, s))) for s in shape)
    m[sl] = True
    return m


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "a" / "out.txt"
    atomic_write(target, lambda tmp: tmp.write_text("first"))
    assert target.read_text() == "first"

    def failing(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]
    (target.parent / f"{TMP_PREFIX}123-out.txt").write_text("stale")
    assert remove_stale_temporaries(target.parent) == 1
    assert file_digest(target) == {"size": 5, "sha256": __import__("hashlib").sha256(b"first").hexdigest()}


def test_mask_png_and_nifti_round_trip(tmp_path):
    mask = _mask((30, 47))
    png = write_mask_png(tmp_path / "m.png", mask)
    back = np.asarray(Image.open(png))
    assert back.shape == (30, 47) and np.array_equal(back > 0, mask) and set(np.unique(back)) == {0, 255}
    vol = _mask((9, 11, 5), seed=1)
    affine = np.array([[-0.7, 0, 0, 10], [0, -0.8, 0, 20], [0, 0, 2.5, -30], [0, 0, 0, 1]])
    path = write_mask_nifti(tmp_path / "m.nii.gz", vol, affine)
    img = nib.load(str(path))
    assert np.array_equal(np.asarray(img.dataobj) > 0, vol) and np.allclose(img.affine, affine)
    assert img.get_data_dtype() == np.uint8
    with pytest.raises(ValueError):
        write_mask_png(tmp_path / "bad.png", vol)


def test_overlay_sizes_and_colours(tmp_path):
    image = (np.arange(64 * 80) % 256).astype(np.uint8).reshape(64, 80)
    path = write_overlay_png(tmp_path / "o.png", image, _mask((64, 80)), 0.73)
    out = np.asarray(Image.open(path).convert("RGB"))
    assert out.shape[2] == 3 and max(out.shape[:2]) >= 512  # small images enlarged
    big = np.zeros((2048, 1500), np.uint8)
    out = np.asarray(Image.open(write_overlay_png(tmp_path / "b.png", big, _mask((2048, 1500)), 0.1)).convert("RGB"))
    assert max(out.shape[:2]) == 1024
    assert (out[..., 0] > out[..., 2]).any()  # the red tint is there
    # a grey ramp with a square: greys kept outside (within a grey level), tinted inside, yellow contour
    ramp = np.tile(np.arange(256, dtype=np.uint8), (512, 2))
    square = np.zeros(ramp.shape, bool)
    square[100:300, 200:400] = True
    rgb = np.asarray(Image.open(write_overlay_png(tmp_path / "r.png", ramp, square, 0.5)).convert("RGB")).astype(int)
    outside = ~square
    outside[:20] = False  # the caption
    assert np.abs(rgb[outside] - ramp[outside][:, None]).max() <= 2
    inside = rgb[150:250, 250:350]
    expected = ramp[150:250, 250:350].astype(float) * 0.6
    assert np.abs(inside[..., 0] - (expected + 102)).max() <= 3 and np.abs(inside[..., 1] - expected).max() <= 3
    assert (rgb[100, 200:400] == [255, 255, 0]).all() and (rgb[99, 200:400] != [255, 255, 0]).any()


def _radiograph(tmp_path: Path, spacing_tag: str | None) -> pydicom.Dataset:
    case = phantoms.plan_radiographs(1, seed=2, size=48)[0]
    import dataclasses

    case = dataclasses.replace(case, spacing_tag=spacing_tag)
    image, _ = phantoms.draw_radiograph_case(case, 2, 48)
    path = phantoms.write_radiograph_dicom(tmp_path / f"r_{spacing_tag}.dcm", image, case)
    return pydicom.dcmread(path, stop_before_pixels=True)


@pytest.mark.parametrize("spacing", ["PixelSpacing", "ImagerPixelSpacing", None, "zero"])
def test_seg_of_a_radiograph_reads_back(tmp_path, spacing):
    ds = _radiograph(tmp_path, "PixelSpacing" if spacing == "zero" else spacing)
    if spacing == "zero":
        ds.PixelSpacing = [0, 0]
    for keyword in ("PatientBirthDate", "AccessionNumber"):  # Type 2 attributes often missing in exports
        if keyword in ds:
            delattr(ds, keyword)
    mask = _mask((ds.Rows, ds.Columns), seed=3)
    path = tmp_path / "seg.dcm"
    assert write_dicom_seg(path, [ds], mask[None], "Pneumothorax scSE U-Net", "0.1.0", uid_seed="x") == []
    seg = hd.seg.segread(path)
    pixels = seg.get_pixels_by_source_instance([ds.SOPInstanceUID], segment_numbers=[1])
    assert np.array_equal(pixels[0, ..., 0].astype(bool), mask)
    measured = [float(v) for v in seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    expected = {"PixelSpacing": ds.get("PixelSpacing"), "ImagerPixelSpacing": ds.get("ImagerPixelSpacing")}.get(spacing)
    assert measured == ([float(v) for v in expected] if expected else [1.0, 1.0])
    assert "PatientBirthDate" not in ds and "AccessionNumber" not in ds  # added to a copy only
    write_dicom_seg(tmp_path / "seg2.dcm", [ds], mask[None], "n", "1", uid_seed="x")
    assert pydicom.dcmread(tmp_path / "seg2.dcm").SOPInstanceUID == seg.SOPInstanceUID  # stable UIDs per scan


def test_empty_mask_seg_and_sanitize_does_not_touch_source(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    original = copy.deepcopy(ds)
    clean = sanitize_source_header(ds)
    assert ds == original and not clean.guessed and clean.spacing == [float(v) for v in ds.PixelSpacing]
    assert clean.left_out == []
    empty = np.zeros((1, ds.Rows, ds.Columns), bool)
    write_dicom_seg(tmp_path / "e.dcm", [ds], empty, "n", "1")
    seg = hd.seg.segread(tmp_path / "e.dcm")
    assert ds == original  # nor does writing the SEG (highdicom gets a top-level copy)
    assert not seg.get_pixels_by_source_instance([ds.SOPInstanceUID], segment_numbers=[1]).any()
    with pytest.raises(ValueError, match="source image"):
        write_dicom_seg(tmp_path / "bad.dcm", [ds, ds], empty, "n", "1")
    assert not os.path.exists(tmp_path / "bad.dcm")


def test_contour_is_mask_minus_its_erosion():
    from scipy import ndimage

    from pneumoseg.infer.writers import _contour

    for seed in range(4):
        mask = _mask((37, 53), seed=seed) | (np.random.default_rng(seed).random((37, 53)) > 0.6)
        mask[0, :] = mask[:, -1] = True  # touching the border: the border is background
        np.testing.assert_array_equal(_contour(mask), mask & ~ndimage.binary_erosion(mask, border_value=0))


INVALID_VALUES = {
    "PatientBirthDate": "00000000",  # matches DA's pattern, but is no date
    "StudyDate": "UNKNOWN",
    "StudyTime": "25:61",
    "PatientSex": "FEMALE",
    "PatientAge": "45 YEARS",  # AS is nnnD/W/M/Y: 045Y
    "ContentDate": "2023-01-01",
}


def test_seg_of_a_header_with_invalid_values_leaves_them_out_and_never_quotes_them(tmp_path, capfd, caplog):
    """PACS exports hold values the standard does not allow; highdicom refuses to copy them. The SEG's copy
    leaves them out (the source is untouched), names the attributes, and no value reaches a log or stderr."""
    ds = _radiograph(tmp_path, "PixelSpacing")
    with pydicom.config.disable_value_validation():
        for keyword, value in INVALID_VALUES.items():
            setattr(ds, keyword, value)
        ds.PatientName = "Doe John"  # no "^": highdicom would log it as "potentially invalid", quoting it
        ds.save_as(tmp_path / "invalid.dcm")
    from pneumoseg.data.dicom import read_dicom

    source = read_dicom(tmp_path / "invalid.dcm", stop_before_pixels=True)
    original = copy.deepcopy(source)
    mask = _mask((source.Rows, source.Columns), seed=5)
    with caplog.at_level("DEBUG"):
        left_out = write_dicom_seg(tmp_path / "seg.dcm", [source], mask[None], "n", "1")
    assert left_out == sorted(INVALID_VALUES)
    assert source == original
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert np.array_equal(
        seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1])[0, ..., 0], mask
    )
    for keyword in ("PatientBirthDate", "StudyDate", "StudyTime", "PatientSex"):  # Type 2: present, empty
        assert seg.get(keyword) in ("", None), keyword
    assert str(seg.PatientName) == "Doe John^" and seg.PatientID == source.PatientID  # valid values copied
    out, err = capfd.readouterr()
    quoted = out + err + caplog.text
    assert not any(value in quoted for value in (*INVALID_VALUES.values(), "Doe John")), quoted


def test_no_private_function_of_highdicom_is_replaced(tmp_path):
    from highdicom import _standard_utils, base

    before = (_standard_utils.is_attribute_in_iod, base.is_attribute_in_iod)
    write_dicom_seg(tmp_path / "s.dcm", [_radiograph(tmp_path, "PixelSpacing")], np.ones((1, 48, 48), bool), "n", "1")
    assert (_standard_utils.is_attribute_in_iod, base.is_attribute_in_iod) == before
    assert not hasattr(base.is_attribute_in_iod, "__wrapped__")


@pytest.mark.parametrize("with_isal", [True, False])
def test_encode_png_round_trips_with_pillow(monkeypatch, with_isal):
    import io
    import sys

    from pneumoseg.infer.writers import encode_png

    if not with_isal:  # the zlib fallback
        monkeypatch.setitem(sys.modules, "isal", None)
    rng = np.random.default_rng(1)
    for shape in ((1, 1), (3, 517), (64, 80)):
        grey = rng.integers(0, 256, shape, dtype=np.uint8)
        image = Image.open(io.BytesIO(encode_png(grey)))
        assert image.mode == "L" and np.array_equal(np.asarray(image), grey)
        palette = [v for i in range(4) for v in (i * 80, 255 - i * 80, 7)]
        indices = (grey % 4).astype(np.uint8)
        image = Image.open(io.BytesIO(encode_png(indices, palette=palette)))
        assert image.mode == "P" and np.array_equal(np.asarray(image), indices)
        rgb = np.asarray(image.convert("RGB"))
        assert np.array_equal(rgb, np.asarray(palette, np.uint8).reshape(-1, 3)[indices])
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4), np.uint16))
    with pytest.raises(ValueError, match="palette"):
        encode_png(np.zeros((4, 4), np.uint8), palette=[1, 2])
