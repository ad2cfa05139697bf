"""Tests for pneumoseg.infer.discovery: folder -> scans (grouping, skipping with reasons, names, shards)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pneumoseg.data import phantoms
from pneumoseg.infer.discovery import discover_scans, shard_scans


def _dicom(
    path: Path, modality: str, rows: int | None = 16, body_part: str = "CHEST", frames: int = 1, **attrs
) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = attrs.pop("SeriesInstanceUID", generate_uid())
    ds.Modality = modality
    if body_part:
        ds.BodyPartExamined = body_part
    for key, value in attrs.items():
        setattr(ds, key, value)
    if rows:
        shape = (frames, rows, rows) if frames > 1 else (rows, rows)
        ds.set_pixel_data(np.zeros(shape, np.uint16), "MONOCHROME2", 12)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_kinds_reasons_and_unique_names(tmp_path):
    root = tmp_path / "in"
    _dicom(root / "a" / "img.dcm", "CR")
    _dicom(root / "b" / "img.dcm", "DX")
    uid = generate_uid()
    for k in range(3):
        _dicom(root / "ct" / f"s{k}.dcm", "CT", SeriesInstanceUID=uid, ImagePositionPatient=[0, 0, k])
    _dicom(root / "ct" / "scout.dcm", "CT", SeriesInstanceUID=uid, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    sag = generate_uid()
    for k in range(2):
        _dicom(root / "sag" / f"s{k}.dcm", "CT", SeriesInstanceUID=sag, ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    _dicom(root / "x" / "frames.dcm", "DX", frames=3)
    _dicom(root / "x" / "enhanced.dcm", "CT", frames=4)
    _dicom(root / "x" / "sr.dcm", "SR", rows=None)
    _dicom(root / "x" / "seg.dcm", "SEG")
    _dicom(root / "x" / "hand.dcm", "CR", body_part="HAND")
    _dicom(root / "x" / "us.dcm", "US", body_part="")
    shutil.copy(get_testdata_file("DICOMDIR"), root / "x" / "DICOMDIR")
    (root / "x" / "notes.txt").write_text("hello")
    (root / "x" / "broken.dcm").write_bytes(b"\x00" * 500)
    (root / ".hidden").mkdir()
    (root / ".hidden" / "junk.dcm").write_bytes(b"junk")
    (root / "v.nii.gz").write_bytes(b"")  # accepted by name; reading happens later
    (root / "p.png").write_bytes(b"")

    scans = discover_scans(root)
    by_id = {s.scan_id: s for s in scans}
    assert [s.scan_id for s in scans] == sorted(by_id)
    assert by_id["a/img.dcm"].kind == by_id["b/img.dcm"].kind == "radiograph"
    series = by_id[f"ct/series-{uid}"]
    assert series.kind == "series" and len(series.files) == 3 and series.source == "ct"
    assert not series.warnings
    assert by_id["ct/scout.dcm"].status == "skipped" and "localizer" in by_id["ct/scout.dcm"].reason
    assert "not axial" in by_id[f"sag/series-{sag}"].warnings[0]
    assert [by_id[f"x/frames.dcm@frame{i:04d}"].frame for i in range(3)] == [0, 1, 2]
    assert by_id["x/enhanced.dcm"].status == "skipped" and "multi-frame" in by_id["x/enhanced.dcm"].reason
    assert by_id["x/sr.dcm"].status == "skipped" and "SR" in by_id["x/sr.dcm"].reason
    assert by_id["x/seg.dcm"].status == "skipped" and "SEG" in by_id["x/seg.dcm"].reason
    assert by_id["x/DICOMDIR"].status == "skipped"
    assert by_id["x/notes.txt"].status == "skipped" and by_id["x/notes.txt"].reason == "not a DICOM file"
    assert by_id["x/broken.dcm"].status == "error" and "corrupt" in by_id["x/broken.dcm"].reason
    assert by_id["x/hand.dcm"].status == "pending" and "HAND" in by_id["x/hand.dcm"].warnings[0]
    assert "US" in by_id["x/us.dcm"].warnings[0]
    assert by_id["v.nii.gz"].kind == "nifti" and by_id["p.png"].kind == "image"
    assert not any(".hidden" in s.scan_id for s in scans)

    chest = {s.scan_id: s for s in discover_scans(root, chest_only=True)}
    assert chest["x/hand.dcm"].status == "skipped" and "--chest-only" in chest["x/hand.dcm"].reason
    assert chest["x/us.dcm"].status == "skipped"
    assert chest["a/img.dcm"].status == "pending"


def test_headers_only_and_phantom_series(tmp_path, monkeypatch):
    """Discovery never decodes pixels (stop_before_pixels) and groups a phantom CT series into one scan."""
    case = phantoms.plan_ct(1, seed=1)[0]
    hu, _, spacing = phantoms.draw_ct_case(case, 1, 32, 5)
    phantoms.write_ct_dicom_series(tmp_path / "in" / "ct", hu, spacing, case)
    calls = []
    real = pydicom.dcmread

    def spy(*args, **kwargs):
        calls.append(kwargs.get("stop_before_pixels", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", spy)
    scans = discover_scans(tmp_path / "in")
    assert len(scans) == 1 and scans[0].kind == "series" and len(scans[0].files) == 5
    assert scans[0].series_uid == case.series_uid and scans[0].modality == "CT"
    assert calls and all(calls)


def test_empty_and_missing_folder(tmp_path):
    assert discover_scans(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="nope"):
        discover_scans(tmp_path / "nope")


def test_shards_partition_the_sorted_list(tmp_path):
    for i in range(7):
        _dicom(tmp_path / f"f{i}.dcm", "CR")
    scans = discover_scans(tmp_path)
    shards = [shard_scans(scans, 3, i) for i in range(3)]
    ids = sorted(s.scan_id for shard in shards for s in shard)
    assert ids == [s.scan_id for s in scans]
    assert [len(s) for s in shards] == [3, 2, 2]
    assert shard_scans(scans, 3, 1) == shards[1]  # deterministic
    with pytest.raises(ValueError):
        shard_scans(scans, 2, 2)
