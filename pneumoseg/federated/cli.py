"""``pneumoseg federated job | simulate | report``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_subcommand", "run"]


def _network_kwargs(text: str | None) -> dict:
    if not text:
        return {}
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("--network-kwargs must be a JSON object, e.g. '{\"decoder_channels\": [16,8,8,4,4]}'")
    return value


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """Register ``pneumoseg federated ...``."""
    from pneumoseg.federated.simulate import SimulationConfig

    parser = subparsers.add_parser(
        "federated",
        help="federated training between hospitals on NVIDIA FLARE: write the job, simulate, report",
        description="Train the bundle across hospitals with NVIDIA FLARE (FedAvg): images stay at each site, "
        "only weights and aggregate metrics cross. See docs/federated.md.",
    )
    actions = parser.add_subparsers(dest="federated_command", metavar="ACTION")

    p = actions.add_parser(
        "job",
        help="write the NVFlare job folder (submit it with the FLARE admin console)",
        description="Write an NVFlare job: FedAvg on the server with model persistence, and at each site the "
        "installed pneumoseg's trainer (Client API) running the bundle's own train.json / evaluate.json. The job "
        "holds configuration only (no custom code); each site reads its manifest and data root from its own "
        "site config (PNEUMOSEG_FEDERATED_SITE_CONFIG), which the job never names.",
    )
    p.add_argument("--bundle", required=True, type=Path, help="bundle whose network and input size the job trains")
    p.add_argument("--sites", required=True, help="comma-separated FLARE site names, e.g. site-a,site-b")
    p.add_argument("--rounds", type=int, required=True, help="federated rounds")
    p.add_argument("--local-epochs", type=int, required=True, help="epochs each site trains per round")
    p.add_argument("--out", required=True, type=Path, help="job folder to write")
    p.add_argument("--learning-rate", type=float, default=3e-4, help="peak learning rate (default: %(default)s)")
    p.add_argument("--warmup-epochs", type=int, default=1, help="warm-up epochs of the schedule (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the bundle's)")
    p.add_argument(
        "--network-kwargs", default=None, help="JSON object overriding the bundle's network arguments (registry schema)"
    )
    p.add_argument("--seed", type=int, default=0, help="training seed at every site (default: %(default)s)")
    p.add_argument("--name", default="pneumoseg-fedavg", help="job name (default: %(default)s)")
    p.add_argument(
        "--initial-weights",
        default=None,
        help="state dict file to start from, as a path on the FLARE server (default: random initialisation)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing job folder")

    d = SimulationConfig()
    p = actions.add_parser(
        "simulate",
        help="run a whole federation on this machine with FLARE's simulator on synthetic hospitals",
        description="Generate synthetic hospitals that differ (CR MONOCHROME1 at twice the size, DX JPEG 2000 with "
        "another exposure, more positives with less data, in turn), write the job, run `nvflare simulator` and "
        "publish OUT/report/rounds.{csv,md,png}, OUT/global_bundle/ and OUT/global_bundle.zip.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=d.out_dir, help="output folder")
    p.add_argument("--sites", type=int, default=d.sites, help="number of synthetic hospitals")
    p.add_argument("--rounds", type=int, default=d.rounds, help="federated rounds")
    p.add_argument("--local-epochs", type=int, default=d.local_epochs, help="epochs per site per round")
    p.add_argument(
        "--images-per-site",
        type=int,
        default=d.images_per_site,
        help="radiographs per site (before the profile's share)",
    )
    p.add_argument("--image-size", type=int, default=d.image_size, help="model input size and base phantom size")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate, help="peak learning rate")
    p.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs, help="warm-up epochs")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="batch size at every site")
    p.add_argument("--num-workers", type=int, default=d.num_workers, help="DataLoader workers at every site")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the data and the training")
    p.add_argument("--network-kwargs", default=None, help="JSON object of network arguments (registry schema)")
    p.add_argument("--no-onnx", action="store_true", help="export the global bundle without ONNX")
    p.add_argument("--signing-key", type=Path, default=None, help="Ed25519 key to sign the global bundle with")

    p = actions.add_parser(
        "report",
        help="table, plot and exported global bundle from a finished job's run folder on the server",
        description="Read RUN_DIR/pneumoseg_rounds.jsonl and RUN_DIR/app_server/FL_global_model.pt (the server's "
        "run folder of the job, e.g. from the admin console's download_job) and write OUT/report/rounds.{csv,md,png}, "
        "OUT/global_bundle/ and OUT/global_bundle.zip.",
    )
    p.add_argument("run_dir", type=Path, help="the job's run folder on the server")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--no-onnx", action="store_true", help="export the global bundle without ONNX")
    p.add_argument("--signing-key", type=Path, default=None, help="Ed25519 key to sign the global bundle with")
    p.add_argument("--overwrite", action="store_true", help="replace earlier outputs in OUT")
    parser.set_defaults(func=run, federated_command=None, federated_parser=parser)


def run(args: argparse.Namespace) -> int:
    """Dispatch ``pneumoseg federated ACTION``; errors are one line on stderr, exit code 1."""
    if args.federated_command is None:
        args.federated_parser.print_help()
        return 2
    try:
        return _ACTIONS[args.federated_command](args)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError, NotImplementedError) as err:
        print(f"pneumoseg federated {args.federated_command}: {err}", file=sys.stderr)
        return 1


def _job(args: argparse.Namespace) -> int:
    from pneumoseg.federated.job import bundle_network, write_job
    from pneumoseg.federated.values import JobValues

    network, size = bundle_network(args.bundle)
    network.update(_network_kwargs(args.network_kwargs))
    image_size = args.image_size or size
    if image_size is None:
        raise ValueError(f"{args.bundle}: no image_size in the bundle; pass --image-size")
    values = JobValues(rounds=args.rounds, local_epochs=args.local_epochs, learning_rate=args.learning_rate,
                       image_size=image_size, warmup_epochs=args.warmup_epochs, seed=args.seed,
                       network=network)  # fmt: skip
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    out = write_job(args.out, sites, values, args.name, args.initial_weights, args.overwrite)
    print(f"wrote the job {out} for sites {', '.join(sites)}: {values.rounds} rounds x {values.local_epochs} epoch(s)")
    print("each site needs: PNEUMOSEG_FEDERATED_SITE_CONFIG pointing at its site config, and in local/resources.json")
    print('  class_allow_list: ["pneumoseg.federated.executor.BundleClientExecutor"] (see docs/federated.md)')
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from pneumoseg.federated.simulate import SimulationConfig, simulate

    config = SimulationConfig(
        out_dir=args.out, sites=args.sites, rounds=args.rounds, local_epochs=args.local_epochs,
        images_per_site=args.images_per_site, image_size=args.image_size, learning_rate=args.learning_rate,
        warmup_epochs=args.warmup_epochs, batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed,
        network=_network_kwargs(args.network_kwargs), onnx=not args.no_onnx, signing_key=args.signing_key,
    )  # fmt: skip
    sim = simulate(config)
    _print_results(sim.results)
    print(f"simulation finished in {sim.seconds:.0f} s; FLARE workspace {sim.workspace}, job {sim.job}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from pneumoseg.federated.export import publish

    _print_results(publish(args.run_dir, args.out, None, args.signing_key, onnx=not args.no_onnx,
                           overwrite=args.overwrite))  # fmt: skip
    return 0


def _print_results(results) -> None:
    print(results.log.markdown())
    print(f"wrote {', '.join(str(p) for p in results.report.values())}")
    print(f"global model bundle: {results.bundle}" + (f", archive {results.archive}" if results.archive else ""))


_ACTIONS = {"job": _job, "simulate": _simulate, "report": _report}
