"""The demo's CT model: a small CT bundle trained from CT through the bundle's ``ct.json``, for ``pneumoseg demo``.

The demo trains a radiograph model; its CT inputs (a DICOM series and a NIfTI volume) need a model trained on
CT, given to ``pneumoseg infer`` as a second ``--bundle``. :func:`train_demo_ct_model` makes one with the very
commands a user runs on their own CT (``pneumoseg synth``, ``pneumoseg manifest nifti``, ``monai.bundle run
training`` with ``train.json + ct.json``, then ``evaluate.json`` to tune the post-processing on validation
volumes). Its phantoms come from another seed than the demo's inputs, so the inputs stay unseen.

Defaults (:class:`DemoCTConfig`) keep it to about four minutes on 2 CPU cores: 24 volumes of 96 x 96 x 24
voxels (18 training, 6 validation), axial slices at 96 px, 32 epochs of 2 slices per volume, 4 volumes
(8 slices) per optimiser step (``ct.json``'s defaults; see docs/training.md for why), validated every 4th
epoch.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DemoCTConfig", "train_demo_ct_model"]

BUNDLE_SOURCE = Path(__file__).resolve().parent.parent / "bundles" / "pneumothorax_scse_unet"


@dataclass
class DemoCTConfig:
    """Every default of the demo's CT model."""

    volumes: int = 24
    ct_size: int = 96  # as the demo's CT inputs
    ct_slices: int = 24
    image_size: int = 96  # the volumes' own in-plane size: no resampling
    epochs: int = 32
    val_interval: int = 4  # validating 6 volumes takes as long as an epoch of training
    slices_per_volume: int = 2
    batch_size: int = 4  # volumes per step, each giving slices_per_volume slices (ct.json's defaults)
    learning_rate: float = 1e-3
    val_fraction: float = 0.25  # 6 validation volumes: with 2, selecting the best epoch was a coin toss
    seed_offset: int = 1  # the demo's inputs are drawn from its seed; the CT model's phantoms from seed + 1


def _run_command(step: str, command: list[str]) -> None:
    print(f"\n== {step}\n$ {' '.join(command)}", flush=True)
    start = time.perf_counter()
    if subprocess.run(command).returncode:
        raise SystemExit(f"demo: step '{step}' failed")
    print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)


def train_demo_ct_model(
    out_dir: Path,
    seed: int = 0,
    config: DemoCTConfig | None = None,
    run: Callable[[str, list[str]], None] = _run_command,
    python: str = sys.executable,
    cpu_bf16: bool = False,
    extra_train_args: Sequence[str] = (),
) -> Path:
    """Train the demo's CT model under ``out_dir`` (``ct_data/``, ``ct_manifest.json``, ``ct_bundle/``) and
    return the bundle folder (``models/model.pt`` + ``models/model_record.json``, record kind ``ct`` with
    post-processing tuned on the validation volumes), ready for ``pneumoseg infer --bundle``.

    Args:
        out_dir: the demo's output folder.
        seed: the demo's seed (the phantoms use ``seed + config.seed_offset``).
        run: ``run(step, command)`` runs and prints one command (the demo's own runner).
        cpu_bf16: bf16 autocast on CPUs with native bf16 (the demo decides).
    """
    import shutil

    c = config or DemoCTConfig()
    out_dir = Path(out_dir).resolve()
    data, manifest, bundle = out_dir / "ct_data", out_dir / "ct_manifest.json", out_dir / "ct_bundle"
    run("CT model 1/4: synthesize CT phantoms for training (another seed than the inputs)", [
        python, "-m", "pneumoseg", "synth", str(data), "--radiographs", "0", "--ct", str(c.volumes),
        "--ct-size", str(c.ct_size), "--ct-slices", str(c.ct_slices), "--seed", str(seed + c.seed_offset),
        "--overwrite",
    ])  # fmt: skip
    run("CT model 2/4: build a patient-level manifest of the NIfTI volumes", [
        python, "-m", "pneumoseg", "manifest", "nifti", "--images", str(data / "ct-nifti" / "images"),
        "--labels", str(data / "ct-nifti" / "labels"), "--out", str(manifest), "--seed", str(seed),
        "--val-fraction", str(c.val_fraction), "--test-fraction", "0", "--no-progress",
    ])  # fmt: skip
    if bundle.exists():
        shutil.rmtree(bundle)
    shutil.copytree(BUNDLE_SOURCE, bundle, ignore=shutil.ignore_patterns("models", "eval", "logs", "__pycache__"))
    (bundle / "models").mkdir()
    configs = bundle / "configs"
    common = ["--bundle_root", str(bundle), "--datalist", str(manifest), "--num_workers", "2", "--seed", str(seed)]
    run(f"CT model 3/4: train from CT slices through ct.json for {c.epochs} epochs", [
        python, "-m", "monai.bundle", "run", "training", "--meta_file", str(configs / "metadata.json"),
        "--config_file", str([str(configs / "train.json"), str(configs / "ct.json")]), *common,
        "--num_epochs", str(c.epochs), "--image_size", str(c.image_size), "--batch_size", str(c.batch_size),
        "--ct_slices_per_volume", str(c.slices_per_volume), "--learning_rate", str(c.learning_rate),
        "--early_stop_patience", str(c.epochs), "--val_interval", str(c.val_interval), "--cache_rate", "1.0",
        "--cpu_bf16", str(bool(cpu_bf16)),
        *extra_train_args,
    ])  # fmt: skip
    run("CT model 4/4: tune the post-processing on the validation volumes (into the model record)", [
        python, "-m", "monai.bundle", "run", "evaluating", "--meta_file", str(configs / "metadata.json"),
        "--config_file", str([str(configs / "train.json"), str(configs / "ct.json"), str(configs / "evaluate.json")]),
        *common, "--eval_split", "validation",
    ])  # fmt: skip
    return bundle
