"""Send, receive and derive bundles: ``pneumoseg bundle export | import | derive``.

Export writes a zip holding ``<name>/`` with only the files of :data:`INCLUDE` (configs, model card, licence,
weights) plus generated TorchScript / ONNX exports and ``checksums.sha256``: datalists, manifests, logs,
TensorBoard events, evaluation folders with per-image rows and anything else never leave the sender.
Absolute paths in configs (data locations) are replaced by :data:`REMOVED_PATH` and reported.

Import verifies first (:func:`pneumoseg.sharing.verify.verify_bundle`) and writes exactly the bytes that
were verified, never extracting with ``zipfile.extractall``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pneumoseg.sharing.verify import CHECKSUM_FILE, VerifyReport, checksum_manifest, verify_bundle

__all__ = [
    "INCLUDE",
    "REMOVED_PATH",
    "BundleRejected",
    "ExportSummary",
    "export_bundle",
    "import_bundle",
    "derive_bundle",
    "bump_version",
]

INCLUDE: tuple[str, ...] = (
    "configs/*.json",
    "configs/logging.conf",
    "docs/README.md",
    "LICENSE",
    "models/model.pt",
)
"""The only source files that are exported (glob patterns relative to the bundle root)."""

NEVER: tuple[str, ...] = ("*datalist*", "*manifest*", "*.jsonl")
"""Included-looking files that are still refused: they may name patients."""

REMOVED_PATH = "<removed by pneumoseg bundle export: pass your own path>"
_ABS_PATH = re.compile(r"^(/|~|[A-Za-z]:[\\/]|\\\\)")
_FIXED_TIME = (2020, 1, 1, 0, 0, 0)  # zip timestamps: identical inputs give an identical archive
_PATH_METRIC_KEYS = {"checkpoint", "manifest", "datalist", "filename", "output_dir"}


class BundleRejected(ValueError):
    """Verification failed; ``report`` holds the table."""

    def __init__(self, report: VerifyReport) -> None:
        super().__init__(f"{report.source}: verification failed\n{report.table()}")
        self.report = report


@dataclass
class ExportSummary:
    """What an export wrote: the zip, each file's SHA-256, the config paths it removed, warnings, and the max
    abs probability difference of each exported model to the checkpoint."""

    out: str
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256
    removed_paths: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    max_prob_diff: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- helpers
def _selected(root: Path) -> list[str]:
    names = set()
    for pattern in INCLUDE:
        for path in root.glob(pattern):
            if path.is_file() and not path.is_symlink():
                names.add(path.relative_to(root).as_posix())
    return sorted(names)


def _looks_like_datalist(name: str, value: Any) -> str | None:
    """Why a JSON file may hold patient-level rows (None if it does not look so)."""

    def rows(v: Any) -> bool:
        return isinstance(v, list) and any(isinstance(r, dict) and ("image" in r or "label" in r) for r in v)

    if rows(value) or (isinstance(value, dict) and any(rows(v) for v in value.values())):
        return f"{name}: holds image/label rows like a datalist or manifest"
    if "patient_hash" in json.dumps(value):
        return f"{name}: mentions patient_hash"
    return None


def _strip_paths(node: Any, where: str, removed: list[str], warnings: list[str]) -> Any:
    if isinstance(node, dict):
        return {k: _strip_paths(v, f"{where}#{k}", removed, warnings) for k, v in node.items()}
    if isinstance(node, list):
        return [_strip_paths(v, f"{where}#{i}", removed, warnings) for i, v in enumerate(node)]
    if isinstance(node, str):
        if _ABS_PATH.match(node):
            removed.append(f"{where}: {node}")
            return REMOVED_PATH
        if node.startswith("$") and _absolute_literals(node[1:]):
            warnings.append(f"{where}: expression with an absolute path left as is: {node[:100]}")
    return node


def _absolute_literals(expression: str) -> list[str]:
    """String literals of an expression that are absolute paths, except the right side of ``+``
    (``@bundle_root + '/models'`` is relative to the bundle)."""
    import ast

    try:
        tree = ast.parse(re.sub(r"@\w*(?:#\w*)*", "ref", expression).strip(), mode="eval")
    except SyntaxError:
        return []
    appended = {id(n.right) for n in ast.walk(tree) if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Add)}
    return [
        n.value for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and _ABS_PATH.match(n.value)
        and id(n) not in appended
    ]  # fmt: skip


def _network_and_settings(root: Path, config_file: str, image_size: int | None):
    """The sender's network (its own config, parsed with MONAI: the sender trusts its bundle) with weights."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(root / config_file))
    parser["bundle_root"] = str(root)
    network = parser.get_parsed_content("network_def")
    weights = root / "models" / "model.pt"
    state = torch.load(weights, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    network.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    size = int(image_size or parser.get("image_size", 512))
    threshold = parser.get("operating_threshold", 0.5)
    channels = int(parser.get("network_def", {}).get("in_channels", 1))
    return network.eval(), size, threshold, channels


def _export_torchscript(network, meta: Mapping[str, Any], config: bytes) -> bytes:
    """TorchScript of the dual-output network with metadata and config embedded, as MONAI's ``ckpt_export``
    does (its ``save_net_with_metadata``); scripted here because the network is already built and loaded."""
    import torch
    from monai.data import save_net_with_metadata

    scripted = torch.jit.script(network)
    stream = io.BytesIO()
    save_net_with_metadata(scripted, stream, include_config_vals=False, append_timestamp=False,
                           meta_values=dict(meta), more_extra_files={"inference.json": config})  # fmt: skip
    return stream.getvalue()


def _export_onnx(network, size: int, channels: int) -> bytes:
    import torch

    dims = {0: "batch", 2: "height", 3: "width"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "model.onnx")
        # the TorchScript-based exporter: the dynamo exporter needs onnxscript, not a dependency
        torch.onnx.export(
            network, (torch.zeros(1, channels, size, size),), str(out), dynamo=False, opset_version=17,
            input_names=["image"], output_names=["seg", "cls"],
            dynamic_axes={"image": dims, "seg": dims, "cls": {0: "batch"}},
        )  # fmt: skip
        return out.read_bytes()


def _equivalence(network, exported: Mapping[str, bytes], size: int, channels: int) -> dict[str, float]:
    """Max abs difference of segmentation and image probabilities, export vs. the checkpoint, on noise."""
    import torch

    from pneumoseg.sharing.model import ExportedModel

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, channels, size, size, generator=generator)
    with torch.no_grad():
        ref = network(x)
    diffs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in exported.items():
            path = Path(tmp, Path(name).name)
            path.write_bytes(data)
            with torch.no_grad():
                out = ExportedModel.load(path)(x)
            diffs[name] = max(
                float((torch.sigmoid(out.seg) - torch.sigmoid(ref.seg)).abs().max()),
                float((torch.sigmoid(out.cls) - torch.sigmoid(ref.cls)).abs().max()),
            )
    return diffs


def _validation_metrics(root: Path, summary: ExportSummary) -> dict[str, Any]:
    """``eval/metrics.json`` of ``evaluate.json`` without its path entries (checkpoint, manifest)."""
    metrics_file = root / "eval" / "metrics.json"
    if not metrics_file.is_file():
        summary.warnings.append("eval/metrics.json not found: run evaluate.json before exporting to report metrics")
        return {}
    raw = json.loads(metrics_file.read_text())
    return {
        k: v
        for k, v in raw.items()
        if k not in _PATH_METRIC_KEYS
        and (isinstance(v, (int, float)) or (isinstance(v, str) and not _ABS_PATH.match(v) and "/" not in v))
    }


def _release_notes(root: Path, meta: Mapping[str, Any], metrics: Mapping[str, Any], threshold: Any,
                   summary: ExportSummary) -> str:  # fmt: skip
    """Model-card section of this release: version, changelog, metrics, thresholds, export accuracy."""
    pp_file = root / "configs" / "postprocessing.json"
    pp = json.loads(pp_file.read_text()) if pp_file.is_file() else {}
    lines = [
        "",
        f"## Release {meta.get('version', '?')} (exported by `pneumoseg bundle export`)",
        "",
        "Changelog:",
        "",
        *[f"- **{v}**: {text}" for v, text in meta.get("changelog", {}).items()],
        "",
        "Validation metrics of the exported weights (`eval/metrics.json`"
        + (f", split `{metrics['split']}`" if "split" in metrics else "")
        + "):",
        "",
        "| metric | value |",
        "| --- | --- |",
        *[
            f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in metrics.items()
            if k != "split"
        ],
        "",
        "Thresholds the model was tuned to:",
        "",
        f"- `operating_threshold` (image probability, sensitivity / specificity): {threshold}",
        *[f"- post-processing `{k}`: {pp[k]}" for k in ("t_cls", "top", "min_area", "bottom") if k in pp],
        "",
        "Exports (max abs probability difference to the checkpoint on random inputs): "
        + ", ".join(f"`{k}` {v:.2e}" for k, v in summary.max_prob_diff.items()),
        "",
    ]
    if not metrics:
        lines.insert(9, "(none recorded)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- export
def export_bundle(
    bundle: str | os.PathLike,
    out: str | os.PathLike,
    config_file: str = "configs/inference.json",
    image_size: int | None = None,
    onnx: bool = True,
    overwrite: bool = False,
) -> ExportSummary:
    """Write ``out`` (.zip): the include-listed files, TorchScript + ONNX exports, release notes, checksums.

    Raises ``FileNotFoundError`` (no weights), ``ValueError`` (a config that looks like patient data, an
    export that differs from the checkpoint by more than 1e-3) or ``FileExistsError``.
    """
    root = Path(bundle)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (use --overwrite)")
    if not (root / "models" / "model.pt").is_file():
        raise FileNotFoundError(f"{root / 'models' / 'model.pt'}: no weights to export (train the bundle first)")
    if not (root / config_file).is_file():
        raise FileNotFoundError(f"{root / config_file}: config not found")
    if onnx:  # fail before any work; onnxruntime checks the export against the checkpoint
        try:
            import onnx as _onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as err:
            from pneumoseg.sharing.model import ONNX_MISSING

            raise ImportError(f"{ONNX_MISSING} (or export TorchScript only with --no_onnx)") from err
    summary = ExportSummary(str(out))
    files: dict[str, bytes] = {}
    for name in _selected(root):
        if any(fnmatch.fnmatch(PurePosixPath(name).name, p) for p in NEVER):
            summary.warnings.append(f"{name}: not exported (may name patients)")
            continue
        data = (root / name).read_bytes()
        if name.endswith(".json"):
            value = json.loads(data)
            problem = _looks_like_datalist(name, value)
            if problem:
                raise ValueError(f"{problem}; remove it from the bundle's configs before exporting")
            removed: list[str] = []
            stripped = _strip_paths(value, name, removed, summary.warnings)
            if removed:
                summary.removed_paths += removed
                data = (json.dumps(stripped, indent=4) + "\n").encode()
        files[name] = data
    meta = json.loads(files["configs/metadata.json"])
    metrics = _validation_metrics(root, summary)
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k.startswith("val_")}
    if numeric:  # the card's metrics, measured, instead of the placeholders
        meta["eval_metrics"] = {**meta.get("eval_metrics", {}), **numeric}
        files["configs/metadata.json"] = (json.dumps(meta, indent=4) + "\n").encode()
    network, size, threshold, channels = _network_and_settings(root, config_file, image_size)
    exported = {"models/model.ts": _export_torchscript(network, meta, files[config_file])}
    if onnx:
        exported["models/model.onnx"] = _export_onnx(network, size, channels)
    summary.max_prob_diff = _equivalence(network, exported, size, channels)
    worst = {k: v for k, v in summary.max_prob_diff.items() if v > 1e-3}
    if worst:
        raise ValueError(f"{root}: exports differ from the checkpoint by {worst} (max 1e-3)")
    files.update(exported)
    notes = _release_notes(root, meta, metrics, threshold, summary)
    if "docs/README.md" in files:
        files["docs/README.md"] = files["docs/README.md"].rstrip(b"\n") + b"\n" + notes.encode()
    else:
        files["docs/README.md"] = f"# {meta.get('name', root.name)}\n{notes}".encode()
    files[CHECKSUM_FILE] = checksum_manifest(files).encode()
    summary.files = {n: hashlib.sha256(d).hexdigest() for n, d in sorted(files.items())}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in sorted(files.items()):
            info = zipfile.ZipInfo(f"{root.resolve().name}/{name}", _FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o100644 << 16  # a regular file, rw-r--r--
            archive.writestr(info, data)
    os.replace(tmp, out)
    return summary


# ---------------------------------------------------------------------------------------------- import
def _is_bundle(path: Path) -> bool:
    return (path / "configs" / "metadata.json").is_file()


def import_bundle(
    archive: str | os.PathLike, into: str | os.PathLike, overwrite: bool = False, trust: bool = False
) -> VerifyReport:
    """Verify ``archive``, then write its verified files into ``into`` (the new bundle root).

    Refuses a non-empty ``into`` unless ``overwrite`` and ``into`` is a bundle (never deletes other folders).
    Raises :class:`BundleRejected` when verification fails (nothing is written).
    """
    into = Path(into)
    if into.exists() and (not into.is_dir() or any(into.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{into} exists and is not empty (use --overwrite to replace a bundle)")
        if not _is_bundle(into):
            raise FileExistsError(f"{into} is not a bundle (no configs/metadata.json); refusing to replace it")
    report = verify_bundle(archive, trust=trust)
    if not report.ok or report.bundle is None:
        raise BundleRejected(report)
    into.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{into.name}.importing-", dir=into.parent))
    try:
        for name, data in report.bundle.files.items():
            target = (staging / name).resolve()
            if not target.is_relative_to(staging.resolve()):  # verified already; defence in depth
                raise BundleRejected(report)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        if into.exists():
            old = into.with_name(f".{into.name}.replaced")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(into, old)
            os.replace(staging, into)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, into)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


# ---------------------------------------------------------------------------------------------- derive
def bump_version(version: str) -> str:
    """``0.1.0 -> 0.1.1``; a version without a numeric last part gets ``.1`` appended."""
    match = re.fullmatch(r"(.*?)(\d+)", version)
    return f"{match.group(1)}{int(match.group(2)) + 1}" if match else f"{version}.1"


FINETUNE_CONFIG = "configs/finetune.json"


def derive_bundle(
    source: str | os.PathLike,
    into: str | os.PathLike,
    version: str | None = None,
    note: str = "fine-tuned on local data",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Start a local bundle from a received one, for fine-tuning from the received weights.

    Copies the include-listed files, keeps the received weights as ``models/parent_model.pt`` (and as
    ``models/model.pt`` until training replaces it), bumps the version with a changelog entry naming the
    parent (name, version, weights SHA-256) and writes ``configs/finetune.json``, an overlay of
    ``train.json`` that loads ``initialize_from`` (default the parent weights) into the network before
    training::

        python -m monai.bundle run --config_file "['configs/train.json','configs/finetune.json']" ...

    Returns the new ``metadata.json``.
    """
    src, into = Path(source), Path(into)
    if not _is_bundle(src):
        raise FileNotFoundError(f"{src}: not a bundle (no configs/metadata.json)")
    if into.exists() and any(into.iterdir()) and not (overwrite and _is_bundle(into)):
        raise FileExistsError(f"{into} exists and is not empty (use --overwrite to replace a bundle)")
    weights = src / "models" / "model.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: the received bundle has no weights to start from")
    meta = json.loads((src / "configs" / "metadata.json").read_text())
    train = json.loads((src / "configs" / "train.json").read_text()) if (src / "configs/train.json").is_file() else {}
    parent_version = str(meta.get("version", "0"))
    new_version = version or bump_version(parent_version)
    if new_version in meta.get("changelog", {}):
        raise ValueError(f"version {new_version} already in the changelog of {src}")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if into.exists() and overwrite:
        shutil.rmtree(into)
    for name in _selected(src):
        (into / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, into / name)
    shutil.copyfile(weights, into / "models" / "parent_model.pt")
    meta["version"] = new_version
    meta["changelog"] = {
        new_version: f"{note}; derived from {meta.get('name', src.name)} {parent_version} "
        f"(models/model.pt sha256 {digest})",
        **meta.get("changelog", {}),
    }
    meta["derived_from"] = {"name": meta.get("name", src.name), "version": parent_version, "weights_sha256": digest}
    (into / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4) + "\n")
    finetune = {
        "initialize_from": "$@ckpt_dir + '/parent_model.pt'",
        "parent_weights": {
            "_target_": "CheckpointLoader",
            "load_path": "@initialize_from",
            "load_dict": {"model": "@network"},
            "map_location": "@device",
            "strict": True,
        },
        # train.json's own initialize steps, then the received weights (CheckpointLoader: weights_only=True)
        "initialize": [*train.get("initialize", []), "$@parent_weights(@train#trainer)"],
    }
    (into / FINETUNE_CONFIG).write_text(json.dumps(finetune, indent=4) + "\n")
    (into / CHECKSUM_FILE).unlink(missing_ok=True)  # re-created by `bundle export`
    return meta
