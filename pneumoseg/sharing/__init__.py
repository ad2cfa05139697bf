"""Sharing bundles between hospitals: ``pneumoseg bundle keygen | export | verify | import | evaluate | derive``.

A received bundle is data, never code: weights (weights-only state dict), an ONNX model, the model record
(closed schema), metadata, model card, licence, checksums and an Ed25519 signature. Receiving commands run
only what the installed pneumoseg ships, filled with the record's validated values.

- :mod:`pneumoseg.sharing.archive`: the closed layout; bounded reading of archives and folders.
- :mod:`pneumoseg.sharing.signing`: keys, signatures, the pinned trusted keys.
- :mod:`pneumoseg.sharing.verify`: every check of a received bundle (nothing from it is executed).
- :mod:`pneumoseg.sharing.export` (sender), :mod:`pneumoseg.sharing.receive` (import, read-only),
  :mod:`pneumoseg.sharing.derive` (fine-tuning from the installed configs).
- :mod:`pneumoseg.sharing.model`: :class:`ExportedModel` (ONNX Runtime after its checks; TorchScript on trust).
- :mod:`pneumoseg.sharing.evaluate`: site validation of a received bundle on a local manifest.
- :mod:`pneumoseg.sharing.templates`: where the installed configs are.

See ``docs/sharing.md`` for the threat model and both hospitals' steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_subcommand", "run"]

_MiB = 1024 * 1024


def _limit_arguments(p: argparse.ArgumentParser) -> None:
    from pneumoseg.sharing.archive import ArchiveLimits

    d = ArchiveLimits()
    g = p.add_argument_group("limits (a bundle beyond any of them is refused)")
    for flag, default, what in (
        ("--max-members", d.max_members, "members of the archive"),
        ("--max-model-mb", d.max_member_bytes // _MiB, "MiB per weights / ONNX file, uncompressed"),
        ("--max-text-mb", d.max_text_bytes // _MiB, "MiB per text file (JSON, Markdown, licence), uncompressed"),
        ("--max-total-mb", d.max_total_bytes // _MiB, "MiB of all members together, uncompressed"),
    ):
        g.add_argument(flag, type=int, default=default, help=f"{what} (default: %(default)s)")


def _limits(args: argparse.Namespace):
    from pneumoseg.sharing.archive import ArchiveLimits

    return ArchiveLimits(args.max_members, args.max_model_mb * _MiB, args.max_total_mb * _MiB, args.max_text_mb * _MiB)


def _key_arguments(p: argparse.ArgumentParser) -> None:
    from pneumoseg.sharing.signing import TRUSTED_KEYS_ENV

    p.add_argument(
        "--trusted-keys",
        metavar="DIR",
        default=None,
        help=f"folder of pinned sender public keys, one NAME.pub each (default: ${TRUSTED_KEYS_ENV}, else "
        "~/.config/pneumoseg/trusted_keys)",
    )
    p.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="accept a bundle that is unsigned or signed by a key that is not pinned (a tampered signature is "
        "refused regardless)",
    )


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """Register ``pneumoseg bundle ...``."""
    parser = subparsers.add_parser(
        "bundle",
        help="share a trained model: keygen, export, verify, import, evaluate on local data, derive for fine-tuning",
        description="Share a trained model between hospitals as data (weights, ONNX, model record, metadata, "
        "model card), signed by the sender. The receiver verifies and imports it, measures it on local data "
        "and may derive a fine-tuning bundle from it; receiving commands never run a received config. "
        "See docs/sharing.md.",
    )
    actions = parser.add_subparsers(dest="bundle_command", metavar="ACTION")

    p = actions.add_parser(
        "keygen",
        help="make the Ed25519 key pair a sending hospital signs its exports with",
        description="Write KEY (private, mode 0600; encrypted if $PNEUMOSEG_SIGNING_PASSPHRASE is set) and "
        "KEY.pub. Give KEY.pub to the receiving hospitals over a channel they trust; they pin it in their "
        "trusted-keys folder.",
    )
    p.add_argument("--out", required=True, metavar="KEY", help="private key file to write (KEY.pub beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing key pair")

    p = actions.add_parser(
        "record",
        help="write the model record of a bundle trained before training wrote one",
        description="Write BUNDLE/models/model_record.json from the values given here (never from the bundle's "
        "configs): the image kind and input size the weights were trained at, the network's keyword arguments, "
        "the operating threshold. The weights must fit the network; post-processing gets the safe defaults "
        "(gate at the operating threshold) until `evaluate.json` tunes it.",
    )
    p.add_argument("--bundle", required=True, help="your bundle folder (with models/model.pt)")
    p.add_argument("--image-kind", choices=["radiograph", "ct"], default="radiograph", help="kind trained on")
    p.add_argument("--image-size", type=int, required=True, help="input size the model was trained at")
    p.add_argument("--operating-threshold", type=float, default=0.5, help="image probability called positive")
    p.add_argument(
        "--network-kwargs", default="{}", metavar="JSON", help="SCSEUNet arguments, e.g. '{\"decoder_channels\": [..]}'"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing record")

    p = actions.add_parser(
        "export",
        help="write a shareable .zip of a trained bundle (data only)",
        description="Write FILE.zip from models/model.pt and models/model_record.json: the weights re-saved "
        "as a plain state dict, the record, an ONNX model checked against the weights, configs/metadata.json, "
        "the model card with metrics and thresholds, LICENSE, the configs as documents "
        "(reference/configs/*.json, absolute paths removed), checksums.sha256 and, with --sign, an Ed25519 "
        "signature. No TorchScript. Datalists, manifests, logs and eval folders are never included. The "
        "archive is verified as the receiver will verify it before it is moved into place.",
    )
    p.add_argument("--bundle", required=True, help="bundle folder (with models/model.pt and models/model_record.json)")
    p.add_argument("--out", required=True, help="output .zip file")
    p.add_argument("--sign", metavar="KEY", default=None, help="private key of `pneumoseg bundle keygen` to sign with")
    p.add_argument("--no-onnx", action="store_true", help="leave the ONNX model out (weights + record only)")
    p.add_argument("--no-reference-configs", action="store_true", help="leave the configs (documents) out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    p = actions.add_parser(
        "verify",
        help="check a received bundle (.zip or imported folder); nothing of it is executed",
        description="Checks, each a row: archive (closed layout, limits), checksums, signature (pinned keys), "
        "record (closed schema), weights (weights-only, fit the record's network), onnx (no external data "
        "anywhere, standard operators, equals the weights), metadata (plain data, MONAI's schema of this "
        "installation), text, reference configs (documents: what they contain and how they differ from the "
        "installed templates; never executed). Exit code 0 if nothing failed, 1 otherwise.",
    )
    p.add_argument("path", help="bundle .zip or folder")
    _key_arguments(p)
    p.add_argument("--diff", action="store_true", help="list every value in which a reference config differs")
    _limit_arguments(p)

    p = actions.add_parser(
        "import",
        help="verify a .zip, then unpack it read-only as a bundle folder",
        description="Verify FILE.zip (as `bundle verify`); if it passes, write exactly the verified files into "
        "DIR, read-only. Exit code 1 and nothing written if it fails.",
    )
    p.add_argument("archive", metavar="FILE.zip", help="exported bundle")
    p.add_argument("--into", required=True, help="destination bundle folder (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle in DIR")
    _key_arguments(p)
    _limit_arguments(p)

    p = actions.add_parser(
        "evaluate",
        help="site validation of a received bundle on a local manifest",
        description="Run the received model as its record says (network, weights, input size, intensity "
        "percentiles, post-processing, operating threshold) on a split of a local manifest; write "
        "site_validation.json, site_validation.md and calibration.png: SIIM Dice, positive Dice, AUC, "
        "sensitivity/specificity at the sender's threshold and at a locally re-tuned (Youden) threshold, "
        "calibration. No config of the bundle is read.",
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
        choices=["state_dict", "onnx", "torchscript"],
        default="state_dict",
        help="what to run: the weights in the record's network, models/model.onnx (ONNX Runtime), or "
        "models/model.ts (TorchScript, only with --trust) (default: %(default)s)",
    )
    p.add_argument("--trust", action="store_true", help="allow --model torchscript (TorchScript is code)")
    p.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="only to state it: the record's input size is used, a different value is refused",
    )
    p.add_argument("--batch_size", type=int, default=4, help="images per forward pass (default: %(default)s)")

    p = actions.add_parser(
        "derive",
        help="start a local bundle from a received one (fine-tuning)",
        description="Make a new bundle from the INSTALLED pneumoseg's configs and the received bundle's "
        "validated data: parent weights (models/parent_model.pt), configs/finetune.json (the record's values "
        "as plain literals + a loader of the parent weights), the parent's thresholds, metadata with a new "
        "version and a changelog entry naming the parent. Then fine-tune with "
        "python -m monai.bundle run training --config_file \"['configs/train.json','configs/finetune.json']\"",
    )
    p.add_argument("--from", dest="source", required=True, help="received (imported) bundle folder")
    p.add_argument("--into", required=True, help="new bundle folder")
    p.add_argument("--version", default=None, help="new version (default: parent version with the last part + 1)")
    p.add_argument("--note", default="fine-tuned on local data", help="changelog text for the new version")
    p.add_argument(
        "--kind", choices=["radiograph", "ct"], default=None, help="image kind to train on (default: the record's)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle in --into")
    parser.set_defaults(func=run, bundle_command=None, bundle_parser=parser)


def run(args: argparse.Namespace) -> int:
    """Dispatch ``pneumoseg bundle ACTION``; returns the exit code (errors: message, no traceback)."""
    if args.bundle_command is None:
        args.bundle_parser.print_help()
        return 2
    from pneumoseg.sharing.receive import BundleRejected

    try:
        return _ACTIONS[args.bundle_command](args)
    except BundleRejected as err:
        print(err.report.table())
        message = f"{err.report.source} failed verification; nothing was written"
        print(f"pneumoseg bundle {args.bundle_command}: {message}", file=sys.stderr)
        return 1
    except (FileNotFoundError, FileExistsError, ValueError, ImportError, KeyError, PermissionError) as err:
        print(f"pneumoseg bundle {args.bundle_command}: {err}", file=sys.stderr)
        return 1


def _keygen(args: argparse.Namespace) -> int:
    from pneumoseg.sharing.signing import generate_key, short

    private, public, fingerprint = generate_key(args.out, overwrite=args.overwrite)
    print(f"wrote {private} (private: keep it on the exporting machine) and {public}")
    print(f"key fingerprint: {short(fingerprint)}")
    print(f"receiving hospitals pin {public.name} in their trusted-keys folder; confirm the fingerprint with them")
    return 0


def _record(args: argparse.Namespace) -> int:
    import json

    from pneumoseg.model_record import RECORD_FILE, ModelRecord, NetworkSpec, load_trained_model

    path = Path(args.bundle) / "models" / RECORD_FILE
    if path.exists() and not args.overwrite:
        raise FileExistsError(f"{path} exists (use --overwrite)")
    try:
        kwargs = json.loads(args.network_kwargs)
    except json.JSONDecodeError as err:
        raise ValueError(f"--network-kwargs: not JSON ({err})") from None
    if not isinstance(kwargs, dict):
        raise ValueError("--network-kwargs: a JSON object of SCSEUNet arguments")
    network = NetworkSpec("SCSEUNet", kwargs).build()
    record = ModelRecord.for_training(network, args.image_kind, args.image_size, args.operating_threshold)
    load_trained_model(args.bundle, record=record)  # the weights must fit before anything is written
    record.write(path)
    print(f"wrote {path}: {args.image_kind} at {args.image_size} px; run evaluate.json to tune its post-processing")
    return 0


def _export(args: argparse.Namespace) -> int:
    from pneumoseg.sharing.export import export_bundle
    from pneumoseg.sharing.signing import short

    summary = export_bundle(args.bundle, args.out, sign=args.sign, onnx=not args.no_onnx,
                            reference_configs=not args.no_reference_configs, overwrite=args.overwrite)  # fmt: skip
    for line in summary.removed_paths:
        print(f"removed absolute path: {line}")
    for line in summary.warnings:
        print(f"warning: {line}")
    if summary.onnx_max_prob_diff is not None:
        print(f"models/model.onnx: max probability difference to the weights {summary.onnx_max_prob_diff:.2e}")
    print(f"signed with {short(summary.signer)}" if summary.signer else "not signed (use --sign KEY)")
    print(f"wrote {summary.out} ({len(summary.files)} files)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from pneumoseg.sharing.verify import verify_bundle

    report = verify_bundle(args.path, args.trusted_keys, args.allow_unsigned, _limits(args))
    print(report.table(differences=args.diff))
    return 0 if report.ok else 1


def _import(args: argparse.Namespace) -> int:
    from pneumoseg.sharing.receive import import_bundle

    report = import_bundle(
        args.archive, args.into, args.overwrite, args.trusted_keys, args.allow_unsigned, _limits(args)
    )
    print(report.table())
    print(f"imported into {args.into} (read-only)")
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
        trust=args.trust,
    )
    print(result["markdown_text"])
    print(f"wrote {result['json']}, {result['markdown']}, {result['calibration_plot']}")
    return 0


def _derive(args: argparse.Namespace) -> int:
    from pneumoseg.sharing.derive import derive_bundle

    summary = derive_bundle(args.source, args.into, version=args.version, note=args.note,
                            overwrite=args.overwrite, kind=args.kind)  # fmt: skip
    version = summary.metadata["version"]
    print(f"derived {args.into}: version {version} ({summary.metadata['changelog'][version]})")
    print(f"fine-tune: {summary.command}")
    return 0


_ACTIONS = {
    "keygen": _keygen,
    "record": _record,
    "export": _export,
    "verify": _verify,
    "import": _import,
    "evaluate": _evaluate,
    "derive": _derive,
}
