"""``pneumoseg demo``: the README's first command — the whole product on the embedded synthetic data.

It runs, and prints, the very commands a user would run on real data:

1. ``pneumoseg synth``: synthetic chest radiographs (SIIM-ACR layout, RLE CSV) and CT phantoms;
2. ``pneumoseg manifest siim``: a patient-level manifest;
3. ``python -m monai.bundle run training``: a short training of the bundle (a copy of
   ``bundles/pneumothorax_scse_unet`` under the output folder, so the repository stays clean);
4. ``python -m monai.bundle run evaluating`` on the validation split: the post-processing thresholds and the
   image gate are searched there and stored in the model record;
5. ``python -m monai.bundle run evaluating`` on the held-out test split with the record's (validation-tuned)
   thresholds, no search: the numbers the demo reports were measured on images nothing was tuned on;
6. a CT model trained from CT (:mod:`pneumoseg.demo_ct`: CT phantoms of another seed, ``train.json`` +
   ``ct.json``, post-processing tuned on its validation volumes): a radiograph model is never run on CT;
7. ``pneumoseg infer`` with both bundles (``--bundle`` twice): batch inference on a folder of radiographs
   and CT (DICOM series + NIfTI), each scan routed by its kind to the model trained on that kind, writing
   masks, DICOM SEG, overlays and a report.

Nothing is downloaded. On a 2-core CPU it takes 10-25 minutes (the shorter with native bf16); the numbers are
those of a short training on small images, not of a trained model (``benchmarks/train_synthetic.py`` trains
longer). The subprocesses run with :data:`pneumoseg.runtime.FAIR_SHARE_ENVIRONMENT` (OpenMP threads that sleep
while they wait), so another job on the machine slows the demo in proportion to the cores it takes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pneumoseg.demo_ct import train_demo_ct_model
from pneumoseg.runtime import FAIR_SHARE_ENVIRONMENT, cpu_has_native_bf16

BUNDLE_SOURCE = Path(__file__).resolve().parent.parent / "bundles" / "pneumothorax_scse_unet"


@dataclass
class DemoConfig:
    """Every default of the demo lives here; the CLI only exposes them."""

    out_dir: Path = Path("demo_output")
    radiographs: int = 240
    size: int = 256
    ct: int = 2
    epochs: int = 8
    learning_rate: float = 1e-3
    batch_size: int = 8
    seed: int = 0


def _run(step: str, command: list[str], ok_codes: tuple[int, ...] = (0,)) -> None:
    shown = " ".join(f"'{c}'" if (" " in c or "[" in c) else c for c in command)
    print(f"\n== {step}\n$ {shown}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, env={**FAIR_SHARE_ENVIRONMENT, **os.environ})
    if result.returncode not in ok_codes:
        raise SystemExit(f"demo: step '{step}' failed with exit code {result.returncode}")
    print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)


def _cpu_has_native_bf16() -> bool:
    """bf16 autocast pays off on CPUs with AVX512-BF16 or AMX only (elsewhere it is emulated, slower)."""
    import torch

    if torch.cuda.is_available():
        return False  # the bundle uses AMP on GPUs by itself
    return cpu_has_native_bf16()


def _copy_bundle(target: Path) -> Path:
    """A fresh copy of the bundle's configs, docs and license (never its models or eval outputs)."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(BUNDLE_SOURCE, target, ignore=shutil.ignore_patterns("models", "eval", "logs", "__pycache__"))
    (target / "models").mkdir()
    return target


def _inference_folder(data: Path, manifest: Path, target: Path, radiographs: int = 8) -> Path:
    """A PACS-export-like folder: held-out test radiographs, one CT as a DICOM series and one as NIfTI."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    entries = json.loads(manifest.read_text())["test"][:radiographs]
    for entry in entries:
        source = (manifest.parent / entry["image"]).resolve()
        shutil.copy2(source, target / f"cr_{source.stem[-12:]}.dcm")
    series = sorted((data / "ct-dicom").iterdir())
    if series:
        shutil.copytree(series[0], target / "ct_series")
    volumes = sorted((data / "ct-nifti" / "images").glob("*.nii.gz"))
    if len(volumes) > 1:
        shutil.copy2(volumes[1], target / volumes[1].name)
    return target


def _print_metrics(test_file: Path, validation_file: Path) -> None:
    """The held-out test metrics, and the validation-tuned thresholds they were measured with."""
    if not test_file.exists():
        return
    test = json.loads(test_file.read_text())
    names = ("val_siim_dice", "val_siim_dice_positive", "val_auc", "val_sensitivity", "val_specificity")
    shown = ", ".join(f"{n.removeprefix('val_')} {test[n]:.3f}" for n in names if isinstance(test.get(n), float))
    print(f"  held-out {test.get('split')} split: {shown}")
    pp = test.get("postprocessing", {})
    print(
        f"    with thresholds t_cls {pp.get('t_cls')}, top {pp.get('top')}, min_area {pp.get('min_area')}, "
        f"bottom {pp.get('bottom')} ({test.get('postprocessing_source')}, models/model_record.json)"
    )
    if validation_file.exists():
        validation = json.loads(validation_file.read_text())
        before, after = validation.get("siim_dice_before"), validation.get("siim_dice_after")
        if isinstance(before, float) and isinstance(after, float):
            print(f"  validation split (tuned on it): siim_dice {before:.3f} plain -> {after:.3f} tuned (optimistic)")
    print(f"  metrics files:      {test_file}, {validation_file}")


def run_demo(config: DemoConfig) -> int:
    out = config.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    data, manifest = out / "data", out / "manifest.json"
    start = time.perf_counter()
    print(f"pneumoseg demo: everything goes to {out}")

    _run("1/7 synthesize chest phantoms (real DICOM + NIfTI files)", [
        python, "-m", "pneumoseg", "synth", str(data), "--radiographs", str(config.radiographs),
        "--size", str(config.size), "--ct", str(config.ct), "--ct-size", "96", "--ct-slices", "24",
        "--seed", str(config.seed), "--overwrite",
    ])  # fmt: skip
    _run("2/7 build a patient-level manifest", [
        python, "-m", "pneumoseg", "manifest", "siim", "--dicom-dir", str(data / "dicom-images-train"),
        "--rle-csv", str(data / "train-rle.csv"), "--out", str(manifest), "--seed", str(config.seed),
        "--no-progress",
    ])  # fmt: skip

    bundle = _copy_bundle(out / "bundle")
    configs = bundle / "configs"
    # training sets the image size; evaluation reads it (and the network) from models/model_record.json
    common = [
        "--bundle_root", str(bundle), "--datalist", str(manifest), "--val_batch_size", str(config.batch_size),
        "--num_workers", "2", "--seed", str(config.seed),
    ]  # fmt: skip
    _run(f"3/7 train the bundle for {config.epochs} epochs", [
        python, "-m", "monai.bundle", "run", "training", "--meta_file", str(configs / "metadata.json"),
        "--config_file", str(configs / "train.json"), *common, "--num_epochs", str(config.epochs),
        "--image_size", str(config.size), "--batch_size", str(config.batch_size),
        "--warmup_epochs", "1", "--early_stop_patience", str(config.epochs),
        "--learning_rate", str(config.learning_rate),
        "--cpu_bf16", str(_cpu_has_native_bf16()),  # Python literals: fire reads "false" as a truthy string
    ])  # fmt: skip
    evaluate = [
        python, "-m", "monai.bundle", "run", "evaluating", "--meta_file", str(configs / "metadata.json"),
        "--config_file", str([str(configs / "train.json"), str(configs / "evaluate.json")]), *common,
    ]  # fmt: skip
    validation_metrics, test_metrics = bundle / "eval" / "metrics.json", bundle / "eval" / "metrics_test.json"
    _run("4/7 evaluate on the validation split: tune post-processing and the image gate (into the model record)", [
        *evaluate, "--eval_split", "validation", "--search_postprocessing", "True",
    ])  # fmt: skip
    _run("5/7 evaluate on the held-out test split with the validation-tuned thresholds", [
        *evaluate, "--eval_split", "test", "--search_postprocessing", "False", "--metrics_file", str(test_metrics),
    ])  # fmt: skip

    bundles = ["--bundle", str(bundle)]
    if config.ct:
        print("\n== 6/7 train a CT model from CT slices (the radiograph model is never run on CT)", flush=True)
        ct_bundle = train_demo_ct_model(out, config.seed, run=_run, python=python, cpu_bf16=_cpu_has_native_bf16())
        bundles += ["--bundle", str(ct_bundle)]

    scans = _inference_folder(data, manifest, out / "scans")
    results = out / "inference"
    _run(
        "7/7 batch inference on a folder of radiographs and CT, each routed to the model of its kind",
        [python, "-m", "pneumoseg", "infer", str(scans), str(results), *bundles, "--overwrite"],
        ok_codes=(0, 1),
    )  # fmt: skip  (1: some scan errored; its row in the report says why)

    print(f"\npneumoseg demo finished in {time.perf_counter() - start:.0f} s")
    _print_metrics(test_metrics, validation_metrics)
    print(f"  trained bundle:     {bundle} (models/model.pt + model_record.json, eval/ for TensorBoard and logs)")
    print(f"  report:             {results / 'report.csv'} and report.json")
    print(f"  overlays and masks: {results / 'scans'}/<scan>/overlay.png, mask.*, seg.dcm")
    if config.ct:
        print(f"  CT model:           {out / 'ct_bundle'} (trained from CT; the report's CT rows name it)")
    print("  (a few epochs on small synthetic images: a demonstration of the pipeline, not a trained model)")
    return 0


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """Register ``pneumoseg demo``."""
    defaults = DemoConfig()
    parser = subparsers.add_parser(
        "demo",
        help="run the whole product on synthetic data: synth, manifest, train, evaluate, batch inference",
        description="Synthesize chest phantoms, build a manifest, train the MONAI bundle briefly, tune its "
        "post-processing on the validation split, evaluate it on the held-out test split with those values and "
        "batch-infer a folder of radiographs and CT, printing every command it runs and where the results are. "
        "Nothing is downloaded; 10-25 minutes on a 2-core CPU.",
    )
    parser.add_argument("--out-dir", type=Path, default=defaults.out_dir, help="where everything is written")
    parser.add_argument("--radiographs", type=int, default=defaults.radiographs, help="synthetic radiographs")
    parser.add_argument("--size", type=int, default=defaults.size, help="radiograph and model size (multiple of 64)")
    parser.add_argument("--ct", type=int, default=defaults.ct, help="synthetic CT volumes")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="training batch size")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the data, split and training")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_demo(
        DemoConfig(
            out_dir=args.out_dir,
            radiographs=args.radiographs,
            size=args.size,
            ct=args.ct,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            seed=args.seed,
        )
    )
