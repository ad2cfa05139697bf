"""pneumoseg.engine.datalist: a manifest split checked from file headers, every bad entry named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pneumoseg.data.rle import encode_siim_rle
from pneumoseg.engine.datalist import DatalistError, check_datalist


def _write_dicom(path: Path, rows: int, cols: int) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.set_pixel_data(np.zeros((rows, cols), np.uint16), "MONOCHROME2", 12)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _manifest(tmp_path: Path, training: list, validation: list | None = None) -> Path:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"data_root": ".", "training": training, "validation": validation or []}))
    return path


def test_check_datalist_accepts_good_entries(tmp_path: Path):
    _write_dicom(tmp_path / "a.dcm", 8, 6)
    mask = np.zeros((8, 6), bool)
    mask[2:4, 1:3] = True
    entry = {"image": "a.dcm", "label_rle": [encode_siim_rle(mask)], "has_pneumothorax": 1, "patient_hash": "h"}
    entries = check_datalist(_manifest(tmp_path, [entry]), "training")
    assert entries[0]["image"] == str(tmp_path / "a.dcm")
    assert entries[0]["label_rle"] == entry["label_rle"]


def test_check_datalist_names_bad_entries(tmp_path: Path):
    import nibabel as nib

    _write_dicom(tmp_path / "a.dcm", 8, 6)
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 3), np.int16), np.eye(4)), str(tmp_path / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 2), np.uint8), np.eye(4)), str(tmp_path / "ct_mask.nii.gz"))
    too_long = encode_siim_rle(np.ones((10, 6), bool))  # runs past an 8 x 6 image
    manifest = _manifest(
        tmp_path,
        [
            {"image": "a.dcm", "label_rle": ["-1"]},
            {"image": "missing.dcm", "label_rle": ["-1"]},
            {"image": "a.dcm", "label_rle": [too_long]},
            {"image": "ct.nii.gz", "label": "ct_mask.nii.gz"},
        ],
    )
    with pytest.raises(DatalistError) as err:
        check_datalist(manifest, "training")
    message = str(err.value)
    assert "3 bad manifest entries" in message
    assert "[training][1] missing.dcm: image file not found" in message
    assert "[training][2] a.dcm: label_rle does not fit the 8x6 image" in message
    assert "[training][3] ct.nii.gz: image shape (4, 5, 3) != label shape (4, 5, 2)" in message
    with pytest.raises(DatalistError, match="split 'validation' is empty"):
        check_datalist(manifest, "validation")
    with pytest.raises(DatalistError, match="no split 'test'"):
        check_datalist(manifest, "test")
    with pytest.raises(DatalistError, match="manifest not found"):
        check_datalist(tmp_path / "nope.json")


def test_split_smaller_than_one_training_batch_is_refused(tmp_path: Path):
    """The training loader drops incomplete batches: fewer entries than one batch would train zero steps."""
    from monai.bundle import ConfigParser

    _write_dicom(tmp_path / "a.dcm", 8, 6)
    entries = [{"image": "a.dcm", "label_rle": ["-1"]}] * 3
    manifest = _manifest(tmp_path, entries, entries)
    assert len(check_datalist(manifest, "training", min_batch=3)) == 3
    with pytest.raises(DatalistError, match="'training' has 3 entries, fewer than one training batch of 4"):
        check_datalist(manifest, "training", min_batch=4)

    # the bundle's training config passes its batch size; validation keeps incomplete batches and is not checked
    configs = Path(__file__).parents[1] / "bundles" / "pneumothorax_scse_unet" / "configs"
    parser = ConfigParser()
    parser.read_config(str(configs / "train.json"))
    parser.update({"datalist": str(manifest), "data_root": str(tmp_path), "batch_size": 8})
    assert len(parser.get_parsed_content("val_datalist")) == 3
    with pytest.raises(Exception) as err:  # MONAI wraps what the expression raised
        parser.get_parsed_content("train_datalist")
    assert isinstance(err.value.__cause__, DatalistError)
    assert "fewer than one training batch of 8" in str(err.value.__cause__)
