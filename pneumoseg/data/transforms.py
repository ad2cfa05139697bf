"""Training / validation / inference transform chains (MONAI ``Compose`` over dict samples).

The factories take only simple, JSON-friendly parameters so that bundle configs can call them, e.g.
``{"_target_": "pneumoseg.data.transforms.radiograph_train_transforms", "spatial_size": 512}``. Their
preprocessing defaults (input size, intensity percentiles, CT window and orientation) are those of the
model record's dataclasses (:class:`pneumoseg.model_record.RadiographPreprocessing`,
:class:`~pneumoseg.model_record.CTPreprocessing`): one home, which a trained model's record repeats.

Radiographs (manifest entries ``{"image", "label_rle"}`` or ``{"image", "label"}``, see ``docs/data.md``):
load (``LoadChestImaged``: ``[1, H, W]`` display values) → label from the SIIM RLE rows
(``DecodeSIIMRLEd``) or from a mask file (binarised at 0.5) → resize to ``S x S`` (image by pixel-area
averaging, :class:`AreaResized`: the exact box filter for the usual downsampling, e.g. SIIM's 1024 px
to 512; an image smaller than ``S`` is enlarged by pixel replication; its inverse is bilinear; mask
nearest, so it stays binary) → percentile scaling to [0, 1] (:class:`PercentileScaleIntensityd`; robust
to 8-16 bit and to burnt-in labels) → training augmentation → ``EnsureTyped``. Output: ``image`` float
``[1, S, S]`` in [0, 1], ``label`` ``[1, S, S]`` in {0, 1}.

CT (``{"image": volume, "label": mask volume}``, NIfTI or DICOM series, ``[1, I, J, K]`` in HU): MONAI's
``Orientationd`` to the record's orientation (default RAS: the last axis runs to superior, i.e. is the
axial one whatever the storage order or slice plane) → the HU window (default W1500/L-600,
``[-1350, 150]``) → [0, 1] via MONAI's ``ScaleIntensityRanged`` → training: axial slices (last axis K)
sampled with ``RandCropByPosNegLabeld(spatial_size=(-1, -1, 1))`` (``pos`` / ``neg`` set the share of
slices through the pneumothorax), squeezed to ``[1, I, J]`` and resized to ``S x S``; validation /
inference keep the volume ``[1, S, S, K]`` for slice-wise inference (``monai.inferers.SliceInferer``).
Training and inference share the orientation, so the model sees slices the same way in both.

Inference chains are invertible (MONAI records each spatial transform in ``applied_operations``);
:func:`invert_prediction_transforms` maps a prediction back to the source image's geometry with MONAI's
``Invertd``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    AsDiscreted,
    Compose,
    EnsureTyped,
    Invertd,
    MapTransform,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    Resize,
    Resized,
    ScaleIntensityRanged,
    SqueezeDimd,
    Transform,
)
from monai.transforms.inverse import InvertibleTransform
from monai.utils import TraceKeys

from pneumoseg.model_record import CTPreprocessing, RadiographPreprocessing

__all__ = [
    "IMAGE",
    "LABEL",
    "LABEL_RLE",
    "PRED",
    "AreaResize",
    "AreaResized",
    "PercentileScaleIntensity",
    "PercentileScaleIntensityd",
    "augmentation_transforms",
    "radiograph_train_transforms",
    "radiograph_validation_transforms",
    "record_validation_transforms",
    "radiograph_inference_transforms",
    "ct_train_transforms",
    "ct_validation_transforms",
    "ct_inference_transforms",
    "invert_prediction_transforms",
    "orientation_with_last",
    "slice_orientation",
]

IMAGE, LABEL, LABEL_RLE, PRED = "image", "label", "label_rle", "pred"
_RADIOGRAPH, _CT = RadiographPreprocessing(), CTPreprocessing()  # the defaults' one home


class PercentileScaleIntensity(Transform):
    """Map the ``lower`` / ``upper`` intensity percentiles of the whole image to ``b_min`` / ``b_max``, clipped.

    The values are those of MONAI's ``ScaleIntensityRangePercentiles(lower, upper, b_min, b_max, clip=True)``
    (linear interpolation between order statistics, one pair for all channels). Not MONAI's class because
    it computes each percentile with ``torch.quantile``, a full sort: 35 ms per 512 x 512 image on one core,
    13x ``np.percentile``'s selection, and batch inference runs this once per scan. A constant image maps
    to ``b_min`` (as MONAI's).

    Args:
        lower, upper: percentiles in [0, 100], ``lower < upper``.
        b_min, b_max: output values of the two percentiles.

    Input / output: ``[C, *spatial]`` tensor or array (a ``MetaTensor`` keeps its metadata), float32 output.
    """

    backend = [MetaTensor.__name__, "numpy"]

    def __init__(self, lower: float, upper: float, b_min: float = 0.0, b_max: float = 1.0) -> None:
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= lower < upper <= 100, got {lower}, {upper}")
        self.lower, self.upper, self.b_min, self.b_max = float(lower), float(upper), float(b_min), float(b_max)

    def __call__(self, img: Any) -> Any:
        values = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        lo, hi = (float(v) for v in np.percentile(values, [self.lower, self.upper]))
        scale = (self.b_max - self.b_min) / (hi - lo) if hi > lo else 0.0
        lo_out, hi_out = min(self.b_min, self.b_max), max(self.b_min, self.b_max)
        if isinstance(img, torch.Tensor):
            return ((img.float() - lo) * scale + self.b_min).clamp_(lo_out, hi_out)
        return np.clip((values.astype(np.float32) - lo) * scale + self.b_min, lo_out, hi_out).astype(np.float32)


class PercentileScaleIntensityd(MapTransform):
    """Dictionary form of :class:`PercentileScaleIntensity`."""

    backend = PercentileScaleIntensity.backend

    def __init__(
        self,
        keys: KeysCollection,
        lower: float,
        upper: float,
        b_min: float = 0.0,
        b_max: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.scaler = PercentileScaleIntensity(lower, upper, b_min, b_max)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.scaler(d[key])
        return d


class AreaResize(Resize):
    """MONAI ``Resize`` by pixel-area averaging (``mode="area"``) whose inverse resamples bilinearly.

    Area averaging is the box filter that shrinking radiographs needs (1024-3000 px to 512), at 1/30 of
    the cost of bilinear with Gaussian anti-aliasing (2 vs 57 ms for 1024 px). Its exact inverse would be
    an area *enlargement*, i.e. pixel replication, and a thresholded mask would get staircase edges; the
    inverse here is a bilinear resize (``align_corners=False``) to the recorded size, no anti-aliasing.
    Input / output: ``[C, *spatial]``.
    """

    def __init__(self, spatial_size: Sequence[int] | int, **kwargs: Any) -> None:
        super().__init__(spatial_size, mode="area", anti_aliasing=False, **kwargs)

    def inverse_transform(self, data: torch.Tensor, transform: Mapping) -> torch.Tensor:
        resize = Resize(spatial_size=transform[TraceKeys.ORIG_SIZE], mode="bilinear", align_corners=False)
        with resize.trace_transform(False):
            data = resize(data)
        for _ in range(transform[TraceKeys.EXTRA_INFO]["new_dim"]):
            data = data.squeeze(-1)  # the dimensions Resize added
        return data


class AreaResized(MapTransform, InvertibleTransform):
    """Dictionary form of :class:`AreaResize` (images; masks are resized ``Resized(mode="nearest-exact")``)."""

    backend = AreaResize.backend

    def __init__(
        self, keys: KeysCollection, spatial_size: Sequence[int] | int, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.resizer = AreaResize(spatial_size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resizer(d[key])
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resizer.inverse(d[key])
        return d


def _load(keys: Sequence[str]) -> MapTransform:
    # the project's reader: DICOM (VOI LUT, MONOCHROME1 inverted), PNG, NIfTI, DICOM series, in the
    # project's axis conventions; imported here so that importing this module stays light
    from pneumoseg.data.readers import LoadChestImaged

    return LoadChestImaged(keys=list(keys), allow_missing_keys=True)


def _radiograph_labels() -> list[MapTransform]:
    """``label`` ``[1, H, W]`` in {0, 1} from ``label_rle`` (SIIM rows) or from a loaded mask file."""
    from pneumoseg.data.rle import DecodeSIIMRLEd

    return [
        # mask files are 0/1 or 0/255: any positive value is pneumothorax
        AsDiscreted(keys=LABEL, threshold=0.5, allow_missing_keys=True),
        DecodeSIIMRLEd(keys=LABEL_RLE, ref_key=IMAGE, output_key=LABEL, allow_missing_keys=True),
    ]


def _label_resize(spatial_size: Sequence[int]) -> Resized:
    # "nearest-exact" samples pixel centres (torch's "nearest" is shifted by half an input pixel) and keeps
    # the mask binary
    return Resized(keys=LABEL, spatial_size=spatial_size, mode="nearest-exact", allow_missing_keys=True)


def _radiograph_resize(spatial_size: int) -> list[MapTransform]:
    """Radiographs are shrunk (1024-3000 px to 512) by area averaging (:class:`AreaResized`); the label, if
    any, nearest."""
    size = (spatial_size, spatial_size)
    return [AreaResized(keys=IMAGE, spatial_size=size), _label_resize(size)]


def _ct_resize(spatial_size: Sequence[int]) -> list[MapTransform]:
    """CT slices in-plane: bilinear with anti-aliasing (also enlarges small slices smoothly); label nearest."""
    image = Resized(keys=IMAGE, spatial_size=spatial_size, mode="bilinear", anti_aliasing=True)
    return [image, _label_resize(spatial_size)]


def _clip01() -> ScaleIntensityRanged:
    # identity on [0, 1] with clipping: keeps the [0, 1] promise after intensity augmentation
    return ScaleIntensityRanged(keys=IMAGE, a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True)


def _ensure_type() -> EnsureTyped:
    return EnsureTyped(keys=[IMAGE, LABEL], dtype="float32", allow_missing_keys=True)


def augmentation_transforms(
    flip_axis: int = 1,
    prob: float = 0.5,
    rotate_deg: float = 10.0,
    scale: float = 0.1,
    translate: float = 0.05,
    spatial_size: int = _RADIOGRAPH.image_size,
    flip_prob: float = 0.5,
    brightness: float = 0.1,
    contrast: float = 0.2,
    gamma: Sequence[float] = (0.7, 1.5),
) -> list[MapTransform]:
    """2D training augmentation of ``image``/``label`` ``[1, S, S]`` (image in [0, 1] before and after).

    Args:
        flip_axis: spatial axis of a left-right flip: 1 (W) for radiographs ``[C, H, W]``, 0 (I) for CT
            slices ``[C, I, J]``. A flip swaps the patient's sides (and puts the heart on the right),
            which is harmless here: a pneumothorax is one on either side.
        prob: probability of each of affine, brightness, contrast, gamma.
        rotate_deg: maximal rotation (degrees); ``scale``: maximal relative zoom;
            ``translate``: maximal shift as a fraction of ``spatial_size``.
        flip_prob: probability of the left-right flip.
        brightness, contrast: maximal relative change; ``gamma``: range of the gamma exponent.
    """
    keys = [IMAGE, LABEL]
    shift = translate * spatial_size
    return [
        RandAffined(
            keys=keys,
            prob=prob,
            rotate_range=math.radians(rotate_deg),
            scale_range=(scale, scale),
            translate_range=(shift, shift),
            mode=("bilinear", "nearest"),  # nearest keeps the mask binary
            padding_mode="zeros",
            allow_missing_keys=True,
        ),
        RandFlipd(keys=keys, prob=flip_prob, spatial_axis=flip_axis, allow_missing_keys=True),
        RandScaleIntensityd(keys=IMAGE, factors=brightness, prob=prob),
        RandScaleIntensityFixedMeand(keys=IMAGE, factors=contrast, prob=prob, preserve_range=True),
        RandAdjustContrastd(keys=IMAGE, gamma=tuple(gamma), prob=prob),
        _clip01(),
    ]


# ========================================================================================== radiographs


def _radiograph_preprocessing(spatial_size: int, lower: float, upper: float) -> list[MapTransform]:
    return [
        _load([IMAGE, LABEL]),
        *_radiograph_labels(),
        *_radiograph_resize(spatial_size),
        PercentileScaleIntensityd(keys=IMAGE, lower=lower, upper=upper),
    ]


def radiograph_train_transforms(
    spatial_size: int = _RADIOGRAPH.image_size,
    lower: float = _RADIOGRAPH.lower_percentile,
    upper: float = _RADIOGRAPH.upper_percentile,
    prob: float = 0.5,
    rotate_deg: float = 10.0,
    scale: float = 0.1,
    translate: float = 0.05,
    flip_prob: float = 0.5,
    brightness: float = 0.1,
    contrast: float = 0.2,
    gamma: Sequence[float] = (0.7, 1.5),
) -> Compose:
    """Radiograph training chain: ``image`` ``[1, S, S]`` in [0, 1], ``label`` ``[1, S, S]`` in {0, 1}.

    ``lower``/``upper``: intensity percentiles mapped to 0 and 1; the rest: :func:`augmentation_transforms`.
    """
    return Compose(
        [
            *_radiograph_preprocessing(spatial_size, lower, upper),
            *augmentation_transforms(
                1, prob, rotate_deg, scale, translate, spatial_size, flip_prob, brightness, contrast, gamma
            ),
            _ensure_type(),
        ]
    )


def radiograph_validation_transforms(
    spatial_size: int = _RADIOGRAPH.image_size,
    lower: float = _RADIOGRAPH.lower_percentile,
    upper: float = _RADIOGRAPH.upper_percentile,
) -> Compose:
    """Radiograph validation chain: as training, without augmentation."""
    return Compose([*_radiograph_preprocessing(spatial_size, lower, upper), _ensure_type()])


def radiograph_inference_transforms(
    spatial_size: int = _RADIOGRAPH.image_size,
    lower: float = _RADIOGRAPH.lower_percentile,
    upper: float = _RADIOGRAPH.upper_percentile,
    load: bool = True,
) -> Compose:
    """Radiograph inference chain (image only; invertible: see :func:`invert_prediction_transforms`).
    ``load=False``: without the reader (the caller passes ``{"image": MetaTensor [1, H, W]}``)."""
    return Compose(
        [
            *([_load([IMAGE])] if load else []),
            AreaResized(keys=IMAGE, spatial_size=(spatial_size, spatial_size)),
            PercentileScaleIntensityd(keys=IMAGE, lower=lower, upper=upper),
            EnsureTyped(keys=IMAGE, dtype="float32"),
        ]
    )


# =================================================================================================== CT


def _ct_preprocessing(window: Sequence[float], orientation: str) -> list[MapTransform]:
    return [
        _load([IMAGE, LABEL]),
        AsDiscreted(keys=LABEL, threshold=0.5, allow_missing_keys=True),
        *_ct_orientation_and_window(window, orientation, [IMAGE, LABEL]),
    ]


def _ct_orientation_and_window(window: Sequence[float], orientation: str, keys: list[str]) -> list[MapTransform]:
    return [
        # the affine decides which array axis is which (NIfTI with a flipped / permuted affine, coronal or
        # sagittal series); MONAI's Orientationd flips / permutes to one orientation and records it for Invertd
        Orientationd(keys=keys, axcodes=orientation, labels=None, allow_missing_keys=True),
        ScaleIntensityRanged(keys=IMAGE, a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True),
    ]


_SAME_AXIS = {"L": "LR", "R": "LR", "A": "AP", "P": "AP", "S": "SI", "I": "SI"}


def orientation_with_last(orientation: str, code: str) -> str:
    """``orientation`` (axis codes) with the anatomical axis of ``code`` moved last, the others keeping their
    order: ``("RAS", "P") -> "RSA"``."""
    same_axis = next(c for c in orientation if c in _SAME_AXIS[code])
    return orientation.replace(same_axis, "") + same_axis


def slice_orientation(affine: Any, spatial_shape: Sequence[int], orientation: str = _CT.orientation) -> str:
    """The axis codes to bring a volume to: ``orientation``, except for a volume one voxel thick along one
    axis (a single slice, e.g. a coronal reformat saved alone), whose thin axis is put last, so that its one
    slice is what the model sees (RAS, a coronal slice: RSA)."""
    from nibabel.orientations import aff2axcodes

    thin = [d for d, n in enumerate(spatial_shape) if int(n) == 1]
    if len(thin) != 1:
        return orientation
    return orientation_with_last(orientation, aff2axcodes(np.asarray(affine, dtype=np.float64))[thin[0]])


def ct_train_transforms(
    spatial_size: int = _CT.image_size,
    pos: float = 1.0,
    neg: float = 1.0,
    num_samples: int = 4,
    window: Sequence[float] = _CT.window,
    orientation: str = _CT.orientation,
    prob: float = 0.5,
    rotate_deg: float = 10.0,
    scale: float = 0.1,
    translate: float = 0.05,
    flip_prob: float = 0.5,
) -> Compose:
    """CT training chain: ``num_samples`` axial slices per volume, each ``image``/``label`` ``[1, S, S]``.

    Args:
        pos, neg: relative frequency of slices centred on pneumothorax voxels vs. on other voxels
            (``RandCropByPosNegLabeld``); a volume without pneumothorax yields negative slices only.
        window: HU mapped to 0 and 1 (default: lung window W1500/L-600), clipped.
        orientation: MONAI axis codes the volume is brought to first (the last axis is the slice axis).
        The rest: :func:`augmentation_transforms` (left-right is axis 0 of a ``[C, I, J]`` slice).
    """
    keys = [IMAGE, LABEL]
    return Compose(
        [
            *_ct_preprocessing(window, orientation),
            RandCropByPosNegLabeld(
                keys=keys, label_key=LABEL, spatial_size=(-1, -1, 1), pos=pos, neg=neg, num_samples=num_samples
            ),
            SqueezeDimd(keys=keys, dim=3),  # [1, I, J, 1] -> [1, I, J]
            *_ct_resize((spatial_size, spatial_size)),
            *augmentation_transforms(0, prob, rotate_deg, scale, translate, spatial_size, flip_prob),
            _ensure_type(),
        ]
    )


def ct_validation_transforms(
    spatial_size: int = _CT.image_size, window: Sequence[float] = _CT.window, orientation: str = _CT.orientation
) -> Compose:
    """CT validation chain: whole volume, oriented, in-plane resized: ``image``/``label`` ``[1, S, S, K]``."""
    return Compose(
        [*_ct_preprocessing(window, orientation), *_ct_resize((spatial_size, spatial_size, -1)), _ensure_type()]
    )


def ct_inference_transforms(
    spatial_size: int = _CT.image_size,
    window: Sequence[float] = _CT.window,
    orientation: str = _CT.orientation,
    load: bool = True,
) -> Compose:
    """CT inference chain (image only, ``[1, S, S, K]``; invertible, see :func:`invert_prediction_transforms`).
    ``load=False``: without the reader (the caller passes ``{"image": MetaTensor [1, I, J, K]}``)."""
    return Compose(
        [
            *([_load([IMAGE])] if load else []),
            *_ct_orientation_and_window(window, orientation, [IMAGE]),
            Resized(keys=IMAGE, spatial_size=(spatial_size, spatial_size, -1), mode="bilinear", anti_aliasing=True),
            EnsureTyped(keys=IMAGE, dtype="float32"),
        ]
    )


def record_validation_transforms(record: Any, image_kind: str) -> Compose:
    """The validation chain of ``image_kind`` exactly as ``record`` (a trained model's
    :class:`~pneumoseg.model_record.ModelRecord`) says the model was fed: what evaluation runs."""
    pp = record.preprocessing[image_kind]
    if isinstance(pp, CTPreprocessing):
        return ct_validation_transforms(pp.image_size, pp.window, pp.orientation)
    return radiograph_validation_transforms(pp.image_size, pp.lower_percentile, pp.upper_percentile)


def invert_prediction_transforms(
    preprocessing: Compose, pred_key: str = PRED, threshold: float | None = 0.5, sigmoid: bool = True
) -> Compose:
    """Post-processing that maps ``pred`` (model output for one sample, ``[1, S, S]`` or ``[1, S, S, K]``)
    back to the geometry of the source image, using the spatial operations ``preprocessing`` recorded
    on ``image``.

    Args:
        preprocessing: the inference chain that produced ``image`` (e.g. :func:`radiograph_inference_transforms`).
        sigmoid: apply a sigmoid first (the model outputs logits).
        threshold: binarise after inverting (``None``: keep probabilities).
    """
    from monai.transforms import Activationsd

    chain: list = [Activationsd(keys=pred_key, sigmoid=True)] if sigmoid else []
    # probabilities are resampled (bi)linearly and thresholded afterwards: smoother edges than nearest
    chain.append(Invertd(keys=pred_key, transform=preprocessing, orig_keys=IMAGE, nearest_interp=False))
    if threshold is not None:
        chain.append(AsDiscreted(keys=pred_key, threshold=threshold))
    return Compose(chain)
