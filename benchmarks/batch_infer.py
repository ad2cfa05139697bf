"""End-to-end speed and memory of ``pneumoseg infer`` (pneumoseg.infer.BatchInferenceRunner).

In one run, on synthetic phantoms (``pneumoseg.data.phantoms``; nothing downloaded):

* end-to-end scans/s on ``--radiographs`` (>= 200) 1024-px radiograph DICOMs (all output formats),
  against model-only forward images/s at the same batch size, precision and input size on tensors
  already in memory; their ratio (target >= 0.8: decoding, pre/post-processing and writing hide behind
  the model), and where the CPU time of the end-to-end run went (DataLoader workers vs the main
  process, whose writer thread is timed separately);
* the same with the mask PNG as the only output (``--formats png``): what the SEG and overlay cost;
* end-to-end CT volumes/s and slices/s on ``--ct`` (>= 3) DICOM series;
* peak RSS of a fresh ``pneumoseg infer`` process (main process, and the largest DataLoader worker) on 100
  vs 400 radiographs (target: within 10%: memory does not grow with the folder); these two runs use a
  small model input (``--rss-image-size``, default 128 px) to save time: the decoding of the 1024-px
  files, the SEG and overlay writing and the bookkeeping, which are what could grow, are unchanged.

The network is the default SCSEUNet, described by a model record for radiographs and CT at
``--image-size`` (default 512, the record's default), with random weights: the model's timing does not
depend on them, the writers' a little (a few ms per scan): random weights call every scan positive with a
mask over most of the image, a worst case the table reports (``positive_fraction``,
``mean_mask_fraction_of_image``). ``--baseline FILE`` (the ``--json`` of an earlier run, e.g. before a
change, on the same machine) adds the ratio of this run's end-to-end speeds to it. Run::

    .venv/bin/python benchmarks/batch_infer.py                 # ~10-20 min on 2 CPU cores
    .venv/bin/python benchmarks/batch_infer.py --quick         # smoke run (small images, few scans)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# as `pneumoseg infer` does (pneumoseg.cli.SUBCOMMAND_ENVIRONMENT), before torch loads OpenMP; the
# model-only measurement runs in this process too, so both sides see the same setting
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def make_bundle(root: Path, image_size: int | None) -> Path:
    """A bundle as inference reads it: a model record (the default SCSEUNet, radiographs and CT at
    ``image_size``) + random weights, and the real bundle's metadata."""
    import dataclasses

    import torch

    from pneumoseg.model_record import CT, RADIOGRAPH, CTPreprocessing, ModelRecord, RadiographPreprocessing
    from pneumoseg.networks import SCSEUNet

    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    shutil.copy(REPO / "bundles" / "pneumothorax_scse_unet" / "configs" / "metadata.json", root / "configs")
    torch.manual_seed(0)
    network = SCSEUNet(spatial_dims=2, in_channels=1, out_channels=1)
    size = image_size or RadiographPreprocessing().image_size
    record = ModelRecord.for_training(network, RADIOGRAPH, size)
    preprocessing = {RADIOGRAPH: RadiographPreprocessing(image_size=size), CT: CTPreprocessing(image_size=size)}
    dataclasses.replace(record, preprocessing=preprocessing).write(root / "models" / "model_record.json")
    torch.save(network.state_dict(), root / "models" / "model.pt")
    return root


def link_copies(files: list[Path], dest: Path, n: int) -> Path:
    """``n`` radiographs in ``dest`` as hard links (or copies) cycling over ``files`` (distinct names)."""
    dest.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        target = dest / f"img_{i:05d}.dcm"
        if target.exists():  # --keep: made by an earlier run
            continue
        try:
            os.link(files[i % len(files)], target)
        except OSError:
            shutil.copy(files[i % len(files)], target)
    return dest


def model_only(bundle: Path, batch_size: int, fp32: bool, repeats: int) -> tuple[float, float]:
    """(forward images/s, CPU ms per image) of the runner's network wrapper (same precision / channels_last)
    on random input. The CPU time is the process's: below threads x wall time where the threads wait."""
    import torch

    from pneumoseg.infer.models import PrecisionWrapper, select_device
    from pneumoseg.model_record import load_trained_model

    device = select_device("auto")
    model = load_trained_model(bundle, device)
    wrapped = PrecisionWrapper(model.network, device, fp32)
    size = model.record.radiograph.image_size
    x = torch.rand(batch_size, 1, size, size, device=device)
    with torch.inference_mode():
        wrapped(x)  # warm-up
        cpu_start = _cpu_seconds(resource.RUSAGE_SELF)
        start = time.perf_counter()
        for _ in range(repeats):
            out = wrapped(x)
            torch.sigmoid(out.seg).cpu()
        seconds = time.perf_counter() - start
        images = batch_size * repeats
        return images / seconds, 1000 * (_cpu_seconds(resource.RUSAGE_SELF) - cpu_start) / images


def _cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def end_to_end(
    bundle: Path, inputs: Path, out: Path, args: argparse.Namespace, formats: str = "nifti,seg,png,overlay"
) -> tuple[float, int, dict]:
    """(seconds of ``run()`` with the model preloaded, processed scans, summary + CPU seconds per scan of
    the main process, of its writer thread (post-processing + writing) and of the DataLoader workers)."""
    from pneumoseg.infer import BatchInferenceRunner
    from pneumoseg.infer.models import load_models, select_device
    from pneumoseg.infer.outputs import ScanOutputs

    class TimedOutputs(ScanOutputs):
        writer_cpu = 0.0

        def finish(self, *a, **k):  # runs in the writer thread: its own CPU time
            start = time.thread_time()
            try:
                return super().finish(*a, **k)
            finally:
                TimedOutputs.writer_cpu += time.thread_time() - start

    class TimedRunner(BatchInferenceRunner):
        outputs_class = TimedOutputs

    runner = TimedRunner(
        input_dir=str(inputs),
        output_dir=str(out),
        batch_size=args.batch_size,
        workers=args.workers,
        fp32=args.fp32,
        progress=False,
        formats=formats,
        models=load_models([bundle], select_device("auto")),
    )
    main_before = _cpu_seconds(resource.RUSAGE_SELF)
    workers_before = _cpu_seconds(resource.RUSAGE_CHILDREN)  # the workers have exited when run() returns
    start = time.perf_counter()
    runner.run()
    seconds = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text())
    summary = report["summary"]
    n = max(1, int(summary["processed"]))
    # the writers' cost depends on the masks: say what they were (random weights: every scan positive)
    ok = [r for r in report["rows"] if r["status"] == "ok"]
    summary["positive_fraction"] = sum(r["positive"] == "yes" for r in ok) / max(1, len(ok))
    summary["mean_mask_pixels"] = sum(int(r["mask_pixels"]) for r in ok) / max(1, len(ok))
    summary["cpu_ms_per_scan"] = {
        "main": 1000 * (_cpu_seconds(resource.RUSAGE_SELF) - main_before) / n,
        "writer_thread": 1000 * TimedOutputs.writer_cpu / n,
        "workers": 1000 * (_cpu_seconds(resource.RUSAGE_CHILDREN) - workers_before) / n,
        "available": 1000 * seconds * _cores() / n,
    }
    return seconds, int(summary["processed"]), summary


def peak_rss(bundle: Path, inputs: Path, out: Path, args: argparse.Namespace) -> tuple[float, float, float]:
    """(main process peak MiB, largest worker peak MiB, main process MiB at the end) of a fresh
    ``pneumoseg infer`` process."""
    # peak (VmHWM) and final (VmRSS) resident memory of the main process. Not ru_maxrss: Linux carries the
    # parent's resident size at fork() into the child's ru_maxrss (and exec keeps it), so this benchmark's
    # own size would be reported; VmHWM belongs to the new address space
    code = (
        "import resource, sys, json\n"
        "from pneumoseg.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "status = dict(line.split(':', 1) for line in open('/proc/self/status') if ':' in line)\n"
        "print(json.dumps({'self': int(status['VmHWM'].split()[0]),"
        " 'children': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,"
        " 'end': int(status['VmRSS'].split()[0])}))\n"
    )
    command = [
        sys.executable,
        "-c",
        code,
        "infer",
        str(inputs),
        str(out),
        "--bundle",
        str(bundle),
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
        "--no-progress",
    ]
    if args.fp32:
        command.append("--fp32")
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    line = [x for x in result.stdout.splitlines() if x.startswith("{")]
    if not line:
        raise RuntimeError(f"child run failed: {result.stderr[-2000:]}")
    rss = json.loads(line[-1])
    return rss["self"] / 1024, rss["children"] / 1024, rss["end"] / 1024  # KiB on Linux


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--radiographs", type=int, default=200, help="distinct radiographs for the speed run (>= 200)")
    p.add_argument("--size", type=int, default=1024, help="radiograph size in px (default 1024)")
    p.add_argument("--ct", type=int, default=3, help="CT series (default 3)")
    p.add_argument("--ct-size", type=int, default=128, help="CT in-plane size (default 128)")
    p.add_argument("--ct-slices", type=int, default=48, help="CT slices (default 48)")
    p.add_argument("--batch-size", type=int, default=8, help="as pneumoseg infer --batch-size (default 8)")
    p.add_argument("--workers", type=int, default=2, help="as pneumoseg infer --workers (default 2)")
    p.add_argument("--image-size", type=int, default=None, help="model input size (default: the bundle's)")
    p.add_argument("--fp32", action="store_true", help="full precision (default: the runner's default)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads of the model, in the model-only and end-to-end runs alike (default: torch's, "
        "one per core). Fewer threads than cores leave the rest to decoding and writing: shows whether the "
        "pipeline hides them when it has CPU of its own",
    )
    p.add_argument("--rss", type=int, nargs=2, default=(100, 400), help="scan counts of the RSS runs")
    p.add_argument(
        "--rss-image-size",
        type=int,
        default=128,
        help="model input size of the RSS runs (default 128: memory growth with the scan count does not depend "
        "on the model's cost, and the 1024-px decoding, SEG and overlays are unchanged)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 24 radiographs of 256 px, 2 small CTs")
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary folder)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument(
        "--baseline",
        metavar="FILE",
        help="the --json of an earlier run on the same machine: print this run's end-to-end speeds relative to it",
    )
    args = p.parse_args()
    if args.quick:
        args.radiographs, args.size, args.ct, args.ct_size, args.ct_slices = 24, 256, 2, 64, 8
        args.image_size = args.image_size or 256
        args.rss = (12, 48)
        args.rss_image_size = 64

    import torch

    from pneumoseg.data.phantoms import synthesize
    from pneumoseg.runtime import retain_freed_memory

    # as `pneumoseg infer` and the bundle's inference config do before running (pneumoseg.runtime): both
    # sides, model-only and end-to-end, measured with the same allocator behaviour
    retained = retain_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="batch_infer_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        data = work / "data"
        if not (data / "dicom-images-train").is_dir():
            synthesize(
                data,
                radiographs=args.radiographs,
                size=args.size,
                ct=args.ct,
                ct_size=args.ct_size,
                ct_slices=args.ct_slices,
                overwrite=True,
            )
        print(f"synthetic data in {time.perf_counter() - t0:.0f} s: {data}", flush=True)
        bundle = make_bundle(work / "bundle", args.image_size)
        rss_bundle = make_bundle(work / "bundle_rss", args.rss_image_size)
        files = sorted((data / "dicom-images-train").rglob("*.dcm"))

        for out in ("out_rad", "out_mask", "out_ct", "out_rss_a", "out_rss_b"):
            shutil.rmtree(work / out, ignore_errors=True)
        # model-only measured right before and right after the end-to-end run, averaged: a change of machine
        # load during the run then hits both sides alike
        # as many images as the end-to-end run: this machine's speed drifts by several % over a minute
        repeats = max(3, args.radiographs // args.batch_size)
        model_before, model_cpu_before = model_only(bundle, args.batch_size, args.fp32, repeats)
        print(f"model-only before: {model_before:.3f} images/s", flush=True)
        seconds, processed, summary = end_to_end(bundle, data / "dicom-images-train", work / "out_rad", args)
        e2e = processed / seconds
        cpu = summary["cpu_ms_per_scan"]
        print(f"end-to-end radiographs: {processed} in {seconds:.1f} s = {e2e:.3f} scans/s", flush=True)
        mask_seconds, mask_processed, _ = end_to_end(
            bundle, data / "dicom-images-train", work / "out_mask", args, formats="png"
        )
        e2e_mask = mask_processed / mask_seconds
        print(f"end-to-end radiographs, mask PNG only: {e2e_mask:.3f} scans/s", flush=True)
        model_after, model_cpu_after = model_only(bundle, args.batch_size, args.fp32, repeats)
        print(f"model-only after: {model_after:.3f} images/s", flush=True)
        model_ips = (model_before + model_after) / 2
        ct_seconds, ct_processed, _ = end_to_end(bundle, data / "ct-dicom", work / "out_ct", args)
        rss = {}
        for n, name in zip(args.rss, ("rss_a", "rss_b")):
            folder = link_copies(files, work / f"in_{name}_{n}", n)
            rss[n] = peak_rss(rss_bundle, folder, work / f"out_{name}", args)
            print(
                f"peak RSS at {n} scans: {rss[n][0]:.0f} MiB (+ largest worker {rss[n][1]:.0f} MiB), "
                f"at the end {rss[n][2]:.0f} MiB",
                flush=True,
            )
        from pneumoseg.infer.models import precision, select_device

        dtype, channels_last = precision(select_device("auto"), args.fp32)
        a, b = args.rss
        cores = _cores()
        model_cpu = (model_cpu_before + model_cpu_after) / 2
        growth = (rss[b][0] - rss[a][0]) / rss[a][0]
        end_growth = (rss[b][2] - rss[a][2]) / rss[a][2]
        results = {
            "device": str(select_device("auto")),
            "precision": str(dtype or torch.float32).removeprefix("torch.") + (" + channels_last" * channels_last),
            "threads": torch.get_num_threads(),
            "retain_freed_memory": retained,
            "radiograph_size": args.size,
            "model_input": json.loads((bundle / "models" / "model_record.json").read_text())["preprocessing"][
                "radiograph"
            ]["image_size"],
            "batch_size": args.batch_size,
            "workers": args.workers,
            "radiographs": processed,
            "e2e_scans_per_s": round(e2e, 3),
            "model_images_per_s": round(model_ips, 3),
            "model_images_per_s_before_after": [round(model_before, 3), round(model_after, 3)],
            "ratio": round(e2e / model_ips, 3),
            # the most the ratio can be when the model and the pipeline share the same cores: every core busy
            # with the model's CPU time per image plus the workers' and writer's per scan (a GPU or spare
            # cores lift it; above it, the rest of the gap is waiting)
            "ratio_cpu_bound": round(
                min(1.0, cores * 1000 / (model_cpu + cpu["workers"] + cpu["writer_thread"]) / model_ips), 3
            ),
            "positive_fraction": round(summary["positive_fraction"], 3),
            "mean_mask_fraction_of_image": round(summary["mean_mask_pixels"] / args.size**2, 3),
            "cpu_ms_per_scan_workers": round(cpu["workers"], 1),
            "cpu_ms_per_scan_main_process": round(cpu["main"], 1),
            "cpu_ms_per_scan_of_which_writer_thread": round(cpu["writer_thread"], 1),
            "cpu_ms_per_scan_available": round(cpu["available"], 1),
            "model_cpu_ms_per_image_alone": round(model_cpu, 1),
            "e2e_mask_png_only_scans_per_s": round(e2e_mask, 3),
            "ratio_mask_png_only": round(e2e_mask / model_ips, 3),
            "ct_volumes": ct_processed,
            "ct_volumes_per_s": round(ct_processed / ct_seconds, 3),
            "ct_slices_per_s": round(ct_processed * args.ct_slices / ct_seconds, 2),
            f"peak_rss_mib_{a}": round(rss[a][0], 1),
            f"peak_rss_mib_{b}": round(rss[b][0], 1),
            f"worker_rss_mib_{a}": round(rss[a][1], 1),
            f"worker_rss_mib_{b}": round(rss[b][1], 1),
            f"end_rss_mib_{a}": round(rss[a][2], 1),
            f"end_rss_mib_{b}": round(rss[b][2], 1),
            "rss_model_input": args.rss_image_size,
            "rss_growth": round(growth, 4),
            "end_rss_growth": round(end_growth, 4),
        }
        if args.baseline:
            baseline = json.loads(Path(args.baseline).read_text())
            for key in ("e2e_scans_per_s", "e2e_mask_png_only_scans_per_s", "ct_volumes_per_s"):
                results[f"{key}_vs_baseline"] = round(results[key] / baseline[key], 3)
        print()
        print("| quantity | value | target |")
        print("|---|---|---|")
        targets = {
            "ratio": ">= 0.8 " + ("PASS" if results["ratio"] >= 0.8 else "MISS"),
            "rss_growth": "<= 10% " + ("PASS" if abs(growth) <= 0.10 else "MISS"),
            "end_rss_growth": "<= 10% " + ("PASS" if abs(end_growth) <= 0.10 else "MISS"),
            "e2e_scans_per_s_vs_baseline": ">= 1 (no slower than the baseline) "
            + ("PASS" if results.get("e2e_scans_per_s_vs_baseline", 1) >= 1 else "MISS"),
        }
        for key, value in results.items():
            print(f"| {key} | {value} | {targets.get(key, '')} |")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
