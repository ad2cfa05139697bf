"""``pneumoseg serve status``: what the node has, is doing, could not do, and how fast (read-only).

Read from the queue database alone, so it works while the node runs (SQLite WAL readers never block the
writer) and after it stopped::

    studies: 0 receiving, 1 queued, 1 processing, 12 done, 0 failed
    results: 3 waiting (pacs: 3, oldest 4 min, last error: PACS@10.1.2.3:104 could not be reached), 40 sent, 0 failed
    throughput: 12 studies in the last hour (mean 4.2 s each), 40 results sent in the last hour
"""

from __future__ import annotations

import time
from typing import Any

from pneumoseg.pacs.queue import NodeQueue

__all__ = ["format_status", "node_status"]

STUDY_STATES = ("receiving", "queued", "processing", "done", "failed")


def node_status(queue: NodeQueue, now: float | None = None) -> dict[str, Any]:
    """Queue depths, results waiting per destination, failures, last errors, throughput (a JSON-able dict)."""
    now = time.time() if now is None else now
    studies = {state: 0 for state in STUDY_STATES}
    for row in queue.query("SELECT state, COUNT(*) FROM studies GROUP BY state"):
        studies[row[0]] = row[1]
    sends = {state: 0 for state in ("pending", "sent", "failed")}
    for row in queue.query("SELECT state, COUNT(*) FROM sends GROUP BY state"):
        sends[row[0]] = row[1]
    waiting = {}
    for row in queue.query(
        "SELECT destination, COUNT(*), MIN(created), MAX(attempts) FROM sends WHERE state = 'pending' "
        "GROUP BY destination"
    ):
        last = queue.query(
            "SELECT last_error FROM sends WHERE state = 'pending' AND destination = ? AND last_error != '' "
            "ORDER BY id DESC LIMIT 1",
            (row[0],),
        )
        waiting[row[0]] = {
            "results": row[1],
            "oldest_seconds": round(now - row[2], 1),
            "max_attempts": row[3],
            "last_error": last[0][0] if last else "",
        }
    hour = now - 3600
    done = queue.query("SELECT COUNT(*), AVG(seconds) FROM studies WHERE state = 'done' AND finished >= ?", (hour,))[0]
    sent_hour = queue.query("SELECT COUNT(*) FROM sends WHERE state = 'sent' AND sent >= ?", (hour,))[0][0]
    received = queue.query("SELECT COUNT(*), MAX(last_received) FROM studies")[0]
    instances = queue.query("SELECT COUNT(*) FROM instances")[0][0]
    rejected = queue.query("SELECT COUNT(*) FROM rejected")[0][0]
    failed_studies = [
        {"study_uid": r[0], "error": r[1]}
        for r in queue.query(
            "SELECT study_uid, error FROM studies WHERE state = 'failed' ORDER BY finished DESC LIMIT 10"
        )
    ]
    return {
        "studies": studies,
        "instances_received": instances,
        "instances_rejected": rejected,
        "last_received_seconds_ago": round(now - received[1], 1) if received[1] else None,
        "results": {**sends, "waiting_by_destination": waiting},
        "failed_studies": failed_studies,
        "throughput_last_hour": {
            "studies": done[0],
            "mean_seconds_per_study": round(done[1], 2) if done[1] is not None else None,
            "results_sent": sent_hour,
        },
        "last_errors": [
            {"seconds_ago": round(now - e["at"], 1), "source": e["source"], "message": e["message"]}
            for e in queue.last_errors(10)
        ],
    }


def _ago(seconds: float) -> str:
    return (
        f"{seconds:.0f} s"
        if seconds < 120
        else f"{seconds / 60:.0f} min"
        if seconds < 7200
        else f"{seconds / 3600:.0f} h"
    )


def format_status(status: dict[str, Any]) -> str:
    """The human form of :func:`node_status`."""
    s = status["studies"]
    counts = ", ".join(f"{s[k]} {k}" for k in STUDY_STATES)
    received = f"{status['instances_received']} instances received, {status['instances_rejected']} rejected"
    lines = [f"studies: {counts} ({received})"]
    r = status["results"]
    waiting = "; ".join(
        f"{name}: {w['results']}, oldest {_ago(w['oldest_seconds'])}"
        + (f", last error: {w['last_error']}" if w["last_error"] else "")
        for name, w in r["waiting_by_destination"].items()
    )
    lines.append(
        f"results: {r['pending']} waiting"
        + (f" ({waiting})" if waiting else "")
        + f", {r['sent']} sent, {r['failed']} failed"
    )
    t = status["throughput_last_hour"]
    mean = f" (mean {t['mean_seconds_per_study']:.1f} s each)" if t["mean_seconds_per_study"] is not None else ""
    lines.append(
        f"throughput: {t['studies']} studies in the last hour{mean}, {t['results_sent']} results sent in the last hour"
    )
    for study in status["failed_studies"]:
        lines.append(f"failed study {study['study_uid']}: {study['error']}")
    if status["last_errors"]:
        lines.append("last errors:")
        lines += [f"  {_ago(e['seconds_ago'])} ago [{e['source']}] {e['message']}" for e in status["last_errors"]]
    return "\n".join(lines)
