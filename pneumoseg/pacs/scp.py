"""The DICOM Storage SCP (pynetdicom): receive CR / DX / CT instances into the spool, answer C-ECHO.

Associations are checked when requested: a calling AE title or a peer address not in the allowed lists is
rejected with an A-ASSOCIATE-RJ (permanent; "calling AE title not recognised" / "no reason given") before
any data set is accepted. Each C-STORE is answered only after :meth:`Spool.store` returned, i.e. after the
instance is durably on disk and recorded in the queue: "success" means the node has it, whatever happens
next. An instance that cannot be kept gets a failure status (``0xA900`` data set does not match SOP class,
``0xC210`` cannot understand) and a row in its study's report.
"""

from __future__ import annotations

import ipaddress
import threading
from collections import Counter
from typing import Any

from pneumoseg.pacs.config import NodeSettings
from pneumoseg.pacs.log import log_event
from pneumoseg.pacs.queue import NodeQueue
from pneumoseg.pacs.spool import ACCEPTED_SOP_CLASSES, Rejected, Spool, ingest

__all__ = ["StorageSCP", "TRANSFER_SYNTAXES"]

TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired; pydicom reads it)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
]
"""Stored as received: what pydicom and the pylibjpeg plugins installed with pneumoseg decode."""
VERIFICATION = "1.2.840.10008.1.1"


class StorageSCP:
    """Listen on ``settings.bind:settings.port`` as ``settings.ae_title``; store into ``spool`` + ``queue``.

    ``start()`` returns once the port is listening; ``stop()`` closes it (associations in progress end).
    """

    def __init__(self, settings: NodeSettings, spool: Spool, queue: NodeQueue) -> None:
        self.settings = settings
        self.spool = spool
        self.queue = queue
        self._server: Any = None
        self._counts: dict[int, Counter] = {}
        self._lock = threading.Lock()
        self._networks = [ipaddress.ip_network(h, strict=False) for h in settings.allowed_hosts]

    # ---------------------------------------------------------------------------------------- server
    def start(self) -> None:
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_associations = self.settings.max_associations
        ae.maximum_pdu_size = self.settings.max_pdu
        for sop_class in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        ae.add_supported_context(VERIFICATION)
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]
        self._server = ae.start_server((self.settings.bind, self.settings.port), block=False, evt_handlers=handlers)
        log_event("listening", ae_title=self.settings.ae_title, bind=self.settings.bind, port=self.port)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server else self.settings.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # -------------------------------------------------------------------------------------- handlers
    @staticmethod
    def _peer(assoc: Any) -> tuple[str, str]:
        calling = assoc.requestor.primitive.calling_ae_title if assoc.requestor.primitive else ""
        return str(calling).strip(), str(assoc.requestor.address)

    def _allowed(self, calling_ae: str, host: str) -> str:
        """Why an association is refused, or ``""``."""
        if self.settings.allowed_ae_titles and calling_ae not in self.settings.allowed_ae_titles:
            return "calling AE title not allowed"
        if self._networks:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                return "peer address not allowed"
            if not any(address in network for network in self._networks):
                return "peer address not allowed"
        return ""

    def _on_requested(self, event: Any) -> None:
        """Reject at association time (pynetdicom's documented use of EVT_REQUESTED: an A-ASSOCIATE-RJ sent
        here skips the negotiation), before any data set is accepted."""
        calling, host = self._peer(event.assoc)
        reason = self._allowed(calling, host)
        if reason:
            log_event("association", calling_ae=calling, peer=host, result="rejected", reason=reason)
            self.queue.record_error("association", f"{calling}@{host} rejected: {reason}")
            diagnostic = 0x03 if reason.startswith("calling AE") else 0x01  # calling AE not recognised | none given
            event.assoc.acse.send_reject(0x01, 0x01, diagnostic)  # rejected permanent, by the service user
            # as pynetdicom's own rejection: wait for the DUL to deliver the A-ASSOCIATE-RJ before the socket closes
            event.assoc.kill()

    def _on_accepted(self, event: Any) -> None:
        with self._lock:
            self._counts[id(event.assoc)] = Counter()

    def _on_store(self, event: Any) -> int:
        counts = self._counts.setdefault(id(event.assoc), Counter())
        try:
            data = event.encoded_dataset(include_meta=True)
            result = ingest(self.spool, self.queue, data)
            if isinstance(result, Rejected):
                counts["rejected"] += 1
                return result.status
        except Exception as err:  # disk full, database locked...: the sender keeps the instance and retries
            log_event("store_failed", error=f"{type(err).__name__}: {err}"[:300])
            self.queue.record_error("receive", f"could not keep an instance: {type(err).__name__}: {err}"[:300])
            counts["failed"] += 1
            return 0xA700  # out of resources
        counts["stored"] += 1
        return 0x0000

    def _on_echo(self, event: Any) -> int:
        self._counts.setdefault(id(event.assoc), Counter())["echo"] += 1
        return 0x0000

    def _on_closed(self, event: Any) -> None:
        calling, host = self._peer(event.assoc)
        with self._lock:
            counts = self._counts.pop(id(event.assoc), Counter())
        how = "released" if event.event.name == "EVT_RELEASED" else "aborted"
        log_event("association", calling_ae=calling, peer=host, result=how, **dict(counts))
