"""The node's one adapter to batch inference: a spooled study -> ``pneumoseg infer``'s outputs and rows.

Everything the node needs from inference goes through :class:`StudyProcessor`, so the runner it drives is
the one behind ``pneumoseg infer`` (same discovery, preprocessing, model, post-processing, SEG writer,
per-scan records and report) and nothing here re-implements it. The models are loaded once, when the
processor is built; each study is one runner run::

    processor = StudyProcessor(["bundles/pneumothorax_scse_unet"], "results")
    result = processor.process("spool/1.2.3", study_uid="1.2.3")
    result.rows          # the report rows (report.csv), one per scan
    result.output_dir    # results/<models>/<study>/: scans/<scan_id>/{seg.dcm, overlay.png, ...}, report.*

Resuming is the runner's: a study processed again (new instances, or after a kill) reuses every scan whose
outputs are complete and verified, so only what changed is computed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumoseg.infer.writers import PNEUMOTHORAX_CODE, atomic_write, sanitize_source_header

__all__ = [
    "PNEUMOTHORAX_CODE",
    "ModelInfo",
    "StudyProcessor",
    "StudyResult",
    "atomic_write",
    "sanitize_source_header",
]
# what the node's results share with the runner's outputs (re-exported: the node imports batch inference
# only here): the SEG's finding code, atomic file writes, source headers made acceptable to highdicom


@dataclass(frozen=True)
class ModelInfo:
    """What the node needs to know of a loaded model: its name, version and output fingerprint (the key of
    "this result was sent already")."""

    name: str
    version: str
    fingerprint: str


@dataclass
class StudyResult:
    """The outputs of one study: ``output_dir`` in ``pneumoseg infer``'s layout, its rows, and the model
    each image kind went to."""

    models: Mapping[str, ModelInfo]
    output_dir: Path
    rows: list[dict[str, Any]]
    exit_code: int
    summary: dict[str, Any] = field(default_factory=dict)

    def model_for(self, row: Mapping[str, Any]) -> ModelInfo | None:
        """The model that processed a report row (by its scan's image kind), ``None`` if none did."""
        from pneumoseg.model_record import CT, RADIOGRAPH

        return self.models.get(CT if row.get("kind") in ("series", "nifti") else RADIOGRAPH)


def _folder_name(models: Mapping[str, Any]) -> str:
    """``<model names>-<fingerprint>``: results of another model set never share a folder (the runner
    refuses a folder holding another model's outputs)."""
    from pneumoseg.infer.models import run_fingerprint

    names = "+".join(sorted({m.name for m in models.values()}))
    digest = hashlib.sha256(run_fingerprint(models).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9._+-]+', '_', names).strip('._') or 'model'}-{digest}"


class StudyProcessor:
    """Load the bundles' models once; run ``pneumoseg infer``'s runner on a study folder.

    Args:
        bundle_dirs: trained bundles (``models/model_record.json`` + ``models/model.pt`` each); each image
            kind goes to the bundle trained on it, as with ``pneumoseg infer --bundle A --bundle B``.
        results_root: results go to ``results_root/<models>/<study UID>/``.
        device, batch_size, workers, fp32: as ``pneumoseg infer``.
        formats: the runner's output formats (the SEG and the overlay are what the node sends back).
    """

    def __init__(
        self,
        bundle_dirs: Sequence[str | os.PathLike],
        results_root: str | os.PathLike,
        device: str = "auto",
        batch_size: int = 8,
        workers: int = 2,
        fp32: bool = False,
        formats: str = "seg,png,nifti,overlay",
    ) -> None:
        from pneumoseg.infer.models import load_models, select_device

        if not bundle_dirs:
            raise ValueError("no bundle given (--bundle DIR or [inference] bundles in the config)")
        self.results_root = Path(results_root)
        self.device = device
        self.batch_size = batch_size
        self.workers = workers
        self.fp32 = fp32
        self.formats = formats
        self._models = load_models([os.fspath(b) for b in bundle_dirs], select_device(device))
        self.by_kind = {k: ModelInfo(m.name, m.version, m.fingerprint) for k, m in self._models.items()}
        self.models = list({m.fingerprint: m for m in self.by_kind.values()}.values())
        self.folder = _folder_name(self._models)

    def output_dir(self, study_uid: str) -> Path:
        return self.results_root / self.folder / study_uid

    def process(
        self, study_dir: str | os.PathLike, study_uid: str, extra_rows: Sequence[Mapping[str, Any]] = ()
    ) -> StudyResult:
        """Run the models on ``study_dir``; ``extra_rows`` (e.g. instances refused at receipt) join the
        report. Raises what the runner raises for a setup problem (the study is then failed)."""
        from pneumoseg.infer.report import read_report, summarize, write_report
        from pneumoseg.infer.runner import BatchInferenceRunner

        out = self.output_dir(study_uid)
        runner = BatchInferenceRunner(
            input_dir=os.fspath(study_dir),
            output_dir=str(out),
            formats=self.formats,
            device=self.device,
            batch_size=self.batch_size,
            workers=self.workers,
            fp32=self.fp32,
            progress=False,
            models=self._models,  # loaded once for every study
        )
        with contextlib.redirect_stdout(io.StringIO()):  # its summary line: the node logs its own
            code = runner.run()
        report = read_report(out / "report.json")
        rows = list(report["rows"])
        summary = dict(report.get("summary", {}))
        if extra_rows:
            rows += [dict(r) for r in extra_rows]
            summary = {**summary, **summarize(rows)}
            write_report(out, rows, summary)
            code = code or 1
        return StudyResult(self.by_kind, out, rows, code, summary)
