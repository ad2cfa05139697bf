"""A PACS node: receive studies over DICOM (or DICOMweb), segment them, send the results back.

``pneumoseg serve --bundle DIR --config node.toml`` (docs/pacs.md). One concept per module:

* :mod:`~pneumoseg.pacs.config`: ``node.toml`` + command-line overrides;
* :mod:`~pneumoseg.pacs.scp`: the Storage SCP (pynetdicom), association checks;
* :mod:`~pneumoseg.pacs.spool`: received instances on disk, durably, checked;
* :mod:`~pneumoseg.pacs.queue`: the persistent state (SQLite): studies, results to send, errors;
* :mod:`~pneumoseg.pacs.pipeline`: the one adapter to batch inference (``pneumoseg infer``'s runner);
* :mod:`~pneumoseg.pacs.results`: SEG, Comprehensive SR, Secondary Capture per scan;
* :mod:`~pneumoseg.pacs.sender`: C-STORE / STOW-RS with retries and back-off;
* :mod:`~pneumoseg.pacs.dicomweb`: pulling new studies (QIDO-RS / WADO-RS);
* :mod:`~pneumoseg.pacs.status`: ``pneumoseg serve status``;
* :mod:`~pneumoseg.pacs.log`: structured log lines (no patient data);
* :mod:`~pneumoseg.pacs.node`: the parts wired together, start-up recovery, graceful stop;
* :mod:`~pneumoseg.pacs.cli`: the command line.

Needs the ``pacs`` extra (``pip install pneumoseg[pacs]``: pynetdicom, dicomweb-client).
"""
