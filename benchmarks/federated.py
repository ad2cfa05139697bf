"""Local-only vs federated vs pooled training on synthetic hospitals: each site's test metrics.

Three synthetic sites (``pneumoseg.federated.sites.PROFILES``: CR MONOCHROME1 at twice the size; DX JPEG 2000
with another exposure; more positives with half the images), the same initial weights and the same total epochs
(``--rounds`` x ``--local-epochs``) in every setting:

- **local-only**: each site trains alone on its training split;
- **federated**: ``pneumoseg federated simulate``'s path (FLARE simulator, FedAvg, every site's trainer running
  the installed bundle's configs);
- **pooled**: one training on all sites' training splits together (what centralising the images would give).

Every model is scored on every site's held-out test split through the same evaluation the federated sites run
(the bundle's ``evaluate.json``, record-default post-processing: the image gate at the operating threshold).
The table (``OUT/benchmark.md``) has each site's SIIM Dice, positive-only Dice and AUC per setting; local-only
is the site's own model.

    flock /tmp/pneumoseg-heavy.lock env OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/federated.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHOWN = ("siim_dice", "positive_dice", "auc")


def _pooled_manifest(sites, path: Path) -> Path:
    """All sites' training and validation rows with absolute image paths (test splits stay per site)."""
    pooled = {"training": [], "validation": [], "test": []}
    for site in sites:
        manifest = json.loads(site.manifest.read_text())
        root = (site.manifest.parent / manifest.get("data_root", ".")).resolve()
        for split in ("training", "validation"):
            pooled[split] += [{**row, "image": str(root / row["image"])} for row in manifest[split]]
    path.write_text(json.dumps(pooled))
    return path


def _train(values, manifest: Path, work: Path, name: str, initial: dict, batch_size: int):
    from pneumoseg.federated.client import BundleSite
    from pneumoseg.federated.values import JobValues, SiteConfig

    # one "round" of all the epochs: the same trainer, schedule and evaluation code the federated sites run
    alone = JobValues(**{**values.to_dict(), "rounds": 1, "local_epochs": values.total_epochs})
    site = SiteConfig(manifest=str(manifest), work_dir=str(work), batch_size=batch_size, val_batch_size=batch_size,
                      num_workers=0)  # fmt: skip
    start = time.perf_counter()
    weights, _ = BundleSite(alone, site, name).train(initial)
    return weights, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench_out/federated"))
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--images-per-site", type=int, default=160)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--decoder", default=None, help="decoder_channels, e.g. 32,16,16,8,8 (default: the bundle's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from pneumoseg.federated.client import BundleSite
    from pneumoseg.federated.simulate import SimulationConfig, simulate
    from pneumoseg.federated.values import SiteConfig
    from pneumoseg.model_record import NetworkSpec, load_state_dict

    start = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    network = {"decoder_channels": [int(c) for c in args.decoder.split(",")]} if args.decoder else {}
    torch.manual_seed(args.seed)
    initial = NetworkSpec("SCSEUNet", network).build().state_dict()
    torch.save(initial, out / "initial.pt")

    config = SimulationConfig(
        out_dir=out / "federated", sites=args.sites, rounds=args.rounds, local_epochs=args.local_epochs,
        images_per_site=args.images_per_site, image_size=args.image_size, learning_rate=args.learning_rate,
        warmup_epochs=1, batch_size=args.batch_size, seed=args.seed, network=network, onnx=False,
        initial_weights=out / "initial.pt",
    )  # fmt: skip
    t0 = time.perf_counter()
    sim = simulate(config)
    seconds = {"federated": time.perf_counter() - t0}
    values = sim.results.values
    models = {"federated": load_state_dict(sim.results.bundle / "models" / "model.pt")}

    local = {}
    seconds["local-only"] = 0.0
    for site in sim.sites:
        local[site.name], took = _train(values, site.manifest, out / "local" / site.name, site.name, initial,
                                        args.batch_size)  # fmt: skip
        seconds["local-only"] += took
    pooled_manifest = _pooled_manifest(sim.sites, out / "pooled_manifest.json")
    models["pooled"], seconds["pooled"] = _train(values, pooled_manifest, out / "pooled", "pooled", initial,
                                                 args.batch_size)  # fmt: skip

    table: dict[str, dict[str, dict[str, float]]] = {}
    for site in sim.sites:
        test = SiteConfig(manifest=str(site.manifest), work_dir=str(out / "test" / site.name), val_split="test",
                          batch_size=args.batch_size, val_batch_size=args.batch_size, num_workers=0)  # fmt: skip
        evaluator = BundleSite(values, test, site.name)
        table[site.name] = {
            "local-only": evaluator.evaluate(local[site.name]),
            "federated": evaluator.evaluate(models["federated"]),
            "pooled": evaluator.evaluate(models["pooled"]),
        }

    settings = ("local-only", "federated", "pooled")
    counts = {s.name: {k: len(v) for k, v in json.loads(s.manifest.read_text()).items() if isinstance(v, list)}
              for s in sim.sites}  # fmt: skip
    lines = [
        f"{args.sites} synthetic sites, {values.rounds} rounds x {values.local_epochs} local epochs "
        f"(= {values.total_epochs} epochs everywhere), {args.image_size} px, decoder "
        f"{network.get('decoder_channels', 'default')}, batch {args.batch_size}, lr {args.learning_rate:g}",
        "",
        "| site | profile | train / val / test images | setting | " + " | ".join(SHOWN) + " |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in SHOWN) + " |",
    ]
    for site in sim.sites:
        c = counts[site.name]
        for setting in settings:
            m = table[site.name][setting]
            cells = " | ".join(f"{m[k]:.3f}" if k in m else "n/a" for k in SHOWN)
            lines.append(f"| {site.name} | {site.profile.label} | {c.get('training')} / {c.get('validation')} / "
                         f"{c.get('test')} | {setting} | {cells} |")  # fmt: skip
    for setting in settings:
        means = [
            sum(table[s][setting][k] for s in table if k in table[s][setting])
            / max(1, sum(k in table[s][setting] for s in table))
            for k in SHOWN
        ]
        lines.append(f"| mean | | | {setting} | " + " | ".join(f"{v:.3f}" for v in means) + " |")
    lines += ["", "wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
              + f"; total {time.perf_counter() - start:.0f} s"]  # fmt: skip
    text = "\n".join(lines) + "\n"
    (out / "benchmark.md").write_text(text)
    (out / "benchmark.json").write_text(json.dumps({"table": table, "seconds": seconds, "counts": counts}, indent=1))
    print(text)
    print(f"per-round federated metrics (validation splits): {sim.results.report['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
