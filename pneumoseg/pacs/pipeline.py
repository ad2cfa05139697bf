"""The node's one adapter to batch inference: a spooled study -> ``pneumoseg infer``'s outputs and rows.

Everything the node needs from inference goes through :class:`StudyProcessor`, so the runner it drives is
the one behind ``pneumoseg infer`` (same discovery, preprocessing, model, post-processing, SEG writer,
per-scan records and report) and nothing here re-implements it. The models are loaded once, when the
processor is built; each study is one runner run::

    processor = StudyProcessor(["bundles/pneumothorax_scse_unet"], "results")
    for result in processor.process("spool/1.2.3", study_uid="1.2.3"):
        result.rows          # the report rows (report.csv), one per scan
        result.output_dir    # results/<model>/<study>/: scans/<scan_id>/{seg.dcm, overlay.png, ...}, report.*

Resuming is the runner's: a study processed again (new instances, or after a kill) reuses every scan whose
outputs are complete and verified, so only what changed is computed.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumoseg.writers import PNEUMOTHORAX_CODE, atomic_write, sanitize_source_header

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
    folder: str  # results/<folder>/<study>/


@dataclass
class StudyResult:
    """One model's outputs for one study: ``output_dir`` in ``pneumoseg infer``'s layout and its rows."""

    model: ModelInfo
    output_dir: Path
    rows: list[dict[str, Any]]
    exit_code: int
    summary: dict[str, Any] = field(default_factory=dict)


def _folder_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


class StudyProcessor:
    """Load the bundles' models once; run ``pneumoseg infer``'s runner on a study folder per model.

    Args:
        bundle_dirs: trained bundles (``configs/inference.json``, ``models/model.pt``, ...).
        results_root: results go to ``results_root/<model name>/<study UID>/``.
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
        from pneumoseg.inference import load_bundle_model, select_device

        if not bundle_dirs:
            raise ValueError("no bundle given (--bundle DIR or [inference] bundles in the config)")
        self.results_root = Path(results_root)
        self.device = device
        self.batch_size = batch_size
        self.workers = workers
        self.fp32 = fp32
        self.formats = formats
        self._bundles = [Path(b) for b in bundle_dirs]
        torch_device = select_device(device)
        self._models = [load_bundle_model(b, torch_device) for b in self._bundles]
        folders = [_folder_name(m.name) for m in self._models]
        if len(set(folders)) != len(folders):  # two versions of one bundle: keep their results apart
            folders = [f"{f}-{m.fingerprint[:8]}" for f, m in zip(folders, self._models)]
        self.models = [ModelInfo(m.name, m.version, m.fingerprint, folder) for m, folder in zip(self._models, folders)]

    def output_dir(self, model: ModelInfo, study_uid: str) -> Path:
        return self.results_root / model.folder / study_uid

    def process(
        self, study_dir: str | os.PathLike, study_uid: str, extra_rows: Sequence[Mapping[str, Any]] = ()
    ) -> list[StudyResult]:
        """Run every model on ``study_dir``; ``extra_rows`` (e.g. instances refused at receipt) join each
        model's report. Raises what the runner raises for a setup problem (the study is then failed)."""
        from pneumoseg.inference import BatchInferenceRunner
        from pneumoseg.report import read_report, summarize, write_report

        results = []
        for bundle, model, info in zip(self._bundles, self._models, self.models):
            out = self.output_dir(info, study_uid)
            runner = BatchInferenceRunner(
                bundle_root=str(bundle),
                input_dir=os.fspath(study_dir),
                output_dir=str(out),
                formats=self.formats,
                device=self.device,
                batch_size=self.batch_size,
                workers=self.workers,
                fp32=self.fp32,
                progress=False,
            )
            runner.model = model  # loaded once for every study
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
            results.append(StudyResult(info, out, rows, code, summary))
        return results
