"""``BatchInferenceRunner``: one run of ``pneumoseg infer`` over a folder, as a class a bundle config can build.

load models (records + weights) -> claim OUTPUT_DIR (lock, model guard, stale temporaries)
-> discover + shard -> plan: skipped / reused (verified records) / to do
-> pipeline (workers -> models -> writer thread) -> report (merged when the last shard finishes)
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pneumoseg.infer.dataset import ScanDataset
from pneumoseg.infer.discovery import Scan, discover_scans, shard_scans
from pneumoseg.infer.folder import OutputFolder
from pneumoseg.infer.models import (
    PrecisionWrapper,
    load_models,
    route_models,
    run_fingerprint,
    select_device,
    with_flip_tta,
)
from pneumoseg.infer.outputs import ScanOutputs, base_row, parse_formats, scan_formats
from pneumoseg.infer.pipeline import InferencePipeline, StopRequest
from pneumoseg.infer.records import ScanRecords
from pneumoseg.infer.report import find_shard_reports, merge_reports, shard_report_name, summarize, summary_line
from pneumoseg.infer.report import write_report as write_rows
from pneumoseg.model_record import TrainedModel

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_SCAN_ERRORS", "EXIT_USAGE", "BatchInferenceRunner", "RunFailed"]

EXIT_OK, EXIT_SCAN_ERRORS, EXIT_USAGE, EXIT_FAILED = 0, 1, 2, 3
"""Exit codes: every scan ok (or skipped); some scan errored; usage / setup error; the run itself failed or
was interrupted (its report lists what finished)."""


class RunFailed(RuntimeError):
    """The run itself failed after it started (exit code 3); its report lists what finished."""


def _distributed_shard() -> tuple[int, int] | None:
    """(num_shards, shard_id) from torchrun's WORLD_SIZE / RANK, if set."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return (world, int(os.environ.get("RANK", "0") or 0)) if world > 1 else None


class BatchInferenceRunner:
    """Segment every scan under ``input_dir`` into ``output_dir``; :meth:`run` returns the exit code.

    All arguments but ``models`` are JSON-friendly, so a bundle config builds it with ``_target_``. A
    program that owns its process should call :func:`pneumoseg.runtime.retain_freed_memory` first and stop
    the run on signals through :attr:`stop` (:func:`pneumoseg.infer.cli.run_owned` does both).

    Args:
        bundles: bundle folder(s); each holds ``models/model_record.json`` + ``models/model.pt`` (read as
            data) and serves the image kinds its record was trained on. Two bundles of one kind: an error.
        input_dir: folder of scans (searched recursively; never modified).
        output_dir: where ``scans/<scan_id>/...``, ``report.csv`` and ``report.json`` go.
        formats: comma-separated subset of ``nifti,seg,png,overlay`` (or a list).
        device: ``auto`` (CUDA if available, else CPU), ``cpu`` or ``cuda:N``.
        batch_size: radiographs per forward pass; CT slices per forward pass.
        workers: DataLoader worker processes decoding / preprocessing (0: in the main process).
        fp32: force full precision (default: bf16 autocast + channels_last on CPUs with native bf16,
            fp16 AMP on GPUs).
        overwrite: redo every scan, replacing existing outputs (default: keep verified outputs, refuse
            outputs of another model).
        strict: stop at the first scan that errors (exit code 1).
        chest_only: skip scans whose header is not a chest / not an expected modality (default: warn only).
        num_shards, shard_id: process every ``num_shards``-th scan starting at ``shard_id`` (``None``: from
            torchrun's WORLD_SIZE / RANK, else 1 / 0); the shards' reports merge when the last one finishes.
        progress: show a tqdm progress bar (scans/s, ETA).
        model_file: an exported ONNX / TorchScript file of the (one) bundle, run instead of its weights.
        trust: load a TorchScript ``model_file`` (code) only when trusted.
        models: already loaded models (``{kind: TrainedModel}`` or a list), instead of ``bundles``.
        tta: horizontal-flip test-time augmentation (each scan also mirrored left-right, probabilities
            averaged; twice the model time). Outputs carry another fingerprint than without.
        weights: weight files relative to each bundle instead of ``models/model.pt``; several are averaged
            (an ensemble of fold models, e.g. ``["models/fold_0.pt", "models/fold_1.pt"]``).
    """

    outputs_class: type[ScanOutputs] = ScanOutputs
    """What writes each scan (subclass it to add to the writer thread's work, e.g. timing)."""

    def __init__(
        self,
        bundles: str | Sequence[str] = (),
        input_dir: str = "",
        output_dir: str = "",
        formats: str | Sequence[str] = "nifti,seg,png,overlay",
        device: str = "auto",
        batch_size: int = 8,
        workers: int = 2,
        fp32: bool = False,
        overwrite: bool = False,
        strict: bool = False,
        chest_only: bool = False,
        num_shards: int | None = None,
        shard_id: int | None = None,
        progress: bool = True,
        model_file: str | None = None,
        trust: bool = False,
        models: Mapping[str, TrainedModel] | Sequence[TrainedModel] | None = None,
        tta: bool = False,
        weights: str | Sequence[str] | None = None,
    ) -> None:
        self.bundles = [bundles] if isinstance(bundles, (str, os.PathLike)) else list(bundles)
        self.input_dir, self.output_dir = Path(input_dir), Path(output_dir)
        self.formats = parse_formats(formats)
        self.device = select_device(device)
        self.batch_size, self.workers = max(1, int(batch_size)), max(0, int(workers))
        self.fp32, self.overwrite, self.strict = bool(fp32), bool(overwrite), bool(strict)
        self.chest_only = bool(chest_only)
        if num_shards is None and shard_id is None:
            num_shards, shard_id = _distributed_shard() or (1, 0)
        self.num_shards, self.shard_id = int(num_shards or 1), int(shard_id or 0)
        if not 0 <= self.shard_id < self.num_shards:
            raise ValueError(f"shard_id {self.shard_id} not in [0, {self.num_shards})")
        self.progress, self.model_file, self.trust = progress, model_file, trust
        self.models = route_models(models) if models is not None else None
        self.tta = bool(tta)
        self.weights = [weights] if isinstance(weights, str) else list(weights or [])
        self.stop = StopRequest()
        """Set it (``stop.request("SIGTERM")``) to end the run after the writes in flight; exit code 3."""

    def run(self) -> int:
        """Process the shard; write records and the report; the exit code (:data:`EXIT_OK` ...)."""
        started = time.perf_counter()
        self._check_folders()
        models = self.models or load_models(self.bundles, self.device, self.model_file, self.trust, self.weights)
        if self.tta:
            models = with_flip_tta(models)
        records = ScanRecords(self.output_dir, self.input_dir)
        with OutputFolder(self.output_dir, self.num_shards, self.shard_id) as folder:
            folder.claim_for(models, records, self.overwrite)
            scans = self._discover()
            rows, todo, reused = self._plan(scans, models, records)
            decided = len(rows)
            try:
                stopped = self._stop_at_broken_input(scans) or self._process(todo, rows, models, records)
            except Exception as e:  # the report of what finished, then the failure
                failure = f"{type(e).__name__}: {e}"
                self._report(rows, models, started, len(rows) - decided, reused, failed=failure)
                raise RunFailed(failure) from e
            return self._report(rows, models, started, len(rows) - decided, reused, stopped)

    def _check_folders(self) -> None:
        if not self.input_dir.is_dir():
            raise FileNotFoundError(f"input folder not found: {self.input_dir}")
        if self.output_dir.resolve().is_relative_to(self.input_dir.resolve()):
            # the outputs would be found as inputs by the next run
            raise ValueError(f"OUTPUT_DIR {self.output_dir} must not be inside INPUT_DIR {self.input_dir}")

    def _discover(self) -> list[Scan]:
        """This shard's scans of INPUT_DIR."""
        found = discover_scans(self.input_dir, self.chest_only)
        if not found:
            print(f"pneumoseg infer: no files found in {self.input_dir}", file=sys.stderr)
        return shard_scans(found, self.num_shards, self.shard_id)

    def _plan(
        self, scans: list[Scan], models: Mapping[str, TrainedModel], records: ScanRecords
    ) -> tuple[dict[str, dict[str, Any]], list[Scan], int]:
        """Rows of the scans not to process (skipped or broken at discovery, no model for their kind, done
        before: verified records), the scans to process, and how many were done before. Scans skipped or
        broken lose their old outputs."""
        rows: dict[str, dict[str, Any]] = {}
        todo: list[Scan] = []
        for scan in scans:
            if scan.status == "pending" and scan.image_kind not in models:
                scan.status = "skipped"
                scan.reason = f"model not trained on {scan.image_kind} images (no --bundle for {scan.image_kind})"
            if scan.status != "pending":
                records.remove(scan)
                rows[scan.scan_id] = base_row(scan)
                continue
            model = models[scan.image_kind]
            formats = scan_formats(self.formats, scan)
            row = None if self.overwrite else records.verified_row(scan, model.fingerprint, formats)
            if row is not None:
                rows[scan.scan_id] = row
            else:
                todo.append(scan)
        reused = sum(1 for s in scans if s.status == "pending") - len(todo)
        return rows, todo, reused

    def _stop_at_broken_input(self, scans: list[Scan]) -> str:
        broken = next((s for s in scans if s.status == "error"), None)
        if self.strict and broken is not None:  # unreadable at discovery: stop before any work
            return f"--strict: stopped at {broken.source}: {broken.reason}"
        return ""

    def _process(
        self,
        todo: list[Scan],
        rows: dict[str, dict[str, Any]],
        models: Mapping[str, TrainedModel],
        records: ScanRecords,
    ) -> str:
        """Run the models over ``todo``, filling ``rows``; a message if the run stopped early."""
        if not todo:
            return ""
        by_kind = {kind: m.record for kind, m in models.items()}
        dataset = ScanDataset(todo, by_kind, "seg" in self.formats, os.fspath(self.input_dir), self.workers)
        wrapped = {id(m): PrecisionWrapper(m.network, self.device, self.fp32) for m in models.values()}
        pipeline = InferencePipeline(
            dataset,
            {kind: wrapped[id(m)] for kind, m in models.items()},
            self.outputs_class(records, self.formats, dataset, models),
            self.device,
            self.batch_size,
            self.workers,
            self.stop,
            self.strict,
            self.progress,
        )
        return pipeline.run(lambda scan, row: rows.__setitem__(scan.scan_id, row))

    def _report(
        self,
        rows: dict[str, dict[str, Any]],
        models: Mapping[str, TrainedModel],
        started: float,
        processed: int,
        reused: int,
        stopped: str = "",
        failed: str = "",
    ) -> int:
        """Write the report of what finished (the shard's; merged when all shards are there); the exit code.
        ``processed``: scans this run processed; ``reused``: scans whose verified records were kept."""
        summary = summarize(list(rows.values()), time.perf_counter() - started, processed)
        summary["reused"] = reused
        summary["model"] = run_fingerprint(models)
        if self.stop.is_set():
            summary["interrupted"] = self.stop.reason or "stop request"
        if stopped or failed:
            summary["stopped_early"] = failed or stopped
            print(failed or stopped, file=sys.stderr)
        if self.num_shards == 1:
            write_rows(self.output_dir, rows.values(), summary)
            print(summary_line(summary) + f"; report: {self.output_dir / 'report.csv'}")
        else:
            write_rows(self.output_dir, rows.values(), summary, name=shard_report_name(self.shard_id, self.num_shards))
            print(f"shard {self.shard_id}/{self.num_shards}: " + summary_line(summary))
            if (
                not (stopped or failed)
                and len(find_shard_reports([self.output_dir], self.num_shards)) == self.num_shards
            ):
                try:
                    _, merged = merge_reports(self.output_dir, num_shards=self.num_shards)
                    print("all shards done: " + summary_line(merged) + f"; report: {self.output_dir / 'report.csv'}")
                except Exception as e:  # another rank merging at the same moment, or a stale shard report
                    print(f"could not merge shard reports yet ({e}); run --merge-reports", file=sys.stderr)
        if failed or self.stop.is_set():
            return EXIT_FAILED
        return EXIT_SCAN_ERRORS if any(r.get("status") == "error" for r in rows.values()) else EXIT_OK
