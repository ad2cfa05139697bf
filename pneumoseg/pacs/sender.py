"""Delivering results: C-STORE (pynetdicom) to DICOM destinations, STOW-RS to a DICOMweb server; retries.

The sender works from the queue's ``sends`` table only, so what it has not delivered survives a restart.
Each pass takes the due results, one association (or HTTP session) per destination; a result is marked
sent only after the destination acknowledged it (C-STORE success or warning status; STOW-RS 200/202 without
a failed SOP). Failures wait ``initial_backoff_seconds`` doubled per failed attempt (at most
``max_backoff_seconds``): a destination that cannot be reached is retried for ever (its results stay queued
and ``pneumoseg serve status`` shows them); one that answers with a failure status is given ``max_attempts``
tries, then the result is marked ``failed``.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Protocol

from pneumoseg.pacs.config import Destination, SendSettings
from pneumoseg.pacs.log import log_event
from pneumoseg.pacs.queue import NodeQueue, PendingSend

__all__ = ["DicomWebStore", "DimseStore", "Sender", "Transport", "TransportError"]

RESULT_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR Storage
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
)
_UNCOMPRESSED = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]  # explicit, implicit VR little endian


class TransportError(Exception):
    """The destination could not be reached (retried for ever) - as opposed to a refusal (a status)."""


class Transport(Protocol):
    """One destination's connection for a pass: ``store`` returns ``""`` if stored, else the refusal."""

    def __enter__(self) -> Transport: ...
    def __exit__(self, *exc: Any) -> None: ...
    def store(self, dataset: Any) -> str: ...


class DimseStore:
    """C-STORE SCU to ``destination`` as ``calling_ae`` (one association per ``with`` block)."""

    def __init__(self, destination: Destination, calling_ae: str, timeout: float = 30.0) -> None:
        self.destination = destination
        self.calling_ae = calling_ae
        self.timeout = timeout
        self._assoc: Any = None

    def __enter__(self) -> DimseStore:
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = min(self.timeout, 10.0)
        for sop_class in RESULT_SOP_CLASSES:
            ae.add_requested_context(sop_class, _UNCOMPRESSED)
        d = self.destination
        assoc = ae.associate(d.host, d.port, ae_title=d.ae_title)
        if not assoc.is_established:
            what = "rejected the association" if assoc.is_rejected else "could not be reached"
            raise TransportError(f"{d.ae_title}@{d.host}:{d.port} {what}")
        self._assoc = assoc
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.release()
        self._assoc = None

    def store(self, dataset: Any) -> str:
        if not self._assoc.is_established:
            raise TransportError("association lost")
        status = self._assoc.send_c_store(dataset)
        if not status or "Status" not in status:  # no answer: the association was aborted or timed out
            raise TransportError("no C-STORE response (association aborted or timed out)")
        code = int(status.Status)
        if code == 0x0000 or code in (0xB000, 0xB006, 0xB007):  # success, or stored with a warning
            return ""
        return f"C-STORE status 0x{code:04X}"


class DicomWebStore:
    """STOW-RS to a DICOMweb server (``dicomweb-client``)."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        self.url = url
        self.timeout = timeout
        self._client: Any = None

    def __enter__(self) -> DicomWebStore:
        from dicomweb_client import DICOMwebClient

        self._client = DICOMwebClient(self.url, timeout=self.timeout)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._client = None

    def store(self, dataset: Any) -> str:
        import requests

        try:
            response = self._client.store_instances([dataset])
        except requests.HTTPError as err:
            code = err.response.status_code if err.response is not None else 0
            if code >= 500 or code in (0, 408, 429):
                raise TransportError(f"STOW-RS HTTP {code}") from None
            return f"STOW-RS HTTP {code}"
        except requests.RequestException as err:
            raise TransportError(f"STOW-RS: {type(err).__name__}") from None
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            reason = failed[0].get("FailureReason", "")
            return f"STOW-RS failed SOP (reason {reason})"
        return ""


class Sender:
    """Deliver the queue's due results to ``transports`` (``{destination name: factory of a Transport}``)."""

    def __init__(self, queue: NodeQueue, transports: Mapping[str, Any], settings: SendSettings) -> None:
        self.queue = queue
        self.transports = dict(transports)
        self.settings = settings
        self._wake = threading.Event()

    def wake(self) -> None:
        """New results were queued: send now instead of at the next due time."""
        self._wake.set()

    def _backoff(self, attempts: int) -> float:
        s = self.settings
        return min(s.max_backoff_seconds, s.initial_backoff_seconds * 2 ** max(0, attempts))

    def send_due(self) -> int:
        """One pass over the due results; returns how many were delivered."""
        by_destination: dict[str, list[PendingSend]] = defaultdict(list)
        for item in self.queue.due_sends():
            by_destination[item.destination].append(item)
        delivered = 0
        for name, items in by_destination.items():
            factory = self.transports.get(name)
            if factory is None:  # a destination removed from the config: its results wait for it to return
                for item in items:
                    self._retry(item, f"destination {name!r} is not configured", transport=True)
                continue
            delivered += self._send(name, factory, items)
        return delivered

    def _send(self, name: str, factory: Any, items: list[PendingSend]) -> int:
        import pydicom

        delivered = handled = 0
        try:
            with factory() as transport:
                for item in items:
                    try:
                        dataset = pydicom.dcmread(item.path)
                    except (OSError, ValueError) as err:  # the result file is gone: nothing to retry
                        self._give_up(item, f"result file unreadable ({type(err).__name__})")
                        handled += 1
                        continue
                    refusal = transport.store(dataset)
                    if refusal:
                        self._refused(item, refusal)
                    else:
                        self.queue.mark_sent(item.id)
                        delivered += 1
                        log_event(
                            "send", destination=name, kind=item.kind, sop_uid=item.sop_uid, study_uid=item.study_uid,
                            series_uid=item.series_uid, result="sent", attempt=item.attempts + 1,
                        )  # fmt: skip
                    handled += 1
        except TransportError as err:
            for item in items[handled:]:
                self._retry(item, str(err), transport=True)
        except Exception as err:  # any other failure of a pass: the results stay queued
            for item in items[handled:]:
                self._retry(item, f"{type(err).__name__}: {err}"[:300], transport=True)
        return delivered

    def _retry(self, item: PendingSend, error: str, transport: bool) -> None:
        delay = self._backoff(item.attempts)
        self.queue.mark_send_failed(item.id, error, time.time() + delay)
        log_event(
            "send", destination=item.destination, kind=item.kind, sop_uid=item.sop_uid, study_uid=item.study_uid,
            result="retry", attempt=item.attempts + 1, error=error, retry_in_s=round(delay, 1),
        )  # fmt: skip
        if item.attempts == 0 or not transport:
            self.queue.record_error("send", f"{item.destination}: {error}")

    def _refused(self, item: PendingSend, refusal: str) -> None:
        limit = self.settings.max_attempts
        if limit and item.attempts + 1 >= limit:
            self._give_up(item, refusal)
        else:
            self._retry(item, refusal, transport=False)

    def _give_up(self, item: PendingSend, error: str) -> None:
        self.queue.mark_send_failed(item.id, error, None)
        self.queue.record_error("send", f"{item.destination}: {item.kind} {item.sop_uid} failed: {error}")
        log_event(
            "send", destination=item.destination, kind=item.kind, sop_uid=item.sop_uid, study_uid=item.study_uid,
            result="failed", attempt=item.attempts + 1, error=error,
        )  # fmt: skip

    def run(self, stop: threading.Event, idle_seconds: float = 1.0) -> None:
        """Send until ``stop`` is set, sleeping until the next result is due (or :meth:`wake`)."""
        while not stop.is_set():
            try:
                self.send_due()
            except Exception as err:  # the database or a bug: logged, the loop goes on
                log_event("send_loop_error", error=f"{type(err).__name__}: {err}"[:300])
            due = self.queue.next_send_time()
            wait = idle_seconds if due is None else min(idle_seconds, max(0.0, due - time.time()))
            self._wake.wait(wait)
            self._wake.clear()
