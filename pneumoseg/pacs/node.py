"""The node: the parts wired together, and its life cycle (start, recover, work, stop on SIGTERM).

Threads: the Storage SCP's (one per association: receive into the spool), the sender's (deliver results),
the DICOMweb poller's (if configured), and the main thread, which promotes quiet studies, processes one
study at a time with the loaded models and queues its results. Start-up order makes a restart after a
``kill -9`` complete what was left: temporaries of half-written instances are deleted, spooled instances
the database missed are recorded, interrupted studies are queued again, and the unsent results are sent.

SIGTERM / SIGINT: the study in progress is finished and its results queued, nothing new is started, the
SCP stops listening, the sender ends after its current result; everything else stays queued for the next
start.
"""

from __future__ import annotations

import functools
import signal
import threading
import time
from pathlib import Path
from typing import Any

from pneumoseg.pacs.config import NodeConfig
from pneumoseg.pacs.log import log_event
from pneumoseg.pacs.queue import DB_NAME, NodeQueue, ResultToSend, StudyClaim
from pneumoseg.pacs.spool import Spool

__all__ = ["Node", "rejection_rows"]

DICOMWEB_DESTINATION = "dicomweb"


def rejection_rows(rejections: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Report rows (``pneumoseg.report`` columns) of the instances refused at receipt."""
    return [
        {
            "scan_id": f"rejected/{r['sop_uid'] or r['id']}",
            "input": f"rejected/{Path(r['file']).name}",
            "kind": "other",
            "series_uid": r["series_uid"],
            "modality": r["modality"],
            "status": "error",
            "reason": f"refused at receipt: {r['reason']}",
        }
        for r in rejections
    ]


class Node:
    """``pneumoseg serve``: build with a :class:`NodeConfig`, then :meth:`run` until stopped."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.state_dir = config.state_dir
        self.queue = NodeQueue(self.state_dir / DB_NAME)
        self.spool = Spool(self.state_dir)
        self.stop_requested = threading.Event()
        self._threads_stop = threading.Event()
        self.processor: Any = None
        self.sender: Any = None

    # ----------------------------------------------------------------------------------------- start
    def _recover(self) -> None:
        removed = self.spool.remove_temporaries()
        known = {r[0] for r in self.queue.query("SELECT sop_uid FROM instances")}
        missed = 0
        for study, series, sop, path in self.spool.instances():
            if sop not in known:  # killed between the spool's rename and the database's commit
                import pydicom

                modality = str(pydicom.dcmread(path, stop_before_pixels=True).get("Modality", ""))
                self.queue.record_instance(study, series, sop, modality, now=path.stat().st_mtime)
                missed += 1
        requeued = self.queue.recover(self.config.inference.max_attempts)
        log_event("recovered", temporaries_removed=removed, instances_recorded=missed, studies_requeued=requeued)

    def _transports(self) -> dict[str, Any]:
        from pneumoseg.pacs.sender import DicomWebStore, DimseStore

        c = self.config
        transports: dict[str, Any] = {
            d.name: functools.partial(DimseStore, d, c.node.ae_title, c.send.timeout_seconds) for d in c.destinations
        }
        if c.dicomweb.url and c.dicomweb.store_results:
            transports[DICOMWEB_DESTINATION] = functools.partial(DicomWebStore, c.dicomweb.url, c.send.timeout_seconds)
        return transports

    def run(self) -> int:
        """Serve until SIGTERM / SIGINT (or :meth:`stop`); returns the exit code."""
        from pneumoseg.pacs.dicomweb import DicomWebPoller
        from pneumoseg.pacs.pipeline import StudyProcessor
        from pneumoseg.pacs.scp import StorageSCP
        from pneumoseg.pacs.sender import Sender

        c = self.config
        self._recover()
        # the models first: a bundle that cannot be loaded stops the node before it accepts anything
        self.processor = StudyProcessor(
            c.bundle_dirs, c.results_dir, device=c.inference.device, batch_size=c.inference.batch_size,
            workers=c.inference.workers, fp32=c.inference.fp32,
        )  # fmt: skip
        transports = self._transports()
        if not transports:
            log_event("no_destinations", message="results are kept in the results folder only")
        self.sender = Sender(self.queue, transports, c.send)
        threads = [threading.Thread(target=self.sender.run, args=(self._threads_stop,), name="sender", daemon=True)]
        if c.dicomweb.url:
            poller = DicomWebPoller(c.dicomweb, self.spool, self.queue)
            threads.append(
                threading.Thread(target=poller.run, args=(self._threads_stop,), name="dicomweb", daemon=True)
            )
        scp = StorageSCP(c.node, self.spool, self.queue)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for thread in threads:
                thread.start()
            scp.start()
            models = [
                {"name": m.name, "version": m.version, "fingerprint": m.fingerprint} for m in self.processor.models
            ]
            log_event(
                "started", ae_title=c.node.ae_title, port=scp.port, models=models, destinations=sorted(transports)
            )
            self._work()
        finally:
            scp.stop()
            self._threads_stop.set()
            self.sender.wake()
            for thread in threads:
                thread.join(timeout=c.send.timeout_seconds + 5)
            for s, handler in previous.items():
                signal.signal(s, handler)
            log_event("stopped", queued=self.queue.query("SELECT COUNT(*) FROM studies WHERE state = 'queued'")[0][0])
        return 0

    def _on_signal(self, signum: int, frame: Any) -> None:
        log_event("stopping", signal=signal.Signals(signum).name, message="finishing the study in progress")
        self.stop_requested.set()

    def stop(self) -> None:
        self.stop_requested.set()

    # ------------------------------------------------------------------------------------------ work
    def _work(self) -> None:
        tick = min(1.0, max(0.05, self.config.node.quiet_seconds / 4))
        while not self.stop_requested.is_set():
            self.queue.promote_quiet_studies(self.config.node.quiet_seconds)
            claim = self.queue.claim_study()
            if claim is None:
                self.stop_requested.wait(tick)
                continue
            self.process_study(claim)

    def process_study(self, claim: StudyClaim) -> None:
        """Infer on one study, build its results and queue them for every destination (one transaction)."""
        from pneumoseg.pacs.results import build_results

        started = time.perf_counter()
        uid = claim.study_uid
        log_event("study_started", study_uid=uid, attempt=claim.attempts)
        study_dir = self.spool.study_dir(uid)
        study_dir.mkdir(parents=True, exist_ok=True)  # a study of refused instances only: an empty input
        try:
            extra = rejection_rows(self.queue.rejections(uid))
            result = self.processor.process(study_dir, uid, extra_rows=extra)
            to_send = [
                ResultToSend(f.series_uid, f.model_fingerprint, name, f.sop_uid, uid, f.kind, str(f.path))
                for f in build_results(result, study_dir, self.config.results)
                for name in self.sender.transports
            ]
        except Exception as err:  # this study fails (recorded, visible in the status); the node goes on
            seconds = time.perf_counter() - started
            message = f"{type(err).__name__}: {str(err)[:300]}"
            self.queue.finish_study(claim, error=message, seconds=seconds)
            log_event("study", study_uid=uid, result="failed", error=message, seconds=round(seconds, 2))
            return
        seconds = time.perf_counter() - started
        state, new = self.queue.finish_study(claim, seconds=seconds, results=to_send)
        rows = result.rows
        log_event(
            "study", study_uid=uid, result=state, scans=len(rows),
            ok=sum(r.get("status") == "ok" for r in rows), errors=sum(r.get("status") == "error" for r in rows),
            positive=sum(r.get("positive") == "yes" for r in rows), results_queued=new,
            results_already_queued=len(to_send) - new, seconds=round(seconds, 2),
        )  # fmt: skip
        if new:
            self.sender.wake()
