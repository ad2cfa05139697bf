"""The spool: every received instance on disk, durably, before its sender hears "stored".

``STATE_DIR/spool/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` holds the bytes as they
arrived (no re-encoding): written to a temporary name in the series folder, ``fsync``-ed, renamed into place
and the folder ``fsync``-ed, so a file under its final name is always complete and survives a ``kill -9``
or a power cut. A study folder is what the inference runner reads (``pneumoseg infer``'s input layout).

An instance is checked before it is kept: a readable DICOM data set of an accepted SOP class (CR, DX, CT
Image Storage), with valid Study / Series / SOP Instance UIDs (they name folders: nothing else may reach a
path) and pixel data of the size its header announces. Anything else is refused with the reason and its
bytes are kept under ``STATE_DIR/rejected/`` for inspection; the node reports it as a row of its study.
"""

from __future__ import annotations

import io
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pneumoseg.pacs.queue import NodeQueue

__all__ = [
    "ACCEPTED_SOP_CLASSES",
    "ingest",
    "Rejected",
    "Spool",
    "Stored",
    "check_instance",
    "fsync_directory",
    "write_durably",
]

ACCEPTED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
}
"""What the node stores: projection radiographs (CR, DX/DR) and single-frame CT (the runner's inputs)."""
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_NATIVE_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2")
TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class Stored:
    """An instance now in the spool."""

    study_uid: str
    series_uid: str
    sop_uid: str
    modality: str
    path: Path


@dataclass(frozen=True)
class Rejected:
    """An instance refused (``reason``); its bytes were kept at ``path``; UIDs empty when unreadable."""

    study_uid: str
    series_uid: str
    sop_uid: str
    modality: str
    reason: str
    path: Path
    status: int  # the C-STORE failure status to answer with


def fsync_directory(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(path: Path) -> None:
    """``mkdir -p`` whose new entries are durable (each new folder's parent is fsync-ed)."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
        fsync_directory(folder.parent)


def write_durably(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and durably (temporary + fsync + rename + fsync of the folder)."""
    _make_dirs(path.parent)
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{time.monotonic_ns()}-{path.name}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_directory(path.parent)
    return path


def _uid(ds: Any, keyword: str) -> str:
    value = ds.get(keyword)
    return str(value).strip() if value is not None else ""


def _expected_pixel_bytes(ds: Any) -> int:
    frames = int(ds.get("NumberOfFrames") or 1)
    samples = int(ds.get("SamplesPerPixel") or 1)
    bits = int(ds.BitsAllocated)
    pixels = int(ds.Rows) * int(ds.Columns) * samples * frames
    return (pixels + 7) // 8 if bits == 1 else pixels * ((bits + 7) // 8)


def check_instance(data: bytes) -> tuple[Any | None, str, int]:
    """Parse and check one instance (DICOM Part 10 bytes): ``(dataset, "", 0)`` if the node can keep it,
    else ``(dataset or None, reason, C-STORE failure status)``. Only UIDs and sizes appear in a reason."""
    import pydicom
    from pydicom.encaps import generate_fragments

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.get("PixelData")  # parse up to the end: a truncated data set fails here
    except Exception as err:  # pydicom raises many kinds of errors on broken input
        return None, f"unreadable data set ({type(err).__name__})", 0xC210
    sop_class = _uid(ds, "SOPClassUID")
    if sop_class not in ACCEPTED_SOP_CLASSES:
        return ds, f"SOP class {sop_class or '(none)'} is not one the node accepts", 0xA900
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        value = _uid(ds, keyword)
        if not _UID.match(value) or len(value) > 64:
            return ds, f"{keyword} missing or not a valid UID", 0xA900
    try:
        if "PixelData" not in ds:
            return ds, "no pixel data", 0xA900
        syntax = str(ds.file_meta.TransferSyntaxUID)
        if syntax in _NATIVE_SYNTAXES:
            expected, actual = _expected_pixel_bytes(ds), len(ds.PixelData)
            if actual < expected:
                return ds, f"pixel data truncated ({actual} of {expected} bytes)", 0xA900
        else:  # encapsulated: every fragment item must be whole (decoding is the runner's job)
            fragments = list(generate_fragments(ds.PixelData))
            if not fragments or not any(len(f) for f in fragments):
                return ds, "encapsulated pixel data without fragments", 0xA900
    except Exception as err:
        return ds, f"pixel data unreadable ({type(err).__name__}: {str(err)[:120]})", 0xA900
    return ds, "", 0


class Spool:
    """Received instances by study and series under ``root / "spool"``; refused ones under ``root / "rejected"``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.spool_dir = self.root / "spool"
        self.rejected_dir = self.root / "rejected"
        _make_dirs(self.spool_dir)

    def study_dir(self, study_uid: str) -> Path:
        if not _UID.match(study_uid):
            raise ValueError(f"not a UID: {study_uid!r}")
        return self.spool_dir / study_uid

    def store(self, data: bytes) -> Stored | Rejected:
        """Check ``data`` (a DICOM Part 10 file's bytes) and keep it durably in the spool or in ``rejected/``."""
        ds, reason, status = check_instance(data)
        if reason:
            ids = ["", "", "", ""]
            if ds is not None:
                keywords = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
                ids = [_uid(ds, k) if _UID.match(_uid(ds, k)) else "" for k in keywords]
                ids.append(str(ds.get("Modality", ""))[:16])
            folder = self.rejected_dir / (ids[0] or "unknown")
            path = write_durably(folder / f"{time.time_ns()}-{ids[2] or 'unknown'}.dcm", data)
            return Rejected(ids[0], ids[1], ids[2], ids[3], reason, path, status)
        study, series, sop = (_uid(ds, k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
        path = write_durably(self.spool_dir / study / series / f"{sop}.dcm", data)
        return Stored(study, series, sop, str(ds.get("Modality", ""))[:16], path)

    def remove_temporaries(self) -> int:
        """Delete temporaries a killed node left (never a complete instance: those have their final name)."""
        stale = [p for p in self.spool_dir.rglob(f"{TMP_PREFIX}*") if p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)

    def instances(self) -> list[tuple[str, str, str, Path]]:
        """Every instance in the spool as ``(study, series, sop, path)`` (for reconciling with the queue)."""
        out = []
        for path in sorted(self.spool_dir.glob("*/*/*.dcm")):
            if not path.name.startswith(TMP_PREFIX):
                out.append((path.parent.parent.name, path.parent.name, path.stem, path))
        return out


def ingest(spool: Spool, queue: NodeQueue, data: bytes) -> Stored | Rejected:
    """Receive one instance (from the SCP or the DICOMweb poller): keep it in the spool and record it in the
    queue, or keep it as refused and record the refusal; both durable when this returns."""
    from pneumoseg.pacs.log import log_event

    result = spool.store(data)
    if isinstance(result, Rejected):
        queue.record_rejection(
            result.study_uid, result.series_uid, result.sop_uid, result.modality, result.reason, str(result.path)
        )
        log_event("instance_rejected", study_uid=result.study_uid, sop_uid=result.sop_uid, reason=result.reason)
    else:
        queue.record_instance(result.study_uid, result.series_uid, result.sop_uid, result.modality)
    return result
