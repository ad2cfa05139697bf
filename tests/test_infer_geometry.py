"""Geometry oracles: a stand-in network whose output is a fixed function of its input ("bright pixels are
pneumothorax") runs through the real runner; mask, NIfTI and SEG (read back with highdicom) must lie exactly
on the bright region of each input, in the source geometry.

Inputs: MONOCHROME1 and non-square radiographs, a multi-frame file, NIfTI volumes stored flipped and
permuted with the compensating affine, a single-slice NIfTI, a DICOM series whose file names run against
slice order with a localizer in the same SeriesInstanceUID, coronal and sagittal series. Sizes are chosen so
that resampling is exact on the oracle's edges (resize factors 1 and 2 in-plane).
"""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from torch import nn

from pneumoseg.infer import BatchInferenceRunner
from pneumoseg.model_record import CT, RADIOGRAPH, CTPreprocessing, ModelRecord, RadiographPreprocessing, TrainedModel
from pneumoseg.networks import SCSEUNetOutput

S = 64  # model input size of both kinds
DARK_HU, BRIGHT_HU = -1000, 100  # windowed: 0.23 and 0.97 (W1500 / L-600)


class BrightOracle(nn.Module):
    """seg logit = 40 (x - 0.5): a pixel is pneumothorax iff the preprocessed input is above 0.5; the image
    logit likewise from the brightest pixel."""

    def forward(self, x: torch.Tensor) -> SCSEUNetOutput:
        return SCSEUNetOutput(40.0 * (x - 0.5), 40.0 * (x.amax(dim=(1, 2, 3)) - 0.5)[:, None])


def oracle_model() -> TrainedModel:
    from pneumoseg.networks import SCSEUNet

    describe = SCSEUNet(decoder_channels=[16, 8, 8, 4, 4], head_channels=4)  # the record names a registry network
    record = ModelRecord.for_training(describe, RADIOGRAPH, S)
    record = ModelRecord(
        network=record.network,
        preprocessing={RADIOGRAPH: RadiographPreprocessing(image_size=S), CT: CTPreprocessing(image_size=S)},
    )
    return TrainedModel(BrightOracle(), record, "oracle", "1.0", "0" * 64, "0123456789abcdef")


# ============================================================================================== inputs


def _file_meta(sop_class: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _common(ds: Dataset, modality: str, series_uid: str, study_uid: str) -> None:
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality, ds.BodyPartExamined = modality, "CHEST"
    ds.PatientID, ds.PatientName = "ORACLE", "Oracle^Test"


def write_radiograph(path: Path, display: np.ndarray, photometric: str = "MONOCHROME2") -> Path:
    """A CR with ``display`` ``[frames?, Rows, Columns]`` (0/1) as what a viewer shows: MONOCHROME1 is stored
    inverted."""
    ds = Dataset()
    ds.file_meta = _file_meta("1.2.840.10008.5.1.4.1.1.1")
    _common(ds, "CR", generate_uid(), generate_uid())
    ds.PixelSpacing = [0.5, 0.5]
    stored = np.where(display > 0, 3000, 200).astype(np.uint16)
    if photometric == "MONOCHROME1":
        stored = (4095 - stored).astype(np.uint16)
    ds.set_pixel_data(stored, photometric, 12)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(
    folder: Path, bright: np.ndarray, orientation: list[float], names: list[str], localizer: str | None = None
) -> list[Path]:
    """CT slices ``bright`` ``[K, Rows, Columns]`` (0/1 -> HU) at positions along the normal of
    ``orientation``, slice k written as ``names[k]``; optionally a localizer with the same series UID."""
    series_uid, study_uid, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    iop = np.asarray(orientation, float)
    normal = np.cross(iop[:3], iop[3:])
    paths = []
    for k, plane in enumerate(bright):
        ds = Dataset()
        ds.file_meta = _file_meta("1.2.840.10008.5.1.4.1.1.2")
        _common(ds, "CT", series_uid, study_uid)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.FrameOfReferenceUID = frame_of_reference
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.ImagePositionPatient = [float(v) for v in (np.array([-20.0, -30.0, 40.0]) + 3.0 * k * normal)]
        ds.PixelSpacing, ds.SliceThickness = [0.8, 0.8], 3.0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.InstanceNumber = k + 1
        ds.set_pixel_data((np.where(plane > 0, BRIGHT_HU, DARK_HU) + 1024).astype(np.uint16), "MONOCHROME2", 12)
        paths.append(folder / names[k])
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(paths[-1], enforce_file_format=True)
    if localizer:
        scout = pydicom.dcmread(paths[0])
        scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        scout.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]  # a sagittal scout
        scout.save_as(folder / localizer, enforce_file_format=True)
    return paths


def _region(shape: tuple[int, ...], *slices: slice) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    out[slices] = 1
    return out


@pytest.fixture(scope="module")
def oracle_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    inputs = tmp_path_factory.mktemp("oracle_inputs")
    truth: dict[str, object] = {}
    # radiographs: non-square (128 x 64: factors 2 and 1 to the 64-px model input), MONOCHROME1 and 2
    mono1 = _region((128, 64), slice(10, 50), slice(6, 20)) | _region((128, 64), slice(10, 20), slice(6, 40))
    truth["cr/mono1.dcm"] = mono1  # an L: any flip or transpose moves it
    write_radiograph(inputs / "cr" / "mono1.dcm", mono1, "MONOCHROME1")
    wide = _region((64, 128), slice(40, 60), slice(10, 90))
    truth["cr/wide.dcm"] = wide
    write_radiograph(inputs / "cr" / "wide.dcm", wide)
    frames = np.stack([_region((64, 64), slice(4, 20), slice(30, 60)), _region((64, 64), slice(30, 62), slice(2, 12))])
    write_radiograph(inputs / "cr" / "frames.dcm", frames)
    truth["cr/frames.dcm@frame0000"], truth["cr/frames.dcm@frame0001"] = frames[0], frames[1]
    # NIfTI: RAS content stored as [K, I, J] with J reversed, and with the compensating affine
    ras = np.full((S, S, 6), DARK_HU, np.int16)
    ras[4:20, 40:60, 1:3] = BRIGHT_HU
    ras[4:10, 10:40, 1] = BRIGHT_HU
    stored = np.ascontiguousarray(ras[:, ::-1, :].transpose(2, 0, 1))
    flip_j, permute = np.eye(4), np.zeros((4, 4))
    flip_j[1, 1], flip_j[1, 3] = -1.0, S - 1.0
    permute[0, 1] = permute[1, 2] = permute[2, 0] = permute[3, 3] = 1.0
    affine = np.diag([0.7, 0.7, 2.5, 1.0]) @ flip_j @ permute
    (inputs / "nifti").mkdir()
    nib.save(nib.Nifti1Image(stored, affine), str(inputs / "nifti" / "permuted.nii.gz"))
    truth["nifti/permuted.nii.gz"] = stored > -600
    single = np.full((S, S, 1), DARK_HU, np.int16)
    single[5:25, 30:50, 0] = BRIGHT_HU
    nib.save(nib.Nifti1Image(single, np.diag([-0.7, -0.7, 3.0, 1.0])), str(inputs / "nifti" / "single.nii.gz"))
    truth["nifti/single.nii.gz"] = single > -600
    # an axial series named against slice order (IM0001 = the highest slice), a localizer among its files
    axial = np.stack([_region((S, S), slice(8, 30), slice(20, 50)) * (k in (1, 2)) for k in range(5)])
    axial[2, 40:60, 5:15] = 1
    names = [f"IM{5 - k:04d}" for k in range(5)]
    files = write_series(inputs / "series" / "axial", axial, [1, 0, 0, 0, 1, 0], names, localizer="IM0000")
    truth["axial"] = (files, axial)
    coronal = np.stack([_region((S, S), slice(10, 40), slice(5, 30)) * (k in (2, 3)) for k in range(5)])
    truth["coronal"] = (write_series(inputs / "series" / "coronal", coronal, [1, 0, 0, 0, 0, -1],
                                     [f"c{k}.dcm" for k in range(5)]), coronal)  # fmt: skip
    sagittal = np.stack([_region((S, S), slice(30, 60), slice(40, 62)) * (k == 1) for k in range(4)])
    truth["sagittal"] = (write_series(inputs / "series" / "sagittal", sagittal, [0, 1, 0, 0, 0, -1],
                                      [f"s{k}.dcm" for k in range(4)]), sagittal)  # fmt: skip
    out = tmp_path_factory.mktemp("oracle_outputs")
    runner = BatchInferenceRunner(input_dir=str(inputs), output_dir=str(out), device="cpu", workers=0, fp32=True,
                                  batch_size=2, progress=False, models=[oracle_model()])  # fmt: skip
    assert runner.run() == 0
    return inputs, out, truth


def _rows(out: Path) -> dict[str, dict]:
    return {r["scan_id"]: r for r in json.loads((out / "report.json").read_text())["rows"]}


def _seg_frames(path: Path, source_uids: list[str]) -> np.ndarray:
    seg = hd.seg.segread(path)
    return seg.get_pixels_by_source_instance(source_uids, segment_numbers=[1])[..., 0].astype(bool)


def test_radiograph_masks_and_segs_lie_on_the_bright_region(oracle_run):
    inputs, out, truth = oracle_run
    rows = _rows(out)
    for sid in ("cr/mono1.dcm", "cr/wide.dcm"):
        expected = truth[sid].astype(bool)
        assert rows[sid]["status"] == "ok" and rows[sid]["mask_pixels"] == int(expected.sum())
        assert np.array_equal(np.asarray(Image.open(out / rows[sid]["mask"])) > 0, expected), sid
        source = pydicom.dcmread(inputs / sid, stop_before_pixels=True)
        assert np.array_equal(_seg_frames(out / rows[sid]["seg"], [source.SOPInstanceUID])[0], expected), sid
        assert rows[sid]["area_mm2"] == pytest.approx(expected.sum() * 0.25)
    source = pydicom.dcmread(inputs / "cr" / "frames.dcm", stop_before_pixels=True)
    for frame in (0, 1):
        sid = f"cr/frames.dcm@frame{frame:04d}"
        expected = truth[sid].astype(bool)
        assert np.array_equal(np.asarray(Image.open(out / rows[sid]["mask"])) > 0, expected), sid
        seg = hd.seg.segread(out / rows[sid]["seg"])
        pixels = seg.get_pixels_by_source_frame(source.SOPInstanceUID, source_frame_numbers=[frame + 1],
                                                segment_numbers=[1])  # fmt: skip
        assert np.array_equal(pixels[0, ..., 0].astype(bool), expected), sid


def test_nifti_masks_lie_on_the_bright_voxels_of_the_stored_grid(oracle_run):
    inputs, out, truth = oracle_run
    rows = _rows(out)
    for sid in ("nifti/permuted.nii.gz", "nifti/single.nii.gz"):
        source, mask = nib.load(str(inputs / sid)), nib.load(str(out / rows[sid]["mask"]))
        assert mask.shape == source.shape and np.allclose(mask.affine, source.affine, atol=1e-5)
        assert np.array_equal(np.asarray(mask.dataobj) > 0, truth[sid]), sid
    assert "single slice" in rows["nifti/single.nii.gz"]["warnings"]


@pytest.mark.parametrize("name", ["axial", "coronal", "sagittal"])
def test_series_mask_and_seg_lie_on_the_bright_pixels_of_each_source_slice(oracle_run, name):
    """The SEG read back by SOPInstanceUID: frame of instance k == bright pixels of slice k, whatever the file
    names, a localizer among the files, or the slice plane; the NIfTI mask == the series reader's volume."""
    from pneumoseg.data.series import LoadDicomSeries

    inputs, out, truth = oracle_run
    files, bright = truth[name]
    row = next(r for r in _rows(out).values() if r["input"] == f"series/{name}" and r["kind"] == "series")
    assert row["status"] == "ok" and row["mask_pixels"] == int(bright.sum())
    if name != "axial":
        assert "not axial" in row["warnings"]
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    assert np.array_equal(_seg_frames(out / row["seg"], uids), bright.astype(bool))
    seg = hd.seg.segread(out / row["seg"])
    referenced = {
        i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence
    }
    assert referenced == set(uids)  # the localizer is no source of the SEG
    volume = LoadDicomSeries()([str(f) for f in files])
    mask = nib.load(str(out / row["mask"]))
    assert np.array_equal(np.asarray(mask.dataobj) > 0, volume[0].numpy() > -600)
    assert np.allclose(mask.affine, volume.affine.numpy(), atol=1e-4)


def test_the_localizer_is_a_skipped_row(oracle_run):
    _, out, _ = oracle_run
    row = _rows(out)["series/axial/IM0000"]
    assert row["status"] == "skipped" and "localizer" in row["reason"]
