"""Synthetic hospitals for ``pneumoseg federated simulate`` and ``benchmarks/federated.py``.

Each site gets its own phantoms, manifest and site-local config, differing the way hospitals do
(:data:`PROFILES`, used in turn): one stores CR as MONOCHROME1 at twice the base size, one stores DX as JPEG
2000 with a different exposure (a display gamma the intensity scaling does not undo), one has more positives
and half the images. Built from the public functions of :mod:`pneumoseg.data.phantoms` (plan, draw, write),
so the generator itself keeps one set of options; the exposure and the DX re-tagging are applied here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumoseg.federated.values import SiteConfig

__all__ = ["SiteProfile", "PROFILES", "SyntheticSite", "site_names", "make_site", "make_sites"]

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
"""SOP class of Digital X-Ray Image Storage - For Presentation."""


@dataclass(frozen=True)
class SiteProfile:
    """How a synthetic hospital's radiographs differ.

    Args:
        label: short description used in tables.
        modality: ``CR`` or ``DX`` (DX files carry the DX For Presentation SOP class).
        monochrome1_fraction: share stored as MONOCHROME1.
        transfer_syntax: force one transfer syntax (key of ``phantoms.TRANSFER_SYNTAXES``), or ``None`` for the
            generator's mix.
        size_factor: stored image size relative to the simulation's base size.
        positive_fraction: share of images with a pneumothorax.
        share: number of images relative to the simulation's images per site.
        gamma: display-value gamma applied to every image (1: as drawn).
    """

    label: str
    modality: str = "CR"
    monochrome1_fraction: float = 0.3
    transfer_syntax: str | None = None
    size_factor: float = 1.0
    positive_fraction: float = 0.5
    share: float = 1.0
    gamma: float = 1.0


PROFILES: tuple[SiteProfile, ...] = (
    SiteProfile("CR, MONOCHROME1, 2x size", modality="CR", monochrome1_fraction=1.0, size_factor=2.0),
    SiteProfile(
        "DX, JPEG 2000, gamma 1.8", modality="DX", monochrome1_fraction=0.0, transfer_syntax="jpeg2000", gamma=1.8
    ),  # fmt: skip
    SiteProfile("CR, 80% positive, half the images", positive_fraction=0.8, share=0.5),
)


@dataclass(frozen=True)
class SyntheticSite:
    """A generated site: its FLARE name, profile, manifest and site-local config file."""

    name: str
    profile: SiteProfile
    root: Path
    manifest: Path
    config: Path
    images: int
    image_size: int


def site_names(n: int) -> list[str]:
    """``site-a``, ``site-b``, ... (``site-27`` and on past 26)."""
    return [f"site-{chr(ord('a') + i)}" if i < 26 else f"site-{i + 1}" for i in range(n)]


def _expose(image: np.ndarray, bits_stored: int, gamma: float) -> np.ndarray:
    """Display gamma over the stored range (uint16 ``[H, W]`` in, same out)."""
    if gamma == 1.0:
        return image
    top = float(2**bits_stored - 1)
    return np.clip(np.rint(top * (image / top) ** gamma), 0, top).astype(np.uint16)


def _as_dx(path: Path) -> None:
    """Re-tag a written CR file as DX For Presentation (pixel data untouched)."""
    import pydicom

    ds = pydicom.dcmread(path)
    ds.Modality = "DX"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.save_as(path, enforce_file_format=True)


def make_site(
    root: str | Path,
    name: str,
    profile: SiteProfile,
    images: int,
    base_size: int,
    seed: int,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    batch_size: int = 8,
    num_workers: int = 0,
) -> SyntheticSite:
    """Write one site's phantoms (SIIM layout), manifest (``manifest.json``) and config (``site.json``)."""
    from pneumoseg.data.manifest import build_siim_manifest, write_manifest
    from pneumoseg.data.phantoms import (
        RADIOGRAPH_DIR,
        RLE_CSV,
        draw_radiograph_case,
        mask_to_rle_rows,
        plan_radiographs,
        write_radiograph_dicom,
    )
    from pneumoseg.data.rle import write_siim_csv

    root = Path(root)
    data = root / "data"
    size = int(round(base_size * profile.size_factor))
    count = max(4, int(round(images * profile.share)))
    cases = plan_radiographs(
        count, seed, size, profile.positive_fraction, monochrome1_fraction=profile.monochrome1_fraction
    )
    if profile.transfer_syntax is not None:
        cases = [dataclasses.replace(c, transfer_syntax=profile.transfer_syntax) for c in cases]
    rows = {}
    for case in cases:
        image, mask = draw_radiograph_case(case, seed, size)
        path = write_radiograph_dicom(data / case.relative_path, _expose(image, case.bits_stored, profile.gamma), case)
        if profile.modality == "DX":
            _as_dx(path)
        rows[case.sop_uid] = mask_to_rle_rows(mask)
    write_siim_csv(data / RLE_CSV, rows)
    manifest, summary = build_siim_manifest(
        data / RADIOGRAPH_DIR, data / RLE_CSV, data, salt=f"{name}-{seed}", val_fraction=val_fraction,
        test_fraction=test_fraction, folds=0, seed=seed, progress=False,
    )  # fmt: skip
    manifest_path = write_manifest(manifest, root / "manifest.json", summary)
    config = SiteConfig(
        manifest=str(Path(manifest_path).resolve()),
        work_dir=str((root / "work").resolve()),
        batch_size=batch_size,
        val_batch_size=batch_size,
        num_workers=num_workers,
    ).write(root / "site.json")
    return SyntheticSite(name, profile, root, Path(manifest_path), config, count, size)


def make_sites(
    root: str | Path,
    n: int,
    images: int,
    base_size: int,
    seed: int = 0,
    profiles: Sequence[SiteProfile] = PROFILES,
    **kwargs,
) -> list[SyntheticSite]:
    """``n`` sites under ``root/<site name>/``, profiles in turn, each with its own seed (so its own patients)."""
    return [
        make_site(Path(root) / name, name, profiles[i % len(profiles)], images, base_size, seed * 1000 + i, **kwargs)
        for i, name in enumerate(site_names(n))
    ]
