"""The batch-inference report: one row per scan, ``report.csv`` + ``report.json``, shard reports and their merge.

Rows are plain dicts with :data:`REPORT_COLUMNS` (see ``docs/inference.md`` for an example of each):

``scan_id``     output folder name under ``OUTPUT_DIR/scans/`` (relative input path; a series: folder + UID)
``input``       input path relative to ``INPUT_DIR`` (a series: its folder)
``kind``        radiograph | image | series | nifti | other
``series_uid``, ``modality``, ``body_part``   from the DICOM header (empty otherwise)
``probability`` image-level pneumothorax probability (classification head; CT: max over slices)
``positive``    yes | no: the post-processed mask (bundle thresholds) is not empty
``mask_pixels`` mask size in pixels / voxels (source geometry)
``area_mm2``    radiographs: mask area in mm² (empty if the file has no pixel spacing)
``volume_ml``   volumes: mask volume in mL
``components``  connected components of the mask (8-connected in 2D, 26-connected in 3D)
``seconds``     wall time spent on the scan (decode + share of the batch forward + writing)
``status``      ok | skipped | error;  ``reason``: why skipped / what failed;  ``warnings``: ``; ``-joined
``mask``, ``seg``, ``overlay``  output paths relative to ``OUTPUT_DIR`` (empty when not written)

Rows are always sorted by ``scan_id``, so a resumed run, a sharded run after the merge and an
uninterrupted run give the same rows (``seconds`` aside, which is a measurement).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pneumoseg.infer.writers import atomic_write

__all__ = [
    "REPORT_COLUMNS",
    "STATUSES",
    "sort_rows",
    "summarize",
    "summary_line",
    "write_report",
    "read_report",
    "shard_report_name",
    "find_shard_reports",
    "merge_reports",
    "ReportMergeError",
]

REPORT_COLUMNS = (
    "scan_id",
    "input",
    "kind",
    "series_uid",
    "modality",
    "body_part",
    "probability",
    "positive",
    "mask_pixels",
    "area_mm2",
    "volume_ml",
    "components",
    "seconds",
    "status",
    "reason",
    "warnings",
    "mask",
    "seg",
    "overlay",
)
STATUSES = ("ok", "skipped", "error")
_SHARD_RE = re.compile(r"^report\.shard-(\d+)-of-(\d+)\.json$")


class ReportMergeError(ValueError):
    """Shard reports cannot be merged (missing / duplicated shards, mixed shard counts); names the files."""


def sort_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows with every column (missing ones empty), sorted by ``scan_id``."""
    full = [{c: row.get(c, "") for c in REPORT_COLUMNS} for row in rows]
    return sorted(full, key=lambda r: str(r["scan_id"]))


def summarize(rows: Sequence[Mapping[str, Any]], seconds: float | None = None, processed: int | None = None) -> dict:
    """Counts by status, positives, and (if timing is given) ``processed`` scans per second."""
    counts = Counter(str(r.get("status", "")) for r in rows)
    summary: dict[str, Any] = {"scans": len(rows), **{s: counts.get(s, 0) for s in STATUSES}}
    summary["positive"] = sum(1 for r in rows if r.get("positive") == "yes")
    if seconds is not None:
        summary["seconds"] = round(seconds, 3)
        summary["processed"] = int(processed or 0)
        summary["scans_per_second"] = round((processed or 0) / seconds, 3) if seconds > 0 else 0.0
    return summary


def summary_line(summary: Mapping[str, Any]) -> str:
    """``"12 scans: 9 ok, 2 skipped, 1 error (3 positive); 9 processed in 4.1 s = 2.2 scans/s"``."""
    text = (
        f"{summary['scans']} scans: {summary['ok']} ok, {summary['skipped']} skipped, {summary['error']} error "
        f"({summary['positive']} positive)"
    )
    if "seconds" in summary:
        text += (
            f"; {summary['processed']} processed in {summary['seconds']:.1f} s = "
            f"{summary['scans_per_second']:.2f} scans/s"
        )
    if summary.get("interrupted"):
        text += f"; interrupted by {summary['interrupted']}: the report lists what finished"
    return text


def _csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(REPORT_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_report(
    output_dir: str | os.PathLike, rows: Iterable[Mapping[str, Any]], summary: Mapping[str, Any], name: str = "report"
) -> tuple[Path, Path]:
    """Write ``<name>.csv`` (the rows) and ``<name>.json`` (``{"summary", "columns", "rows"}``) atomically."""
    output_dir = Path(output_dir)
    rows = sort_rows(rows)
    csv_path = atomic_write(output_dir / f"{name}.csv", lambda tmp: tmp.write_text(_csv_text(rows)))
    payload = {"summary": dict(summary), "columns": list(REPORT_COLUMNS), "rows": rows}
    json_path = atomic_write(
        output_dir / f"{name}.json", lambda tmp: tmp.write_text(json.dumps(payload, indent=1) + "\n")
    )
    return csv_path, json_path


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    """A ``report*.json`` as written by :func:`write_report`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportMergeError(f"{path}: cannot read report ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ReportMergeError(f"{path}: not a pneumoseg report (no 'rows' list)")
    return data


def shard_report_name(shard_id: int, num_shards: int) -> str:
    """Base name (no suffix) of a shard's report, e.g. ``report.shard-000-of-004``."""
    return f"report.shard-{shard_id:03d}-of-{num_shards:03d}"


def find_shard_reports(
    folders: Iterable[str | os.PathLike], num_shards: int | None = None
) -> dict[int, tuple[int, Path]]:
    """``{shard_id: (num_shards, path)}`` of the shard reports in ``folders`` (only those of ``num_shards``
    shards if given, e.g. to ignore an earlier run with another shard count); duplicates raise."""
    found: dict[int, tuple[int, Path]] = {}
    for folder in folders:
        for path in sorted(Path(folder).glob("report.shard-*-of-*.json")):
            match = _SHARD_RE.match(path.name)
            if not match:
                continue
            shard, total = int(match.group(1)), int(match.group(2))
            if num_shards is not None and total != num_shards:
                continue
            if shard in found and found[shard][1].resolve() != path.resolve():
                raise ReportMergeError(f"shard {shard} reported twice: {found[shard][1]} and {path}")
            found[shard] = (total, path)
    return found


def merge_reports(
    destination: str | os.PathLike,
    sources: Sequence[str | os.PathLike] = (),
    require_complete: bool = True,
    num_shards: int | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Merge the shard reports found in ``destination`` and ``sources`` into ``destination/report.{csv,json}``.

    All shards ``0..K-1`` of one shard count ``K`` must be present exactly once (else
    :class:`ReportMergeError` naming what is missing), and no scan may appear in two shards. The merged
    rows are sorted by ``scan_id``: identical to an unsharded run's. ``num_shards``: consider only reports
    of that shard count. Shards whose summaries name different models (``"model"`` fingerprints) raise.
    Timing in the summary: the sum of the shards' processed counts over the longest shard's wall time
    (shards run in parallel).
    """
    found = find_shard_reports([destination, *sources], num_shards)
    if not found:
        where = [str(destination), *map(str, sources)]
        raise ReportMergeError(f"no shard reports (report.shard-*-of-*.json) in {where}")
    totals = {total for total, _ in found.values()}
    if len(totals) > 1:
        raise ReportMergeError(f"shard reports of different shard counts {sorted(totals)}: {sorted(found)}")
    total = totals.pop()
    missing = sorted(set(range(total)) - set(found))
    if missing and require_complete:
        raise ReportMergeError(f"missing shard report(s) {missing} of {total} (looked in {destination}, {sources})")
    rows: list[dict[str, Any]] = []
    seen: dict[str, Path] = {}
    seconds, processed = 0.0, 0
    models: dict[str, Path] = {}
    for shard in sorted(found):
        path = found[shard][1]
        data = read_report(path)
        for row in data["rows"]:
            sid = str(row.get("scan_id"))
            if sid in seen:
                raise ReportMergeError(f"scan {sid} is in two shard reports: {seen[sid]} and {path}")
            seen[sid] = path
            rows.append(row)
        summary = data.get("summary", {})
        if summary.get("model"):  # the model fingerprint: shards of different models must not be mixed
            models.setdefault(str(summary["model"]), path)
            if len(models) > 1:
                raise ReportMergeError(f"shard reports of different models: {sorted(map(str, models.values()))}")
        seconds = max(seconds, float(summary.get("seconds", 0.0)))
        processed += int(summary.get("processed", 0))
    rows = sort_rows(rows)
    summary = summarize(rows, seconds, processed)
    summary["merged_shards"] = total
    if models:
        summary["model"] = next(iter(models))
    write_report(destination, rows, summary)
    return rows, summary
