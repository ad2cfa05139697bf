"""Pre-flight check of a manifest split before any engine starts: every problem named, from file headers only."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["DatalistError", "check_datalist"]


class DatalistError(ValueError):
    """A manifest cannot be used: names the manifest, split and offending entries."""


def _image_shape(path: Path) -> tuple[int, ...]:
    """Spatial shape from the header only: DICOM ``(Rows, Columns)``, NIfTI its shape, others ``(H, W)``."""
    name = path.name.lower()
    if path.is_dir():  # a DICOM series: count is not a shape we can compare; only existence is checked
        return ()
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        shape = tuple(int(s) for s in nib.load(str(path)).shape)
        while len(shape) > 2 and shape[-1] == 1:
            shape = shape[:-1]
        return shape
    if name.endswith((".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")):
        from PIL import Image

        with Image.open(path) as im:
            return (im.height, im.width)
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
    return (int(ds.Rows), int(ds.Columns))


def check_datalist(
    manifest: str | os.PathLike,
    split: str = "training",
    data_root: str | os.PathLike | None = None,
    check_sizes: bool = True,
    allow_empty: bool = False,
    max_listed: int = 10,
    min_batch: int = 0,
) -> list[dict[str, Any]]:
    """Load one split of a manifest with absolute paths, after checking it from file headers only.

    Checks: the manifest and split exist; the split is not empty (unless ``allow_empty``); every image
    (and ``label`` file) exists; SIIM ``label_rle`` rows are valid and fit the image's Rows x Columns; a
    ``label`` file has the image's shape. ``data_root`` overrides the manifest's own ``data_root``.
    ``min_batch``: the training batch size; a split smaller than one batch is refused, because the training
    loader drops incomplete batches (batch norm cannot train on a batch of one) and would run zero steps.

    Raises:
        DatalistError: listing up to ``max_listed`` offending entries as
            ``<manifest>[<split>][<index>] <image>: <problem>``.
    """
    from monai.data import load_decathlon_datalist

    from pneumoseg.data.manifest import manifest_base_dir
    from pneumoseg.data.rle import validate_siim_rle

    manifest = Path(manifest)
    if not manifest.is_file():
        raise DatalistError(f"manifest not found: {manifest}")
    try:
        raw = json.loads(manifest.read_text())
    except json.JSONDecodeError as err:
        raise DatalistError(f"{manifest}: not valid JSON ({err})") from None
    if split not in raw:
        raise DatalistError(
            f"{manifest}: no split {split!r} (has {sorted(k for k, v in raw.items() if isinstance(v, list))})"
        )
    if not raw[split] and not allow_empty:
        raise DatalistError(f"{manifest}: split {split!r} is empty; nothing to train or validate on")
    if 0 < len(raw[split]) < min_batch:
        raise DatalistError(
            f"{manifest}: split {split!r} has {len(raw[split])} entries, fewer than one training batch of"
            f" {min_batch} (incomplete batches are dropped, so no step would run): lower --batch_size or add data"
        )
    base = Path(data_root) if data_root else manifest_base_dir(manifest)
    entries = load_decathlon_datalist(str(manifest), is_segmentation=True, data_list_key=split, base_dir=str(base))
    problems: list[str] = []
    for index, entry in enumerate(entries):
        where = f"{manifest}[{split}][{index}] {raw[split][index].get('image', '?')}"
        image = Path(str(entry.get("image", "")))
        if "image" not in entry:
            problems.append(f"{where}: no 'image' key")
            continue
        if not image.exists():
            problems.append(f"{where}: image file not found ({image})")
            continue
        label = entry.get("label")
        if label is not None and not Path(str(label)).exists():
            problems.append(f"{where}: label file not found ({label})")
            continue
        if not check_sizes or ("label_rle" not in entry and label is None):
            continue
        try:
            shape = _image_shape(image)
        except Exception as err:  # noqa: BLE001 - any unreadable header is reported with its entry
            problems.append(f"{where}: unreadable image header ({type(err).__name__}: {err})")
            continue
        if "label_rle" in entry:
            if len(shape) != 2:
                problems.append(f"{where}: label_rle needs a 2D image, image shape is {shape}")
                continue
            try:
                validate_siim_rle(entry["label_rle"], shape[0], shape[1])
            except ValueError as err:
                problems.append(f"{where}: label_rle does not fit the {shape[0]}x{shape[1]} image ({err})")
        elif shape:
            try:
                label_shape = _image_shape(Path(str(label)))
            except Exception as err:  # noqa: BLE001
                problems.append(f"{where}: unreadable label header ({type(err).__name__}: {err})")
                continue
            if label_shape != shape:
                problems.append(f"{where}: image shape {shape} != label shape {label_shape} ({label})")
        if len(problems) >= max_listed:
            break
    if problems:
        more = f" (stopped after the first {max_listed})" if len(problems) >= max_listed else ""
        raise DatalistError(f"{len(problems)} bad manifest entries{more}:\n  " + "\n  ".join(problems))
    return entries
