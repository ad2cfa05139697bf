"""Start a local bundle from a received one, for fine-tuning: ``pneumoseg bundle derive --from DIR --into NEW``.

The new bundle is made of the INSTALLED pneumoseg's bundle (:mod:`pneumoseg.sharing.templates`: its
``train.json`` and the other configs, model card, metadata schema) and of the received bundle's validated
data, never of a received config:

- ``models/parent_model.pt``: the received weights, read weights-only and re-saved as a plain state dict;
  ``models/parent_record.json``: the received model record;
- ``configs/finetune.json``: an overlay of ``train.json`` generated here from the validated record, made of
  plain values (network keyword arguments, input size, intensity scaling or CT window, operating threshold)
  plus a fixed MONAI ``CheckpointLoader`` that loads ``models/parent_model.pt`` into the network before the
  first epoch (appended to ``initialize``);
- ``configs/postprocessing.json``: the parent's post-processing thresholds;
- ``configs/metadata.json``: the received metadata (checked plain data) with a new version and a changelog
  entry naming the parent (name, version, weights SHA-256), also under ``derived_from``;
- ``docs/parent_model_card.md``: the received model card; ``LICENSE``: the received licence.

Fine-tune with MONAI's own command (``python -m monai.bundle run training``, see :attr:`DeriveSummary.command`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumoseg.sharing.archive import ArchiveLimits

__all__ = ["FINETUNE_CONFIG", "DeriveSummary", "bump_version", "derive_bundle", "finetune_overlay"]

FINETUNE_CONFIG = "configs/finetune.json"
_GENERATED = {"metadata.json", "postprocessing.json", "finetune.json"}  # written here, not copied
_INSTALLED_IDS = (
    "network_def", "image_size", "operating_threshold", "train#preprocessing#transforms#0",
    "validate#preprocessing#transforms#0", "ckpt_dir", "network", "device", "initialize", "train#trainer",
)  # fmt: skip
"""What the overlay sets or refers to in the installed training configs."""


@dataclass
class DeriveSummary:
    """What ``derive`` wrote: the folder, its metadata, the configs to train with and the command."""

    into: str
    metadata: dict[str, Any]
    config_files: list[str] = field(default_factory=list)

    @property
    def command(self) -> str:
        files = "[" + ",".join(f"'{c}'" for c in self.config_files) + "]"
        return (
            f"cd {self.into} && python -m monai.bundle run training --meta_file configs/metadata.json "
            f'--config_file "{files}" --datalist YOUR_MANIFEST.json'
        )


def bump_version(version: str) -> str:
    """``0.1.0 -> 0.1.1``; a version without a numeric last part gets ``.1`` appended."""
    match = re.fullmatch(r"(.*?)(\d+)", version)
    return f"{match.group(1)}{int(match.group(2)) + 1}" if match else f"{version}.1"


def _has_id(config: Any, id_: str) -> bool:
    node = config
    for part in id_.split("#"):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def finetune_overlay(record: Any, kind: str, installed: dict[str, Any]) -> dict[str, Any]:
    """The fine-tuning overlay of ``installed`` (the merged installed training configs): the record's values
    as plain literals, then the fixed loader of the parent weights."""
    from pneumoseg.model_record import CT, CTPreprocessing

    prep = record.preprocessing[kind]
    values: dict[str, Any] = {"image_size": prep.image_size, "operating_threshold": record.operating_threshold}
    for key, value in record.network.kwargs.items():
        values[f"network_def#{key}"] = list(value) if isinstance(value, tuple) else value
    if kind == CT and prep.orientation != CTPreprocessing().orientation:
        raise ValueError(f"the installed training configs bring CT to {CTPreprocessing().orientation}; this "
                         f"model was trained in {prep.orientation}")  # fmt: skip
    for section in ("train", "validate"):
        chain = f"{section}#preprocessing#transforms#0"
        if kind == CT:
            values[f"{chain}#window"] = list(prep.window)
        else:
            values[f"{chain}#lower"] = prep.lower_percentile
            values[f"{chain}#upper"] = prep.upper_percentile
    if _has_id(installed, "model_record"):
        # the installed train.json writes the new model's record from its own values: the same values, so
        # the record says how the fine-tuned model was fed
        fields = (
            {"window": list(prep.window), "orientation": prep.orientation}
            if kind == CT
            else {"lower_percentile": prep.lower_percentile, "upper_percentile": prep.upper_percentile}
        )
        values.update({f"model_record#{k}": v for k, v in fields.items()})
    if _has_id(installed, "image_kind"):
        values["image_kind"] = kind
    for id_ in _INSTALLED_IDS:
        if not _has_id(installed, id_):
            raise ValueError(f"the installed training configs have no {id_!r}: derive cannot pass the record to them")
    for value in values.values():  # the record's schema allows no strings but enums; say so where it matters
        if isinstance(value, str) and value.startswith(("$", "@", "%")):
            raise ValueError(f"record value {value!r} would be code to MONAI")
    return {
        **values,
        # fixed text of this module (nothing received): load the parent weights (MONAI's CheckpointLoader,
        # weights_only) into train.json's network after its own initialize steps
        "parent_weights_file": "$@ckpt_dir + '/parent_model.pt'",
        "parent_weights": {
            "_target_": "CheckpointLoader",
            "load_path": "@parent_weights_file",
            "load_dict": {"model": "@network"},
            "map_location": "@device",
            "strict": True,
        },
        "+initialize": ["$@parent_weights(@train#trainer)"],
    }


def derive_bundle(
    source: str | os.PathLike,
    into: str | os.PathLike,
    version: str | None = None,
    note: str = "fine-tuned on local data",
    overwrite: bool = False,
    kind: str | None = None,
    limits: ArchiveLimits = ArchiveLimits(),
) -> DeriveSummary:
    """Make ``into``, a local bundle to fine-tune the received bundle ``source`` (an imported folder).

    ``source`` is verified first (layout, checksums, record, weights, metadata; its signature was checked at
    import, and is checked again when a trusted key for it is pinned). ``kind``: the image kind to train on
    when the model was trained on several.
    """
    from monai.bundle import ConfigParser

    from pneumoseg.model_record import CT, ModelRecord, load_state_dict
    from pneumoseg.sharing.export import state_dict_bytes
    from pneumoseg.sharing.metadata import metadata_problems, read_metadata
    from pneumoseg.sharing.receive import BundleRejected, remove_tree
    from pneumoseg.sharing.templates import installed_bundle
    from pneumoseg.sharing.verify import verify_bundle

    src, into = Path(source), Path(into)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such bundle folder (import the received .zip first)")
    report = verify_bundle(src, allow_unsigned=True, limits=limits)
    if not report.ok:
        raise BundleRejected(report)
    if into.exists() and any(into.iterdir()) and not (overwrite and (into / "configs" / "metadata.json").is_file()):
        raise FileExistsError(f"{into} exists and is not empty (use --overwrite to replace a bundle)")
    if note.startswith(("$", "@", "%")) or "\n" in note or len(note) > 500:
        raise ValueError("--note: one line of plain text (not starting with $, @ or %)")
    record = ModelRecord.read(src / "models" / "model_record.json")
    kind = kind or (record.kinds[0] if len(record.kinds) == 1 else None)
    if kind not in record.kinds:
        raise ValueError(f"--kind: the model was trained on {', '.join(record.kinds)}; choose one of them")
    state = load_state_dict(src / "models" / "model.pt")
    meta = read_metadata(src / "configs" / "metadata.json")
    parent_version, name = meta["version"], meta["name"]
    new_version = version or bump_version(parent_version)
    if new_version in meta.get("changelog", {}):
        raise ValueError(f"version {new_version} already in the changelog of {src}")
    listed = (src / "checksums.sha256").read_text().splitlines()
    digest = next(line.split()[0] for line in listed if line.endswith("  models/model.pt"))  # verified above

    template = installed_bundle()
    config_files = ["configs/train.json"] + (["configs/ct.json"] if kind == CT else []) + [FINETUNE_CONFIG]
    # merged as `monai.bundle run` merges them (read only: nothing is evaluated); the installed files only
    installed = ConfigParser.load_config_files([str(template / c) for c in config_files[:-1]])
    overlay = finetune_overlay(record, kind, installed)
    pp = record.postprocessing
    meta["version"] = new_version
    meta["changelog"] = {new_version: f"{note}; derived from {name} {parent_version} (models/model.pt sha256 {digest})",
                         **meta.get("changelog", {})}  # fmt: skip
    meta["derived_from"] = {"name": name, "version": parent_version, "weights_sha256": digest}
    problems = metadata_problems(meta)
    if problems:
        raise ValueError(f"derived metadata: {'; '.join(problems[:3])}")

    into.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{into.name}.deriving-", dir=into.parent))
    try:
        shutil.copytree(template / "configs", staging / "configs", ignore=lambda _, names: _GENERATED & set(names))
        (staging / "docs").mkdir()
        (staging / "models").mkdir()
        shutil.copyfile(template / "docs" / "README.md", staging / "docs" / "README.md")
        if (src / "docs" / "README.md").is_file():
            shutil.copyfile(src / "docs" / "README.md", staging / "docs" / "parent_model_card.md")
        shutil.copyfile(src / "LICENSE" if (src / "LICENSE").is_file() else template / "LICENSE", staging / "LICENSE")
        (staging / "models" / "parent_model.pt").write_bytes(state_dict_bytes(state))
        record.write(staging / "models" / "parent_record.json")
        (staging / FINETUNE_CONFIG).write_text(json.dumps(overlay, indent=4) + "\n")
        thresholds = {"t_cls": pp.t_cls, "top": pp.top, "min_area": pp.min_area, "bottom": pp.bottom,
                      "comment": f"post-processing of the parent model {name} {parent_version}; evaluate.json "
                                 "overwrites this file with the values searched on local validation data"}  # fmt: skip
        (staging / "configs" / "postprocessing.json").write_text(json.dumps(thresholds, indent=1) + "\n")
        (staging / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4) + "\n")
        for path in [
            staging,
            *staging.rglob("*"),
        ]:  # the templates may be read-only in the installation; this copy is the user's
            path.chmod(0o755 if path.is_dir() else 0o644)
        if into.exists():
            remove_tree(into)
        os.replace(staging, into)
    finally:
        remove_tree(staging)
    return DeriveSummary(str(into), meta, config_files)
