"""The bottom layer (pneumoseg.data.dicom) and what builds on it: headers checked against pixels, files
without the preamble, symbolic-link loops, value warnings that would quote patient data."""

from __future__ import annotations

import threading

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pneumoseg.data.dicom import ImageReadError, quiet_value_validation, read_dicom, walk_files
from pneumoseg.data.readers import LoadRadiograph
from pneumoseg.infer.discovery import discover_scans


def _cr(rows: int = 16, columns: int = 12) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.Modality, ds.BodyPartExamined = generate_uid(), "CR", "CHEST"
    pixels = (np.arange(rows * columns).reshape(rows, columns) * 7 % 4096).astype(np.uint16)
    ds.set_pixel_data(pixels, "MONOCHROME2", 12)
    return ds


def test_a_file_without_the_preamble_is_read(tmp_path):
    ds = _cr()
    expected = ds.pixel_array.copy()
    path = tmp_path / "IM0001"  # no suffix, no preamble, no DICM prefix, no File Meta
    del ds.file_meta
    pydicom.dcmwrite(path, ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert path.read_bytes()[128:132] != b"DICM"
    image = LoadRadiograph()(path)
    np.testing.assert_array_equal(image[0].numpy(), expected)
    (scan,) = discover_scans(tmp_path)
    assert scan.kind == "radiograph" and scan.status == "pending"
    (tmp_path / "notes").write_bytes(b"exported by PACS, see attached\n" * 20)  # force=True parses junk too
    with pytest.raises(ImageReadError, match="not a DICOM file"):
        read_dicom(tmp_path / "notes")


def test_columns_that_do_not_describe_the_pixel_data_are_an_error_naming_the_file(tmp_path):
    ds = _cr(16, 12)
    ds.Columns = 10  # the true width is 12: decoding would shear the image and look valid
    ds.save_as(tmp_path / "wrong_columns.dcm", enforce_file_format=True)
    with pytest.raises(ImageReadError, match="wrong_columns.dcm: Pixel Data holds 384 bytes but .* is 320"):
        LoadRadiograph()(tmp_path / "wrong_columns.dcm")
    short = _cr(16, 12)
    short.Rows = 20  # more than the data holds
    short.save_as(tmp_path / "short.dcm", enforce_file_format=True)
    with pytest.raises(ImageReadError, match="short.dcm"):
        LoadRadiograph()(tmp_path / "short.dcm")


def test_pixel_data_without_rows_and_columns_is_an_error_not_a_non_image(tmp_path):
    ds = _cr()
    del ds.Rows, ds.Columns
    ds.save_as(tmp_path / "no_size.dcm", enforce_file_format=True)
    sr = _cr()
    del sr.Rows, sr.Columns, sr.PixelData
    sr.Modality = "SR"
    sr.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    scans = {s.scan_id: s for s in discover_scans(tmp_path)}
    assert scans["no_size.dcm"].status == "error" and "without Rows / Columns" in scans["no_size.dcm"].reason
    assert scans["report.dcm"].status == "skipped"


def test_symbolic_links_to_folders_are_followed_once(tmp_path):
    root = tmp_path / "in"
    (root / "a").mkdir(parents=True)
    _cr().save_as(root / "a" / "x.dcm", enforce_file_format=True)
    (root / "a" / "loop").symlink_to(root)  # a loop back to the top
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    _cr().save_as(outside / "y.dcm", enforce_file_format=True)
    (root / "linked").symlink_to(outside)  # a folder reached only through a link
    walk = walk_files(root)
    assert [p.relative_to(root).as_posix() for p in walk.files] == ["a/x.dcm", "linked/y.dcm"]
    assert [(p.relative_to(root).as_posix(), why) for p, why in walk.not_walked] == [
        ("a/loop", "folder already searched as . (symbolic link)")
    ]
    scans = {s.scan_id: s for s in discover_scans(root)}
    assert scans["linked/y.dcm"].status == "pending"
    assert scans["a/loop"].status == "skipped" and "symbolic link" in scans["a/loop"].reason
    (root / "dangling").symlink_to(tmp_path / "nowhere")
    assert {s.scan_id: s.reason for s in discover_scans(root)}["dangling"] == "broken symbolic link"


def test_value_warnings_never_quote_a_header_value(tmp_path, capfd, caplog):
    ds = _cr()
    with pydicom.config.disable_value_validation():
        ds.PatientBirthDate, ds.PatientSex = "19801332", "FEMALE"
        ds.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    with caplog.at_level("DEBUG"):
        read = read_dicom(tmp_path / "a.dcm")
        discover_scans(tmp_path)
        LoadRadiograph()(tmp_path / "a.dcm")
    assert read.PatientBirthDate == "19801332"  # read as it is
    out, err = capfd.readouterr()
    assert "19801332" not in out + err + caplog.text and "FEMALE" not in out + err + caplog.text


def test_quiet_value_validation_restores_the_setting_whatever_the_threads_do():
    from pydicom import config

    before = (config.settings.reading_validation_mode, config.settings.writing_validation_mode)
    inside = threading.Barrier(4)

    def hold() -> None:
        with quiet_value_validation():
            inside.wait()
            assert config.settings.reading_validation_mode == config.IGNORE
            inside.wait()

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for t in threads:
        t.start()
    with quiet_value_validation():
        inside.wait()
    inside.wait()
    for t in threads:
        t.join()
    assert (config.settings.reading_validation_mode, config.settings.writing_validation_mode) == before
