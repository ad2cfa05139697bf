"""DICOM CT series: discovery, grouping by SeriesInstanceUID, geometric sorting, volume assembly (HU).

MONAI's PydicomReader is not used for series: it merges every file of a folder into one volume (two
series in one folder give a bogus spacing), and it transposes relative to ``pixel_array``. Here:

* files are grouped by SeriesInstanceUID, never merged across series;
* slices are sorted by ImagePositionPatient projected on the slice normal (row x column cosines);
* localizers (ImageType LOCALIZER, often sharing the axial series' UID) never enter the volume;
* duplicates (same position; dropped) and gaps (> 1.5x the median spacing) are warnings, kept in
  ``meta["series_warnings"]`` and logged, as is a single slice (its step: SpacingBetweenSlices, else
  SliceThickness, else 1 mm); only inconsistent orientation / shape or missing geometry raise;
* the volume's K axis is the sorted slice order, and ``meta["slice_sop_uids"]`` names the source instance
  of each layer (what a DICOM SEG over the volume must reference, never the file order);
* the volume is ``[1, I, J, K]`` (I = column index, J = row index, K = slice) in Hounsfield units with
  the RAS affine (DICOM LPS flipped like MONAI/ITK), i.e. what nibabel/MONAI give for a NIfTI export.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from pneumoseg.data.dicom import (
    ImageReadError,
    PathLike,
    decode_pixels,
    float_array,
    int_value,
    is_localizer,
    read_dicom,
    walk_files,
)

__all__ = [
    "DicomSeries",
    "LoadDicomSeries",
    "LoadDicomSeriesd",
    "find_dicom_series",
    "group_series",
    "load_dicom_series",
]

logger = logging.getLogger(__name__)

# slices closer than this along the normal are the same position (duplicates)
DUPLICATE_TOLERANCE_MM = 1e-3
# a step larger than this times the median step means slices are missing
GAP_FACTOR = 1.5
# direction cosines of two slices differing by more than this are inconsistent orientations
ORIENTATION_TOLERANCE = 1e-4
# LPS (DICOM patient frame) -> RAS (NIfTI/MONAI): flip x and y
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class _SliceHeader:
    path: Path
    rows: int
    columns: int
    orientation: np.ndarray | None  # [6] row cosines then column cosines
    position: np.ndarray | None  # [3] LPS mm
    pixel_spacing: tuple[float, float] | None
    instance_number: int
    n_frames: int
    sop_uid: str = ""
    slice_step: float | None = None  # SpacingBetweenSlices, else SliceThickness (a single slice's step)


@dataclass
class DicomSeries:
    """One DICOM series found on disk.

    ``files`` are sorted along the slice normal (duplicates removed); ``positions`` are the slices'
    positions along the normal in mm ``[N]``; ``error`` is set (and loading raises it) when the series
    cannot form a volume (inconsistent orientation/shape, missing geometry).
    """

    series_uid: str
    files: list[Path]
    modality: str
    warnings: list[str] = field(default_factory=list)
    positions: np.ndarray = field(default_factory=lambda: np.zeros(0))
    error: str | None = None
    description: str = ""
    headers: list[_SliceHeader] = field(default_factory=list, repr=False)  # geometry of ``files``


def _slice_header(path: Path) -> tuple[str, str, str, _SliceHeader] | None:
    """(series UID, modality, description, header) of a slice file; None for non-DICOM / non-image files
    and for localizers."""
    try:
        ds = read_dicom(path, stop_before_pixels=True)
    except ImageReadError as e:
        logger.debug("skipping %s", e)
        return None
    if "Rows" not in ds or "Columns" not in ds:  # DICOMDIR, SR, RTSTRUCT...: no image
        return None
    if is_localizer(ds):
        logger.info("%s: localizer image, not part of a volume", path)
        return None
    uid = str(ds.get("SeriesInstanceUID", "") or "")
    if not uid:
        logger.warning("%s: image without SeriesInstanceUID, skipped", path)
        return None
    spacing = float_array(ds.get("PixelSpacing"), 2)
    steps = [float_array([ds.get(k)], 1) for k in ("SpacingBetweenSlices", "SliceThickness")]
    step = next((float(v[0]) for v in steps if v is not None and v[0] > 0), None)
    header = _SliceHeader(
        path=path,
        rows=int_value(ds, "Rows", 0),
        columns=int_value(ds, "Columns", 0),
        orientation=float_array(ds.get("ImageOrientationPatient"), 6),
        position=float_array(ds.get("ImagePositionPatient"), 3),
        pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing is not None else None,
        instance_number=int_value(ds, "InstanceNumber", 0),
        n_frames=int_value(ds, "NumberOfFrames", 1) or 1,
        sop_uid=str(ds.get("SOPInstanceUID", "") or ""),
        slice_step=step,
    )
    return uid, str(ds.get("Modality", "") or ""), str(ds.get("SeriesDescription", "") or ""), header


def _slice_normal(orientation: np.ndarray) -> np.ndarray:
    """Unit normal = row cosines x column cosines (DICOM C.7.6.2.1.1)."""
    normal = np.cross(orientation[:3], orientation[3:])
    return normal / np.linalg.norm(normal)


def _sort_slices(uid: str, headers: list[_SliceHeader]) -> tuple[list[_SliceHeader], np.ndarray, list[str]]:
    """Sort along the normal, drop duplicates, report gaps; raises ImageReadError if no volume can be made."""
    where = f"series {uid} ({headers[0].path.parent})"
    if any(h.n_frames > 1 for h in headers):
        raise ImageReadError(f"{where}: multi-frame (enhanced) DICOM files are not supported as a series")
    missing = [h.path.name for h in headers if h.orientation is None or h.position is None]
    if missing:
        raise ImageReadError(
            f"{where}: ImageOrientationPatient/ImagePositionPatient missing in {', '.join(missing[:5])}"
        )
    shapes = {(h.rows, h.columns) for h in headers}
    if len(shapes) > 1:
        raise ImageReadError(f"{where}: slices have different shapes {sorted(shapes)}")
    ref = headers[0].orientation
    bad = [h.path.name for h in headers if np.max(np.abs(h.orientation - ref)) > ORIENTATION_TOLERANCE]
    if bad:
        raise ImageReadError(f"{where}: inconsistent ImageOrientationPatient in {', '.join(bad[:5])}")

    warnings: list[str] = []
    normal = _slice_normal(ref)
    # stable tie-break on InstanceNumber then file name, so that the kept duplicate is deterministic
    ordered = sorted(headers, key=lambda h: (float(h.position @ normal), h.instance_number, h.path.name))
    kept = [ordered[0]]
    for h in ordered[1:]:
        if abs(float((h.position - kept[-1].position) @ normal)) < DUPLICATE_TOLERANCE_MM:
            warnings.append(
                f"duplicate slice position {float(h.position @ normal):.3f} mm: kept {kept[-1].path.name}, "
                f"dropped {h.path.name}"
            )
        else:
            kept.append(h)
    if len(kept) == 1:
        warnings.append("a single slice: processed as a one-slice volume")
    positions = np.array([float(h.position @ normal) for h in kept])
    steps = np.diff(positions)
    median = float(np.median(steps)) if len(steps) else 0.0
    for i in np.flatnonzero(steps > GAP_FACTOR * median):
        warnings.append(
            f"missing slice(s) between {kept[i].path.name} and {kept[i + 1].path.name}: gap "
            f"{steps[i]:.3f} mm vs median spacing {median:.3f} mm (volume stacked without the gap)"
        )
    spacings = {h.pixel_spacing for h in kept}
    if len(spacings) > 1:
        warnings.append(f"PixelSpacing differs between slices {sorted(map(str, spacings))}; first one used")
    return kept, positions, warnings


def group_series(files: Sequence[Path]) -> list[DicomSeries]:
    """Group image files by SeriesInstanceUID and sort each series; problems go to ``error``/``warnings``."""
    groups: dict[str, list[_SliceHeader]] = defaultdict(list)
    info: dict[str, tuple[str, str]] = {}
    for path in files:
        parsed = _slice_header(path)
        if parsed is None:
            continue
        uid, modality, description, header = parsed
        groups[uid].append(header)
        info.setdefault(uid, (modality, description))
    found = []
    for uid, headers in groups.items():
        modality, description = info[uid]
        try:
            kept, positions, warnings = _sort_slices(uid, headers)
            series = DicomSeries(uid, [h.path for h in kept], modality, warnings, positions, None, description, kept)
        except ImageReadError as e:
            ordered = sorted(headers, key=lambda h: (h.instance_number, h.path.name))
            series = DicomSeries(
                uid, [h.path for h in ordered], modality, [], np.zeros(0), str(e), description, ordered
            )
        for w in series.warnings:
            logger.warning("series %s (%s): %s", uid, headers[0].path.parent, w)
        found.append(series)
    return sorted(found, key=lambda s: (-len(s.files), s.series_uid))


def find_dicom_series(folder: PathLike) -> list[DicomSeries]:
    """All DICOM image series under ``folder`` (recursive), one entry per SeriesInstanceUID.

    Non-DICOM and non-image files are skipped. Series that cannot form a volume are returned with
    ``error`` set (loading them raises). Largest series first.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ImageReadError(f"{folder}: not a directory")
    return group_series(walk_files(root).files)


def _series_affine(
    origin: np.ndarray, orientation: np.ndarray, pixel_spacing: Sequence[float], step: np.ndarray
) -> np.ndarray:
    """4x4 RAS affine mapping (i = column, j = row, k = slice) to mm, from LPS geometry."""
    affine = np.eye(4)
    affine[:3, 0] = orientation[:3] * pixel_spacing[1]  # along a row: column index i, column spacing
    affine[:3, 1] = orientation[3:] * pixel_spacing[0]  # along a column: row index j, row spacing
    affine[:3, 2] = step
    affine[:3, 3] = origin
    return LPS_TO_RAS @ affine


def load_dicom_series(
    series: DicomSeries, where: str | None = None, headers: list[Dataset] | None = None
) -> MetaTensor:
    """Read the slices of a sorted :class:`DicomSeries` into MetaTensor ``[1, I, J, K]`` float32 (HU).

    ``meta`` holds filename_or_obj (``where``, default the first file's folder), spacing (mm per I, J, K),
    affine (RAS), Modality, SeriesInstanceUID, PhotometricInterpretation, BodyPartExamined,
    series_warnings, n_slices, slice_sop_uids (SOPInstanceUID of layer k, k = 0..K-1).
    ``headers``: if given, each slice's dataset without its pixel data is appended, in K order (the
    sources of a DICOM SEG over the volume; read here anyway, so not parsed twice).
    """
    where = where or os.fspath(series.files[0].parent)
    if series.error is not None:
        raise ImageReadError(series.error)
    frames: list[np.ndarray] = []
    first_ds = None
    for path, expected in zip(series.files, series.headers):
        ds = read_dicom(path)
        if str(ds.get("SOPInstanceUID", "") or "") != expected.sop_uid:
            raise ImageReadError(f"{path}: changed while the series was read (SOPInstanceUID differs)")
        raw = decode_pixels(ds, path)
        if raw.ndim != 2:
            raise ImageReadError(f"{path}: expected a single-sample slice, decoded shape {raw.shape}")
        # per slice: RescaleSlope/Intercept may differ between slices
        frames.append(np.asarray(apply_modality_lut(raw, ds), dtype=np.float32))
        if not np.all(np.isfinite(frames[-1])):
            raise ImageReadError(f"{path}: rescaled pixels contain NaN or infinite values")
        if first_ds is None:
            first_ds = ds
        if headers is not None:
            del ds.PixelData
            headers.append(ds)
    assert first_ds is not None
    first, last = series.headers[0], series.headers[-1]
    pixel_spacing = first.pixel_spacing
    warnings = list(series.warnings)
    if pixel_spacing is None or min(pixel_spacing) <= 0:
        warnings.append("PixelSpacing missing or zero; 1.0 mm assumed")
        pixel_spacing = (1.0, 1.0)
    # slice step: median of consecutive position differences along the normal, in the direction
    # first -> last slice position (handles gantry tilt / shear: the IPP offset need not be the normal)
    normal = _slice_normal(first.orientation)
    if len(series.headers) > 1:
        step_along_normal = float(np.median(np.diff(series.positions)))
        offset = last.position - first.position
        step_lps = offset / float(offset @ normal) * step_along_normal
    else:  # one slice: along the normal, by the thickness the header gives
        step_lps = normal * (first.slice_step or 1.0)
    affine = _series_affine(first.position, first.orientation, pixel_spacing, step_lps)

    # [K, Rows, Cols] -> [I = col, J = row, K]
    volume = np.stack(frames, axis=0).transpose(2, 1, 0)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    meta = {
        "filename_or_obj": where,
        "spacing": spacing,
        "Modality": series.modality,
        "SeriesInstanceUID": series.series_uid,
        "PhotometricInterpretation": str(first_ds.get("PhotometricInterpretation", "") or ""),
        "BodyPartExamined": str(first_ds.get("BodyPartExamined", "") or ""),
        "series_warnings": warnings,
        "n_slices": len(frames),
        "slice_sop_uids": [h.sop_uid for h in series.headers],
        "spatial_shape": np.array(volume.shape, dtype=np.int64),
        "original_channel_dim": "no_channel",
        "original_affine": torch.as_tensor(affine, dtype=torch.float64),
        "space": "RAS",
    }
    for w in warnings[len(series.warnings) :]:
        logger.warning("%s series %s: %s", where, series.series_uid, w)
    return MetaTensor(
        torch.from_numpy(np.ascontiguousarray(volume))[None],
        affine=torch.as_tensor(affine, dtype=torch.float64),
        meta=meta,
    )


class LoadDicomSeries(Transform):
    """Load a DICOM CT series (folder, searched recursively, or list of files) as ``[1, I, J, K]`` HU.

    Args:
        series_uid: which series to load when the input holds several.
        pick: without ``series_uid``, what to do when several loadable series are found: ``"only"``
            raises ImageReadError listing them (never merge); ``"largest"`` takes the one with most slices.
    """

    def __init__(self, series_uid: str | None = None, pick: Literal["only", "largest"] = "only") -> None:
        if pick not in ("only", "largest"):
            raise ValueError(f"pick must be 'only' or 'largest', got {pick!r}")
        self.series_uid = series_uid
        self.pick = pick

    def select(self, found: list[DicomSeries], where: str) -> DicomSeries:
        """The series to load among ``found`` (see class doc)."""
        if not found:
            raise ImageReadError(f"{where}: no DICOM image series found")
        if self.series_uid is not None:
            match = [s for s in found if s.series_uid == self.series_uid]
            if not match:
                raise ImageReadError(
                    f"{where}: series {self.series_uid} not found (have {', '.join(s.series_uid for s in found)})"
                )
            return match[0]
        loadable = [s for s in found if s.error is None]
        if not loadable:
            raise ImageReadError(f"{where}: no loadable series: " + "; ".join(s.error or "" for s in found))
        if len(loadable) > 1 and self.pick == "only":
            listing = ", ".join(f"{s.series_uid} ({len(s.files)} slices)" for s in loadable)
            raise ImageReadError(f"{where}: {len(loadable)} series found ({listing}); pass series_uid=")
        return max(loadable, key=lambda s: len(s.files))

    def __call__(self, source: PathLike | Sequence[PathLike]) -> MetaTensor:
        if isinstance(source, (list, tuple)):
            files = [Path(p) for p in source]
            where = os.fspath(files[0].parent) if files else "<empty file list>"
            found = group_series(files)
        else:
            where = os.fspath(source)
            found = find_dicom_series(source)
        return load_dicom_series(self.select(found, where), where=where)


class LoadDicomSeriesd(MapTransform):
    """Dictionary form of :class:`LoadDicomSeries`."""

    def __init__(
        self,
        keys: KeysCollection,
        series_uid: str | None = None,
        pick: Literal["only", "largest"] = "only",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadDicomSeries(series_uid=series_uid, pick=pick)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d
