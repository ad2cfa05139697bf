"""Training on a shared machine: wall time alone, beside a busy loop, and beside a second training.

A fair process slows down in proportion to the cores another job takes: on a 2-core machine, a busy loop
(one core) or a second training (asking for both cores) should make a training take about 2x as long. OpenMP
threads that spin while they wait (GNU libgomp's default) turn that into many times more: the spinning
threads burn the time slices that the thread they wait for needs. pneumoseg's fix is
``OMP_WAIT_POLICY=PASSIVE`` in the environment of every CPU-heavy process (``pneumoseg.runtime``) and a thread
pool sized to the CPUs the process may use.

Each situation runs the bundle's own training command (``python -m monai.bundle run``, ``train.json``) on the
same synthetic phantoms, with two versions of the code:

- ``before``: the code at ``--before-rev`` (extracted with ``git archive``), run as its documentation said
  (no ``OMP_WAIT_POLICY``);
- ``after``: this checkout, run as its documentation says (``OMP_WAIT_POLICY=PASSIVE``).

The busy loop and the second training run inside this script (its lock hold). Run it under the project's
lock on an otherwise quiet machine, e.g.::

    flock /tmp/pneumoseg-heavy.lock .venv/bin/python benchmarks/shared_machine.py --before-rev e683035

(about 12 minutes on 2 CPU cores; numbers in docs/training.md). Each version first runs once untimed (warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SITUATIONS = ("alone", "beside a busy loop", "beside a second training")
BUSY_LOOP = "while True:\n    pass\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Training wall time alone vs beside a CPU hog of known size, before and after the fix.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench_out" / "shared_machine", help="output folder")
    parser.add_argument("--before-rev", default=None, help="git revision of the 'before' code (none: after only)")
    parser.add_argument("--radiographs", type=int, default=64, help="synthetic radiographs (256 px)")
    parser.add_argument("--image-size", type=int, default=256, help="training input size")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch size")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers (the bundle's default)")
    parser.add_argument("--cpu-bf16", action="store_true", help="bf16 autocast on CPU (as the demo on AVX512-BF16)")
    parser.add_argument("--decoder-channels", default="[64,32,32,16,16]", help="decoder widths")
    parser.add_argument(
        "--without-policy", action="store_true", help="also run this checkout without OMP_WAIT_POLICY (its cost alone)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args(argv)


def _phantoms(out: Path, count: int) -> Path:
    sys.path.insert(0, str(REPO))
    from pneumoseg.data.manifest import build_siim_manifest, write_manifest
    from pneumoseg.data.phantoms import synthesize

    data = out / "data"
    manifest = data / "manifest.json"
    if not manifest.is_file():
        synthesize(data, radiographs=count, size=256, ct=0, seed=0, workers=2)
        entries, summary = build_siim_manifest(
            data / "dicom-images-train", data / "train-rle.csv", data, salt="shared-machine", val_fraction=0.2,
            test_fraction=0.0, folds=0, seed=0, progress=False,
        )  # fmt: skip
        write_manifest(entries, manifest, summary)
    return manifest


def _before_code(out: Path, rev: str) -> Path:
    """The code at ``rev``, extracted (not checked out: the working tree is left alone)."""
    target = out / f"code-{rev}"
    if not (target / "pneumoseg").is_dir():
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        archive = out / f"code-{rev}.tar"
        subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "-o", str(archive), rev], check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
        archive.unlink()
    return target


class Version:
    """One version of the code and the environment its documentation runs it with."""

    def __init__(self, name: str, code: Path, environment: dict[str, str]) -> None:
        self.name = name
        self.code = code
        self.environment = environment

    def command(self, args: argparse.Namespace, manifest: Path, root: Path) -> list[str]:
        return [
            sys.executable, "-m", "monai.bundle", "run",
            "--config_file", str(self.code / "bundles" / "pneumothorax_scse_unet" / "configs" / "train.json"),
            "--bundle_root", str(root), "--datalist", str(manifest), "--num_epochs", str(args.epochs),
            "--image_size", str(args.image_size), "--batch_size", str(args.batch_size),
            "--val_batch_size", str(args.batch_size), "--num_workers", str(args.workers),
            "--network_def#decoder_channels", args.decoder_channels, "--early_stop_patience", "100",
            "--cpu_bf16", str(bool(args.cpu_bf16)),
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
        return {**env, **self.environment, "PYTHONPATH": str(self.code), "PYTHONWARNINGS": "ignore"}


def _train(version: Version, args: argparse.Namespace, manifest: Path, root: Path, log: Path) -> subprocess.Popen:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    with log.open("w") as f:
        return subprocess.Popen(
            version.command(args, manifest, root), cwd=version.code, env=version.env(), stdout=f, stderr=f
        )


def _wait(process: subprocess.Popen, log: Path) -> None:
    if process.wait() != 0:
        raise SystemExit(f"training failed ({process.returncode}); log: {log}")


def measure(version: Version, situation: str, args: argparse.Namespace, manifest: Path) -> float:
    """Wall time of one training (the first, when two run side by side)."""
    work = args.out / "runs" / version.name / situation.replace(" ", "_")
    work.mkdir(parents=True, exist_ok=True)
    hog = None
    second = None
    if situation == "beside a busy loop":
        hog = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    start = time.perf_counter()
    first = _train(version, args, manifest, work / "first", work / "first.log")
    if situation == "beside a second training":
        second = _train(version, args, manifest, work / "second", work / "second.log")
    try:
        _wait(first, work / "first.log")
        seconds = time.perf_counter() - start
        if second is not None:
            _wait(second, work / "second.log")
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    return seconds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = _phantoms(args.out, args.radiographs)
    versions = []
    if args.before_rev:
        versions.append(Version(f"before ({args.before_rev})", _before_code(args.out, args.before_rev), {}))
    versions.append(Version("after", REPO, {"OMP_WAIT_POLICY": "PASSIVE"}))
    if args.without_policy:
        versions.append(Version("after, no policy", REPO, {}))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{cpus} CPUs; {args.radiographs} phantoms, {args.epochs} epochs at {args.image_size} px, "
          f"batch {args.batch_size}, {args.workers} workers, bf16 {args.cpu_bf16}", flush=True)  # fmt: skip
    results: dict[str, dict[str, float]] = {}
    for version in versions:
        results[version.name] = {}
        # untimed: the first run of a version compiles its .pyc files and fills the page cache (it took 68 s
        # where warm runs took 40)
        measure(version, "alone", args, manifest)
        for situation in SITUATIONS:
            seconds = measure(version, situation, args, manifest)
            results[version.name][situation] = seconds
            print(f"  {version.name:>20} | {situation:<25} | {seconds:7.1f} s", flush=True)
    print()
    header = "| situation | fair | " + " | ".join(f"{v.name}: s (x alone)" for v in versions) + " |"
    print(header)
    print("| --- | --- | " + " | ".join("---" for _ in versions) + " |")
    fair = {"alone": "1x", "beside a busy loop": f"{cpus / (cpus - 1):.0f}x", "beside a second training": "2x"}
    for situation in SITUATIONS:
        cells = []
        for version in versions:
            seconds = results[version.name][situation]
            cells.append(f"{seconds:.0f} ({seconds / results[version.name]['alone']:.1f}x)")
        print(f"| {situation} | {fair[situation]} | " + " | ".join(cells) + " |")
    if args.json:
        options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"cpus": cpus, "options": options, "seconds": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
