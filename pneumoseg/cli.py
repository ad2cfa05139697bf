"""Command line: ``pneumoseg demo | synth | manifest | infer | bundle ...``.

Each subcommand lives in the module of its concept, which exposes ``add_subcommand(subparsers)``;
this module only assembles them, so the CLI restates no defaults of its own.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from pneumoseg.runtime import FAIR_SHARE_ENVIRONMENT

# module that owns each subcommand (imported lazily: `pneumoseg synth --help` need not import torch)
SUBCOMMANDS: dict[str, str] = {
    "demo": "pneumoseg.demo",
    "synth": "pneumoseg.data.phantoms",
    "manifest": "pneumoseg.data.manifest",
    "infer": "pneumoseg.infer.cli",
    "bundle": "pneumoseg.sharing",
    "serve": "pneumoseg.pacs.cli",
    "federated": "pneumoseg.federated.cli",
}

# environment a subcommand needs before torch is imported (an explicit setting by the user wins): OpenMP
# threads that sleep instead of spinning while they wait (pneumoseg.runtime). infer: the model's threads share
# the cores with the DataLoader workers and the writer thread; passive waiting measured +7% scans/s end to end
# on 2 CPU cores (benchmarks/batch_infer.py). demo: its training and evaluation subprocesses inherit it, so a
# second job on the machine slows them in proportion to the cores it takes (benchmarks/shared_machine.py).
SUBCOMMAND_ENVIRONMENT: dict[str, dict[str, str]] = {"infer": FAIR_SHARE_ENVIRONMENT, "demo": FAIR_SHARE_ENVIRONMENT}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pneumoseg",
        description="Pneumothorax segmentation + classification on chest radiographs and CT "
        "(multi-task scSE U-Net, patent CN114743000A).",
    )
    from pneumoseg import __version__

    parser.add_argument("--version", action="version", version=f"pneumoseg {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        if only is not None and name != only:
            # cheap placeholder so that `pneumoseg --help` lists every command without importing it
            subparsers.add_parser(name, help=f"see `pneumoseg {name} --help`", add_help=False)
            continue
        importlib.import_module(module_name).add_subcommand(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    for key, value in SUBCOMMAND_ENVIRONMENT.get(command or "", {}).items():
        os.environ.setdefault(key, value)
    parser = build_parser(only=command if command in SUBCOMMANDS else "")
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)
