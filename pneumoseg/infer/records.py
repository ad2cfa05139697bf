"""Resume records: ``OUTPUT_DIR/scans/<scan_id>/record.json``, written last, proof that a scan is done.

A scan is done when its record exists, was made by the same model (fingerprint: weights + record) from the
same input files (relative path, size, mtime), lists every requested format, and every listed output still
has its recorded size and sha256. Anything else is redone, so a run killed at any point (even SIGKILL) and
started again ends with the outputs and report rows of an uninterrupted run. A scan about to be rewritten,
or that turned into an error or a skip, first loses its record, then its outputs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pneumoseg.infer.discovery import Scan
from pneumoseg.infer.writers import atomic_write, file_digest

__all__ = ["OUTPUT_NAMES", "RECORD_NAME", "RECORD_VERSION", "SCANS_DIR", "ScanRecords"]

RECORD_NAME = "record.json"
SCANS_DIR = "scans"
RECORD_VERSION = 2  # 2: the fingerprint covers the model record (preprocessing, thresholds) with the weights
OUTPUT_NAMES = ("mask.png", "mask.nii.gz", "seg.dcm", "overlay.png")
"""Every file a scan's folder can hold besides its record."""


class ScanRecords:
    """The per-scan records under ``output_dir`` for inputs under ``input_dir``."""

    def __init__(self, output_dir: str | os.PathLike, input_dir: str | os.PathLike) -> None:
        self.output_dir = Path(output_dir)
        self.input_dir = Path(input_dir)

    def folder(self, scan: Scan) -> Path:
        return self.output_dir / SCANS_DIR / scan.scan_id

    def input_signature(self, scan: Scan) -> list[list[Any]]:
        """``[[path relative to INPUT_DIR, size, mtime_ns], ...]`` of the scan's files: a record made from
        other or changed inputs (same relative path, e.g. another INPUT_DIR into the same OUTPUT_DIR) is
        not reused."""
        signature = []
        for f in scan.files:
            try:
                st = os.stat(f)
                signature.append([os.path.relpath(f, self.input_dir), st.st_size, st.st_mtime_ns])
            except OSError:
                signature.append([os.path.relpath(f, self.input_dir), -1, -1])
        return signature

    def verified_row(self, scan: Scan, fingerprint: str, formats: Sequence[str]) -> dict[str, Any] | None:
        """The report row of the scan's record if it is complete and verified for this model and these
        formats, else ``None``."""
        folder = self.folder(scan)
        try:
            record = json.loads((folder / RECORD_NAME).read_text())
        except (OSError, ValueError):
            return None
        if (
            not isinstance(record, dict)
            or record.get("version") != RECORD_VERSION
            or record.get("fingerprint") != fingerprint
            or record.get("row", {}).get("status") != "ok"
            or not set(formats) <= set(record.get("formats", []))
            or record.get("inputs") != self.input_signature(scan)
        ):
            return None
        for name, digest in record.get("outputs", {}).items():
            file = folder / name
            try:
                if file.stat().st_size != digest["size"] or file_digest(file)["sha256"] != digest["sha256"]:
                    return None
            except (OSError, KeyError, TypeError):
                return None
        return record["row"]

    def write(
        self,
        scan: Scan,
        row: Mapping[str, Any],
        outputs: Mapping[str, Mapping[str, Any]],
        formats: Sequence[str],
        fingerprint: str,
    ) -> None:
        """The scan's record, last (``outputs``: ``{file name: file_digest}`` of what was written)."""
        record = {
            "version": RECORD_VERSION,
            "fingerprint": fingerprint,
            "formats": list(formats),
            "inputs": self.input_signature(scan),
            "row": dict(row),
            "outputs": dict(outputs),
        }
        atomic_write(self.folder(scan) / RECORD_NAME, lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))

    def remove(self, scan: Scan, keep: Iterable[str] = ()) -> None:
        """Delete the scan's record, then its outputs (except ``keep``): the record first, so that a kill in
        between leaves outputs without a record (redone), never a record without its outputs."""
        folder = self.folder(scan)
        (folder / RECORD_NAME).unlink(missing_ok=True)
        for name in OUTPUT_NAMES:
            if name not in keep:
                (folder / name).unlink(missing_ok=True)

    def fingerprints(self) -> set[str]:
        """The model fingerprints of every readable record under ``scans/`` (unreadable ones are redone)."""
        found = set()
        for path in (self.output_dir / SCANS_DIR).rglob(RECORD_NAME):
            try:
                value = json.loads(path.read_text()).get("fingerprint")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(value, str):
                found.add(value)
        return found
