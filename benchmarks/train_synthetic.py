"""Train the bundle on synthetic radiographs on this machine's CPU and report held-out quality.

Steps (all through the bundle's own commands, as a user would run them):

1. ``pneumoseg.data.phantoms.synthesize``: ``--radiographs`` CR DICOM phantoms at ``--size`` px (SIIM layout);
2. ``build_siim_manifest``: patient-level training / validation / test split (``--val-fraction``,
   ``--test-fraction``; no folds);
3. ``python -m monai.bundle run training`` (``train.json``) for ``--epochs`` epochs at ``--image-size``,
   validating every epoch (StatsHandler + metrics history; the best epoch is kept);
4. ``train.json + evaluate.json`` on the validation split: searches the post-processing (image gate + SIIM
   triplet) and writes it to the bundle's ``models/model_record.json``;
5. ``train.json + evaluate.json`` on the held-out test split with that post-processing
   (``--eval_split test --search_postprocessing false``): SIIM Dice (mean per image, empty-on-empty = 1),
   Dice on positive images, image-level AUC, sensitivity/specificity: the reported numbers;
6. learning curves (training loss per epoch, validation Dice / positive Dice / AUC) to ``--out``/curves.png.

Prints the numbers with PASS/MISS against the targets (SIIM Dice >= 0.85, AUC >= 0.95) and the wall time
(budget: 15 min on 2 CPU cores). Everything is written under ``--out`` (default ``bench_out/train_synthetic``).

    .venv/bin/python benchmarks/train_synthetic.py --cpu-bf16   # 480 phantoms, 9 epochs at 256 px

``--hard``: the hard phantoms (``pneumoseg synth --hard``: 352 training + validation images from ``--seed``, 100
test images from ``--seed + 1000``) and a peer. The bundle is trained through its own configs and defaults
(``train.json``, plus the ``average_top_k.json`` overlay keeping the top-3 validation checkpoints' average), the
peer — segmentation_models_pytorch's ``Unet("resnet34", decoder_attention_type="scse", aux_params=...)``
(``smp_unet.py``) — with the same recipe read from ``train.json``, on the same files, for the same epochs, on the
same machine. Both are scored by the same code (``hard_set.score``): post-processing searched on validation,
test SIIM Dice, positive-only Dice, AUC, sensitivity / specificity at the tuned values, training wall time;
with horizontal-flip TTA and (bundle) the top-3 checkpoint average too. ``--phase bundle|peer|score`` runs one
part (each training under its own ``flock``); ``--phase all`` all three::

    OMP_WAIT_POLICY=PASSIVE flock /tmp/pneumoseg-heavy.lock .venv/bin/python benchmarks/train_synthetic.py --hard
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "pneumothorax_scse_unet"
TARGETS = {"siim_dice": 0.85, "auc": 0.95}
_LOSS_LINE = re.compile(r"Epoch: (\d+)/\d+, Iter: \d+/\d+ -- .*?\bloss: ([0-9.eE+-]+)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train the pneumothorax bundle on synthetic radiographs (CPU) and report held-out "
        "SIIM Dice, positive-only Dice and AUC, with learning curves.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench_out" / "train_synthetic", help="output folder")
    parser.add_argument("--radiographs", type=int, default=480, help="synthetic radiographs in total")
    parser.add_argument("--size", type=int, default=256, help="phantom size in pixels (rows = columns)")
    parser.add_argument("--val-fraction", type=float, default=0.12, help="validation fraction (by patient)")
    parser.add_argument("--test-fraction", type=float, default=0.22, help="held-out test fraction (by patient)")
    parser.add_argument("--image-size", type=int, default=256, help="network input size (multiple of 64)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 9; --hard: 12)")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch size")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate (AdamW)")
    parser.add_argument(
        "--decoder-channels", default="[64,32,32,16,16]", help="decoder widths (smaller than the default for CPU)"
    )
    parser.add_argument("--workers", type=int, default=2, help="processes for synthesis and data loading")
    parser.add_argument("--seed", type=int, default=0, help="seed of the phantoms, the split and training")
    parser.add_argument("--keep-data", action="store_true", help="reuse phantoms already in --out/data")
    parser.add_argument(
        "--cpu-bf16", action="store_true", help="bf16 autocast on CPU (worth it on CPUs with AVX512-BF16 / AMX)"
    )
    parser.add_argument("--hard", action="store_true", help="hard phantoms, bundle vs the smp peer (docstring)")
    parser.add_argument(
        "--ct", action="store_true", help="hard CT phantoms: the 2D slice model (ct.json) vs the same network in 3D"
    )
    parser.add_argument(
        "--phase",
        choices=("all", "bundle", "peer", "score", "2d", "3d"),
        default="all",
        help="--hard: bundle | peer | score; --ct: 2d | 3d | score",
    )
    parser.add_argument("--epochs-3d", type=int, default=8, help="--ct: epochs of the 3D network")
    parser.add_argument("--ct-size", type=int, default=64, help="--ct: volume size (in-plane = slices; 64 px)")
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 12 if args.hard or args.ct else 9
    return args


def _bundle_command(args: argparse.Namespace, bundle: Path, extra: list[str]) -> list[str]:
    # evaluation reads the image size and network from the model record training wrote
    return [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        *extra,
        "--datalist",
        str(args.out / "data" / "manifest.json"),
        "--bundle_root",
        str(bundle),
        "--num_workers",
        str(args.workers),
        "--seed",
        str(args.seed),
        "--cpu_bf16",
        str(bool(args.cpu_bf16)),
    ]  # fmt: skip  (a Python literal: fire reads "false" as a string)


def _stream(command: list[str], log: Path) -> str:
    """Run ``command``, echo its output and keep it in ``log``; raise on failure."""
    lines = []
    with (
        log.open("w") as f,
        subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc,
    ):
        for line in proc.stdout:  # type: ignore[union-attr]
            f.write(line)
            lines.append(line)
            if "Metrics --" in line or "Epoch[" in line and "Complete" in line:
                print(line.rstrip(), flush=True)
    if proc.returncode:
        sys.stdout.write("".join(lines[-40:]))
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(command)}; log: {log}")
    return "".join(lines)


def plot_curves(train_log: str, history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses: dict[int, list[float]] = defaultdict(list)
    for epoch, loss in _LOSS_LINE.findall(train_log):
        losses[int(epoch)].append(float(loss))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = sorted(losses)
    ax1.plot(epochs, [sum(losses[e]) / len(losses[e]) for e in epochs], marker="o")
    ax1.set(title="training loss (fused, mean per epoch)", xlabel="epoch", ylabel="loss")
    for key, label in (
        ("val_siim_dice", "SIIM Dice"),
        ("val_siim_dice_positive", "Dice (positive images)"),
        ("val_auc", "image AUC"),
    ):
        ax2.plot([h["epoch"] for h in history], [h.get(key) for h in history], marker="o", label=label)
    ax2.axhline(TARGETS["siim_dice"], color="grey", ls="--", lw=0.8)
    ax2.set(title="validation (held-out)", xlabel="epoch", ylim=(0, 1))
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main_hard(args: argparse.Namespace) -> int:
    """``--hard``: bundle vs peer on the hard set (module docstring)."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    import hard_set
    from smp_unet import SmpUnet

    from pneumoseg.infer.models import FlipTTA
    from pneumoseg.model_record import load_trained_model

    out = args.out.parent / "train_synthetic_hard" if args.out.name == "train_synthetic" else args.out
    manifest = hard_set.make_hard_data(hard_set.DATA, size=args.size, seed=args.seed, workers=args.workers, folds=3)
    bundle, peer_file, timings_file = out / "bundle", out / "peer.pt", out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    if args.phase in ("all", "bundle"):
        print(f"training the bundle ({args.epochs} epochs at {args.image_size} px) ...", flush=True)
        timings["bundle"] = hard_set.train_bundle(
            bundle, manifest, args.epochs, args.image_size, args.seed, workers=args.workers, average_top_k=3
        )
        timings_file.write_text(json.dumps(timings, indent=1) + "\n")
    if args.phase in ("all", "peer"):
        print(f"training the smp peer ({args.epochs} epochs at {args.image_size} px) ...", flush=True)
        torch.manual_seed(args.seed)
        state, history, seconds = hard_set.train_peer(
            SmpUnet(), manifest, args.epochs, args.image_size, args.seed, workers=args.workers
        )
        torch.save(state, peer_file)
        timings["peer"], timings["peer_history"] = seconds, history
        timings_file.write_text(json.dumps(timings, indent=1) + "\n")
    if args.phase not in ("all", "score"):
        return 0
    trained = load_trained_model(bundle)
    data = {split: hard_set.load_images(manifest, split, args.image_size, trained.record)
            for split in ("validation", "test")}  # fmt: skip
    peer = SmpUnet()
    peer.load_state_dict(torch.load(peer_file, weights_only=True))
    averaged = load_trained_model(bundle, weights="models/model_top_k_average.pt").network
    models = {
        "bundle": trained.network, "bundle + flip TTA": FlipTTA(trained.network),
        "bundle, top-3 average": averaged, "bundle, top-3 average + flip TTA": FlipTTA(averaged),
        "smp peer": peer, "smp peer + flip TTA": FlipTTA(peer),
    }  # fmt: skip
    results = {"epochs": args.epochs, "image_size": args.image_size, "seconds_train": timings,
               "train_images": len(json.loads(manifest.read_text())["training"]),
               "validation_images": len(data["validation"][0]), "test_images": len(data["test"][0]),
               "bundle_history": hard_set.read_history(bundle)}  # fmt: skip
    for name, network in models.items():
        results[name] = hard_set.score_network(network, data)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nhard set: {results['train_images']} training / {results['validation_images']} validation / "
          f"{results['test_images']} test images ({args.epochs} epochs at {args.image_size} px; post-processing "
          "searched on validation)")  # fmt: skip
    print("| model | SIIM Dice | positive-only Dice | AUC | sensitivity | specificity | training wall time |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in models:
        r = results[name]
        wall = {"bundle": timings.get("bundle"), "smp peer": timings.get("peer")}.get(name)
        print(f"| {name} | {r['siim_dice']:.3f} | {r['siim_dice_positive']:.3f} | {r['auc']:.3f} | "
              f"{r['sensitivity']:.2f} | {r['specificity']:.2f} | {f'{wall:.0f} s' if wall else ''} |")  # fmt: skip
    print(f"results: {out / 'results.json'}")
    return 0


def main_ct(args: argparse.Namespace) -> int:
    """``--ct``: the 2D slice model trained from CT through ``ct.json`` vs ``SCSEUNet(spatial_dims=3)``, per volume."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    import ct_set
    import hard_set

    from pneumoseg.model_record import load_trained_model
    from pneumoseg.networks import SCSEUNet

    out = args.out.parent / "train_synthetic_ct" if args.out.name == "train_synthetic" else args.out
    out.mkdir(parents=True, exist_ok=True)
    manifest = ct_set.make_ct_data(size=args.ct_size, slices=args.ct_size, seed=args.seed)
    bundle, results_file = out / "bundle_2d", out / "results.json"
    if args.phase in ("all", "2d"):
        print(f"training the 2D slice model through ct.json ({args.epochs} epochs at {args.ct_size} px) ...")
        seconds = hard_set.train_bundle(bundle, manifest, args.epochs, args.ct_size, args.seed, workers=args.workers,
                                        overlays=["ct.json"], overrides=["--val_batch_size", "1"])  # fmt: skip
        ct_set.write_results(results_file, "seconds_2d", seconds)
    if args.phase in ("all", "3d"):
        print(f"training SCSEUNet(spatial_dims=3) ({args.epochs_3d} epochs on {args.ct_size}^3 volumes) ...")
        torch.manual_seed(args.seed)
        network, history, seconds = ct_set.train_3d(manifest, args.epochs_3d, args.ct_size, args.seed)
        torch.save(network.state_dict(), out / "model_3d.pt")
        ct_set.write_results(results_file, "seconds_3d", seconds)
        ct_set.write_results(results_file, "history_3d", history)
    if args.phase not in ("all", "score"):
        return 0
    data = {split: ct_set.load_volumes(manifest, split, args.ct_size) for split in ("validation", "test")}
    two_d = load_trained_model(bundle).network
    three_d = SCSEUNet(spatial_dims=3)
    three_d.load_state_dict(torch.load(out / "model_3d.pt", weights_only=True))
    results = ct_set.write_results(results_file, "2D slice model (ct.json)", ct_set.score_volumes(two_d, data, True))
    results = ct_set.write_results(results_file, "3D network", ct_set.score_volumes(three_d, data, False))
    print(f"\nhard CT: {len(data['validation'][0])} validation / {len(data['test'][0])} test volumes "
          f"({args.ct_size}^3; post-processing searched on validation)")  # fmt: skip
    print("| model | per-volume Dice | positive-only Dice | detection AUC | sensitivity | specificity | "
          "volume error (mL, positives) | training wall time |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, seconds in (("2D slice model (ct.json)", "seconds_2d"), ("3D network", "seconds_3d")):
        r = results[name]
        print(f"| {name} | {r['siim_dice']:.3f} | {r['siim_dice_positive']:.3f} | {r['auc']:.3f} | "
              f"{r['sensitivity']:.2f} | {r['specificity']:.2f} | {r['volume_error_ml_positive']:.1f} of "
              f"{r['truth_volume_ml_positive']:.1f} | {results.get(seconds, 0):.0f} s |")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ct:
        return main_ct(args)
    if args.hard:
        return main_hard(args)
    from pneumoseg.data.manifest import build_siim_manifest, write_manifest
    from pneumoseg.data.phantoms import synthesize

    start = time.perf_counter()
    data = args.out / "data"
    if not (args.keep_data and (data / "manifest.json").is_file()):
        shutil.rmtree(data, ignore_errors=True)
        print(
            synthesize(data, radiographs=args.radiographs, size=args.size, ct=0, seed=args.seed, workers=args.workers)
        )
        manifest, summary = build_siim_manifest(
            data / "dicom-images-train", data / "train-rle.csv", data, salt="benchmark",
            val_fraction=args.val_fraction, test_fraction=args.test_fraction, folds=0, seed=args.seed,
            progress=False,
        )  # fmt: skip
        write_manifest(manifest, data / "manifest.json", summary)
    manifest = json.loads((data / "manifest.json").read_text())
    n_train, n_val, n_test = (len(manifest[k]) for k in ("training", "validation", "test"))
    print(f"{n_train} training, {n_val} validation, {n_test} held-out test radiographs")
    data_seconds = time.perf_counter() - start

    bundle = args.out / "bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    shutil.copytree(BUNDLE / "configs", bundle / "configs")  # the searched post-processing lands here
    train_log = _stream(
        _bundle_command(
            args, bundle,
            ["training", "--meta_file", str(bundle / "configs/metadata.json"),
             "--config_file", str(bundle / "configs/train.json"), "--num_epochs", str(args.epochs),
             "--image_size", str(args.image_size), "--network_def#decoder_channels", args.decoder_channels,
             "--batch_size", str(args.batch_size), "--learning_rate", str(args.learning_rate),
             "--cache_rate", "1.0", "--early_stop_patience", str(args.epochs)],
        ),
        args.out / "train.log",
    )  # fmt: skip
    train_seconds = time.perf_counter() - start - data_seconds
    evaluate = ["--config_file", str([str(bundle / "configs/train.json"), str(bundle / "configs/evaluate.json")])]
    _stream(_bundle_command(args, bundle, evaluate), args.out / "search.log")  # into models/model_record.json
    search = json.loads((bundle / "eval" / "metrics.json").read_text())
    _stream(
        _bundle_command(args, bundle, [*evaluate, "--eval_split", "test", "--search_postprocessing", "false"]),
        args.out / "test.log",
    )
    report = json.loads((bundle / "eval" / "metrics.json").read_text())
    history = [json.loads(line) for line in (bundle / "eval" / "metrics_history.jsonl").read_text().splitlines()]
    plot_curves(train_log, history, args.out / "curves.png")
    total = time.perf_counter() - start

    results = {
        "radiographs": args.radiographs,
        "size": args.size,
        "image_size": args.image_size,
        "train_images": n_train,
        "validation_images": n_val,
        "held_out_images": n_test,
        "epochs": len(history),
        "siim_dice": report.get("val_siim_dice"),
        "siim_dice_positive": report.get("val_siim_dice_positive"),
        "auc": report.get("val_auc"),
        "sensitivity": report.get("val_sensitivity"),
        "specificity": report.get("val_specificity"),
        "postprocessing": {k: search.get(f"pp_{k}") for k in ("t_cls", "top", "min_area", "bottom")},
        "validation_siim_dice_plain": search.get("siim_dice_before"),
        "validation_siim_dice_postprocessed": search.get("siim_dice_after"),
        "seconds_data": round(data_seconds, 1),
        "seconds_train": round(train_seconds, 1),
        "seconds_total": round(total, 1),
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(
        f"\nheld-out test images: {n_test} (trained on {n_train}, {len(history)} epochs at {args.image_size} px; "
        f"post-processing {results['postprocessing']} chosen on {n_val} validation images)"
    )
    for key, target in (("siim_dice", TARGETS["siim_dice"]), ("siim_dice_positive", None), ("auc", TARGETS["auc"])):
        value = results[key]
        verdict = "" if target is None else (" PASS" if value is not None and value >= target else " MISS")
        shown = "n/a" if value is None else f"{value:.4f}"
        print(f"  {key:<22} {shown}" + (f"  (target >= {target}){verdict}" if target is not None else ""))
    print(f"  validation SIIM Dice: plain 0.5 threshold {results['validation_siim_dice_plain']:.4f}, "
          f"post-processed {results['validation_siim_dice_postprocessed']:.4f}")  # fmt: skip
    print(f"  wall time {total / 60:.1f} min (data {data_seconds:.0f} s, training {train_seconds:.0f} s)"
          f"{' PASS' if total <= 15 * 60 else ' MISS'} (budget 15 min)")  # fmt: skip
    print(f"  curves: {args.out / 'curves.png'}; results: {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
