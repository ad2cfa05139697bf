"""Patient-level train/validation/test/fold manifests (MONAI datalist JSON) and ``pneumoseg manifest``.

Sources: the SIIM-ACR layout (DICOM radiographs + RLE CSV), paired NIfTI image/label folders, and a
generic ``image,label[,patient_id]`` CSV. Every manifest entry carries the image path relative to the
data root, its label (``label_rle`` rows for SIIM, a ``label`` mask path otherwise), ``has_pneumothorax``
and ``patient_hash`` (salted SHA-256 of the patient id; raw ids and names never enter a manifest).

Splits are by patient (one patient's images never straddle splits), stratified by pneumothorax at the
patient level (positive if any image is), and deterministic for a seed: they depend only on the seed and
the patient ids, not on the salt or the file-system order. ``fold_0..fold_{k-1}`` partition the
training + validation patients (again by patient, stratified); ``test`` is never in a fold.

Nothing is dropped silently: every skipped item is recorded with its reason in a
:class:`ManifestSummary`, printed and written beside the manifest as ``<manifest>.summary.json``.
See ``docs/data.md`` (Manifests).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pneumoseg import __version__
from pneumoseg.data.rle import read_siim_csv, validate_siim_rle

__all__ = [
    "Reason",
    "SkippedItem",
    "ManifestRecord",
    "ManifestSummary",
    "hash_patient_id",
    "resolve_salt",
    "split_by_patient",
    "assemble_manifest",
    "build_siim_manifest",
    "build_nifti_manifest",
    "build_csv_manifest",
    "write_manifest",
    "summary_path_for",
    "salt_path_for",
    "manifest_base_dir",
    "load_manifest_split",
    "add_subcommand",
    "run",
]

SPLIT_KEYS = ("training", "validation", "test")
_EPILOG = (
    "Writes OUT (keys training, validation, test, fold_0..fold_{k-1}, data_root, seed, generated_by), "
    "OUT with suffix .summary.json (skipped items with reasons) and, unless --salt is given, the salt in "
    "OUT with suffix .salt (keep it private; reused on the next run). Entries: image (relative to the "
    "data root), label_rle (siim) or label, has_pneumothorax, patient_hash."
)


class Reason:
    """Why an item was left out of a manifest (or, for ``NOTE_*``, kept but worth a look)."""

    UNREADABLE_FILE = "unreadable_file"
    IMAGE_WITHOUT_LABEL = "image_without_label"  # SIIM: no CSV row for the image's ImageId
    LABEL_WITHOUT_IMAGE = "label_without_image"  # SIIM: CSV rows for an ImageId without a DICOM file
    MASK_SIZE_MISMATCH = "mask_size_mismatch"  # RLE runs past the image end; label shape != image shape
    INVALID_RLE = "invalid_rle"  # malformed RLE (odd token count, negative, non-integer, blank)
    DUPLICATE_IMAGE = "duplicate_image"  # duplicate SOPInstanceUID / image path; the first is kept
    MISSING_PATIENT_ID = "missing_patient_id"  # cannot split by patient without one
    MISSING_FILE = "missing_file"  # generic CSV: listed path does not exist
    # kept in the manifest, reported so that a wrong assumption does not go unnoticed
    NOTE_UID_STEM_MISMATCH = "note_sop_uid_differs_from_file_name"
    NOTE_NO_SOP_UID = "note_no_sop_uid_used_file_name"
    NOTE_SIZE_NOT_CHECKED = "note_label_size_not_checked"
    NOTE_NO_PATIENT_COLUMN = "note_no_patient_id_column"  # generic CSV: one patient per image


@dataclass
class SkippedItem:
    """One reported item: ``item`` names the file / ImageId / CSV line, ``reason`` is a :class:`Reason`."""

    item: str
    reason: str
    detail: str = ""


@dataclass
class ManifestSummary:
    """What went into a manifest and what did not (and why)."""

    source: str
    scanned: int = 0
    skipped: list[SkippedItem] = field(default_factory=list)
    notes: list[SkippedItem] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> images/positives/patients

    def skip(self, item: str | Path, reason: str, detail: str = "") -> None:
        self.skipped.append(SkippedItem(str(item), reason, detail))

    def note(self, item: str | Path, reason: str, detail: str = "") -> None:
        self.notes.append(SkippedItem(str(item), reason, detail))

    def skipped_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(s.reason for s in self.skipped).items()))

    def note_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(s.reason for s in self.notes).items()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "scanned": self.scanned,
            "counts": self.counts,
            "skipped_counts": self.skipped_counts(),
            "note_counts": self.note_counts(),
            "skipped": [vars(s) for s in self.skipped],
            "notes": [vars(s) for s in self.notes],
        }

    def format(self, max_items: int = 10) -> str:
        """Human-readable summary; lists up to ``max_items`` items per reason (all are in the JSON)."""
        lines = [f"manifest ({self.source}): scanned {self.scanned} items"]
        for split, c in self.counts.items():
            lines.append(
                f"  {split:<11} {c['images']:>6} images {c['positives']:>6} with pneumothorax "
                f"{c['patients']:>6} patients"
            )
        for title, items, counts in (
            ("skipped", self.skipped, self.skipped_counts()),
            ("notes (kept)", self.notes, self.note_counts()),
        ):
            lines.append(f"  {title}: {len(items)}")
            for reason, n in counts.items():
                lines.append(f"    {reason}: {n}")
                for s in [s for s in items if s.reason == reason][:max_items]:
                    lines.append(f"      {s.item}" + (f" ({s.detail})" if s.detail else ""))
                if n > max_items:
                    lines.append(f"      ... {n - max_items} more in the summary JSON")
        return "\n".join(lines)


@dataclass
class ManifestRecord:
    """A manifest entry before splitting; ``patient_id`` is raw and never written out."""

    entry: dict[str, Any]
    patient_id: str


# ------------------------------------------------------------------------------------ patient hashing


def hash_patient_id(patient_id: str, salt: str) -> str:
    """Salted SHA-256 (hex) of a patient id: stable within a data set, not reversible without the salt."""
    return hashlib.sha256(f"{salt}\x00{patient_id}".encode()).hexdigest()


def salt_path_for(manifest_path: str | Path) -> Path:
    """Side file holding a generated salt: ``M.json`` -> ``M.salt`` (kept out of the manifest)."""
    return Path(manifest_path).with_suffix(".salt")


def resolve_salt(manifest_path: str | Path, salt: str | None = None) -> str:
    """Return ``salt`` if given, else the salt stored beside the manifest, else a new random one (stored).

    Reusing the stored salt keeps ``patient_hash`` stable when a manifest is regenerated.
    """
    if salt:
        return salt
    side = salt_path_for(manifest_path)
    if side.exists():
        stored = side.read_text().strip()
        if not stored:
            raise ValueError(f"{side}: salt file is empty")
        return stored
    new = secrets.token_hex(16)
    side.parent.mkdir(parents=True, exist_ok=True)
    side.write_text(new + "\n")
    os.chmod(side, 0o600)  # the salt is what makes the hashes non-reversible
    return new


# ------------------------------------------------------------------------------------------- splitting


def split_by_patient(
    patient_positive: Mapping[str, bool],
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    folds: int = 5,
    seed: int = 0,
) -> tuple[dict[str, str], dict[str, int]]:
    """Assign patients to splits and folds, stratified by patient-level pneumothorax.

    ``round(N * fraction)`` of the N patients go to ``test`` / ``validation`` (at least one each when the
    fraction is > 0 and N >= 3, because ``monai.data.load_decathlon_datalist`` fails on an empty
    ``test`` list), shared between the positive and negative strata in proportion to their size
    (largest remainder). Within each stratum the patients are sorted, shuffled with
    ``numpy.random.default_rng(seed)`` and taken in that order: test, validation, then training.
    Training + validation patients are then dealt round-robin into ``folds`` folds (the count runs on
    across strata so fold sizes stay balanced); ``folds < 2`` makes no folds.

    Returns:
        (patient -> split name, patient -> fold index for training + validation patients).
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"need 0 <= fractions and val + test < 1, got val={val_fraction}, test={test_fraction}")
    rng = np.random.default_rng(seed)
    strata = [sorted(p for p, pos in patient_positive.items() if bool(pos) == positive) for positive in (1, 0)]
    sizes = np.array([len(s) for s in strata])
    n_total = int(sizes.sum())
    per_stratum = {}
    for name, fraction in (("test", test_fraction), ("validation", val_fraction)):
        target = int(round(n_total * fraction))
        if fraction > 0 and n_total >= 3:
            target = max(target, 1)
        per_stratum[name] = _share(target, sizes)
    split: dict[str, str] = {}
    fold: dict[str, int] = {}
    dealt = 0
    for k, stratum in enumerate(strata):
        order = [stratum[i] for i in rng.permutation(len(stratum))]
        n_test, n_val = per_stratum["test"][k], per_stratum["validation"][k]
        for i, patient in enumerate(order):
            split[patient] = "test" if i < n_test else "validation" if i < n_test + n_val else "training"
        if folds >= 2:
            for patient in [order[i] for i in rng.permutation(len(order))]:
                if split[patient] != "test":
                    fold[patient] = dealt % folds
                    dealt += 1
    return split, fold


def _share(target: int, sizes: np.ndarray) -> list[int]:
    """Split ``target`` over strata in proportion to ``sizes`` (largest remainder; ties to the larger)."""
    if sizes.sum() == 0:
        return [0] * len(sizes)
    exact = target * sizes / sizes.sum()
    counts = np.floor(exact).astype(int)
    by_remainder = sorted(range(len(sizes)), key=lambda i: (counts[i] - exact[i], -sizes[i]))
    for i in by_remainder[: target - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]


def assemble_manifest(
    records: Sequence[ManifestRecord],
    summary: ManifestSummary,
    data_root: str | Path,
    salt: str,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    folds: int = 5,
    seed: int = 0,
    generated_by: str = "",
) -> dict[str, Any]:
    """Split records by patient and build the datalist dict (also fills ``summary.counts``)."""
    patient_positive: dict[str, bool] = {}
    for r in records:
        patient_positive[r.patient_id] = patient_positive.get(r.patient_id, False) or bool(r.entry["has_pneumothorax"])
    split, fold = split_by_patient(patient_positive, val_fraction, test_fraction, folds, seed)
    fold_keys = [f"fold_{i}" for i in range(folds)] if folds >= 2 else []
    manifest: dict[str, Any] = {
        "description": "pneumoseg manifest: splits by patient, stratified by patient-level pneumothorax",
        "generated_by": generated_by or f"pneumoseg {__version__}",
        "data_root": str(Path(data_root).resolve()),
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "folds": len(fold_keys),
    }
    for key in (*SPLIT_KEYS, *fold_keys):
        manifest[key] = []
    patients: dict[str, set[str]] = {key: set() for key in (*SPLIT_KEYS, *fold_keys)}
    # entries sorted by image path so that the file is the same whatever order the disk walk gave
    for r in sorted(records, key=lambda r: r.entry["image"]):
        entry = {**r.entry, "patient_hash": hash_patient_id(r.patient_id, salt)}
        keys = [split[r.patient_id]] + ([f"fold_{fold[r.patient_id]}"] if r.patient_id in fold else [])
        for key in keys:
            manifest[key].append(entry)
            patients[key].add(r.patient_id)
    summary.counts = {
        key: {
            "images": len(manifest[key]),
            "positives": sum(e["has_pneumothorax"] for e in manifest[key]),
            "patients": len(patients[key]),
        }
        for key in (*SPLIT_KEYS, *fold_keys)
    }
    return manifest


def _relative(path: Path, data_root: Path) -> str:
    # os.path.relpath (not Path.relative_to) so that images outside the root still get a working "../" path
    return Path(os.path.relpath(path.resolve(), data_root.resolve())).as_posix()


def _progress(items: Iterable[Any], desc: str, enabled: bool, total: int | None = None) -> Iterable[Any]:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, unit="file", file=sys.stderr, mininterval=0.5)


# ------------------------------------------------------------------------------------------------ SIIM


def build_siim_manifest(
    dicom_dir: str | Path,
    rle_csv: str | Path,
    data_root: str | Path,
    salt: str,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    folds: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, Any], ManifestSummary]:
    """Manifest for the SIIM-ACR layout ``<dicom_dir>/<study>/<series>/<SOPInstanceUID>.dcm`` + RLE CSV.

    Every ``*.dcm`` under ``dicom_dir`` is read header-only (``stop_before_pixels``); ImageId is the
    header's SOPInstanceUID (the file stem only if that is missing; a difference is noted). The RLE rows
    of each image are checked against its Rows x Columns. Entries: ``{"image", "label_rle": [rows],
    "has_pneumothorax", "patient_hash"}``.
    """
    import pydicom

    dicom_dir, data_root = Path(dicom_dir), Path(data_root)
    if not dicom_dir.is_dir():
        raise FileNotFoundError(f"DICOM directory not found: {dicom_dir}")
    rle_rows = read_siim_csv(rle_csv)
    summary = ManifestSummary(source=f"siim: {dicom_dir} + {rle_csv}")
    files = sorted(p for p in dicom_dir.rglob("*") if p.suffix.lower() == ".dcm" and p.is_file())
    summary.scanned = len(files)
    seen: dict[str, Path] = {}
    records: list[ManifestRecord] = []
    for path in _progress(files, "reading DICOM headers", progress):
        rel = _relative(path, data_root)
        try:
            ds = pydicom.dcmread(
                path,
                stop_before_pixels=True,
                specific_tags=["SOPInstanceUID", "PatientID", "Rows", "Columns"],
            )
            rows, cols = int(ds.Rows), int(ds.Columns)
        except Exception as err:  # noqa: BLE001 - any unreadable file is reported, not fatal
            summary.skip(rel, Reason.UNREADABLE_FILE, f"{type(err).__name__}: {err}")
            continue
        image_id = str(ds.get("SOPInstanceUID", "") or "").strip()
        if not image_id:
            image_id = path.stem
            summary.note(rel, Reason.NOTE_NO_SOP_UID, f"ImageId taken from file name {image_id}")
        elif image_id != path.stem:
            summary.note(rel, Reason.NOTE_UID_STEM_MISMATCH, f"SOPInstanceUID {image_id} used as ImageId")
        if image_id in seen:
            summary.skip(rel, Reason.DUPLICATE_IMAGE, f"SOPInstanceUID {image_id} also in {seen[image_id]}")
            continue
        seen[image_id] = Path(rel)
        patient_id = str(ds.get("PatientID", "") or "").strip()
        if not patient_id:
            summary.skip(rel, Reason.MISSING_PATIENT_ID, f"ImageId {image_id}")
            continue
        if image_id not in rle_rows:
            summary.skip(rel, Reason.IMAGE_WITHOUT_LABEL, f"no row for ImageId {image_id} in {rle_csv}")
            continue
        try:
            area = validate_siim_rle(rle_rows[image_id], rows, cols)
        except ValueError as err:
            reason = Reason.MASK_SIZE_MISMATCH if "past the end" in str(err) else Reason.INVALID_RLE
            summary.skip(rel, reason, f"ImageId {image_id}: {err}")
            continue
        entry = {"image": rel, "label_rle": list(rle_rows[image_id]), "has_pneumothorax": int(area > 0)}
        records.append(ManifestRecord(entry, patient_id))
    for image_id in rle_rows:
        if image_id not in seen:
            summary.skip(image_id, Reason.LABEL_WITHOUT_IMAGE, f"CSV rows in {rle_csv}, no DICOM file")
    manifest = assemble_manifest(
        records,
        summary,
        data_root,
        salt,
        val_fraction,
        test_fraction,
        folds,
        seed,
        generated_by=f"pneumoseg {__version__} manifest siim",
    )
    return manifest, summary


# ----------------------------------------------------------------------------------------------- NIfTI

_NIFTI_SUFFIXES = (".nii.gz", ".nii")
DEFAULT_LABEL_SUFFIXES = ("", "_seg", "_label", "_mask")


def _nifti_stem(path: Path) -> str | None:
    name = path.name
    for suffix in _NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _patient_from_stem(stem: str, pattern: re.Pattern[str] | None) -> str | None:
    """Patient id = the ``patient`` named group, else group 1, else the whole match; the stem if no regex."""
    if pattern is None:
        return stem
    m = pattern.search(stem)
    if m is None:
        return None
    if "patient" in pattern.groupindex:
        return m.group("patient")
    return m.group(1) if pattern.groups else m.group(0)


def _label_positive_and_shape(path: Path) -> tuple[bool, tuple[int, ...], str]:
    """(any positive voxel/pixel, shape in the kind's own order, kind) of a mask file."""
    if _nifti_stem(path) is not None:
        import nibabel as nib

        img = nib.load(str(path))
        return bool(np.any(np.asanyarray(img.dataobj) > 0)), _squeeze_shape(img.shape), "nifti"
    if path.suffix.lower() == ".dcm":
        import pydicom

        arr = pydicom.dcmread(path).pixel_array
        return bool(np.any(arr > 0)), tuple(arr.shape[:2]), "raster"
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im)
    return bool(np.any(arr > 0)), tuple(arr.shape[:2]), "raster"


def _image_shape(path: Path) -> tuple[tuple[int, ...], str]:
    """Shape from the header only: NIfTI (I, J[, K]); DICOM (Rows, Columns); raster images (H, W)."""
    if _nifti_stem(path) is not None:
        import nibabel as nib

        return _squeeze_shape(nib.load(str(path)).shape), "nifti"
    if path.suffix.lower() == ".dcm":
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
        return (int(ds.Rows), int(ds.Columns)), "raster"
    from PIL import Image

    with Image.open(path) as im:
        return (im.height, im.width), "raster"


def _squeeze_shape(shape: Sequence[int]) -> tuple[int, ...]:
    # a trailing singleton (2D slice saved as [I, J, 1], or a 4th dim of 1) is not a different size
    shape = tuple(int(s) for s in shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _check_pair(image: Path, label: Path, rel: str, summary: ManifestSummary) -> int | None:
    """``has_pneumothorax`` of a checked image/label pair, or None (reported in ``summary``)."""
    for p in (image, label):
        if not p.is_file():
            summary.skip(rel, Reason.MISSING_FILE, f"{p} does not exist")
            return None
    try:
        image_shape, image_kind = _image_shape(image)
    except Exception as err:  # noqa: BLE001 - reported, not fatal
        summary.skip(rel, Reason.UNREADABLE_FILE, f"image {image}: {type(err).__name__}: {err}")
        return None
    try:
        positive, label_shape, label_kind = _label_positive_and_shape(label)
    except Exception as err:  # noqa: BLE001
        summary.skip(rel, Reason.UNREADABLE_FILE, f"label {label}: {type(err).__name__}: {err}")
        return None
    if image_kind == label_kind:
        if image_shape != label_shape:
            summary.skip(rel, Reason.MASK_SIZE_MISMATCH, f"image {image_shape} vs label {label_shape} ({label})")
            return None
    else:
        # NIfTI axes are (column, row, ...) while DICOM/PNG are (row, column): not comparable without
        # orientation handling, which belongs to the readers
        summary.note(rel, Reason.NOTE_SIZE_NOT_CHECKED, f"{image_kind} image with {label_kind} label")
    return int(positive)


def build_nifti_manifest(
    images_dir: str | Path,
    labels_dir: str | Path,
    data_root: str | Path,
    salt: str,
    patient_regex: str | None = None,
    label_suffixes: Sequence[str] = DEFAULT_LABEL_SUFFIXES,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    folds: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, Any], ManifestSummary]:
    """Manifest for NIfTI images and masks paired by file name.

    The label of ``<images_dir>/.../case_001.nii.gz`` is the first of ``<labels_dir>/.../case_001<suffix>``
    (``.nii.gz`` or ``.nii``) for ``suffix`` in ``label_suffixes`` (same relative sub-folder). Patient id
    = ``patient_regex`` applied to the file stem (named group ``patient``, else group 1, else the match),
    or the stem. ``has_pneumothorax`` = the label has a voxel > 0. Entries: ``{"image", "label",
    "has_pneumothorax", "patient_hash"}``.
    """
    images_dir, labels_dir, data_root = Path(images_dir), Path(labels_dir), Path(data_root)
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"directory not found: {d}")
    pattern = re.compile(patient_regex) if patient_regex else None
    summary = ManifestSummary(source=f"nifti: {images_dir} + {labels_dir}")
    same_dir = images_dir.resolve() == labels_dir.resolve()
    if same_dir:
        # images and masks in one folder: a file whose stem ends with a label suffix is a mask, and a file
        # cannot be its own mask
        label_suffixes = [s for s in label_suffixes if s]
    labels: dict[tuple[str, str], Path] = {}  # (sub-folder, stem) -> label file
    for p in sorted(labels_dir.rglob("*")):
        stem = _nifti_stem(p)
        if stem is not None and p.is_file():
            labels[(p.parent.relative_to(labels_dir).as_posix(), stem)] = p
    images: list[tuple[Path, str]] = []
    for p in sorted(images_dir.rglob("*")):
        stem = _nifti_stem(p)
        if stem is not None and p.is_file() and not (same_dir and any(stem.endswith(s) for s in label_suffixes)):
            images.append((p, stem))
    summary.scanned = len(images)
    used: set[Path] = set()
    records: list[ManifestRecord] = []
    for image, stem in _progress(images, "reading NIfTI", progress):
        rel = _relative(image, data_root)
        sub = image.parent.relative_to(images_dir).as_posix()
        label = next((labels[(sub, stem + s)] for s in label_suffixes if (sub, stem + s) in labels), None)
        if label is None:
            tried = ", ".join(f"{stem}{s}.nii[.gz]" for s in label_suffixes)
            summary.skip(rel, Reason.IMAGE_WITHOUT_LABEL, f"none of {tried} in {labels_dir / sub}")
            continue
        used.add(label)
        patient_id = _patient_from_stem(stem, pattern)
        if not patient_id:
            summary.skip(rel, Reason.MISSING_PATIENT_ID, f"--patient-regex {patient_regex!r} does not match")
            continue
        positive = _check_pair(image, label, rel, summary)
        if positive is None:
            continue
        entry = {"image": rel, "label": _relative(label, data_root), "has_pneumothorax": positive}
        records.append(ManifestRecord(entry, patient_id))
    image_files = {p for p, _ in images}
    for label in labels.values():
        if label not in used and label not in image_files:
            summary.skip(_relative(label, data_root), Reason.LABEL_WITHOUT_IMAGE, "no image of that name")
    manifest = assemble_manifest(
        records,
        summary,
        data_root,
        salt,
        val_fraction,
        test_fraction,
        folds,
        seed,
        generated_by=f"pneumoseg {__version__} manifest nifti",
    )
    return manifest, summary


# ------------------------------------------------------------------------------------------------- CSV


def build_csv_manifest(
    csv_path: str | Path,
    data_root: str | Path,
    salt: str,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    folds: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, Any], ManifestSummary]:
    """Manifest from a CSV with columns ``image,label[,patient_id]``.

    Relative paths in the CSV are relative to the CSV's folder. Without ``patient_id`` every image is
    its own patient (noted once in the summary, since images of one patient could then straddle splits).
    Labels may be NIfTI, DICOM or raster (PNG, ...) masks; ``has_pneumothorax`` = any value > 0.
    """
    import csv

    csv_path, data_root = Path(csv_path), Path(data_root)
    summary = ManifestSummary(source=f"csv: {csv_path}")
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        columns = [c.strip() for c in reader.fieldnames or []]
        if not {"image", "label"} <= set(columns):
            raise ValueError(f"{csv_path}: needs columns image,label[,patient_id], got {columns}")
        reader.fieldnames = columns
        rows = [(reader.line_num, row) for row in reader]
    has_patient = "patient_id" in columns
    if not has_patient:
        summary.note(csv_path, Reason.NOTE_NO_PATIENT_COLUMN, "each image is treated as its own patient")
    summary.scanned = len(rows)
    seen: dict[Path, str] = {}
    records: list[ManifestRecord] = []
    for line, row in _progress(rows, "reading CSV entries", progress):
        item = f"{csv_path.name}:{line}"
        image_text, label_text = (row.get("image") or "").strip(), (row.get("label") or "").strip()
        if not image_text or not label_text:
            summary.skip(item, Reason.MISSING_FILE, "empty image or label")
            continue
        image, label = (csv_path.parent / image_text), (csv_path.parent / label_text)
        key = image.resolve()
        if key in seen:
            summary.skip(item, Reason.DUPLICATE_IMAGE, f"{image_text} also at {seen[key]}")
            continue
        seen[key] = item
        patient_id = (row.get("patient_id") or "").strip() if has_patient else image_text
        if not patient_id:
            summary.skip(item, Reason.MISSING_PATIENT_ID, image_text)
            continue
        positive = _check_pair(image, label, item, summary)
        if positive is None:
            continue
        entry = {
            "image": _relative(image, data_root),
            "label": _relative(label, data_root),
            "has_pneumothorax": positive,
        }
        records.append(ManifestRecord(entry, patient_id))
    manifest = assemble_manifest(
        records,
        summary,
        data_root,
        salt,
        val_fraction,
        test_fraction,
        folds,
        seed,
        generated_by=f"pneumoseg {__version__} manifest csv",
    )
    return manifest, summary


# ------------------------------------------------------------------------------------------ write/read


def summary_path_for(manifest_path: str | Path) -> Path:
    """``M.json`` -> ``M.summary.json``."""
    return Path(manifest_path).with_suffix(".summary.json")


def write_manifest(manifest: Mapping[str, Any], path: str | Path, summary: ManifestSummary | None = None) -> Path:
    """Write the manifest JSON (and ``<M>.summary.json``); ``data_root`` is stored relative to the
    manifest's folder so that manifest + data can be moved together. Returns the manifest path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = dict(manifest)
    if "data_root" in out:
        out["data_root"] = Path(os.path.relpath(Path(out["data_root"]).resolve(), path.parent.resolve())).as_posix()
    path.write_text(json.dumps(out, indent=1) + "\n")
    if summary is not None:
        summary_path_for(path).write_text(json.dumps(summary.to_dict(), indent=1) + "\n")
    return path


def manifest_base_dir(path: str | Path) -> Path:
    """The data root of a written manifest (its ``data_root`` resolved against the manifest's folder)."""
    path = Path(path)
    data_root = json.loads(path.read_text()).get("data_root", ".")
    return (path.parent / data_root).resolve()


def load_manifest_split(path: str | Path, key: str = "training") -> list[dict[str, Any]]:
    """Entries of one split/fold with absolute paths, via ``monai.data.load_decathlon_datalist``."""
    from monai.data import load_decathlon_datalist

    base_dir = manifest_base_dir(path)
    return load_decathlon_datalist(str(path), is_segmentation=True, data_list_key=key, base_dir=base_dir)


# ------------------------------------------------------------------------------------------------- CLI


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """Register ``pneumoseg manifest {siim,nifti,csv}``."""
    parser = subparsers.add_parser(
        "manifest",
        help="build patient-level train/validation/test/fold manifests (MONAI datalist JSON)",
        description="Build a MONAI datalist JSON with keys training, validation, test and "
        "fold_0..fold_{k-1}, "
        "split by patient and stratified by patient-level pneumothorax. Skipped items and their reasons are "
        "printed and written to <manifest>.summary.json.",
    )
    parser.set_defaults(func=run, parser=parser)
    sources = parser.add_subparsers(dest="source", metavar="SOURCE")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, type=Path, help="manifest JSON to write (e.g. data/siim.json)")
    common.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="folder that image/label paths in the manifest are relative to "
        "(default: the manifest's folder, so load_decathlon_datalist works without base_dir)",
    )
    common.add_argument(
        "--val-fraction",
        type=float,
        default=0.15,
        help="fraction of patients per stratum for validation (default: %(default)s)",
    )
    common.add_argument(
        "--test-fraction",
        type=float,
        default=0.15,
        help="fraction of patients per stratum for test (default: %(default)s)",
    )
    common.add_argument(
        "--folds",
        type=int,
        default=5,
        help="number of cross-validation folds fold_0..fold_{k-1} over training+validation patients; "
        "<2 writes none (default: %(default)s)",
    )
    common.add_argument("--seed", type=int, default=0, help="random seed of the split (default: %(default)s)")
    common.add_argument(
        "--salt",
        default=None,
        help="salt for patient_hash = sha256(salt, PatientID); default: reuse <out>.salt, or generate a "
        "random one and store it there (never in the manifest)",
    )
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_argument("--strict", action="store_true", help="exit with status 1 if any item was skipped (default: 0)")

    siim = sources.add_parser(
        "siim",
        parents=[common],
        help="SIIM-ACR DICOM folder + RLE CSV",
        epilog=_EPILOG,
        description="SIIM-ACR: recurse --dicom-dir for *.dcm "
        "(dicom-images-train/<study>/<series>/<uid>.dcm), "
        "read headers only; ImageId = SOPInstanceUID; entries carry label_rle (the CSV rows of the image).",
    )
    siim.add_argument("--dicom-dir", required=True, type=Path, help="folder with the DICOM files (recursed)")
    siim.add_argument(
        "--rle-csv",
        required=True,
        type=Path,
        help="SIIM RLE CSV (stage-1 train-rle.csv 'ImageId, EncodedPixels' or stage-2 stage_2_train.csv)",
    )
    siim.set_defaults(func=run)

    nifti = sources.add_parser(
        "nifti",
        parents=[common],
        help="NIfTI images + masks paired by file name",
        epilog=_EPILOG,
        description="Pair <images>/<sub>/<name>.nii[.gz] with <labels>/<sub>/<name><suffix>.nii[.gz]; "
        "has_pneumothorax = label has a voxel > 0; label shape must equal image shape.",
    )
    nifti.add_argument("--images", required=True, type=Path, help="folder with image volumes (recursed)")
    nifti.add_argument("--labels", required=True, type=Path, help="folder with label masks (may be --images)")
    nifti.add_argument(
        "--patient-regex",
        default=None,
        help="regex applied to the image file stem giving the patient id (named group 'patient', else "
        "group 1, else the whole match); default: the stem, i.e. one patient per image",
    )
    nifti.add_argument(
        "--label-suffix",
        action="append",
        default=None,
        help="label name suffix to try after the image stem; repeatable (default: '', _seg, _label, _mask)",
    )
    nifti.set_defaults(func=run)

    table = sources.add_parser(
        "csv",
        parents=[common],
        help="generic CSV with columns image,label[,patient_id]",
        epilog=_EPILOG,
        description="Rows image,label[,patient_id]; relative paths are relative to the CSV's folder. Without "
        "patient_id every image is its own patient.",
    )
    table.add_argument("--csv", required=True, type=Path, help="CSV file with columns image,label[,patient_id]")
    table.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build and write the manifest; returns the exit status."""
    if getattr(args, "source", None) is None:
        args.parser.print_help()
        return 2
    out: Path = args.out
    data_root = args.data_root if args.data_root is not None else out.parent
    new_salt_file = not args.salt and not salt_path_for(out).exists()
    salt = resolve_salt(out, args.salt)
    split = {
        "val_fraction": args.val_fraction,
        "test_fraction": args.test_fraction,
        "folds": args.folds,
        "seed": args.seed,
        "progress": not args.no_progress,
    }
    try:
        if args.source == "siim":
            manifest, summary = build_siim_manifest(args.dicom_dir, args.rle_csv, data_root, salt, **split)
        elif args.source == "nifti":
            suffixes = tuple(args.label_suffix) if args.label_suffix else DEFAULT_LABEL_SUFFIXES
            manifest, summary = build_nifti_manifest(
                args.images, args.labels, data_root, salt, args.patient_regex, suffixes, **split
            )
        else:
            manifest, summary = build_csv_manifest(args.csv, data_root, salt, **split)
    except (OSError, ValueError) as err:
        print(f"pneumoseg manifest: error: {err}", file=sys.stderr)
        if new_salt_file:  # no manifest uses it
            salt_path_for(out).unlink(missing_ok=True)
        return 1
    write_manifest(manifest, out, summary)
    print(summary.format())
    print(f"wrote {out} and {summary_path_for(out)}")
    if not any(manifest[k] for k in SPLIT_KEYS):
        print("pneumoseg manifest: error: no usable entries", file=sys.stderr)
        return 1
    return 1 if args.strict and summary.skipped else 0
