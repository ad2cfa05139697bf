"""Image readers for chest radiographs (DICOM, PNG/JPEG) and NIfTI volumes, as MONAI transforms.

Outputs follow the project conventions (docs/data.md, "Orientation convention"):

* radiographs: ``MetaTensor`` float32 ``[1, H, W]`` with H = DICOM Rows, W = Columns, i.e. exactly the
  order of pydicom's ``pixel_array`` (as displayed); intensities are display values (modality LUT ->
  VOI LUT -> MONOCHROME1 inverted, so that higher = brighter);
* NIfTI volumes: ``MetaTensor`` float32 ``[C, I, J, K]`` in voxel-index order with the RAS affine.

DICOM CT series live in :mod:`pneumoseg.data.series`; :class:`LoadChestImage` dispatches on the path.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform, Transform
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from pneumoseg.data.dicom import (
    IMAGE_SUFFIXES,
    NIFTI_SUFFIXES,
    ImageReadError,
    PathLike,
    decode_pixels,
    has_suffix,
    int_value,
    pixel_spacing,
    quiet_value_validation,
    read_dicom,
)
from pneumoseg.data.series import LoadDicomSeries

__all__ = [
    "ImageReadError",
    "LoadChestImage",
    "LoadChestImaged",
    "LoadNifti",
    "LoadNiftid",
    "LoadRadiograph",
    "LoadRadiographd",
    "image_kind",
    "radiograph_from_dataset",
    "read_dicom_radiograph",
    "read_image_file",
]

logger = logging.getLogger(__name__)

# ITU-R BT.601 luma weights, the same PIL uses for RGB -> "L", so DICOM RGB and PNG exports agree
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])


def _stored_range(ds: Dataset) -> tuple[float, float]:
    bits = int(ds.BitsStored)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def display_range(ds: Dataset) -> tuple[float, float]:
    """Range of the values after modality LUT + VOI LUT, as pydicom computes them.

    MONOCHROME1 is inverted within this range (``lo + hi - x``), so a full-range image stays full-range.
    Mirrors pydicom's ``apply_windowing`` output range and the LUT descriptors' bit depths.
    """
    if ds.get("VOILUTSequence"):
        return 0.0, 2.0 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1
    if ds.get("ModalityLUTSequence"):
        lo, hi = 0.0, 2.0 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1
    else:
        lo, hi = _stored_range(ds)
        slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
        if slope is not None and intercept is not None:
            lo, hi = sorted((lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)))
    return lo, hi


def _to_luminance(rgb: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` (or 4 with alpha, dropped) -> ``[H, W]`` float64 luma."""
    return rgb[..., :3].astype(np.float64) @ LUMA_WEIGHTS


def _radiograph_tensor(image: np.ndarray, spacing: tuple[float, float] | None, meta: dict[str, Any]) -> MetaTensor:
    """``[H, W]`` -> MetaTensor ``[1, H, W]`` with spacing/affine meta (affine: index -> mm, no patient frame)."""
    spacing_missing = spacing is None
    sp = np.array(spacing if spacing is not None else (1.0, 1.0), dtype=np.float64)
    # a radiograph has no patient-space position: the affine only scales indices to mm, 4x4 like MONAI's
    # 2D readers produce so that MONAI spatial transforms accept it
    affine = torch.diag(torch.tensor([sp[0], sp[1], 1.0, 1.0], dtype=torch.float64))
    meta = {
        **meta,
        "spacing": sp,
        "spacing_missing": spacing_missing,
        "spatial_shape": np.array(image.shape, dtype=np.int64),
        "original_channel_dim": "no_channel",
        "original_affine": affine.clone(),
    }
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None], affine=affine, meta=meta)


def _display_values(arr: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    """Decoded stored values -> display values ``[H, W]`` (higher = brighter)."""
    if photometric == "PALETTE COLOR":
        return _to_luminance(apply_color_lut(arr, ds))
    if arr.ndim == 3:  # RGB (pydicom converted YBR_* to RGB already); no LUTs apply to colour
        return _to_luminance(arr)
    if arr.ndim != 2:
        raise ValueError(f"unexpected decoded shape {arr.shape}")
    # float32 is exact for stored values (<= 16 bit) and is what the tensor holds anyway
    image = apply_voi_lut(apply_modality_lut(arr, ds), ds).astype(np.float32, copy=False)
    if photometric == "MONOCHROME1":
        # pydicom leaves MONOCHROME1 as stored (checked in tests): invert within the LUT output range
        lo, hi = display_range(ds)
        image = lo + hi - image
    return image


def read_dicom_radiograph(path: PathLike, frame: int | None = None) -> MetaTensor:
    """Read a single-frame DICOM radiograph (CR/DX/DR, or any 2D DICOM image) as display values.

    Args:
        path: the DICOM file.
        frame: frame index for multi-frame files; multi-frame files without it raise ImageReadError.

    Returns:
        MetaTensor float32 ``[1, H, W]``, H = Rows, W = Columns (``pixel_array`` order).
    """
    return radiograph_from_dataset(read_dicom(path), path, frame)


def radiograph_from_dataset(ds: Dataset, path: PathLike, frame: int | None = None) -> MetaTensor:
    """:func:`read_dicom_radiograph` of a dataset already read with its pixel data (``path`` names it in
    errors and meta): for callers that need the header too, without parsing the file twice."""
    n_frames = int_value(ds, "NumberOfFrames", 1) or 1
    if n_frames > 1 and frame is None:
        raise ImageReadError(
            f"{path}: multi-frame DICOM ({n_frames} frames) is not a single radiograph; pass frame=<index>"
        )
    if frame is not None and not 0 <= frame < n_frames:
        raise ImageReadError(f"{path}: frame {frame} out of range (file has {n_frames} frame(s))")
    arr = decode_pixels(ds, path, frame if n_frames > 1 else None)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()

    try:
        with quiet_value_validation():  # LUT elements are read lazily; their warnings would quote values
            image = _display_values(arr, ds, photometric)
    except Exception as e:  # malformed LUT / window elements
        raise ImageReadError(f"{path}: cannot apply modality/VOI/colour LUT ({type(e).__name__})") from None
    if not np.all(np.isfinite(image)):
        raise ImageReadError(f"{path}: decoded image contains NaN or infinite values")

    meta = {
        "filename_or_obj": os.fspath(path),
        "Modality": str(ds.get("Modality", "") or ""),
        "SeriesInstanceUID": str(ds.get("SeriesInstanceUID", "") or ""),
        "SOPInstanceUID": str(ds.get("SOPInstanceUID", "") or ""),
        "PhotometricInterpretation": photometric,
        # always present (empty when absent) so that meta dicts of a batch have the same keys
        "BodyPartExamined": str(ds.get("BodyPartExamined", "") or ""),
        "TransferSyntaxUID": str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or ""),
    }
    if n_frames > 1:
        meta["frame"] = frame
    return _radiograph_tensor(image, pixel_spacing(ds), meta)


def read_image_file(path: PathLike) -> MetaTensor:
    """Read a PNG/JPEG radiograph export as ``[1, H, W]`` float32 (RGB -> luminance), spacing missing.

    MONAI's PILReader is not used: it returns ``[W, H]`` (transposed), against our convention.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "P":
                img = img.convert("RGBA")
            arr = np.asarray(img)
            mode = img.mode
    except (OSError, UnidentifiedImageError) as e:
        raise ImageReadError(f"{path}: cannot read image ({e})") from e
    if arr.ndim == 3:
        image = arr[..., 0].astype(np.float64) if arr.shape[-1] <= 2 else _to_luminance(arr)  # LA: drop alpha
    else:
        image = arr.astype(np.float64)
    meta = {
        "filename_or_obj": os.fspath(path),
        "Modality": "",
        "SeriesInstanceUID": "",
        "SOPInstanceUID": "",
        "PhotometricInterpretation": "MONOCHROME2" if arr.ndim == 2 or arr.shape[-1] <= 2 else "RGB",
        "BodyPartExamined": "",
        "TransferSyntaxUID": "",
        "image_mode": mode,
    }
    return _radiograph_tensor(image, None, meta)


class LoadRadiograph(Transform):
    """Load a radiograph (DICOM, or a ``.png/.jpg/.jpeg`` export) as MetaTensor ``[1, H, W]`` float32.

    Args:
        frame: frame index for multi-frame DICOM files (default: such files raise ImageReadError).
    """

    def __init__(self, frame: int | None = None) -> None:
        self.frame = frame

    def __call__(self, path: PathLike) -> MetaTensor:
        if has_suffix(path, IMAGE_SUFFIXES):
            return read_image_file(path)
        return read_dicom_radiograph(path, frame=self.frame)


class LoadRadiographd(MapTransform):
    """Dictionary form of :class:`LoadRadiograph`: replaces each path under ``keys`` by the image."""

    def __init__(self, keys: KeysCollection, frame: int | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadRadiograph(frame=frame)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d


def _affine_spacing(affine: torch.Tensor | np.ndarray) -> np.ndarray:
    """mm per array axis = norms of the affine's direction columns."""
    a = np.asarray(affine, dtype=np.float64)
    return np.linalg.norm(a[:-1, :-1], axis=0)


class LoadNifti(Transform):
    """Load a NIfTI volume as MetaTensor ``[C, I, J, K]`` float32 with its RAS affine; NaN / ±inf voxels raise.

    MONAI's ``LoadImage(reader="NibabelReader")`` does the reading (voxel order and affine as stored,
    which is our convention); this adds ``spacing`` and the check for non-finite voxels.
    """

    def __init__(self) -> None:
        self.loader = LoadImage(reader="NibabelReader", ensure_channel_first=True, image_only=True, dtype=np.float32)

    def __call__(self, path: PathLike) -> MetaTensor:
        try:
            img = self.loader(os.fspath(path))
        except Exception as e:
            raise ImageReadError(f"{path}: cannot read NIfTI ({type(e).__name__}: {e})") from e
        n_bad = int((~torch.isfinite(img)).sum())
        if n_bad:
            raise ImageReadError(f"{path}: NIfTI volume contains {n_bad} NaN or infinite voxel(s)")
        img.meta["filename_or_obj"] = os.fspath(path)
        img.meta["spacing"] = _affine_spacing(img.affine)
        return img


class LoadNiftid(MapTransform):
    """Dictionary form of :class:`LoadNifti`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadNifti()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d


def image_kind(path: PathLike) -> str:
    """``"dicom_series"`` (directory), ``"nifti"``, ``"image"`` (PNG/JPEG) or ``"dicom"`` for ``path``."""
    if Path(path).is_dir():
        return "dicom_series"
    if has_suffix(path, NIFTI_SUFFIXES):
        return "nifti"
    if has_suffix(path, IMAGE_SUFFIXES):
        return "image"
    return "dicom"


class LoadChestImage(Transform):
    """Load any supported chest image, choosing the reader from the path.

    directory -> DICOM CT series (:class:`~pneumoseg.data.series.LoadDicomSeries`, ``[1, I, J, K]``);
    ``.nii/.nii.gz`` -> :class:`LoadNifti`; ``.png/.jpg/.jpeg`` and anything else -> :class:`LoadRadiograph`
    (``[1, H, W]``). A list/tuple of paths is read as the files of one DICOM series.

    Args:
        frame: passed to :class:`LoadRadiograph`.
        series_uid: passed to :class:`~pneumoseg.data.series.LoadDicomSeries`.
    """

    def __init__(self, frame: int | None = None, series_uid: str | None = None) -> None:
        self.radiograph = LoadRadiograph(frame=frame)
        self.nifti = LoadNifti()
        self.series = LoadDicomSeries(series_uid=series_uid)

    def __call__(self, path: PathLike | Sequence[PathLike]) -> MetaTensor:
        if isinstance(path, (list, tuple)):
            return self.series(path)
        kind = image_kind(path)
        if kind == "dicom_series":
            return self.series(path)
        if kind == "nifti":
            return self.nifti(path)
        return self.radiograph(path)


class LoadChestImaged(MapTransform):
    """Dictionary form of :class:`LoadChestImage`."""

    def __init__(
        self,
        keys: KeysCollection,
        frame: int | None = None,
        series_uid: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadChestImage(frame=frame, series_uid=series_uid)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d
