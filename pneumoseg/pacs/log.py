"""Structured log lines of the node: one JSON object per line on stderr.

``{"ts": "2024-05-01T10:00:00.123Z", "event": "association", "calling_ae": "ORTHANC", ...}``; one line per
association, per study, per send (and start, stop, errors). Only the fields passed to :func:`log_event` are
written, and callers pass UIDs, AE titles, addresses, counts and reasons: never a data set's patient name,
ID or birth date (the node never reads them).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["configure_logging", "log_event", "LOGGER_NAME"]

LOGGER_NAME = "pneumoseg.pacs"
_logger = logging.getLogger(LOGGER_NAME)


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        if fields is None:  # a library's plain message (pynetdicom warnings, the runner's logger)
            fields = {"event": "message", "logger": record.name, "message": record.getMessage()}
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        line = {"ts": ts, "level": record.levelname.lower(), **fields}
        return json.dumps(line, default=str, ensure_ascii=False)


def configure_logging(level: str = "info") -> None:
    """JSON lines on stderr for the node and the libraries it runs (theirs at WARNING and above)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonLines())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    _logger.setLevel(level.upper())
    # pynetdicom logs every PDU at INFO (and data set contents at DEBUG): warnings only
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def log_event(event: str, level: int = logging.INFO, **fields: Any) -> None:
    """One structured line: ``event`` and ``fields`` (UIDs, AE titles, counts, reasons; no patient data)."""
    _logger.log(level, event, extra={"fields": {"event": event, **fields}})
