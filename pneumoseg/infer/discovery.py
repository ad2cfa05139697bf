"""Folder -> list of scans to segment (what ``pneumoseg infer`` will process, skip, or report as broken).

Walks ``INPUT_DIR`` recursively in sorted order (:func:`pneumoseg.data.dicom.walk_files`: symbolic links to
folders followed once, a loop reported) and reads DICOM headers only (``stop_before_pixels``; files without
the 128-byte preamble too):

* single-frame radiographs (CR, DX, ... any 2D image that is not part of a CT/MR/PET series) -> one
  ``radiograph`` scan per file; multi-frame radiographs -> one scan per frame;
* single-frame CT (and MR/PT/NM) slices -> grouped by SeriesInstanceUID into one ``series`` scan (a volume);
  localizers sharing the UID stay out of it (skipped rows); enhanced multi-frame CT/MR files -> skipped
  (the series reader needs one slice per file);
* ``.nii`` / ``.nii.gz`` -> ``nifti`` scan (a CT volume in HU); ``.png`` / ``.jpg`` / ``.jpeg`` -> ``image``;
* non-image objects (SR, RTSTRUCT, SEG, PR, KO, ...), DICOMDIR, hidden files and non-DICOM files ->
  skipped with the reason; a file that announces itself as DICOM (``.dcm`` or the ``DICM`` magic) but
  cannot be parsed -> an ``error`` row (corrupt / truncated), as is Pixel Data without Rows / Columns;
* a header saying it is not a chest (BodyPartExamined) or an unexpected modality -> a warning in the row,
  or skipped with ``chest_only``.

Each scan has a ``scan_id`` derived from its relative path (series: the series folder and UID); it names
the scan's output folder, so two inputs with the same file name never share outputs, and sorting by it
gives the deterministic order of reports and shards. ``Scan.image_kind`` says which model it needs
(:data:`pneumoseg.model_record.IMAGE_KINDS`).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pneumoseg.data.dicom import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    NIFTI_SUFFIXES,
    ImageReadError,
    has_dicom_magic,
    has_pixel_data,
    has_suffix,
    int_value,
    is_localizer,
    read_dicom,
    walk_files,
)
from pneumoseg.model_record import CT, RADIOGRAPH

__all__ = [
    "Scan",
    "discover_scans",
    "shard_scans",
    "RADIOGRAPH_MODALITIES",
    "VOLUME_MODALITIES",
    "TRAINED_MODALITIES",
    "NON_IMAGE_MODALITIES",
]

logger = logging.getLogger(__name__)

RADIOGRAPH_MODALITIES = ("CR", "DX", "DR")
"""Projection radiography modalities: one scan per image."""
VOLUME_MODALITIES = ("CT", "MR", "PT", "NM")
"""Cross-sectional modalities whose single-frame files are grouped by series into volumes."""
TRAINED_MODALITIES = ("CR", "DX", "DR", "CT")
"""The modalities of the image kinds (radiograph: CR/DX/DR, ct: CT); anything else gets a warning."""
NON_IMAGE_MODALITIES = ("SR", "RTSTRUCT", "SEG", "PR", "KO", "RTPLAN", "RTDOSE", "REG", "DOC", "AU", "ECG")
"""DICOM objects without an image to segment."""
CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG", "TORSO", "HEART", "RIB")
"""A BodyPartExamined containing one of these words counts as a chest (an empty one is not questioned)."""


@dataclass
class Scan:
    """One unit of work: a radiograph (or one frame of a multi-frame file), a CT series, or a NIfTI/PNG.

    ``kind``: ``radiograph`` (DICOM 2D), ``image`` (PNG/JPEG), ``series`` (DICOM volume), ``nifti`` (volume).
    ``files``: absolute paths (a series: all its slice files, sorted by path; the reader sorts by geometry).
    ``source``: the input as shown in the report (path relative to the input folder; a series: its folder).
    ``status``: ``pending`` (to process), ``skipped`` or ``error`` (decided here; ``reason`` says why).
    """

    scan_id: str
    kind: str
    files: list[str]
    source: str
    series_uid: str = ""
    sop_uid: str = ""
    modality: str = ""
    body_part: str = ""
    frame: int | None = None
    status: str = "pending"
    reason: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def is_volume(self) -> bool:
        return self.kind in ("series", "nifti")

    @property
    def image_kind(self) -> str:
        """The kind of image a model must have been trained on to segment this scan."""
        return CT if self.is_volume else RADIOGRAPH

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _header_warnings(modality: str, body_part: str) -> list[str]:
    warnings = []
    if modality and modality.upper() not in TRAINED_MODALITIES:
        warnings.append(f"modality {modality} is not one of the image kinds' ({', '.join(TRAINED_MODALITIES)})")
    if body_part and not any(word in body_part.upper() for word in CHEST_BODY_PARTS):
        warnings.append(f"BodyPartExamined {body_part!r} is not a chest")
    return warnings


def _orientation_warning(orientation: Any) -> list[str]:
    """A warning if the slices are not axial (the model was trained on axial CT slices)."""
    try:
        cosines = [float(v) for v in orientation]
        normal = abs(cosines[0] * cosines[4] - cosines[1] * cosines[3])  # z of row x column cosines
    except (TypeError, ValueError, IndexError):
        return []
    if normal > 0.9:
        return []
    return ["slices are not axial (ImageOrientationPatient): reoriented, the model sees axial slices of the volume"]


def _read_header(path: Path) -> tuple[Any | None, str]:
    """(dataset without pixels, "") or (None, reason)."""
    try:
        return read_dicom(path, stop_before_pixels=True), ""
    except ImageReadError as e:
        return None, str(e).split(": ", 1)[-1]


def discover_scans(input_dir: str | os.PathLike, chest_only: bool = False) -> list[Scan]:
    """All scans under ``input_dir`` (recursive), sorted by ``scan_id``; see the module docstring.

    Raises ``FileNotFoundError`` if ``input_dir`` is not a directory. An empty folder gives ``[]``. Folders
    that were not walked (a symbolic-link loop, a second link to a folder, an unreadable folder) and broken
    links are ``skipped`` rows naming why.
    """
    root = Path(input_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder not found: {input_dir}")
    scans: list[Scan] = []
    series_files: dict[str, list[Path]] = defaultdict(list)
    series_info: dict[str, tuple[str, str, list[str]]] = {}
    walk = walk_files(root)  # hidden files/folders (e.g. .DS_Store, .git): not inputs, not worth a row
    for path, reason in walk.not_walked:
        source = path.relative_to(root).as_posix()
        scans.append(Scan(source, "other", [str(path)], source, status="skipped", reason=reason))
    for path in walk.files:
        rel = PurePosixPath(path.relative_to(root).as_posix())
        name = path.name
        source = str(rel)
        if has_suffix(name, NIFTI_SUFFIXES):
            scans.append(Scan(source, "nifti", [str(path)], source))
            continue
        if has_suffix(name, IMAGE_SUFFIXES):
            scans.append(Scan(source, "image", [str(path)], source))
            continue
        if name.upper() == "DICOMDIR":
            scans.append(Scan(source, "other", [str(path)], source, status="skipped", reason="DICOMDIR (an index)"))
            continue
        ds, problem = _read_header(path)
        if ds is None or "SOPClassUID" not in ds and "Modality" not in ds and "Rows" not in ds:
            if has_suffix(name, DICOM_SUFFIXES) or has_dicom_magic(path):
                reason = f"corrupt or truncated DICOM header ({problem or 'no DICOM attributes'})"
                scans.append(Scan(source, "radiograph", [str(path)], source, status="error", reason=reason))
            else:
                scans.append(Scan(source, "other", [str(path)], source, status="skipped", reason="not a DICOM file"))
            continue
        modality = str(ds.get("Modality", "") or "").upper()
        body_part = str(ds.get("BodyPartExamined", "") or "")
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        sop_uid = str(ds.get("SOPInstanceUID", "") or "")
        common = dict(series_uid=series_uid, sop_uid=sop_uid, modality=modality, body_part=body_part)
        no_size = "Rows" not in ds or "Columns" not in ds
        if no_size and modality not in NON_IMAGE_MODALITIES and has_pixel_data(path):
            reason = "Pixel Data without Rows / Columns: the image cannot be read"
            scans.append(Scan(source, "radiograph", [str(path)], source, status="error", reason=reason, **common))
            continue
        if modality in NON_IMAGE_MODALITIES or no_size:
            what = f"Modality {modality}" if modality else "no image"
            reason = f"non-image DICOM ({what})"
            scans.append(Scan(source, "other", [str(path)], source, status="skipped", reason=reason, **common))
            continue
        n_frames = int_value(ds, "NumberOfFrames", 1) or 1
        warnings = _header_warnings(modality, body_part)
        if modality in VOLUME_MODALITIES:
            if n_frames > 1:
                scans.append(
                    Scan(
                        source,
                        "series",
                        [str(path)],
                        source,
                        status="skipped",
                        reason=f"enhanced multi-frame {modality} ({n_frames} frames) is not supported; "
                        "export the series as single-frame files",
                        **common,
                    )
                )
                continue
            if is_localizer(ds):  # scouts often share the axial series' UID: keep them out of the volume and SEG
                scans.append(
                    Scan(
                        source,
                        "radiograph",
                        [str(path)],
                        source,
                        status="skipped",
                        reason=f"{modality} localizer (scout) image",
                        **common,
                    )
                )
                continue
            if not series_uid:
                scans.append(
                    Scan(
                        source,
                        "series",
                        [str(path)],
                        source,
                        status="error",
                        reason=f"{modality} slice without SeriesInstanceUID",
                        **common,
                    )
                )
                continue
            series_files[series_uid].append(path)
            if series_uid not in series_info:
                orientation = _orientation_warning(ds.get("ImageOrientationPatient"))
                series_info[series_uid] = (modality, body_part, orientation)
            continue
        if n_frames > 1:
            for frame in range(n_frames):
                scans.append(
                    Scan(
                        f"{source}@frame{frame:04d}",
                        "radiograph",
                        [str(path)],
                        f"{source}@frame{frame:04d}",
                        frame=frame,
                        warnings=list(warnings),
                        **common,
                    )
                )
            continue
        scans.append(Scan(source, "radiograph", [str(path)], source, warnings=warnings, **common))

    for uid, files in series_files.items():
        modality, body_part, orientation_warning = series_info[uid]
        parent = Path(os.path.commonpath([os.fspath(f.parent) for f in files]))
        rel_parent = parent.relative_to(root).as_posix()
        folder = "" if rel_parent == "." else rel_parent + "/"
        scan_id = f"{folder}series-{uid}"
        source = folder.rstrip("/") or "."
        scans.append(
            Scan(
                scan_id,
                "series",
                [str(f) for f in sorted(files)],
                source,
                series_uid=uid,
                modality=modality,
                body_part=body_part,
                warnings=_header_warnings(modality, body_part) + orientation_warning,
            )
        )

    for scan in scans:
        if chest_only and scan.status == "pending" and scan.warnings:
            scan.status, scan.reason = "skipped", "--chest-only: " + "; ".join(scan.warnings)
    return _unique_ids(sorted(scans, key=lambda s: s.scan_id))


def _unique_ids(scans: list[Scan]) -> list[Scan]:
    """Suffix ``~2``, ``~3``... to a repeated ``scan_id`` (only possible with odd file names), in order."""
    seen: dict[str, int] = {}
    taken = {s.scan_id for s in scans}
    for scan in scans:
        if scan.scan_id in seen:
            n = seen[scan.scan_id] + 1
            while f"{scan.scan_id}~{n}" in taken:
                n += 1
            seen[scan.scan_id] = n
            scan.scan_id = f"{scan.scan_id}~{n}"
            taken.add(scan.scan_id)
        else:
            seen[scan.scan_id] = 1
    return scans


def shard_scans(scans: Sequence[Scan], num_shards: int = 1, shard_id: int = 0) -> list[Scan]:
    """Shard ``shard_id`` of ``num_shards`` of the (sorted) scan list: every ``num_shards``-th scan.

    Round-robin rather than contiguous blocks, so that a folder sorted by site/date spreads evenly.
    """
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be in [0, {num_shards}), got {shard_id} (num_shards={num_shards})")
    return [s for i, s in enumerate(scans) if i % num_shards == shard_id]
