"""Tests for pneumoseg.data.manifest: patient-level splits, skipped-item reporting, MONAI datalist output."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pneumoseg.data.manifest import (
    Reason,
    build_csv_manifest,
    build_nifti_manifest,
    build_siim_manifest,
    hash_patient_id,
    load_manifest_split,
    resolve_salt,
    split_by_patient,
    write_manifest,
)
from pneumoseg.data.rle import encode_siim_rle, write_siim_csv

SPLITS = ("training", "validation", "test")
SIZE = 64


def _write_dicom(path: Path, sop_uid: str, patient_id: str, rows: int = SIZE, cols: int = SIZE) -> None:
    """Minimal valid CR DICOM file (explicit VR little endian) with a tiny gradient image."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = sop_uid
    ds.PatientID = patient_id
    ds.PatientName = f"Doe^{patient_id}"
    ds.Modality = "CR"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = (np.arange(rows * cols) % 256).astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _siim_dataset(root: Path, n_patients: int = 12, images_per_patient: int = 3, seed: int = 0):
    """SIIM layout under root; every other patient has pneumothorax in some of its images.

    Returns (dicom_dir, csv_path, {sop_uid: patient_id}, {patient_id: positive}).
    """
    rng = np.random.default_rng(seed)
    dicom_dir = root / "dicom-images-train"
    rows: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    positive: dict[str, bool] = {}
    for p in range(n_patients):
        patient = f"PAT{p:03d}"
        positive[patient] = p % 2 == 0
        for i in range(images_per_patient):
            uid = f"1.2.826.0.1.{p}.{i}"
            _write_dicom(dicom_dir / f"1.2.3.{p}.{i}" / f"1.2.4.{p}.{i}" / f"{uid}.dcm", uid, patient)
            owner[uid] = patient
            if positive[patient] and i == 0:
                mask = np.zeros((SIZE, SIZE), bool)
                r, c = rng.integers(5, 40, size=2)
                mask[r : r + 10, c : c + 8] = True
                rows[uid] = [encode_siim_rle(mask), encode_siim_rle(np.roll(mask, 15, axis=1))]
            else:
                rows[uid] = ["-1"]
    csv_path = root / "train-rle.csv"
    write_siim_csv(csv_path, rows)
    return dicom_dir, csv_path, owner, positive


def _uid_of(entry: dict) -> str:
    return Path(entry["image"]).name[: -len(".dcm")]


def test_siim_manifest_patients_never_straddle_splits(tmp_path):
    dicom_dir, csv_path, owner, positive = _siim_dataset(tmp_path, n_patients=20, images_per_patient=3)
    manifest, summary = build_siim_manifest(dicom_dir, csv_path, tmp_path, salt="s", folds=4, progress=False)
    assert summary.skipped == [] and summary.notes == []
    patients_in = {key: {owner[_uid_of(e)] for e in manifest[key]} for key in SPLITS}
    assert not patients_in["training"] & patients_in["validation"]
    assert not patients_in["training"] & patients_in["test"]
    assert not patients_in["validation"] & patients_in["test"]
    assert set().union(*patients_in.values()) == set(positive)
    assert sum(len(manifest[k]) for k in SPLITS) == 60
    # every image of a patient is in that patient's split
    for key in SPLITS:
        for patient in patients_in[key]:
            assert sum(owner[_uid_of(e)] == patient for e in manifest[key]) == 3
    # folds partition training + validation by patient; test is in no fold
    fold_patients = [{owner[_uid_of(e)] for e in manifest[f"fold_{i}"]} for i in range(4)]
    assert set().union(*fold_patients) == patients_in["training"] | patients_in["validation"]
    assert sum(len(f) for f in fold_patients) == len(set().union(*fold_patients))
    assert "fold_4" not in manifest


def test_siim_entries_labels_and_hashes(tmp_path):
    dicom_dir, csv_path, owner, positive = _siim_dataset(tmp_path, n_patients=4, images_per_patient=2)
    manifest, _ = build_siim_manifest(dicom_dir, csv_path, tmp_path, salt="pepper", progress=False)
    entries = [e for k in SPLITS for e in manifest[k]]
    text = json.dumps(manifest)
    for entry in entries:
        uid = _uid_of(entry)
        assert set(entry) == {"image", "label_rle", "has_pneumothorax", "patient_hash"}
        assert not Path(entry["image"]).is_absolute() and (tmp_path / entry["image"]).is_file()
        assert entry["has_pneumothorax"] == int(entry["label_rle"] != ["-1"])
        assert entry["has_pneumothorax"] == int(positive[owner[uid]] and uid.endswith(".0"))
        assert entry["patient_hash"] == hash_patient_id(owner[uid], "pepper")
        assert len(entry["label_rle"]) in (1, 2)
    for patient in positive:  # no raw ids or names in the manifest
        assert patient not in text and f"Doe^{patient}" not in text
    assert hash_patient_id("PAT000", "a") != hash_patient_id("PAT000", "b")


def test_stratification_roughly_holds():
    patients = {f"p{i}": i < 40 for i in range(200)}  # 20 % positive
    split, fold = split_by_patient(patients, val_fraction=0.15, test_fraction=0.15, folds=5, seed=3)
    for name, expected in (("training", 140), ("validation", 30), ("test", 30)):
        members = [p for p, s in split.items() if s == name]
        assert len(members) == expected
        assert sum(patients[p] for p in members) / len(members) == pytest.approx(0.2, abs=0.01)
    for i in range(5):
        members = [p for p, f in fold.items() if f == i]
        assert len(members) == 34
        assert 6 <= sum(patients[p] for p in members) <= 8
    assert set(fold) == {p for p, s in split.items() if s != "test"}


def test_split_is_deterministic_and_seed_dependent():
    patients = {f"p{i}": i % 3 == 0 for i in range(60)}
    reversed_input = dict(reversed(list(patients.items())))
    assert split_by_patient(patients, seed=1) == split_by_patient(reversed_input, seed=1)
    assert split_by_patient(patients, seed=1) != split_by_patient(patients, seed=2)
    with pytest.raises(ValueError, match="val"):
        split_by_patient(patients, val_fraction=0.6, test_fraction=0.5)


def test_same_seed_same_manifest_file(tmp_path):
    dicom_dir, csv_path, _, _ = _siim_dataset(tmp_path, n_patients=8, images_per_patient=2)
    outs = []
    for name in ("a.json", "b.json"):
        manifest, summary = build_siim_manifest(
            dicom_dir, csv_path, tmp_path, salt="x", seed=7, progress=False
        )
        write_manifest(manifest, tmp_path / name, summary)
        outs.append((tmp_path / name).read_text())
    assert outs[0] == outs[1]
    other, _ = build_siim_manifest(dicom_dir, csv_path, tmp_path, salt="x", seed=8, progress=False)
    assert [e["image"] for e in other["test"]] != [e["image"] for e in json.loads(outs[0])["test"]]


def test_every_skipped_item_reported_with_reason(tmp_path):
    dicom_dir, csv_path, owner, _ = _siim_dataset(tmp_path, n_patients=4, images_per_patient=2)
    rows = {uid: ["-1"] for uid in owner}
    # image without CSV row
    del rows["1.2.826.0.1.0.0"]
    # CSV row without image
    rows["9.9.9"] = ["-1"]
    # RLE running past the end of its 64x64 image
    rows["1.2.826.0.1.1.0"] = [f"{SIZE * SIZE - 3} 5"]
    # malformed RLE
    rows["1.2.826.0.1.1.1"] = ["1 2 3"]
    write_siim_csv(csv_path, rows)
    # unreadable file
    (dicom_dir / "broken").mkdir()
    (dicom_dir / "broken" / "junk.dcm").write_bytes(b"not a dicom file")
    # duplicate SOPInstanceUID in a second file
    _write_dicom(dicom_dir / "dup" / "copy.dcm", "1.2.826.0.1.2.0", "PAT002")
    manifest, summary = build_siim_manifest(dicom_dir, csv_path, tmp_path, salt="s", progress=False)
    reasons = {(s.item.split("/")[-1], s.reason) for s in summary.skipped}
    assert reasons == {
        ("1.2.826.0.1.0.0.dcm", Reason.IMAGE_WITHOUT_LABEL),
        ("9.9.9", Reason.LABEL_WITHOUT_IMAGE),
        ("1.2.826.0.1.1.0.dcm", Reason.MASK_SIZE_MISMATCH),
        ("1.2.826.0.1.1.1.dcm", Reason.INVALID_RLE),
        ("junk.dcm", Reason.UNREADABLE_FILE),
        ("copy.dcm", Reason.DUPLICATE_IMAGE),
    }
    size_issue = next(s for s in summary.skipped if s.reason == Reason.MASK_SIZE_MISMATCH)
    assert "by 2 pixels" in size_issue.detail
    # copy.dcm's name differs from its SOPInstanceUID: noted (and then skipped as duplicate)
    assert [n.reason for n in summary.notes] == [Reason.NOTE_UID_STEM_MISMATCH]
    kept = sum(len(manifest[k]) for k in SPLITS)
    assert kept == 8 - 3 and summary.scanned == 10
    # summary file: counts per reason + every item
    out = tmp_path / "m" / "siim.json"
    write_manifest(manifest, out, summary)
    written = json.loads(out.with_suffix(".summary.json").read_text())
    assert written["skipped_counts"] == dict(Counter(r for _, r in reasons))
    assert len(written["skipped"]) == 6
    text = summary.format()
    for _, reason in reasons:
        assert reason in text


def test_load_decathlon_datalist_default_and_custom_root(tmp_path):
    from monai.data import load_decathlon_datalist

    data = tmp_path / "data"
    dicom_dir, csv_path, _, _ = _siim_dataset(data, n_patients=6, images_per_patient=2)
    # data root = the manifest's folder: MONAI's default base_dir works
    out = data / "siim.json"
    manifest, summary = build_siim_manifest(dicom_dir, csv_path, data, salt="s", folds=3, progress=False)
    write_manifest(manifest, out, summary)
    stored = json.loads(out.read_text())
    assert stored["data_root"] == "." and stored["seed"] == 0 and "generated_by" in stored
    for key in (*SPLITS, "fold_0", "fold_1", "fold_2"):
        items = load_decathlon_datalist(str(out), data_list_key=key)
        assert len(items) == len(stored[key])
        for item in items:
            assert Path(item["image"]).is_file()
            assert isinstance(item["label_rle"], list)  # not turned into a path
    # data root elsewhere: base_dir from the manifest's data_root
    out2 = tmp_path / "manifests" / "siim.json"
    manifest, summary = build_siim_manifest(dicom_dir, csv_path, data, salt="s", progress=False)
    write_manifest(manifest, out2, summary)
    assert json.loads(out2.read_text())["data_root"] == "../data"
    items = load_decathlon_datalist(str(out2), data_list_key="training", base_dir=str(data))
    assert items and all(Path(i["image"]).is_file() for i in items)
    assert [i["image"] for i in load_manifest_split(out2, "training")] == [i["image"] for i in items]


def test_salt_side_file(tmp_path):
    out = tmp_path / "m.json"
    assert resolve_salt(out, "given") == "given" and not (tmp_path / "m.salt").exists()
    salt = resolve_salt(out)
    assert (tmp_path / "m.salt").read_text().strip() == salt and len(salt) >= 32
    assert resolve_salt(out) == salt  # reused, so hashes stay stable


def _nifti(path: Path, data: np.ndarray) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def test_nifti_manifest_pairs_and_reports(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    shape = (8, 9, 4)
    for i in range(6):
        _nifti(images / f"pt{i // 2}_scan{i % 2}.nii.gz", np.zeros(shape, np.float32))
        mask = np.zeros(shape, np.uint8)
        if i % 2:
            mask[2:4, 3:5, 1] = 1
        name = f"pt{i // 2}_scan{i % 2}" + ("_seg" if i < 3 else "")
        _nifti(labels / f"{name}.nii.gz", mask)
    _nifti(images / "pt9_scan0.nii.gz", np.zeros(shape, np.float32))  # no label
    _nifti(labels / "orphan_seg.nii.gz", np.zeros(shape, np.uint8))  # no image
    _nifti(images / "pt8_scan0.nii.gz", np.zeros(shape, np.float32))
    _nifti(labels / "pt8_scan0.nii.gz", np.zeros((8, 9, 5), np.uint8))  # size mismatch
    (images / "pt7_scan0.nii.gz").write_bytes(b"garbage")
    _nifti(labels / "pt7_scan0.nii.gz", np.zeros(shape, np.uint8))  # image unreadable
    manifest, summary = build_nifti_manifest(
        images, labels, tmp_path, salt="s", patient_regex=r"^(pt\d+)_", folds=0, progress=False
    )
    entries = {Path(e["image"]).name: e for k in SPLITS for e in manifest[k]}
    assert len(entries) == 6
    assert entries["pt0_scan1.nii.gz"]["has_pneumothorax"] == 1
    assert entries["pt0_scan0.nii.gz"]["has_pneumothorax"] == 0
    assert entries["pt0_scan0.nii.gz"]["label"] == "labels/pt0_scan0_seg.nii.gz"
    assert entries["pt2_scan1.nii.gz"]["label"] == "labels/pt2_scan1.nii.gz"
    assert entries["pt0_scan0.nii.gz"]["patient_hash"] == entries["pt0_scan1.nii.gz"]["patient_hash"]
    assert not any(k.startswith("fold_") for k in manifest)
    reasons = {(Path(s.item).name, s.reason) for s in summary.skipped}
    assert reasons == {
        ("pt9_scan0.nii.gz", Reason.IMAGE_WITHOUT_LABEL),
        ("orphan_seg.nii.gz", Reason.LABEL_WITHOUT_IMAGE),
        ("pt8_scan0.nii.gz", Reason.MASK_SIZE_MISMATCH),
        ("pt7_scan0.nii.gz", Reason.UNREADABLE_FILE),
    }
    # the patient regex keeps a patient's scans together
    for key in SPLITS:
        hashes = {e["patient_hash"] for e in manifest[key]}
        for other in set(SPLITS) - {key}:
            assert not hashes & {e["patient_hash"] for e in manifest[other]}


def test_csv_manifest(tmp_path):
    from PIL import Image

    for i in range(4):
        Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / f"img{i}.png")
        mask = np.zeros((10, 12) if i < 3 else (10, 13), np.uint8)
        mask[2, 3] = 255 * (i % 2)
        Image.fromarray(mask).save(tmp_path / f"mask{i}.png")
    lines = ["image,label,patient_id"] + [f"img{i}.png,mask{i}.png,P{i // 2}" for i in range(4)]
    lines.append("img_missing.png,mask0.png,P5")
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    manifest, summary = build_csv_manifest(tmp_path / "list.csv", tmp_path, salt="s", progress=False)
    entries = {e["image"]: e for k in SPLITS for e in manifest[k]}
    assert set(entries) == {"img0.png", "img1.png", "img2.png"}
    assert entries["img1.png"]["has_pneumothorax"] == 1 and entries["img0.png"]["has_pneumothorax"] == 0
    assert {(s.item, s.reason) for s in summary.skipped} == {
        ("list.csv:5", Reason.MASK_SIZE_MISMATCH),
        ("list.csv:6", Reason.MISSING_FILE),
    }


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pneumoseg", "manifest", *args], cwd=cwd, capture_output=True, text=True
    )


def test_cli_help_explains_every_option(tmp_path):
    result = _cli("siim", "--help", cwd=tmp_path)
    assert result.returncode == 0
    for option in (
        "--dicom-dir", "--rle-csv", "--out", "--data-root", "--val-fraction", "--test-fraction",
        "--folds", "--seed", "--salt", "--no-progress", "--strict",
    ):  # fmt: skip
        assert option in result.stdout
    # every option of every source has a help text
    import argparse

    from pneumoseg.cli import build_parser

    def subparsers_of(parser):
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return action.choices

    sources = subparsers_of(subparsers_of(build_parser(only="manifest"))["manifest"])
    assert set(sources) == {"siim", "nifti", "csv"}
    for source_parser in sources.values():
        for action in source_parser._actions:
            assert action.help and len(action.help) > 10, (source_parser.prog, action.dest)
    for source in ("nifti", "csv"):
        assert _cli(source, "--help", cwd=tmp_path).returncode == 0


def test_cli_siim_run(tmp_path):
    dicom_dir, csv_path, owner, _ = _siim_dataset(tmp_path, n_patients=6, images_per_patient=2)
    out = tmp_path / "manifests" / "siim.json"
    args = ("siim", "--dicom-dir", str(dicom_dir), "--rle-csv", str(csv_path), "--out", str(out))
    result = _cli(*args, "--data-root", str(tmp_path), "--folds", "3", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "skipped: 0" in result.stdout
    manifest = json.loads(out.read_text())
    assert sum(len(manifest[k]) for k in SPLITS) == 12
    assert {"fold_0", "fold_1", "fold_2", "data_root", "seed", "generated_by"} <= set(manifest)
    salt = (tmp_path / "manifests" / "siim.salt").read_text().strip()
    assert salt not in out.read_text()
    hashes = {e["patient_hash"] for k in SPLITS for e in manifest[k]}
    assert hashes == {hash_patient_id(p, salt) for p in set(owner.values())}
    assert json.loads(out.with_suffix(".summary.json").read_text())["skipped"] == []
    # a skipped item: reported, exit 0; with --strict exit 1
    (dicom_dir / "junk.dcm").write_bytes(b"junk")
    result = _cli(*args, "--data-root", str(tmp_path), "--no-progress", cwd=tmp_path)
    assert result.returncode == 0 and "unreadable_file: 1" in result.stdout
    result = _cli(*args, "--data-root", str(tmp_path), "--no-progress", "--strict", cwd=tmp_path)
    assert result.returncode == 1


@pytest.mark.parametrize("n_pos, n_neg", [(3, 3), (1, 5), (0, 4), (2, 1)])
def test_small_cohorts_get_every_split(n_pos, n_neg):
    patients = {**{f"pos{i}": True for i in range(n_pos)}, **{f"neg{i}": False for i in range(n_neg)}}
    split, fold = split_by_patient(patients, val_fraction=0.15, test_fraction=0.15, folds=2, seed=0)
    assert set(split) == set(patients)
    # empty "test" would make monai.data.load_decathlon_datalist fail, so each split gets a patient
    assert Counter(split.values()) == {"training": len(patients) - 2, "validation": 1, "test": 1}
    assert set(fold.values()) == {0, 1}
    assert split_by_patient({}, folds=2) == ({}, {})
