"""Tests for pneumoseg.infer.report: rows, CSV/JSON, summary, shard merge."""

from __future__ import annotations

import csv
import json

import pytest

from pneumoseg.infer.report import (
    REPORT_COLUMNS,
    ReportMergeError,
    merge_reports,
    shard_report_name,
    sort_rows,
    summarize,
    summary_line,
    write_report,
)


def _rows(n: int) -> list[dict]:
    statuses = ["ok", "ok", "skipped", "error"]
    return [
        {
            "scan_id": f"scan{i:02d}",
            "status": statuses[i % 4],
            "positive": "yes" if i % 4 == 0 else ("no" if i % 4 == 1 else ""),
            "probability": round(0.1 * (i % 10), 6) if i % 4 < 2 else "",
            "reason": 'bad, "quoted"\nreason' if i % 4 == 3 else "",
        }
        for i in range(n)
    ]


def test_write_report_csv_and_json_agree(tmp_path):
    rows = list(reversed(_rows(9)))
    summary = summarize(rows, seconds=3.0, processed=6)
    assert (summary["ok"], summary["skipped"], summary["error"], summary["positive"]) == (5, 2, 2, 3)
    assert summary["scans_per_second"] == 2.0
    assert summary_line(summary).startswith("9 scans: 5 ok, 2 skipped, 2 error (3 positive); 6 processed")
    csv_path, json_path = write_report(tmp_path, rows, summary)
    data = json.loads(json_path.read_text())
    assert data["columns"] == list(REPORT_COLUMNS)
    assert [r["scan_id"] for r in data["rows"]] == sorted(r["scan_id"] for r in rows)
    with csv_path.open() as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == list(REPORT_COLUMNS)
    assert [r["reason"] for r in read] == [str(r["reason"]) for r in data["rows"]]  # quoting survives
    assert sort_rows(rows) == data["rows"]


def test_merge_shards_equals_whole_and_detects_problems(tmp_path):
    rows = _rows(10)
    write_report(tmp_path / "whole", rows, summarize(rows))
    for shard in range(3):
        part = [r for i, r in enumerate(rows) if i % 3 == shard]
        write_report(tmp_path / "dest", part, summarize(part, 1.0 + shard, len(part)), name=shard_report_name(shard, 3))
    merged, summary = merge_reports(tmp_path / "dest")
    whole = json.loads((tmp_path / "whole" / "report.json").read_text())["rows"]
    assert merged == whole == json.loads((tmp_path / "dest" / "report.json").read_text())["rows"]
    assert summary["merged_shards"] == 3 and summary["processed"] == 10 and summary["seconds"] == 3.0

    (tmp_path / "dest" / f"{shard_report_name(1, 3)}.json").unlink()
    with pytest.raises(ReportMergeError, match=r"missing shard report\(s\) \[1\]"):
        merge_reports(tmp_path / "dest")
    write_report(tmp_path / "other", rows[:2], summarize(rows[:2]), name=shard_report_name(1, 3))
    with pytest.raises(ReportMergeError, match="scan scan00 is in two shard reports"):
        merge_reports(tmp_path / "dest", [tmp_path / "other"])
    write_report(tmp_path / "four", rows[:1], summarize(rows[:1]), name=shard_report_name(1, 4))
    with pytest.raises(ReportMergeError, match="different shard counts"):
        merge_reports(tmp_path / "dest", [tmp_path / "four"])
    part = [r for i, r in enumerate(rows) if i % 3 == 1]
    write_report(tmp_path / "dest", part, summarize(part), name=shard_report_name(1, 3))
    assert merge_reports(tmp_path / "dest", [tmp_path / "four"], num_shards=3)[0] == whole  # others ignored
    a, b = rows[:3], rows[3:]
    write_report(tmp_path / "m", a, {**summarize(a), "model": "aaa"}, name=shard_report_name(0, 2))
    write_report(tmp_path / "m", b, {**summarize(b), "model": "bbb"}, name=shard_report_name(1, 2))
    with pytest.raises(ReportMergeError, match="different models"):
        merge_reports(tmp_path / "m")
    with pytest.raises(ReportMergeError, match="no shard reports"):
        merge_reports(tmp_path / "empty")
