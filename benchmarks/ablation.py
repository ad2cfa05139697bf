"""The patent's parts measured on the hard set: each variant trained through the bundle's configs with one
override, two seeds each, scored by ``hard_set.score`` (post-processing searched on validation, held-out test).

Variants: ``full`` (the bundle's defaults); ``no_encoder_scse`` (``--network_def#encoder_scse False``: plain
ResNet34 stages, the decoder keeps its scSE); ``no_hypercolumn`` (the head sees the last decoder block only);
``no_cls`` (``w_cls = 0``: the classification head is not trained, the image gate is then uninformative);
``cls_1`` (``w_cls = 1``: loss weights); ``lr_1e-3`` (peak learning rate 1e-3 instead of the default).
``folds``: the full network trained on 3 cross-validation folds of training + validation (validated on its
held-out fold), scored alone and as a :class:`pneumoseg.infer.models.MeanEnsemble` (post-processing searched on
the common validation split, which the fold models partly trained on: their ensemble's tuned values are
optimistic for it, the test split is not).

One training per call, so each holds the shared lock alone::

    for run in full:0 full:1 no_encoder_scse:0 ...; do
        OMP_WAIT_POLICY=PASSIVE flock /tmp/pneumoseg-heavy.lock .venv/bin/python benchmarks/ablation.py --run $run
    done
    .venv/bin/python benchmarks/ablation.py --ensemble    # fold_0..2 (seed 0) as one MeanEnsemble, +/- flip TTA
    .venv/bin/python benchmarks/ablation.py --ensemble --last   # the same with each fold's last epoch, and alone
    .venv/bin/python benchmarks/ablation.py --table       # the markdown table from results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import hard_set  # noqa: E402

VARIANTS: dict[str, list[str]] = {
    "full": [],
    "no_encoder_scse": ["--network_def#encoder_scse", "False"],
    "no_hypercolumn": ["--network_def#hypercolumn", "False"],
    "no_cls": ["--loss#cls_weight", "0.0"],
    "cls_1": ["--loss#cls_weight", "1.0"],
    "lr_1e-3": ["--learning_rate", "0.001"],
}
# every variant is selected as the first seed-0 runs were (SIIM Dice at a plain 0.5 threshold, the default
# then); on these runs it picks the same epoch as positive-only Dice, today's default, but for full:1 (12 vs 11)
SELECTION = ["--selection_metric", "val_siim_dice"]
METRICS = ("siim_dice", "siim_dice_positive", "auc", "sensitivity", "specificity")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=hard_set.REPO / "bench_out" / "ablation", help="output folder")
    parser.add_argument("--run", help="VARIANT:SEED (a VARIANT of the list, or fold_I for fold I of 3)")
    parser.add_argument("--table", action="store_true", help="print the table of the runs so far")
    parser.add_argument(
        "--ensemble", action="store_true", help="score the fold models (seed 0) as one ensemble, with and without TTA"
    )
    parser.add_argument("--last", action="store_true", help="--ensemble: the folds' last epochs, not model.pt")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs (the table's: 12)")
    parser.add_argument(
        "--image-size", type=int, default=256, help="network input size (multiple of 64; the table's: 256)"
    )
    parser.add_argument("--workers", type=int, default=2, help="data loading processes")
    return parser.parse_args(argv)


def run_one(args: argparse.Namespace, name: str, seed: int) -> None:
    from pneumoseg.model_record import load_trained_model

    manifest = hard_set.make_hard_data(hard_set.DATA, folds=3, workers=args.workers)
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    bundle = args.out / f"{name}_seed{seed}"
    if name.startswith("fold_"):
        fold = int(name.split("_")[1])
        splits = {"train_split": f"cv_train_{fold}", "val_split": f"cv_val_{fold}"}
        seconds = hard_set.train_bundle(bundle, manifest, args.epochs, args.image_size, seed, workers=args.workers,
                                        **splits)  # fmt: skip
    else:
        seconds = hard_set.train_bundle(
            bundle, manifest, args.epochs, args.image_size, seed, [*VARIANTS[name], *SELECTION], workers=args.workers
        )
    trained = load_trained_model(bundle)
    data = {s: hard_set.load_images(manifest, s, args.image_size, trained.record) for s in ("validation", "test")}
    scored = hard_set.score_network(trained.network, data)
    scored["seconds_train"] = round(seconds, 1)
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}  # others may have written
    results[f"{name}:{seed}"] = scored
    results_file.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{name} seed {seed}: " + ", ".join(f"{k} {scored[k]:.4f}" for k in METRICS) + f", {seconds:.0f} s")


def score_ensemble(args: argparse.Namespace) -> None:
    """The trained ``fold_I_seed0`` bundles as one :class:`MeanEnsemble` (and with flip TTA), into results.json."""
    import torch

    from pneumoseg.infer.models import FlipTTA, MeanEnsemble
    from pneumoseg.model_record import load_trained_model

    manifest = hard_set.make_hard_data(hard_set.DATA, folds=3, workers=args.workers)
    folds = sorted(args.out.glob("fold_*_seed0"))
    if not folds:
        raise SystemExit(f"no fold bundles in {args.out}: run --run fold_0:0 .. fold_2:0 first")
    trained = [load_trained_model(bundle) for bundle in folds]
    suffix = ""
    if args.last:  # each fold's last epoch (checkpoint_last.pt) instead of its selected model.pt
        suffix = "_last"
        for bundle, model in zip(folds, trained):
            last = torch.load(bundle / "models" / "checkpoint_last.pt", weights_only=True)
            model.network.load_state_dict(last["model"])
    data = {s: hard_set.load_images(manifest, s, args.image_size, trained[0].record) for s in ("validation", "test")}
    ensemble = MeanEnsemble([t.network for t in trained])
    results_file = args.out / "results.json"
    alone = [(f"{bundle.name.removesuffix('_seed0')}{suffix}", t.network) for bundle, t in zip(folds, trained)]
    for name, network in (*(alone if args.last else ()), (f"fold_ensemble_{len(folds)}{suffix}", ensemble),
                          (f"fold_ensemble_{len(folds)}{suffix}+tta", FlipTTA(ensemble))):  # fmt: skip
        scored = hard_set.score_network(network, data)
        scored["seconds_train"] = 0.0
        results = json.loads(results_file.read_text()) if results_file.is_file() else {}
        results[f"{name}:0"] = scored
        results_file.write_text(json.dumps(results, indent=1) + "\n")
        print(f"{name}: " + ", ".join(f"{k} {scored[k]:.4f}" for k in METRICS))


def table(args: argparse.Namespace) -> None:
    results = json.loads((args.out / "results.json").read_text())
    groups: dict[str, list[dict]] = {}
    for key, value in results.items():
        groups.setdefault(key.split(":")[0], []).append(value)
    print("| variant | seeds | SIIM Dice | positive-only Dice | AUC | sensitivity | specificity | training s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, runs in groups.items():
        cells = []
        for metric in (*METRICS, "seconds_train"):
            values = [r[metric] for r in runs]
            mean = statistics.fmean(values)
            spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 and metric != "seconds_train" else ""
            cells.append(f"{mean:.0f}" if metric == "seconds_train" else f"{mean:.3f}{spread}")
        print(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.run:
        name, seed = args.run.split(":")
        if name not in VARIANTS and not name.startswith("fold_"):
            raise SystemExit(f"unknown variant {name}; one of {sorted(VARIANTS)} or fold_0..2")
        run_one(args, name, int(seed))
    if args.ensemble:
        score_ensemble(args)
    if args.table:
        table(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
