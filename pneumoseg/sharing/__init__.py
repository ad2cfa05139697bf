"""Sharing bundles between hospitals: ``pneumoseg bundle export | verify | import | evaluate | derive``.

- :mod:`pneumoseg.sharing.verify`: static checks of a received bundle (nothing from it is executed).
- :mod:`pneumoseg.sharing.export`: export (sender), import (receiver, verifies first), derive (fine-tuning).
- :mod:`pneumoseg.sharing.model`: :class:`ExportedModel`, the TorchScript / ONNX network without training code.
- :mod:`pneumoseg.sharing.evaluate`: site validation of a received bundle on a local manifest.

See ``docs/sharing.md`` for both hospitals' steps and what verification can and cannot tell.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_subcommand", "run"]


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """Register ``pneumoseg bundle ...``."""
    parser = subparsers.add_parser(
        "bundle",
        help="share a trained bundle: export, verify, import, evaluate on local data, derive for fine-tuning",
        description="Share a trained MONAI bundle between hospitals. The sender exports it; the receiver "
        "verifies it (static checks, nothing executed), imports it, measures it on local data and may "
        "derive a fine-tuning bundle from it. See docs/sharing.md.",
    )
    actions = parser.add_subparsers(dest="bundle_command", metavar="ACTION")

    p = actions.add_parser(
        "export",
        help="write a shareable .zip of a trained bundle",
        description="Write FILE.zip: configs (absolute data paths removed), model card with "
        "validation metrics and thresholds, weights, TorchScript and ONNX exports, "
        "checksums.sha256. Datalists, manifests, logs and eval folders are never included.",
    )
    p.add_argument("--bundle", required=True, help="bundle folder (with models/model.pt)")
    p.add_argument("--out", required=True, help="output .zip file")
    p.add_argument(
        "--config_file",
        default="configs/inference.json",
        help="config whose network_def/image_size/operating_threshold are exported (default: %(default)s)",
    )
    p.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="input size used to trace the ONNX export and check the exports (default: the config's)",
    )
    p.add_argument("--no_onnx", action="store_true", help="skip the ONNX export (TorchScript only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    p = actions.add_parser(
        "verify",
        help="check a received bundle (folder or .zip) without executing it",
        description="Static checks: archive members, checksums, bundle layout (no code files), metadata "
        "schema, network shapes, every $ expression / _target_ of every config against an allowlist, "
        "logging.conf, weights (weights_only), TorchScript structure, ONNX checker. Prints a "
        "PASS/FAIL table; exit code 0 if everything passed, 1 otherwise.",
    )
    p.add_argument("path", help="bundle folder or .zip")
    p.add_argument(
        "--trust",
        action="store_true",
        help="report findings of the code, contents and logging checks as SKIP instead of FAIL, and load + "
        "run TorchScript with torch.jit.load (only for bundles whose sender you trust)",
    )
    p.add_argument("--list", action="store_true", help="also list every expression, _target_ and reference")

    p = actions.add_parser(
        "import",
        help="verify a .zip, then unpack it as a bundle folder",
        description="Verify FILE.zip (as `bundle verify`); if it passes, write the verified "
        "files into DIR (the bundle root). Exit code 1 and nothing written if it fails.",
    )
    p.add_argument("archive", metavar="FILE.zip", help="exported bundle")
    p.add_argument("--into", required=True, help="destination bundle folder (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle in DIR")
    p.add_argument("--trust", action="store_true", help="as for verify: code findings do not block the import")

    p = actions.add_parser(
        "evaluate",
        help="site validation of a received bundle on a local manifest",
        description="Run the bundle's exported model (TorchScript or ONNX, no training code) "
        "on a split of a local manifest; write site_validation.json, site_validation.md and "
        "calibration.png: SIIM Dice, positive Dice, AUC, sensitivity/specificity at the "
        "sender's threshold and at a locally re-tuned (Youden) threshold, calibration.",
    )
    p.add_argument("--bundle", required=True, help="imported bundle folder")
    p.add_argument("--manifest", required=True, help="local manifest (MONAI datalist JSON of `pneumoseg manifest`)")
    p.add_argument("--split", default="test", help="manifest split to evaluate (default: %(default)s)")
    p.add_argument(
        "--data_root", default=None, help="folder the manifest's paths are relative to (default: manifest's)"
    )
    p.add_argument("--out", default=None, help="report folder (default: BUNDLE_site_validation next to the bundle)")
    p.add_argument(
        "--model",
        choices=["torchscript", "onnx"],
        default="torchscript",
        help="exported model to run (default: %(default)s)",
    )
    p.add_argument("--image_size", type=int, default=None, help="input size (default: inference.json's image_size)")
    p.add_argument("--batch_size", type=int, default=4, help="images per forward pass (default: %(default)s)")

    p = actions.add_parser(
        "derive",
        help="start a local bundle from a received one (fine-tuning)",
        description="Copy a received bundle into a new folder, bump its version with a "
        "changelog entry naming the parent, keep its weights as models/parent_model.pt and "
        "write configs/finetune.json, which makes train.json start from them: "
        "python -m monai.bundle run --config_file \"['configs/train.json','configs/finetune.json']\"",
    )
    p.add_argument("--from", dest="source", required=True, help="received (imported) bundle folder")
    p.add_argument("--into", required=True, help="new bundle folder")
    p.add_argument("--version", default=None, help="new version (default: parent version with the last part + 1)")
    p.add_argument("--note", default="fine-tuned on local data", help="changelog text for the new version")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle in --into")
    parser.set_defaults(func=run, bundle_command=None, bundle_parser=parser)


def run(args: argparse.Namespace) -> int:
    """Dispatch ``pneumoseg bundle ACTION``; returns the exit code (errors: message, no traceback)."""
    if args.bundle_command is None:
        args.bundle_parser.print_help()
        return 2
    try:
        return _ACTIONS[args.bundle_command](args)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError, KeyError) as err:
        from pneumoseg.sharing.export import BundleRejected

        if isinstance(err, BundleRejected):
            print(err.report.table())
            print(f"import refused: {err.report.source} failed verification; nothing was written", file=sys.stderr)
            return 1
        print(f"pneumoseg bundle {args.bundle_command}: {err}", file=sys.stderr)
        return 1


def _export(args: argparse.Namespace) -> int:
    from pneumoseg.sharing.export import export_bundle

    summary = export_bundle(args.bundle, args.out, args.config_file, args.image_size, not args.no_onnx, args.overwrite)
    for line in summary.removed_paths:
        print(f"removed absolute path: {line}")
    for line in summary.warnings:
        print(f"warning: {line}")
    for name, diff in summary.max_prob_diff.items():
        print(f"{name}: max abs probability difference to the checkpoint {diff:.2e}")
    print(f"wrote {summary.out} ({len(summary.files)} files)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from pneumoseg.sharing.verify import verify_bundle

    report = verify_bundle(args.path, trust=args.trust)
    if args.list:
        print(report.listing_text())
    print(report.table())
    return 0 if report.ok else 1


def _import(args: argparse.Namespace) -> int:
    from pneumoseg.sharing.export import import_bundle

    report = import_bundle(args.archive, args.into, overwrite=args.overwrite, trust=args.trust)
    print(report.table())
    print(f"imported into {args.into}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from pneumoseg.runtime import retain_freed_memory
    from pneumoseg.sharing.evaluate import evaluate_site

    retain_freed_memory()  # this command owns the process: forward passes reuse their activations' memory
    result = evaluate_site(
        args.bundle,
        args.manifest,
        split=args.split,
        data_root=args.data_root,
        out_dir=args.out,
        model=args.model,
        image_size=args.image_size,
        batch_size=args.batch_size,
    )
    print(result["markdown_text"])
    print(f"wrote {result['json']}, {result['markdown']}, {result['calibration_plot']}")
    return 0


def _derive(args: argparse.Namespace) -> int:
    from pneumoseg.sharing.export import derive_bundle

    meta = derive_bundle(args.source, args.into, version=args.version, note=args.note, overwrite=args.overwrite)
    print(f"derived {args.into}: version {meta['version']} ({meta['changelog'][meta['version']]})")
    print(
        "fine-tune: python -m monai.bundle run --config_file \"['configs/train.json','configs/finetune.json']\" "
        f"--bundle_root {args.into} --datalist YOUR_MANIFEST.json"
    )
    return 0


_ACTIONS = {"export": _export, "verify": _verify, "import": _import, "evaluate": _evaluate, "derive": _derive}
