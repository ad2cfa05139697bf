"""``pneumoseg serve``: run the PACS node; ``pneumoseg serve status``: what it is doing (see docs/pacs.md)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

from pneumoseg.pacs.config import ConfigError, load_config, parse_destination

__all__ = ["add_subcommand", "run"]


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """Register ``pneumoseg serve``."""
    p = subparsers.add_parser(
        "serve",
        help="a DICOM node: receive studies from the PACS, segment them, send the SEG (and SR) back",
        description="Run a DICOM Storage SCP (or poll a DICOMweb server) that keeps every received CR/DX/CT "
        "instance in a spool, processes each study once no instance arrived for the quiet time with the same "
        "runner as `pneumoseg infer`, and sends the DICOM SEG (and a Comprehensive SR, optionally a Secondary "
        "Capture of the overlay) to the configured destinations. `pneumoseg serve status` prints queue depths, "
        "waiting results, last errors and throughput. Settings: --config node.toml, overridden by the options "
        "below. Stops on SIGTERM after the study in progress. See docs/pacs.md.",
    )
    p.add_argument("action", nargs="?", choices=["status"], help="status: print the node's state and exit")
    p.add_argument("--config", metavar="FILE", help="node.toml (see docs/pacs.md); options below override it")
    p.add_argument(
        "--bundle", action="append", metavar="DIR", help="trained bundle (repeatable; replaces the config's)"
    )
    p.add_argument("--ae-title", help="the node's AE title")
    p.add_argument("--port", type=int, help="DICOM port to listen on")
    p.add_argument("--bind", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--state-dir", metavar="DIR", help="spool, queue database and (by default) results")
    p.add_argument("--results-dir", metavar="DIR", help="results folder (default: STATE_DIR/results)")
    p.add_argument("--quiet-seconds", type=float, help="a study is complete after this long without a new instance")
    p.add_argument("--allow-ae", action="append", metavar="AE_TITLE", help="allowed calling AE title (repeatable)")
    p.add_argument("--allow-host", action="append", metavar="ADDRESS", help="allowed peer address/network (repeatable)")
    p.add_argument(
        "--destination",
        action="append",
        metavar="AE@HOST:PORT",
        help="where results go (repeatable; replaces the config's)",
    )
    p.add_argument(
        "--dicomweb", metavar="URL", help="also pull new studies from this DICOMweb server and STOW the results"
    )
    p.add_argument("--device", help="auto, cpu or cuda:N")
    p.add_argument("--workers", type=int, help="DataLoader workers of the runner")
    p.add_argument("--batch-size", type=int, help="radiographs / CT slices per forward pass")
    p.add_argument("--json", action="store_true", help="status: print JSON")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning"], help="node log level")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace):
    overrides = {
        "inference.bundles": args.bundle,
        "node.ae_title": args.ae_title,
        "node.port": args.port,
        "node.bind": args.bind,
        "node.state_dir": os.path.abspath(args.state_dir) if args.state_dir else None,
        "node.results_dir": os.path.abspath(args.results_dir) if args.results_dir else None,
        "node.quiet_seconds": args.quiet_seconds,
        "node.allowed_ae_titles": args.allow_ae,
        "node.allowed_hosts": args.allow_host,
        "dicomweb.url": args.dicomweb,
        "inference.device": args.device,
        "inference.workers": args.workers,
        "inference.batch_size": args.batch_size,
    }
    if args.bundle:
        overrides["inference.bundles"] = [os.path.abspath(b) for b in args.bundle]
    if args.destination:
        overrides["destinations"] = [parse_destination(d) for d in args.destination]
    return load_config(args.config, overrides)


def run(args: argparse.Namespace) -> int:
    """``pneumoseg serve [status]``: 0 on a clean stop, 2 on a usage / setup error."""
    try:
        config = _config(args)
    except ConfigError as err:
        print(f"pneumoseg serve: {err}", file=sys.stderr)
        return 2
    if args.action == "status":
        from pneumoseg.pacs.queue import DB_NAME, NodeQueue
        from pneumoseg.pacs.status import format_status, node_status

        try:
            status = node_status(NodeQueue(config.state_dir / DB_NAME, readonly=True))
        except FileNotFoundError as err:
            print(f"pneumoseg serve status: {err}", file=sys.stderr)
            return 2
        print(json.dumps(status, indent=1) if args.json else format_status(status))
        return 0
    missing = [m for m in ("pynetdicom", "dicomweb_client") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"pneumoseg serve: {', '.join(missing)} not installed: pip install 'pneumoseg[pacs]'", file=sys.stderr)
        return 2
    # as for `pneumoseg infer` (pneumoseg.cli): OpenMP threads wait passively, read when torch loads
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from pneumoseg.pacs.log import configure_logging, log_event
    from pneumoseg.pacs.node import Node
    from pneumoseg.runtime import retain_freed_memory

    configure_logging(args.log_level)
    retain_freed_memory()  # this program owns the process (as `pneumoseg infer`)
    try:
        node = Node(config)
        return node.run()
    except (FileNotFoundError, ValueError, KeyError, OSError) as err:
        log_event("cannot_start", level=40, error=f"{type(err).__name__}: {err}"[:500])
        print(f"pneumoseg serve: {err}", file=sys.stderr)
        return 2
