"""``pneumoseg infer``: the command line, and the program around a run (signals, memory, exit codes).

Exit codes: ``0`` every scan ok or skipped; ``1`` some scan errored (the others were processed; with
``--strict`` the run stopped at the first); ``2`` usage or setup error (missing folder or bundle, invalid
model record, unknown format, an OUTPUT_DIR in use by another run or holding another model's results);
``3`` the run itself failed or was interrupted (SIGINT / SIGTERM: the writes in flight are finished and
the report lists what finished; a second signal stops at once).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from pneumoseg.infer.runner import EXIT_FAILED, EXIT_OK, EXIT_USAGE, BatchInferenceRunner, RunFailed
from pneumoseg.runtime import retain_freed_memory

__all__ = ["add_subcommand", "run", "run_and_exit", "run_owned", "stop_on_signals"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def stop_on_signals(runner: BatchInferenceRunner) -> Iterator[None]:
    """SIGINT / SIGTERM request the runner to stop after the writes in flight; a second one stops at once.
    Only in the main thread (where Python runs signal handlers); the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if runner.stop.is_set():
            raise KeyboardInterrupt(name)
        print(f"pneumoseg infer: {name}: stopping after the writes in flight (send it again to stop at once)",
              file=sys.stderr)  # fmt: skip
        runner.stop.request(name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_owned(runner: BatchInferenceRunner) -> int:
    """Run as the program that owns the process: freed memory kept for reuse (the forward passes reuse their
    activations' memory instead of faulting in fresh pages each time; process-wide, so not done by the
    runner itself), signals stop the run cleanly. Returns the exit code."""
    retain_freed_memory()
    with stop_on_signals(runner):
        return runner.run()


def run_and_exit(runner: BatchInferenceRunner) -> int:
    """For ``configs/inference.json``: :func:`run_owned`, and make ``python -m monai.bundle run`` exit with
    the run's code, as ``pneumoseg infer`` does."""
    code = run_owned(runner)
    if code:
        raise SystemExit(code)
    return code


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """Register ``pneumoseg infer``."""
    from pneumoseg.infer.outputs import FORMATS

    p = subparsers.add_parser(
        "infer",
        help="segment every scan in a folder (masks, DICOM SEG, overlays, report)",
        description="Batch inference with trained bundles on a folder of chest radiographs (DICOM CR/DX, "
        "PNG/JPEG) and CT (DICOM series, NIfTI), searched recursively. Each bundle's model record says which "
        "image kinds it was trained on and how to feed them (input size, intensity scaling, CT window and "
        "orientation, thresholds); a scan of a kind no bundle was trained on is a skipped row. Writes "
        "OUTPUT_DIR/scans/<scan_id>/{mask.png|mask.nii.gz, seg.dcm, overlay.png, record.json} and "
        "OUTPUT_DIR/report.{csv,json}. Re-running skips scans whose outputs are complete and verified. "
        "Exit code 0 if no scan errored, 1 if some did, 2 on a usage or setup error, 3 if the run failed or "
        "was interrupted (SIGINT / SIGTERM finish the writes in flight and report what finished). "
        "See docs/inference.md.",
    )
    p.add_argument("input_dir", nargs="?", metavar="INPUT_DIR", help="folder of scans (never modified)")
    p.add_argument("output_dir", nargs="?", metavar="OUTPUT_DIR", help="folder for outputs and the report")
    p.add_argument(
        "--bundle",
        metavar="DIR",
        action="append",
        help="a trained bundle: models/model_record.json (what the model was trained on and how it is fed) and "
        "models/model.pt (weights), read as data; configs/metadata.json gives name and version. Repeat it "
        "for one bundle per image kind (e.g. a radiograph and a CT model)",
    )
    p.add_argument(
        "--model",
        metavar="FILE",
        help="an exported model of the (one) bundle, models/model.onnx or models/model.ts from `pneumoseg bundle "
        "export`, run instead of its weights; preprocessing and thresholds still come from the bundle's record",
    )
    p.add_argument(
        "--trust", action="store_true", help="allow a TorchScript --model (it is code): trusted senders only"
    )
    p.add_argument(
        "--weights",
        nargs="+",
        metavar="FILE",
        help="weight files relative to each bundle instead of models/model.pt (e.g. "
        "models/model_top_k_average.pt); several are an ensemble whose probabilities are averaged (fold models)",
    )
    p.add_argument(
        "--tta",
        action="store_true",
        help="horizontal-flip test-time augmentation: each scan also runs mirrored left-right and the "
        "probabilities are averaged (twice the model time)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu or cuda:N (default: auto)")
    p.add_argument("--batch-size", type=int, default=8, help="radiographs / CT slices per forward pass (default: 8)")
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="DataLoader worker processes decoding and preprocessing while the model runs (0: none; default: 2)",
    )
    p.add_argument(
        "--formats",
        default=",".join(FORMATS),
        help="comma-separated outputs: nifti (mask of volumes / NIfTI inputs), png (mask of radiographs), "
        "seg (DICOM SEG of DICOM inputs), overlay (preview PNG); default: all",
    )
    p.add_argument("--overwrite", action="store_true", help="redo every scan and replace existing outputs")
    p.add_argument("--strict", action="store_true", help="stop at the first scan that errors (exit code 1)")
    p.add_argument(
        "--fp32",
        action="store_true",
        help="full precision (default: bf16 autocast + channels_last on CPUs with native bf16, AMP on GPUs)",
    )
    p.add_argument(
        "--chest-only",
        action="store_true",
        help="skip scans whose header says they are not a chest or not an expected modality (default: warn)",
    )
    p.add_argument(
        "--num-shards",
        type=int,
        default=None,
        help="split the sorted scan list into K shards (default: WORLD_SIZE under torchrun, else 1)",
    )
    p.add_argument(
        "--shard-id", type=int, default=None, help="shard to process, 0..K-1 (default: RANK under torchrun, else 0)"
    )
    p.add_argument(
        "--merge-reports",
        nargs="+",
        metavar="DIR",
        help="instead of inferring: merge the shard reports found in the first DIR and any further DIRs into "
        "DIR/report.{csv,json}",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in logs)")
    p.set_defaults(func=run)


def _merge(folders: list[str]) -> int:
    from pneumoseg.infer.report import ReportMergeError, merge_reports, summary_line

    try:
        _, summary = merge_reports(folders[0], folders[1:])
    except ReportMergeError as e:
        print(f"pneumoseg infer --merge-reports: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(summary_line(summary) + f"; report: {Path(folders[0]) / 'report.csv'}")
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    """``pneumoseg infer``: returns the exit code (module docstring)."""
    from pneumoseg.infer.folder import OutputFolderBusy

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.merge_reports:
        return _merge(args.merge_reports)
    if not args.input_dir or not args.output_dir or not args.bundle:
        print("pneumoseg infer: INPUT_DIR, OUTPUT_DIR and --bundle are required (or --merge-reports)", file=sys.stderr)
        return EXIT_USAGE
    if (args.num_shards is None) != (args.shard_id is None):
        print("pneumoseg infer: give both --num-shards and --shard-id", file=sys.stderr)
        return EXIT_USAGE
    try:
        runner = BatchInferenceRunner(
            bundles=args.bundle,
            input_dir=args.input_dir,
            output_dir=args.output_dir,
            formats=args.formats,
            device=args.device,
            batch_size=args.batch_size,
            workers=args.workers,
            fp32=args.fp32,
            overwrite=args.overwrite,
            strict=args.strict,
            chest_only=args.chest_only,
            num_shards=args.num_shards,
            shard_id=args.shard_id,
            progress=not args.no_progress,
            model_file=args.model,
            trust=args.trust,
            tta=args.tta,
            weights=args.weights,
        )
        return run_owned(runner)
    except RunFailed as e:
        print(f"pneumoseg infer: the run failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("pneumoseg infer: stopped at once (second signal)", file=sys.stderr)
        return EXIT_FAILED
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, OutputFolderBusy) as e:
        print(f"pneumoseg infer: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # a bug or an environment failure before the run started
        logger.debug("run failed", exc_info=True)
        print(f"pneumoseg infer: the run failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
