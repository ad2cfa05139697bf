"""The node's persistent state: studies and their progress, results to send, errors (SQLite, WAL).

One database file, ``STATE_DIR/queue.sqlite3``, written in short transactions from the node's threads (one
connection per thread). SQLite's write-ahead log with ``synchronous=FULL`` makes every committed change
survive a ``kill -9`` (and a power cut), so after a restart:

* a study still ``receiving`` completes after the quiet time as before;
* a study that was ``processing`` goes back to ``queued`` (processed again; the runner reuses the scans whose
  outputs it had finished and verified) unless it was interrupted ``max_attempts`` times (``failed``);
* results not yet acknowledged by their destination are sent (again).

Study states: ``receiving`` -> ``queued`` (quiet time over) -> ``processing`` -> ``done`` | ``failed``; a new
instance for a study in any state puts it back to ``receiving`` (its generation counter goes up, so a run
that started before the instance arrived does not mark the study done).

A result is sent once per (source series, model fingerprint, destination, result SOP Instance UID): the row
is created with ``INSERT OR IGNORE`` on that key, so processing a study again never queues a result that was
already queued or sent. The result's SOP Instance UID is derived from the scan and the model, so even a send
repeated after a kill between the destination's acknowledgement and the commit here stores the same
instance again (a PACS keeps one copy of a SOP Instance UID).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DB_NAME", "NodeQueue", "PendingSend", "ResultToSend", "StudyClaim"]

DB_NAME = "queue.sqlite3"
SCHEMA_VERSION = 1
_ERRORS_KEPT = 200

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0,
    instances INTEGER NOT NULL DEFAULT 0,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    started REAL,
    finished REAL,
    seconds REAL,
    error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS studies_state ON studies (state, last_received);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    modality TEXT NOT NULL DEFAULT '',
    instances INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS instances (sop_uid TEXT PRIMARY KEY, series_uid TEXT NOT NULL, study_uid TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rejected (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    modality TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL,
    file TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sends (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    destination TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    sent REAL,
    last_error TEXT NOT NULL DEFAULT '',
    UNIQUE (series_uid, fingerprint, destination, sop_uid)
);
CREATE INDEX IF NOT EXISTS sends_due ON sends (state, next_attempt);
CREATE TABLE IF NOT EXISTS errors (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, source TEXT NOT NULL, message TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS remote_studies (study_uid TEXT PRIMARY KEY, instances INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class StudyClaim:
    """A study taken for processing: its UID and the generation it had when taken."""

    study_uid: str
    generation: int
    attempts: int


@dataclass(frozen=True)
class ResultToSend:
    """A result file to deliver to one destination, keyed by its source series and model."""

    series_uid: str
    fingerprint: str
    destination: str
    sop_uid: str
    study_uid: str
    kind: str  # seg | sr | sc
    path: str


@dataclass(frozen=True)
class PendingSend:
    id: int
    destination: str
    sop_uid: str
    study_uid: str
    series_uid: str
    kind: str
    path: str
    attempts: int


class NodeQueue:
    """The node's state database (see the module docstring); safe to use from several threads."""

    def __init__(self, path: str | os.PathLike, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._local = threading.local()
        if readonly:
            if not self.path.is_file():
                raise FileNotFoundError(f"{self.path}: no node state here (has `pneumoseg serve` run with it?)")
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db().executescript(_SCHEMA)  # idempotent (IF NOT EXISTS); executescript commits by itself
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        version = self._db().execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
        if int(version) != SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: node state of schema {version}, this pneumoseg reads {SCHEMA_VERSION}")

    # --------------------------------------------------------------------------------------- plumbing
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            if self.readonly:
                db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30, isolation_level=None)
            else:
                db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns
            db.row_factory = sqlite3.Row
            self._local.db = db
        return db

    class _Transaction:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")  # take the write lock now: no upgrade deadlocks between threads
            return self.db

        def __exit__(self, kind: Any, *_: Any) -> None:
            self.db.execute("COMMIT" if kind is None else "ROLLBACK")

    def _tx(self) -> NodeQueue._Transaction:
        return NodeQueue._Transaction(self._db())

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # --------------------------------------------------------------------------------------- receiving
    def record_instance(self, study_uid: str, series_uid: str, sop_uid: str, modality: str, now: float | None = None):
        """An instance is in the spool: its study is (again) ``receiving`` and its quiet time restarts."""
        now = time.time() if now is None else now
        with self._tx() as db:
            new = db.execute(
                "INSERT OR IGNORE INTO instances VALUES (?, ?, ?)", (sop_uid, series_uid, study_uid)
            ).rowcount
            db.execute(
                "INSERT INTO studies (study_uid, state, generation, instances, first_received, last_received) "
                "VALUES (?, 'receiving', 1, ?, ?, ?) ON CONFLICT (study_uid) DO UPDATE SET state = 'receiving', "
                "generation = generation + 1, instances = instances + excluded.instances, "
                "last_received = excluded.last_received, attempts = 0, error = ''",
                (study_uid, new, now, now),
            )
            db.execute(
                "INSERT INTO series VALUES (?, ?, ?, ?) ON CONFLICT (series_uid) DO UPDATE SET "
                "instances = instances + excluded.instances",
                (series_uid, study_uid, modality, new),
            )

    def record_rejection(
        self, study_uid: str, series_uid: str, sop_uid: str, modality: str, reason: str, file: str
    ) -> None:
        """An instance refused at receipt (kept in ``file`` for inspection): a row of its study's report, so
        its study is (again) ``receiving``; without a readable Study Instance UID, an error in the status."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO rejected (study_uid, series_uid, sop_uid, modality, reason, file, at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (study_uid, series_uid, sop_uid, modality, reason, file, now),
            )
            if study_uid:
                db.execute(
                    "INSERT INTO studies (study_uid, state, generation, instances, first_received, last_received) "
                    "VALUES (?, 'receiving', 1, 0, ?, ?) ON CONFLICT (study_uid) DO UPDATE SET state = 'receiving', "
                    "generation = generation + 1, last_received = excluded.last_received, attempts = 0, error = ''",
                    (study_uid, now, now),
                )
        self.record_error("receive", f"instance {sop_uid or '?'} of study {study_uid or '?'} rejected: {reason}")

    def rejections(self, study_uid: str) -> list[dict[str, Any]]:
        rows = self._db().execute("SELECT * FROM rejected WHERE study_uid = ? ORDER BY id", (study_uid,))
        return [dict(r) for r in rows]

    def known_instances(self, study_uid: str) -> set[str]:
        rows = self._db().execute("SELECT sop_uid FROM instances WHERE study_uid = ?", (study_uid,))
        return {r[0] for r in rows}

    # ------------------------------------------------------------------------------------------ studies
    def promote_quiet_studies(self, quiet_seconds: float, now: float | None = None) -> list[str]:
        """Studies without a new instance for ``quiet_seconds`` become ``queued``; returns their UIDs."""
        limit = (time.time() if now is None else now) - quiet_seconds
        with self._tx() as db:
            uids = [
                r[0]
                for r in db.execute(
                    "SELECT study_uid FROM studies WHERE state = 'receiving' AND last_received <= ? "
                    "ORDER BY last_received",
                    (limit,),
                )
            ]
            db.executemany("UPDATE studies SET state = 'queued' WHERE study_uid = ?", [(u,) for u in uids])
        return uids

    def claim_study(self) -> StudyClaim | None:
        """The oldest ``queued`` study, now ``processing`` (its attempt counted), or ``None``."""
        with self._tx() as db:
            row = db.execute(
                "SELECT study_uid, generation, attempts FROM studies WHERE state = 'queued' "
                "ORDER BY last_received LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE studies SET state = 'processing', attempts = attempts + 1, started = ? WHERE study_uid = ?",
                (time.time(), row["study_uid"]),
            )
        return StudyClaim(row["study_uid"], row["generation"], row["attempts"] + 1)

    def finish_study(
        self, claim: StudyClaim, error: str = "", seconds: float = 0.0, results: Iterable[ResultToSend] = ()
    ) -> tuple[str, int]:
        """Close a claim in one transaction with the results it queues: ``done`` (or ``failed`` with
        ``error``), unless an instance arrived meanwhile (then the study stays ``receiving``). Returns the
        study's new state and how many of ``results`` were new (the others were queued before)."""
        now = time.time()
        with self._tx() as db:
            new = 0
            for r in results:
                new += db.execute(
                    "INSERT OR IGNORE INTO sends (series_uid, fingerprint, destination, sop_uid, study_uid, kind, "
                    "path, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (r.series_uid, r.fingerprint, r.destination, r.sop_uid, r.study_uid, r.kind, r.path, now),
                ).rowcount
            state = "failed" if error else "done"
            db.execute(
                "UPDATE studies SET state = ?, finished = ?, seconds = ?, error = ? "
                "WHERE study_uid = ? AND generation = ? AND state = 'processing'",
                (state, now, seconds, error, claim.study_uid, claim.generation),
            )
            current = db.execute("SELECT state FROM studies WHERE study_uid = ?", (claim.study_uid,)).fetchone()
        if error:
            self.record_error("process", f"study {claim.study_uid}: {error}")
        return current[0], new

    def recover(self, max_attempts: int) -> list[str]:
        """At start-up: studies left ``processing`` by a killed node go back to ``queued`` (or ``failed``
        after ``max_attempts`` interrupted attempts). Returns the re-queued UIDs."""
        with self._tx() as db:
            rows = db.execute("SELECT study_uid, attempts FROM studies WHERE state = 'processing'").fetchall()
            requeued = []
            for row in rows:
                if row["attempts"] >= max_attempts:
                    message = f"processing interrupted {row['attempts']} times (the node stopped or crashed)"
                    db.execute(
                        "UPDATE studies SET state = 'failed', error = ? WHERE study_uid = ?",
                        (message, row["study_uid"]),
                    )
                else:
                    db.execute("UPDATE studies SET state = 'queued' WHERE study_uid = ?", (row["study_uid"],))
                    requeued.append(row["study_uid"])
        return requeued

    def study(self, study_uid: str) -> dict[str, Any] | None:
        row = self._db().execute("SELECT * FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
        return dict(row) if row else None

    def studies(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._db().execute("SELECT * FROM studies ORDER BY first_received")]

    # -------------------------------------------------------------------------------------------- sends
    def due_sends(self, now: float | None = None, limit: int = 100) -> list[PendingSend]:
        now = time.time() if now is None else now
        rows = self._db().execute(
            "SELECT id, destination, sop_uid, study_uid, series_uid, kind, path, attempts FROM sends "
            "WHERE state = 'pending' AND next_attempt <= ? ORDER BY destination, id LIMIT ?",
            (now, limit),
        )
        return [PendingSend(**dict(r)) for r in rows]

    def next_send_time(self) -> float | None:
        row = self._db().execute("SELECT MIN(next_attempt) FROM sends WHERE state = 'pending'").fetchone()
        return row[0]

    def mark_sent(self, send_id: int) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE sends SET state = 'sent', sent = ?, attempts = attempts + 1, last_error = '' WHERE id = ?",
                (time.time(), send_id),
            )

    def mark_send_failed(self, send_id: int, error: str, retry_at: float | None) -> None:
        """A failed attempt: retried at ``retry_at``, or given up (``failed``) if it is ``None``."""
        with self._tx() as db:
            if retry_at is None:
                db.execute(
                    "UPDATE sends SET state = 'failed', attempts = attempts + 1, last_error = ? WHERE id = ?",
                    (error, send_id),
                )
            else:
                db.execute(
                    "UPDATE sends SET attempts = attempts + 1, next_attempt = ?, last_error = ? WHERE id = ?",
                    (retry_at, error, send_id),
                )

    def sends(self, study_uid: str | None = None) -> list[dict[str, Any]]:
        if study_uid is None:
            return [dict(r) for r in self._db().execute("SELECT * FROM sends ORDER BY id")]
        return [
            dict(r) for r in self._db().execute("SELECT * FROM sends WHERE study_uid = ? ORDER BY id", (study_uid,))
        ]

    # ------------------------------------------------------------------------------------ remote (DICOMweb)
    def remote_instances(self, study_uids: Sequence[str]) -> dict[str, int]:
        """Instance counts of remote studies as last seen by the DICOMweb poller."""
        db = self._db()
        out = {}
        for uid in study_uids:
            row = db.execute("SELECT instances FROM remote_studies WHERE study_uid = ?", (uid,)).fetchone()
            if row is not None:
                out[uid] = row[0]
        return out

    def set_remote_instances(self, counts: dict[str, int]) -> None:
        with self._tx() as db:
            db.executemany(
                "INSERT INTO remote_studies VALUES (?, ?) ON CONFLICT (study_uid) DO UPDATE SET "
                "instances = excluded.instances",
                list(counts.items()),
            )

    def get_meta(self, key: str) -> str | None:
        row = self._db().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value)
            )

    # ------------------------------------------------------------------------------------------- errors
    def record_error(self, source: str, message: str) -> None:
        """Keep the last errors for ``pneumoseg serve status`` (UIDs and reasons only, never patient data)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO errors (at, source, message) VALUES (?, ?, ?)", (time.time(), source, message[:500])
            )
            db.execute("DELETE FROM errors WHERE id <= (SELECT MAX(id) FROM errors) - ?", (_ERRORS_KEPT,))

    def last_errors(self, n: int = 10) -> list[dict[str, Any]]:
        rows = self._db().execute("SELECT at, source, message FROM errors ORDER BY id DESC LIMIT ?", (n,))
        return [dict(r) for r in rows]

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """A read for the status report."""
        return list(self._db().execute(sql, args))
