"""Helpers of the sharing tests: a tiny trained-looking sender bundle, and archives re-packed (checksums,
signature) the way a sender, honest or hostile, would make them."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import zipfile
from pathlib import Path

import torch

from pneumoseg.model_record import ModelRecord, PostprocessingThresholds
from pneumoseg.networks import SCSEUNet
from pneumoseg.sharing.archive import CHECKSUM_FILE, SIGNATURE_FILE, checksum_manifest, write_zip
from pneumoseg.sharing.signing import sign_manifest
from pneumoseg.sharing.templates import installed_bundle

DECODER = [16, 8, 8, 4, 4]
SIZE = 64
TOP = "pneumothorax_scse_unet"
SECRET = "/data/hospital_a/secret_manifest.json"
RECORD_BASED_INFER = importlib.util.find_spec("pneumoseg.infer") is not None
"""`pneumoseg infer --bundle` reads the model record and weights only (issue 13's `pneumoseg.infer`); the
older runner parses the bundle's inference.json, which a received bundle no longer has."""


def tiny_network(seed: int = 0) -> SCSEUNet:
    torch.manual_seed(seed)
    return SCSEUNet(decoder_channels=DECODER).eval()


def sender_bundle(dest: Path, seed: int = 0) -> Path:
    """A bundle as training and evaluation leave it: weights in MONAI's checkpoint form ``{"model": sd}``,
    the record with tuned thresholds, metrics with absolute paths, and files that must never leave."""
    shutil.copytree(installed_bundle(), dest, ignore=shutil.ignore_patterns("*.pt", "eval", "predictions", ".gitkeep"))
    network = tiny_network(seed)
    torch.save({"model": network.state_dict()}, dest / "models" / "model.pt")
    # not the default percentiles: whoever feeds the model must have read them from the record
    record = ModelRecord.for_training(
        network, "radiograph", SIZE, operating_threshold=0.4, lower_percentile=1.0, upper_percentile=99.0
    )
    record = record.with_postprocessing(PostprocessingThresholds(t_cls=0.35, top=0.6, min_area=5, bottom=0.45))
    record.write(dest / "models" / "model_record.json")
    inference = json.loads((dest / "configs" / "inference.json").read_text())
    inference["sender_note"] = "tuned at hospital A"  # a value the installed config does not have
    (dest / "configs" / "inference.json").write_text(json.dumps(inference, indent=4))
    (dest / "eval").mkdir()
    metrics = {"checkpoint": "/data/hospital_a/models/model.pt", "manifest": SECRET, "split": "validation",
               "val_siim_dice": 0.8125, "val_auc": 0.9375, "val_sensitivity": 0.75}  # fmt: skip
    (dest / "eval" / "metrics.json").write_text(json.dumps(metrics))
    (dest / "eval" / "metrics_history.jsonl").write_text(json.dumps({"image": "patient_1.dcm"}) + "\n")
    (dest / "manifest.json").write_text(json.dumps({"training": [{"image": "p1.dcm", "patient_hash": "abc"}]}))
    (dest / "models" / "checkpoint_last.pt").write_bytes(b"optimizer state")
    return dest


def source_network(bundle: Path) -> SCSEUNet:
    network = SCSEUNet(decoder_channels=DECODER)
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True)["model"])
    return network.eval()


def members(archive: Path) -> dict[str, bytes]:
    """An archive's files keyed by their path below the top-level folder."""
    with zipfile.ZipFile(archive) as z:
        return {n.split("/", 1)[1]: z.read(n) for n in z.namelist() if not n.endswith("/")}


def pack(files: dict[str, bytes], out: Path, key: Path | None = None, manifest: bool = True) -> Path:
    """Write ``files`` as a bundle archive: with ``manifest``, a fresh checksum manifest (an old signature
    dropped); with ``key``, the manifest signed. ``manifest=False`` keeps the given manifest and signature:
    what someone who changed files without the key makes."""
    files = dict(files)
    if manifest:
        files = {n: d for n, d in files.items() if n not in (CHECKSUM_FILE, SIGNATURE_FILE)}
        files[CHECKSUM_FILE] = checksum_manifest(files).encode()
    if key is not None:
        files[SIGNATURE_FILE], _ = sign_manifest(files[CHECKSUM_FILE], key)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_zip(files, out, TOP)


def tree(root: Path) -> set[str]:
    """Every path under ``root`` (files and folders), for "nothing written outside the output folder"."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            found.add(os.path.join(dirpath, name))
    return found
