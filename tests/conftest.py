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
