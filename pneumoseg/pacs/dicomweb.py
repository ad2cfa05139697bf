"""DICOMweb as the node's other transport: pull new studies (QIDO-RS + WADO-RS) into the spool.

Each poll lists the server's recent studies (StudyDate within ``lookback_days``) with their instance counts
(QIDO-RS); a study whose count differs
from the one recorded at the last poll is looked into: its CR / DX / DR / CT series (QIDO-RS), their
instances of an accepted SOP class that the node does not have yet, each retrieved (WADO-RS) and received
exactly like an instance from the Storage SCP (:func:`pneumoseg.pacs.spool.ingest`), so the quiet time,
the queue and the pipeline are the same. The count is recorded only once the study's new instances are all
in the spool: a poll that fails half-way is repeated. The node's own results (SEG, SR, SC series) change a
study's count but are never retrieved.

At its first poll the node records the studies already on the server and leaves them alone (a node
pointed at a full archive must not start segmenting years of images), unless ``pull_existing`` is set.
Results are stored back with STOW-RS (:class:`pneumoseg.pacs.sender.DicomWebStore`).
"""

from __future__ import annotations

import datetime
import io
import threading
from typing import Any

from pneumoseg.pacs.config import DicomWebSettings
from pneumoseg.pacs.log import log_event
from pneumoseg.pacs.queue import NodeQueue
from pneumoseg.pacs.spool import ACCEPTED_SOP_CLASSES, Spool, ingest

__all__ = ["DicomWebPoller", "PULLED_MODALITIES"]

PULLED_MODALITIES = ("CR", "DX", "DR", "CT")
_BASELINE_KEY = "dicomweb_baseline"


def _value(attributes: dict[str, Any], tag: str) -> Any:
    """The first value of a DICOM JSON attribute (``{"0020000D": {"vr": "UI", "Value": [...]}}``)."""
    values = attributes.get(tag, {}).get("Value") or [None]
    return values[0]


class DicomWebPoller:
    """Poll ``settings.url`` and feed new instances to ``spool`` + ``queue``."""

    def __init__(self, settings: DicomWebSettings, spool: Spool, queue: NodeQueue) -> None:
        self.settings = settings
        self.spool = spool
        self.queue = queue

    def _client(self) -> Any:
        from dicomweb_client import DICOMwebClient

        return DICOMwebClient(self.settings.url, timeout=self.settings.timeout_seconds)

    def poll(self) -> int:
        """One poll; returns how many instances were received."""
        client = self._client()
        filters = {}
        if self.settings.lookback_days:
            since = datetime.date.today() - datetime.timedelta(days=self.settings.lookback_days)
            filters["StudyDate"] = f"{since:%Y%m%d}-"
        studies = client.search_for_studies(
            fields=["NumberOfStudyRelatedInstances"], search_filters=filters, get_remaining=True
        )
        counts = {}
        for study in studies:
            uid = _value(study, "0020000D")
            if uid:
                counts[str(uid)] = int(_value(study, "00201208") or 0)
        if self.queue.get_meta(_BASELINE_KEY) is None:
            self.queue.set_meta(_BASELINE_KEY, "done")
            if not self.settings.pull_existing:
                self.queue.set_remote_instances(counts)
                log_event("dicomweb_baseline", url_studies=len(counts))
                return 0
        seen = self.queue.remote_instances(list(counts))
        received = 0
        for uid, count in counts.items():
            if seen.get(uid) == count:
                continue
            received += self._pull_study(client, uid)
            self.queue.set_remote_instances({uid: count})
        return received

    def _pull_study(self, client: Any, study_uid: str) -> int:
        from pydicom.filewriter import dcmwrite

        have = self.queue.known_instances(study_uid)
        received = 0
        for series in client.search_for_series(study_uid, fields=["Modality"]):
            if str(_value(series, "00080060") or "").upper() not in PULLED_MODALITIES:
                continue  # e.g. the node's own SEG / SR series
            series_uid = str(_value(series, "0020000E"))
            for instance in client.search_for_instances(study_uid, series_uid, fields=["SOPClassUID"]):
                sop_uid, sop_class = str(_value(instance, "00080018")), str(_value(instance, "00080016"))
                if sop_uid in have or sop_class not in ACCEPTED_SOP_CLASSES:
                    continue
                dataset = client.retrieve_instance(study_uid, series_uid, sop_uid)
                buffer = io.BytesIO()
                dcmwrite(buffer, dataset, enforce_file_format=True)
                ingest(self.spool, self.queue, buffer.getvalue())
                received += 1
        if received:
            log_event("dicomweb_study", study_uid=study_uid, instances=received)
        return received

    def run(self, stop: threading.Event) -> None:
        """Poll every ``poll_seconds`` until ``stop`` is set; a failed poll is logged and repeated."""
        while not stop.is_set():
            try:
                self.poll()
            except Exception as err:  # server down, HTTP error: the next poll tries again
                message = f"{type(err).__name__}: {str(err)[:200]}"
                log_event("dicomweb_poll_failed", error=message)
                self.queue.record_error("dicomweb", message)
            stop.wait(self.settings.poll_seconds)
