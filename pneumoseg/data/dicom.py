"""The bottom layer of reading inputs: what a file is, what its DICOM header says, and its pixels checked
against that header. Readers, series and discovery build on it; it imports nothing of pneumoseg.

* one error type, :class:`ImageReadError`, whose message names the file;
* one suffix table (:data:`DICOM_SUFFIXES`, :data:`NIFTI_SUFFIXES`, :data:`IMAGE_SUFFIXES`, :func:`has_suffix`);
* one header reader, :func:`read_dicom`: Part 10 files, and files without the 128-byte preamble (read with
  ``force=True``, then accepted only if they carry DICOM image or SOP attributes); values converted once,
  without pydicom's warnings, which quote the offending value (a birth date may be one);
* :func:`pixel_spacing`, :func:`float_array`, :func:`is_localizer`: the header values the layers above use;
* :func:`decode_pixels`: one frame, after checking that Rows x Columns x ... describes the Pixel Data
  (a wrong Columns would otherwise give a garbled image that looks valid);
* :func:`walk_files`: a folder walked recursively in sorted order, following symbolic links to folders
  once (a link loop or a second link to the same folder is reported, not walked twice).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError

__all__ = [
    "DICOM_SUFFIXES",
    "IMAGE_SUFFIXES",
    "NIFTI_SUFFIXES",
    "FolderWalk",
    "ImageReadError",
    "PathLike",
    "decode_pixels",
    "float_array",
    "has_dicom_magic",
    "has_pixel_data",
    "has_suffix",
    "int_value",
    "is_localizer",
    "pixel_spacing",
    "quiet_value_validation",
    "read_dicom",
    "transfer_syntax",
    "walk_files",
]

PathLike = str | os.PathLike

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
"""The suffix table of the project: which inputs are NIfTI volumes, PNG/JPEG radiograph exports, or named
as DICOM (any other file may still be DICOM: its header decides)."""


class ImageReadError(ValueError):
    """An input image cannot be read; the message names the file (and transfer syntax for DICOM)."""


def has_suffix(path: PathLike, suffixes: Sequence[str]) -> bool:
    """Whether the file name ends with one of ``suffixes`` (case-insensitive)."""
    return os.fspath(path).lower().endswith(tuple(suffixes))


# ====================================================================================== header reading

_quiet_lock = threading.Lock()
_quiet_depth = 0
_saved_modes: tuple[int, int] | None = None


@contextlib.contextmanager
def quiet_value_validation() -> Iterator[None]:
    """pydicom's value validation off (reading and writing) while any thread is inside.

    pydicom warns about a non-conformant value by quoting it ("Invalid value for VR DA: '19800101'"), on
    stderr and in its log; header values are patient data. pydicom's own ``disable_value_validation`` saves
    and restores the process-wide setting per call, which two threads inside at once (the writer thread
    writing a SEG while the main thread reads a DICOM) can leave off or on for good; this one counts.
    """
    global _quiet_depth, _saved_modes
    from pydicom import config

    with _quiet_lock:
        if _quiet_depth == 0:
            settings = config.settings
            _saved_modes = (settings.reading_validation_mode, settings.writing_validation_mode)
            settings.reading_validation_mode = config.IGNORE
            settings.writing_validation_mode = config.IGNORE
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _saved_modes is not None:
                config.settings.reading_validation_mode, config.settings.writing_validation_mode = _saved_modes


def has_dicom_magic(path: PathLike) -> bool:
    """``DICM`` at byte 128 (a DICOM Part 10 file)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _looks_like_dicom_dataset(ds: Dataset) -> bool:
    """What a dataset read with ``force=True`` must hold to count as DICOM (random bytes parse too)."""
    return "SOPClassUID" in ds or ("Rows" in ds and "Columns" in ds)


def read_dicom(path: PathLike, stop_before_pixels: bool = False) -> Dataset:
    """The DICOM dataset of ``path``; failures are :class:`ImageReadError` naming the file.

    A file without the 128-byte preamble and ``DICM`` prefix (written by some exporters) is read with
    ``force=True`` and kept only if it holds SOPClassUID or Rows and Columns; its transfer syntax is the
    encoding pydicom recognised (implicit / explicit VR little endian). Top-level values are converted
    here, under :func:`quiet_value_validation`, so that no later access warns with a header value.
    """
    with quiet_value_validation():
        try:
            try:
                ds = pydicom.dcmread(os.fspath(path), stop_before_pixels=stop_before_pixels)
            except InvalidDicomError:
                ds = pydicom.dcmread(os.fspath(path), stop_before_pixels=stop_before_pixels, force=True)
                if not _looks_like_dicom_dataset(ds):
                    raise ImageReadError(f"{path}: not a DICOM file (no DICOM header, no image attributes)") from None
                _set_transfer_syntax_from_encoding(ds)
            for _ in ds:  # convert every top-level value now (lazily converted values warn when first read)
                pass
        except ImageReadError:
            raise
        except Exception as e:  # truncated / corrupt files raise all kinds of errors inside pydicom
            raise ImageReadError(f"{path}: cannot parse DICOM ({type(e).__name__}: {_first_line(e)})") from None
    return ds


def _set_transfer_syntax_from_encoding(ds: Dataset) -> None:
    """A preamble-less dataset has no File Meta; decoding its pixels needs the transfer syntax."""
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian
    )


def has_pixel_data(path: PathLike) -> bool:
    """Whether the file holds Pixel Data (large values are skipped, not read): for headers without Rows /
    Columns, to tell a broken image from a non-image object."""
    try:
        with quiet_value_validation():
            ds = pydicom.dcmread(os.fspath(path), defer_size=1024, force=True)
    except Exception:  # unparseable: no evidence of pixels
        return False
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0][:300] if str(error).strip() else ""


def transfer_syntax(ds: Dataset) -> str:
    """``"<UID> (<name>)"`` of the dataset's transfer syntax, for error messages."""
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if uid is None:
        return "unknown transfer syntax (no (0002,0010) Transfer Syntax UID)"
    return f"{uid} ({uid.name})"


# ======================================================================================== header values


def float_array(value: Any, n: int) -> np.ndarray | None:
    """``value`` as ``n`` finite floats (e.g. ImagePositionPatient), or ``None``."""
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.all(np.isfinite(arr)) else None


def pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    """(row spacing, column spacing) in mm from PixelSpacing, else ImagerPixelSpacing; ``None`` if absent,
    non-finite or not positive (zero spacing occurs in the wild: it is missing)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        spacing = float_array(ds.get(keyword), 2)
        if spacing is not None and np.all(spacing > 0):
            return float(spacing[0]), float(spacing[1])
    return None


def is_localizer(ds: Dataset) -> bool:
    """A scout / localizer image (ImageType contains LOCALIZER): it often shares the axial series' UID but is
    no slice of the volume."""
    value = ds.get("ImageType") or []
    if isinstance(value, str):
        value = value.split("\\")
    return any(str(v).strip().upper() == "LOCALIZER" for v in value)


def int_value(ds: Dataset, keyword: str, default: int) -> int:
    """An integer header value, or ``default`` when absent or not an integer."""
    try:
        value = ds.get(keyword)
        return default if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return default


# =============================================================================================== pixels


def _check_pixel_length(ds: Dataset, path: PathLike) -> None:
    """Native (uncompressed) Pixel Data must be as long as Rows x Columns x samples x bytes x frames say.

    pydicom raises when it is shorter but ignores an excess as padding: a Columns smaller than the true
    width then decodes to a sheared, garbled image. More than one row's worth of excess is an error here.
    """
    from pydicom.pixels.utils import get_expected_length

    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or syntax.is_encapsulated or "PixelData" not in ds:
        return
    try:
        expected = int(get_expected_length(ds, unit="bytes"))
        row = math.ceil(int(ds.Columns) * int_value(ds, "SamplesPerPixel", 1) * int(ds.BitsAllocated) / 8)
    except Exception as e:  # missing / broken BitsAllocated, SamplesPerPixel...
        raise ImageReadError(f"{path}: image pixel module incomplete ({type(e).__name__}: {_first_line(e)})") from None
    actual = len(ds.PixelData)
    if actual > expected + expected % 2 and actual - expected >= row:
        raise ImageReadError(
            f"{path}: Pixel Data holds {actual} bytes but Rows {ds.Rows} x Columns {ds.Columns} x "
            f"{int_value(ds, 'SamplesPerPixel', 1)} sample(s) x {ds.BitsAllocated} bits x "
            f"{int_value(ds, 'NumberOfFrames', 1)} frame(s) is {expected}: the header does not describe the pixels"
        )


def decode_pixels(ds: Dataset, path: PathLike, frame: int | None = None) -> np.ndarray:
    """Decoded stored values of one frame (or of the whole single-frame image), checked against the header.

    Returns ``[Rows, Columns]`` or ``[Rows, Columns, Samples]`` (pydicom order; YBR already converted to RGB
    by pydicom). BitsStored is honoured by pydicom (unused high bits masked, sign extended). Raises
    :class:`ImageReadError` naming ``path`` when Pixel Data or Rows / Columns are missing, when the header's
    dimensions do not match the pixel data, or when no installed plugin decodes the transfer syntax.
    """
    from pydicom.pixels import pixel_array

    if "PixelData" not in ds:
        raise ImageReadError(f"{path}: no (7FE0,0010) Pixel Data element")
    rows, columns = int_value(ds, "Rows", 0), int_value(ds, "Columns", 0)
    if rows <= 0 or columns <= 0:
        raise ImageReadError(f"{path}: Pixel Data without valid Rows / Columns ({rows} x {columns})")
    _check_pixel_length(ds, path)
    try:
        with quiet_value_validation():
            arr = pixel_array(ds, index=frame)
    except Exception as e:
        raise ImageReadError(
            f"{path}: cannot decode pixel data with transfer syntax {transfer_syntax(ds)} "
            f"({type(e).__name__}: {_first_line(e)})"
        ) from None
    if tuple(arr.shape[:2]) != (rows, columns):
        raise ImageReadError(
            f"{path}: decoded pixels are {tuple(arr.shape[:2])} but Rows x Columns is {(rows, columns)}"
        )
    return arr


# ================================================================================================ folders


@dataclass
class FolderWalk:
    """What :func:`walk_files` found: ``files`` (sorted, as reached), and what it did not walk or read,
    each ``(path, reason)``: folders reached again through a symbolic link, broken links, unreadable
    folders."""

    files: list[Path] = field(default_factory=list)
    not_walked: list[tuple[Path, str]] = field(default_factory=list)


def walk_files(root: PathLike, skip_hidden: bool = True) -> FolderWalk:
    """Every file under ``root``, depth first in sorted order (the order of ``sorted(root.rglob("*"))``).

    Symbolic links to folders are followed, each real folder walked once: a loop, or a second link to a
    folder already walked, is listed in ``not_walked`` with the path it was first reached by (relative to
    ``root``). Hidden names (``.git``, ``.DS_Store``) are skipped when ``skip_hidden``.
    """
    root = Path(root)
    walk = FolderWalk()
    seen: dict[tuple[int, int], Path] = {}

    def visit(folder: Path) -> None:
        try:
            st = folder.stat()
            key = (st.st_dev, st.st_ino)
            if key in seen:
                first = seen[key]
                where = first.relative_to(root).as_posix() if first != root else "."
                walk.not_walked.append((folder, f"folder already searched as {where} (symbolic link)"))
                return
            seen[key] = folder
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            walk.not_walked.append((folder, f"folder not readable ({type(e).__name__})"))
            return
        for entry in entries:
            if skip_hidden and entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                if entry.is_dir(follow_symlinks=True):
                    visit(path)
                elif entry.is_file(follow_symlinks=True):
                    walk.files.append(path)
                elif entry.is_symlink():
                    walk.not_walked.append((path, "broken symbolic link"))
            except OSError as e:
                walk.not_walked.append((path, f"not readable ({type(e).__name__})"))

    visit(root)
    return walk
