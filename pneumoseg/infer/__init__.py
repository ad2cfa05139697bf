"""Batch inference on a folder of scans: ``pneumoseg infer INPUT_DIR OUTPUT_DIR --bundle DIR [--bundle DIR]``.

One implementation behind the CLI and the bundle (``configs/inference.json`` builds a
:class:`BatchInferenceRunner` and runs it with :func:`run_and_exit`)::

    models      pneumoseg.model_record records + weights, read as data, one model per image kind
    folder      OUTPUT_DIR: exclusive lock, model guard (run.json), stale temporaries removed
    discovery   INPUT_DIR -> scans (radiographs, CT series, NIfTI, PNG; skipped / broken rows with reasons)
    records     per-scan completion records: what is done and verified is not redone
    dataset     DataLoader workers: decode + the record's preprocessing (pneumoseg.data.transforms)
    pipeline    workers -> models (radiographs batched, CT slice-batched) -> one writer thread
    outputs     post-processing, MONAI's inversion to the source geometry, mask / overlay / SEG, the record
    writers     the file formats (PNG, NIfTI, DICOM SEG via highdicom), written atomically
    report      report.csv / report.json, shard reports and their merge
    runner      BatchInferenceRunner: the steps above, in one screen
    cli         the command line, signals, exit codes (0 ok, 1 scan errors, 2 usage, 3 failed / interrupted)

Image-level probability: radiographs: ``sigmoid`` of the classification head; CT: the maximum over the
axial slices (a pneumothorax on any slice makes the volume positive), as ``DualOutputSliceInferer``.
"""

from pneumoseg.infer.cli import run_and_exit, run_owned
from pneumoseg.infer.runner import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_SCAN_ERRORS,
    EXIT_USAGE,
    BatchInferenceRunner,
    RunFailed,
)

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_SCAN_ERRORS",
    "EXIT_USAGE",
    "BatchInferenceRunner",
    "RunFailed",
    "run_and_exit",
    "run_owned",
]
