"""Send a trained bundle: ``pneumoseg bundle export --bundle DIR --out FILE.zip [--sign KEY]``.

What crosses to the other hospital is data only (the closed layout of :mod:`pneumoseg.sharing.archive`):

- ``models/model.pt``: the weights, re-saved as a plain state dict (read weights-only, written back);
- ``models/model_record.json``: the model record training wrote (network, preprocessing per image kind,
  operating threshold, post-processing);
- ``models/model.onnx``: the network exported from the record and the weights, checked against them with
  ONNX Runtime (probabilities within 1e-3) (``--no-onnx`` leaves it out);
- ``configs/metadata.json`` (with the measured validation metrics), ``docs/README.md`` (the model card plus
  a release section: version, changelog, metrics, thresholds), ``LICENSE``;
- ``reference/configs/*.json``: the sender's configs as documents (absolute paths removed), which the
  receiver may read and which nothing executes (``--no-reference-configs`` leaves them out);
- ``checksums.sha256`` and, with ``--sign KEY``, ``checksums.sha256.sig`` (Ed25519).

No TorchScript: it is code the receiver would have to run. Datalists, manifests, logs, TensorBoard events,
evaluation folders with per-image rows and anything else never leave the sender. Before the archive is
moved into place it is verified as the receiver will verify it.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumoseg.sharing.archive import CHECKSUM_FILE, REFERENCE_CONFIG, SIGNATURE_FILE, checksum_manifest, write_zip

__all__ = ["REMOVED_PATH", "ExportSummary", "export_bundle", "state_dict_bytes"]

REMOVED_PATH = "<removed by pneumoseg bundle export: pass your own path>"
_ABS_PATH = re.compile(r"^(/|~|[A-Za-z]:[\\/]|\\\\)")
# a quoted absolute path in an expression, unless appended to something (`@bundle_root + '/models'`)
_EXPRESSION_PATH = re.compile(r"(?<!\+ )(?<!\+)['\"](/|~|[A-Za-z]:[\\/])")
_PATH_METRIC_KEYS = {"checkpoint", "manifest", "datalist", "filename", "output_dir"}
# metadata travels as configs/metadata.json; the receiver checks it against its own schema
_NOT_REFERENCE = {"metadata.json", "meta_schema.json"}


@dataclass
class ExportSummary:
    """What an export wrote: the zip, each member's SHA-256, the config paths it removed, warnings, the max
    probability difference of the ONNX model to the weights, and the signer's key fingerprint."""

    out: str
    files: dict[str, str] = field(default_factory=dict)
    removed_paths: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    onnx_max_prob_diff: float | None = None
    signer: str | None = None


def state_dict_bytes(state: Mapping[str, Any]) -> bytes:
    """A plain state dict (contiguous CPU tensors in a dict) as ``torch.save`` bytes."""
    import torch

    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, buffer)
    return buffer.getvalue()


# =========================================================================================== helpers


def _looks_like_datalist(name: str, value: Any) -> str | None:
    """Why a JSON file may hold patient-level rows (None if it does not look so)."""

    def rows(v: Any) -> bool:
        return isinstance(v, list) and any(isinstance(r, dict) and ("image" in r or "label" in r) for r in v)

    if rows(value) or (isinstance(value, dict) and any(rows(v) for v in value.values())):
        return f"{name}: holds image/label rows like a datalist or manifest"
    if "patient_hash" in json.dumps(value):
        return f"{name}: mentions patient_hash"
    return None


def _strip_paths(node: Any, where: str, removed: list[str]) -> Any:
    if isinstance(node, dict):
        return {k: _strip_paths(v, f"{where}#{k}", removed) for k, v in node.items()}
    if isinstance(node, list):
        return [_strip_paths(v, f"{where}#{i}", removed) for i, v in enumerate(node)]
    expression_path = isinstance(node, str) and node.startswith("$") and _EXPRESSION_PATH.search(node)
    if isinstance(node, str) and (_ABS_PATH.match(node) or expression_path):
        removed.append(f"{where}: {node[:120]}")
        return REMOVED_PATH
    return node


def _reference_configs(root: Path, summary: ExportSummary) -> dict[str, bytes]:
    """The sender's JSON configs as documents (absolute paths removed); a datalist among them stops the
    export (it may name patients)."""
    files = {}
    for path in sorted((root / "configs").glob("*")):
        if path.name in _NOT_REFERENCE or not path.is_file() or path.is_symlink():
            continue
        name = f"reference/configs/{path.name}"
        if not REFERENCE_CONFIG.fullmatch(name):
            summary.warnings.append(f"configs/{path.name}: not sent (reference configs are lower-case .json files)")
            continue
        try:
            value = json.loads(path.read_text())
        except ValueError:
            raise ValueError(f"{path}: not valid JSON (fix it, or export with --no-reference-configs)") from None
        problem = _looks_like_datalist(f"configs/{path.name}", value)
        if problem:
            raise ValueError(f"{problem}; remove it from the bundle's configs before exporting")
        files[name] = (json.dumps(_strip_paths(value, name, summary.removed_paths), indent=4) + "\n").encode()
    return files


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


def _export_onnx(network: Any, size: int) -> bytes:
    import torch

    dims = {0: "batch", 2: "height", 3: "width"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "model.onnx")
        # the TorchScript-based exporter: the dynamo exporter needs onnxscript, not a dependency
        torch.onnx.export(
            network, (torch.zeros(1, 1, size, size),), str(out), dynamo=False, opset_version=17,
            input_names=["image"], output_names=["seg", "cls"],
            dynamic_axes={"image": dims, "seg": dims, "cls": {0: "batch"}},
        )  # fmt: skip
        return out.read_bytes()


def _onnx_difference(network: Any, data: bytes, size: int) -> float:
    """Max abs difference of segmentation and image probabilities, ONNX Runtime vs. the weights, on noise."""
    import torch

    from pneumoseg.sharing.model import ExportedModel

    x = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "model.onnx")
        path.write_bytes(data)
        with torch.no_grad():
            out, ref = ExportedModel.load(path)(x), network(x)
    return max(
        float((torch.sigmoid(out.seg) - torch.sigmoid(ref.seg)).abs().max()),
        float((torch.sigmoid(out.cls) - torch.sigmoid(ref.cls)).abs().max()),
    )


def _release_notes(meta: Mapping[str, Any], metrics: Mapping[str, Any], record: Any, weights_sha: str,
                   summary: ExportSummary) -> str:  # fmt: skip
    """Model-card section of this release: version, changelog, metrics, the record's thresholds."""
    pp = record.postprocessing
    metric_rows = [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    metric_rows = [row for row in metric_rows if not row.startswith("| split |")]
    prep = [
        f"- {kind}: {p.image_size} x {p.image_size} px, "
        + (f"intensity percentiles {p.lower_percentile} / {p.upper_percentile} -> 0 / 1" if kind == "radiograph"
           else f"HU window {p.window[0]:g} .. {p.window[1]:g} -> 0 / 1, orientation {p.orientation}")
        for kind, p in record.preprocessing.items()
    ]  # fmt: skip
    onnx = (
        f"`models/model.onnx` (ONNX Runtime) equals the weights within {summary.onnx_max_prob_diff:.1e} "
        "(max probability difference on random inputs)."
        if summary.onnx_max_prob_diff is not None
        else "No ONNX model in this release."
    )
    return "\n".join(
        [
            "",
            f"## Release {meta.get('version', '?')} (exported by `pneumoseg bundle export`)",
            "",
            "Changelog:",
            "",
            *[f"- **{v}**: {text}" for v, text in meta.get("changelog", {}).items()],
            "",
            "Validation metrics of these weights (`eval/metrics.json`"
            + (f", split `{metrics['split']}`" if "split" in metrics else "")
            + "):",
            "",
            *(["| metric | value |", "| --- | --- |", *metric_rows] if metric_rows else ["(none recorded)"]),
            "",
            "Thresholds (`models/model_record.json`):",
            "",
            f"- operating threshold (image probability; sensitivity / specificity are reported at it): "
            f"{record.operating_threshold:g}",
            f"- post-processing ({record.training.get('postprocessing_source', 'default')}): `t_cls` {pp.t_cls:g}, "
            f"`top` {pp.top:g}, `min_area` {pp.min_area}, `bottom` {pp.bottom:g}",
            "",
            "Preprocessing the model was trained with:",
            "",
            *prep,
            "",
            f"Network `{record.network.name}` {json.dumps(dict(record.network.kwargs))}; weights "
            f"`models/model.pt` sha256 `{weights_sha}`. {onnx}",
            "",
        ]
    )


# ============================================================================================ export


def export_bundle(
    bundle: str | os.PathLike,
    out: str | os.PathLike,
    sign: str | os.PathLike | None = None,
    onnx: bool = True,
    reference_configs: bool = True,
    overwrite: bool = False,
) -> ExportSummary:
    """Write ``out`` (.zip) from ``bundle`` (``models/model.pt`` + ``models/model_record.json``); sign
    the checksum manifest with the private key ``sign`` if given.

    Raises ``FileNotFoundError`` (no weights or record), ``ValueError`` (a config that looks like patient
    data, metadata that is not plain data, an ONNX model that differs from the weights by more than 1e-3,
    an archive that would not pass verification), ``ImportError`` (ONNX without onnx / onnxruntime) or
    ``FileExistsError``.
    """
    import hashlib

    from pneumoseg.model_record import ModelRecord, ModelRecordError, load_state_dict
    from pneumoseg.sharing.metadata import metadata_problems, read_json
    from pneumoseg.sharing.verify import EXPORT_TOLERANCE, verify_bundle

    root, out = Path(bundle), Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (use --overwrite)")
    weights, record_path = root / "models" / "model.pt", root / "models" / "model_record.json"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no weights to export (train the bundle first)")
    if not record_path.is_file():
        raise FileNotFoundError(
            f"{record_path}: no model record, and a bundle is shared as weights + record (data only). Training "
            "writes it beside the weights (python -m monai.bundle run training); a bundle trained before "
            "pneumoseg 0.2 has none: train it again"
        )
    if onnx:  # fail before any work
        try:
            import onnx as _onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as err:
            from pneumoseg.sharing.model import ONNX_MISSING

            raise ImportError(f"{ONNX_MISSING} (or export without the ONNX model: --no-onnx)") from err
    summary = ExportSummary(str(out))
    record = ModelRecord.read(record_path)
    state = load_state_dict(weights)
    network = record.network.build()
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ModelRecordError(f"{weights} does not fit the network of {record_path}: {first}") from None
    network.eval()

    files: dict[str, bytes] = {
        "models/model.pt": state_dict_bytes(state),
        "models/model_record.json": record.to_json().encode(),
    }
    meta = read_json(root / "configs" / "metadata.json")
    metrics = _validation_metrics(root, summary)
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k.startswith("val_")}
    if numeric:  # the card's metrics, measured, instead of the placeholders
        meta["eval_metrics"] = {**meta.get("eval_metrics", {}), **numeric}
    problems = metadata_problems(meta)
    if problems:
        where = root / "configs" / "metadata.json"
        raise ValueError(f"{where}: {'; '.join(problems[:3])} (the receiver's verify would refuse it)")
    files["configs/metadata.json"] = (json.dumps(meta, indent=4) + "\n").encode()
    if onnx:
        size = max(p.image_size for p in record.preprocessing.values())
        size = -(-size // 64) * 64  # any size works at run time (ExportedModel pads); trace at the model's
        files["models/model.onnx"] = _export_onnx(network, size)
        summary.onnx_max_prob_diff = _onnx_difference(network, files["models/model.onnx"], size)
        if summary.onnx_max_prob_diff > EXPORT_TOLERANCE:
            diff = summary.onnx_max_prob_diff
            raise ValueError(
                f"{root}: the ONNX export differs from the weights by {diff:.2e} (max {EXPORT_TOLERANCE:g})"
            )
    weights_sha = hashlib.sha256(files["models/model.pt"]).hexdigest()
    notes = _release_notes(meta, metrics, record, weights_sha, summary)
    card = root / "docs" / "README.md"
    head = card.read_bytes().rstrip(b"\n") + b"\n" if card.is_file() else f"# {meta['name']}\n".encode()
    files["docs/README.md"] = head + notes.encode()
    if (root / "LICENSE").is_file():
        files["LICENSE"] = (root / "LICENSE").read_bytes()
    if reference_configs:
        files.update(_reference_configs(root, summary))
    manifest = checksum_manifest(files).encode()
    files[CHECKSUM_FILE] = manifest
    trusted: list = []
    if sign is not None:
        from pneumoseg.sharing.signing import sign_manifest

        files[SIGNATURE_FILE], signer = sign_manifest(manifest, sign)
        trusted = [signer]
        summary.signer = signer.fingerprint
    summary.files = {n: hashlib.sha256(d).hexdigest() for n, d in sorted(files.items())}

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    top = re.sub(r"[^A-Za-z0-9_.-]", "_", root.resolve().name).lstrip("._-")[:64] or "bundle"
    try:
        write_zip(files, partial, top)
        report = verify_bundle(partial, trusted_keys=trusted, allow_unsigned=sign is None)
        if not report.ok:  # what the receiver would see: better found here
            raise ValueError(f"{out}: the archive does not pass verification:\n{report.table()}")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return summary
