"""Tests for pneumoseg.data.series: CT series discovery, sorting, warnings, HU, affine, localizers, slice UIDs."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pneumoseg.data.readers import ImageReadError, LoadNifti
from pneumoseg.data.series import LoadDicomSeries, LoadDicomSeriesd, find_dicom_series, load_dicom_series

ROWS, COLS = 6, 5
PIXEL_SPACING = (0.7, 0.9)  # (between rows, between columns)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # normal +z (head)
FLIPPED = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # normal -z: slice direction negative in patient z
_c, _s = np.cos(np.radians(20)), np.sin(np.radians(20))
TILTED = (1.0, 0.0, 0.0, 0.0, _c, -_s)  # oblique: rotated 20 degrees about x


def _normal(orientation) -> np.ndarray:
    o = np.asarray(orientation, dtype=float)
    return np.cross(o[:3], o[3:])


def write_series(
    folder: Path,
    n_slices: int = 8,
    orientation=AXIAL,
    slice_spacing: float = 2.5,
    origin=(-10.0, 20.0, 30.0),
    series_uid: str | None = None,
    skip: tuple[int, ...] = (),
    seed: int = 0,
    slope: float = 1.0,
    intercept: float = -1024.0,
    rows: int = ROWS,
) -> dict:
    """Write a synthetic CT series, slice s at ``origin + s * slice_spacing * normal``.

    Files get shuffled names and InstanceNumbers in reverse order of position, so neither name nor
    InstanceNumber order gives the geometric order. Returns the ground truth: stored values
    ``[S, Rows, Cols]``, HU, positions ``[S, 3]`` (LPS), series UID, file path per slice.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stored = rng.integers(0, 3000, size=(n_slices, rows, COLS)).astype(np.int16)
    normal = _normal(orientation)
    positions = np.array(origin) + np.arange(n_slices)[:, None] * slice_spacing * normal
    series_uid = series_uid or generate_uid()
    names = rng.permutation(n_slices)
    files = {}
    for s in range(n_slices):
        if s in skip:
            continue
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.StudyInstanceUID = "1.2.3"
        ds.Modality = "CT"
        ds.BodyPartExamined = "CHEST"
        ds.InstanceNumber = n_slices - s
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.ImagePositionPatient = [float(v) for v in positions[s]]
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.SliceThickness = slice_spacing
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.Rows, ds.Columns = rows, COLS
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.PixelData = stored[s].tobytes()
        path = folder / f"IM{seed}_{names[s]:04d}_{series_uid[-6:]}"
        ds.save_as(path, enforce_file_format=True)
        files[s] = path
    return {
        "stored": stored,
        "hu": stored * slope + intercept,
        "positions": positions,
        "uid": series_uid,
        "files": files,
        "orientation": np.asarray(orientation, dtype=float),
    }


def expected_ras(truth: dict, s: int, row: int, col: int) -> np.ndarray:
    """RAS mm of pixel (row, col) of slice s by the DICOM formula (PS3.3 C.7.6.2.1.1), LPS -> RAS."""
    o = truth["orientation"]
    lps = truth["positions"][s] + col * PIXEL_SPACING[1] * o[:3] + row * PIXEL_SPACING[0] * o[3:]
    return lps * np.array([-1, -1, 1])


@pytest.mark.parametrize("orientation", [AXIAL, FLIPPED, TILTED], ids=["axial", "flipped", "tilted"])
def test_shuffled_series_sorted_geometrically(tmp_path, orientation):
    truth = write_series(tmp_path / "ct", orientation=orientation)
    vol = LoadDicomSeries()(tmp_path / "ct")
    assert tuple(vol.shape) == (1, COLS, ROWS, 8) and vol.dtype == torch.float32
    # [I = column, J = row, K = slice along the normal]
    np.testing.assert_array_equal(vol[0].numpy(), truth["hu"].transpose(2, 1, 0))
    affine = vol.affine.numpy()
    for s, row, col in [(0, 0, 0), (3, 2, 4), (7, 5, 1)]:
        np.testing.assert_allclose(affine @ [col, row, s, 1], [*expected_ras(truth, s, row, col), 1], atol=1e-6)
    np.testing.assert_allclose(vol.meta["spacing"], [PIXEL_SPACING[1], PIXEL_SPACING[0], 2.5])
    assert vol.meta["series_warnings"] == []
    assert vol.meta["SeriesInstanceUID"] == truth["uid"] and vol.meta["Modality"] == "CT"


def test_reverse_slice_direction_sorts_along_normal(tmp_path):
    # slices written with a negative step along the normal: k must still increase along the normal
    truth = write_series(tmp_path / "ct", slice_spacing=-2.0)
    vol = LoadDicomSeries()(tmp_path / "ct")
    np.testing.assert_array_equal(vol[0].numpy(), truth["hu"][::-1].transpose(2, 1, 0))
    assert vol.affine[2, 2] > 0
    np.testing.assert_allclose(vol.affine.numpy() @ [0, 0, 0, 1], [*expected_ras(truth, 7, 0, 0), 1])


def test_hounsfield_units_via_rescale(tmp_path):
    truth = write_series(tmp_path / "ct", slope=2.0, intercept=-1000.0)
    vol = LoadDicomSeries()(tmp_path / "ct")
    np.testing.assert_array_equal(vol[0, ..., 0].numpy(), (2.0 * truth["stored"][0] - 1000.0).T)


def test_series_equals_its_nifti_export(tmp_path):
    write_series(tmp_path / "ct", orientation=TILTED)
    vol = LoadDicomSeries()(tmp_path / "ct")
    nib.save(nib.Nifti1Image(vol[0].numpy(), vol.affine.numpy()), tmp_path / "ct.nii.gz")
    nifti = LoadNifti()(tmp_path / "ct.nii.gz")
    assert nifti.shape == vol.shape
    np.testing.assert_array_equal(nifti.numpy(), vol.numpy())
    np.testing.assert_allclose(nifti.affine.numpy(), vol.affine.numpy(), atol=1e-5)
    np.testing.assert_allclose(nifti.meta["spacing"], vol.meta["spacing"], atol=1e-5)


def test_duplicate_positions_reported_and_dropped(tmp_path, caplog):
    truth = write_series(tmp_path / "ct")
    shutil.copy(truth["files"][3], tmp_path / "ct" / "copy_of_slice_3")
    with caplog.at_level(logging.WARNING, logger="pneumoseg.data.series"):
        vol = LoadDicomSeries()(tmp_path / "ct")
    assert vol.shape[-1] == 8
    assert any("duplicate" in w for w in vol.meta["series_warnings"])
    assert "duplicate" in caplog.text
    np.testing.assert_array_equal(vol[0].numpy(), truth["hu"].transpose(2, 1, 0))


def test_missing_slices_reported(tmp_path, caplog):
    truth = write_series(tmp_path / "ct", skip=(4,))
    with caplog.at_level(logging.WARNING, logger="pneumoseg.data.series"):
        vol = LoadDicomSeries()(tmp_path / "ct")
    assert vol.shape[-1] == 7
    (warning,) = vol.meta["series_warnings"]
    assert "missing" in warning and truth["files"][3].name in warning and truth["files"][5].name in warning
    assert "missing" in caplog.text
    np.testing.assert_allclose(vol.meta["spacing"][2], 2.5)


def test_two_series_in_one_folder_stay_apart(tmp_path):
    a = write_series(tmp_path / "mixed", n_slices=8, slice_spacing=2.5, seed=1)
    b = write_series(tmp_path / "mixed", n_slices=5, slice_spacing=1.0, seed=2)
    found = find_dicom_series(tmp_path / "mixed")
    assert {(s.series_uid, len(s.files)) for s in found} == {(a["uid"], 8), (b["uid"], 5)}
    assert all(s.modality == "CT" and s.error is None for s in found)
    with pytest.raises(ImageReadError, match="2 series") as info:
        LoadDicomSeries()(tmp_path / "mixed")
    assert a["uid"] in str(info.value) and b["uid"] in str(info.value)
    vol_b = LoadDicomSeries(series_uid=b["uid"])(tmp_path / "mixed")
    assert vol_b.shape[-1] == 5
    np.testing.assert_allclose(vol_b.meta["spacing"][2], 1.0)
    np.testing.assert_array_equal(vol_b[0].numpy(), b["hu"].transpose(2, 1, 0))
    assert LoadDicomSeries(pick="largest")(tmp_path / "mixed").meta["SeriesInstanceUID"] == a["uid"]


def test_discovery_is_recursive_and_skips_non_dicom(tmp_path):
    write_series(tmp_path / "study" / "sub" / "deeper", n_slices=4)
    (tmp_path / "study" / "README.txt").write_text("not dicom")
    (found,) = find_dicom_series(tmp_path / "study")
    assert len(found.files) == 4
    assert all(f.is_relative_to(tmp_path / "study" / "sub" / "deeper") for f in found.files)


def test_list_of_files_input_and_dict_form(tmp_path):
    truth = write_series(tmp_path / "ct", n_slices=5)
    files = [os.fspath(p) for p in reversed(list(truth["files"].values()))]
    vol = LoadDicomSeries()(files)
    np.testing.assert_array_equal(vol[0].numpy(), truth["hu"].transpose(2, 1, 0))
    d = LoadDicomSeriesd(keys="image")({"image": tmp_path / "ct", "label": "x"})
    assert tuple(d["image"].shape) == (1, COLS, ROWS, 5) and d["label"] == "x"


def test_single_slice_is_a_one_slice_volume_with_a_warning(tmp_path):
    truth = write_series(tmp_path / "ct", n_slices=1, slice_spacing=3.0)
    (found,) = find_dicom_series(tmp_path / "ct")
    assert found.error is None and "single slice" in found.warnings[0]
    vol = LoadDicomSeries()(tmp_path / "ct")
    assert tuple(vol.shape) == (1, COLS, ROWS, 1)
    np.testing.assert_array_equal(vol[0, ..., 0].numpy(), truth["hu"][0].T)
    # the slice axis: along the normal, by SliceThickness (no second position to measure it from)
    np.testing.assert_allclose(vol.affine.numpy()[:3, 2], [0, 0, 3.0])


def test_localizer_in_the_series_stays_out_and_layers_name_their_instances(tmp_path):
    """A scout sharing the series' UID (and file names against slice order) never enters the volume; the
    meta names the source instance of each layer in K order: what a SEG must reference."""
    truth = write_series(tmp_path / "ct", n_slices=5)
    scout = pydicom.dcmread(truth["files"][2])
    scout.SOPInstanceUID = generate_uid()
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]  # coronal: would break the series
    scout.save_as(tmp_path / "ct" / "AAA_scout")
    (found,) = find_dicom_series(tmp_path / "ct")
    assert found.error is None and len(found.files) == 5
    headers: list = []
    vol = load_dicom_series(found, headers=headers)
    np.testing.assert_array_equal(vol[0].numpy(), truth["hu"].transpose(2, 1, 0))
    expected = [pydicom.dcmread(truth["files"][k], stop_before_pixels=True).SOPInstanceUID for k in range(5)]
    assert vol.meta["slice_sop_uids"] == expected
    assert [h.SOPInstanceUID for h in headers] == expected and all("PixelData" not in h for h in headers)


def test_slice_read_twice_must_be_the_same_instance(tmp_path):
    truth = write_series(tmp_path / "ct", n_slices=3)
    (found,) = find_dicom_series(tmp_path / "ct")
    replaced = pydicom.dcmread(truth["files"][1])
    replaced.SOPInstanceUID = generate_uid()
    replaced.save_as(truth["files"][1])
    with pytest.raises(ImageReadError, match="changed while the series was read"):
        load_dicom_series(found)


def test_inconsistent_orientation_raises(tmp_path):
    uid = generate_uid()
    write_series(tmp_path / "ct", n_slices=4, series_uid=uid, seed=1)
    write_series(tmp_path / "ct", n_slices=4, series_uid=uid, orientation=TILTED, origin=(0, 0, 100), seed=2)
    with pytest.raises(ImageReadError, match="inconsistent ImageOrientationPatient"):
        LoadDicomSeries()(tmp_path / "ct")


def test_inconsistent_shape_raises(tmp_path):
    uid = generate_uid()
    write_series(tmp_path / "ct", n_slices=4, series_uid=uid, seed=1)
    write_series(tmp_path / "ct", n_slices=4, series_uid=uid, origin=(0, 0, 100), seed=2, rows=ROWS + 1)
    with pytest.raises(ImageReadError, match="different shapes"):
        LoadDicomSeries()(tmp_path / "ct")


def test_empty_folder_raises(tmp_path):
    with pytest.raises(ImageReadError, match="no DICOM image series") as info:
        LoadDicomSeries()(tmp_path)
    assert str(tmp_path) in str(info.value)
