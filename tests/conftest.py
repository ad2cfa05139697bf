"""Helpers shared by several test modules."""

from __future__ import annotations

from pathlib import Path


def synthetic_siim_manifest(
    root: Path, radiographs: int, seed: int, val_fraction: float, test_fraction: float, salt: str = "test"
) -> Path:
    """Write ``radiographs`` 64-px phantoms (SIIM layout) under ``root`` and their manifest; return its path."""
    from pneumoseg.data.manifest import build_siim_manifest, write_manifest
    from pneumoseg.data.phantoms import synthesize

    synthesize(root, radiographs=radiographs, size=64, ct=0, seed=seed, workers=1)
    manifest, summary = build_siim_manifest(
        root / "dicom-images-train", root / "train-rle.csv", root, salt=salt, val_fraction=val_fraction,
        test_fraction=test_fraction, folds=0, seed=0, progress=False,
    )  # fmt: skip
    write_manifest(manifest, root / "manifest.json", summary)
    return root / "manifest.json"


REPO = Path(__file__).resolve().parents[1]
TINY_NETWORK = {"decoder_channels": [16, 8, 8, 4, 4], "head_channels": 4, "cls_dropout": 0.0}


def tiny_bundle(
    root: Path, kinds: tuple[str, ...] = ("radiograph",), image_size: int = 64, seed: int = 0, **record_fields
) -> Path:
    """A bundle folder holding what inference reads: ``models/model_record.json`` (a tiny SCSEUNet trained, as
    it were, on ``kinds`` at ``image_size``), random ``models/model.pt`` and the real ``configs/metadata.json``.

    The segmentation head's last convolution is scaled up so that outputs are confident (masks neither empty
    nor full, no pixel near the threshold: results do not hinge on float noise). ``record_fields`` replace
    fields of the record (e.g. ``postprocessing=PostprocessingThresholds(...)``).
    """
    import dataclasses
    import shutil

    import torch

    from pneumoseg.model_record import CT, CTPreprocessing, ModelRecord, RadiographPreprocessing
    from pneumoseg.networks import SCSEUNet

    (root / "models").mkdir(parents=True)
    (root / "configs").mkdir()
    shutil.copy(REPO / "bundles" / "pneumothorax_scse_unet" / "configs" / "metadata.json", root / "configs")
    torch.manual_seed(seed)
    network = SCSEUNet(**TINY_NETWORK)
    with torch.no_grad():
        final = [m for m in network.seg_head.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        final.weight.mul_(50.0)
    record = ModelRecord.for_training(network, kinds[0], image_size)
    kind_types = {"radiograph": RadiographPreprocessing, CT: CTPreprocessing}
    preprocessing = {kind: kind_types[kind](image_size=image_size) for kind in kinds}
    record = dataclasses.replace(record, preprocessing=preprocessing, **record_fields)
    record.write(root / "models" / "model_record.json")
    torch.save(network.state_dict(), root / "models" / "model.pt")
    return root
