"""Synthetic chest phantoms: the project's embedded default data (nothing is downloaded).

``pneumoseg synth OUT_DIR`` writes

* chest radiograph phantoms as CR DICOM in the SIIM-ACR layout
  ``OUT/dicom-images-train/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` with the SIIM RLE
  CSV ``OUT/train-rle.csv`` (ImageId = SOPInstanceUID, one row per connected pneumothorax region, ``-1`` for
  none), mixing MONOCHROME1/2, 12-16 bit, uncompressed and lossless-compressed transfer syntaxes, and
  PixelSpacing / ImagerPixelSpacing / no spacing;
* chest CT phantoms as DICOM series ``OUT/ct-dicom/<case>/slice_XXX.dcm`` and the same volumes as NIfTI
  ``OUT/ct-nifti/images/<case>.nii.gz`` with their pneumothorax masks ``OUT/ct-nifti/labels/<case>.nii.gz``.

Anatomy: body outline, two air-filled lungs with branching vessel markings, ribs, clavicles, spine, heart
(patient's left = image right on a PA radiograph), mediastinum and noise. A pneumothorax is modelled as the
lung having collapsed towards its hilum: the collapsed lung is the lung shape contracted about a
lower-medial (CT: posterior-medial) point, so the air gap left between it and the chest wall lies along
the apical/lateral (CT: anterior/lateral) pleura. The gap has no lung markings and is bounded by a thin
bright visceral pleural line (part of the collapsed lung, not of the mask); the mask is exactly the gap.

Everything is drawn from one ``numpy.random.Generator`` per case, seeded by ``(seed, kind, index)``, so the
output does not depend on ``--workers`` and the same seed gives byte-identical files.

Geometry conventions: radiographs ``[H, W]`` = (DICOM Rows, Columns), as ``pixel_array``; CT volumes
``[I, J, K]`` = (column, row, slice) as nibabel gives for NIfTI, with the RAS affine; the DICOM series is
LPS (``ImageOrientationPatient`` = 1,0,0,0,1,0, ``ImagePositionPatient`` z growing with K).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage
from scipy.special import expit

from pneumoseg.data.rle import EMPTY_RLE, encode_siim_rle, write_siim_csv

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "PNEUMOTHORAX_KINDS",
    "RadiographCase",
    "RadiographFeatures",
    "CTCase",
    "CTFeatures",
    "SynthSummary",
    "make_radiograph_phantom",
    "make_ct_phantom",
    "ct_affine_ras",
    "write_radiograph_dicom",
    "write_ct_dicom_series",
    "write_ct_nifti",
    "mask_to_rle_rows",
    "plan_radiographs",
    "plan_ct",
    "draw_radiograph_case",
    "draw_ct_case",
    "synthesize",
    "add_subcommand",
    "run",
]

RADIOGRAPH_DIR = "dicom-images-train"
RLE_CSV = "train-rle.csv"
CT_DICOM_DIR = "ct-dicom"
CT_NIFTI_DIR = "ct-nifti"

# lossless only, so that the stored pixels (and hence the masks) stay exact
TRANSFER_SYNTAXES = {
    "explicit": "1.2.840.10008.1.2.1",  # Explicit VR Little Endian (uncompressed)
    "rle": "1.2.840.10008.1.2.5",  # RLE Lossless, pydicom's native encoder
    "jpeg2000": "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless, pylibjpeg-openjpeg
    "deflated": "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian (zlib on write)
}
_CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_EXPLICIT_VR_LE = TRANSFER_SYNTAXES["explicit"]
_MANUFACTURER = "pneumoseg synthetic phantom"
_CT_INTERCEPT = -1024
_MARKER = ".pneumoseg-synth"
_OUTPUTS = (
    RADIOGRAPH_DIR,
    RLE_CSV,
    CT_DICOM_DIR,
    CT_NIFTI_DIR,
)  # stored = HU + 1024 as unsigned 12 bit, as many scanners do


def _uid(*entropy: object) -> str:
    """Deterministic DICOM UID (pydicom's prefix + hash of the entropy sources)."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["pneumoseg-synth", *map(str, entropy)]))


def _case_rng(seed: int, kind: int, index: int) -> np.random.Generator:
    # kind separates radiographs (0), CT (1) and the plan (2) so adding CT cases changes no radiograph
    return np.random.default_rng([int(seed), kind, index])


# ================================================================================== radiograph drawing


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise ``shape`` in about [-1, 1]: a ``cells x cells`` random grid, cubic-upsampled."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return ndimage.zoom(coarse, (shape[0] / cells, shape[1] / cells), order=3, grid_mode=True, mode="nearest")


def _branching_tree(
    rng: np.random.Generator, root: np.ndarray, direction: np.ndarray, length: float, depth: int, spread: float
) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Segments ``(start, end, generation)`` of a random binary tree (vessel-like branching), 2D or 3D."""
    dim = root.shape[0]
    segments: list[tuple[np.ndarray, np.ndarray, int]] = []
    stack = [(root, np.asarray(direction, float) / np.linalg.norm(direction), length, 0)]
    while stack:
        start, d, seg_len, gen = stack.pop()
        d = d + rng.normal(0, 0.15, dim)
        d /= np.linalg.norm(d)
        end = start + d * seg_len
        segments.append((start, end, gen))
        if gen < depth:
            for sign in (-1.0, 1.0):
                # rotate in a random plane containing d (2D: the only plane)
                perp = rng.normal(0, 1, dim)
                perp -= perp.dot(d) * d
                perp /= np.linalg.norm(perp) + 1e-9
                if dim == 2:
                    perp = np.array([-d[1], d[0]]) * sign
                theta = spread * rng.uniform(0.5, 1.0)
                child = np.cos(theta) * d + np.sin(theta) * perp
                stack.append((end, child, seg_len * rng.uniform(0.62, 0.8), gen + 1))
    return segments


def _vessel_canvas(rng: np.random.Generator, trees: Iterable[tuple[np.ndarray, float]], res: int) -> np.ndarray:
    """Vessel markings ``[res, res]`` in [0, 1] over normalised coordinates [-1, 1]^2 (row = v, col = u).

    Lines are rasterised anti-aliased and blurred: much cheaper than a distance field to hundreds of
    segments, and the result is only sampled (bilinearly) afterwards.
    """
    from skimage.draw import line_aa

    thin = np.zeros((res, res), np.float32)
    thick = np.zeros((res, res), np.float32)
    scale = (res - 1) / 2.0
    for root, angle in trees:
        direction = np.array([np.cos(angle), np.sin(angle)])
        for start, end, gen in _branching_tree(rng, root, direction, rng.uniform(0.12, 0.18), 5, 0.55):
            (c0, r0), (c1, r1) = np.round((start + 1) * scale).astype(int), np.round((end + 1) * scale).astype(int)
            rr, cc, val = line_aa(r0, c0, r1, c1)
            ok = (rr >= 0) & (rr < res) & (cc >= 0) & (cc < res)
            target = thick if gen <= 1 else thin
            amp = 0.8**gen
            np.maximum.at(target, (rr[ok], cc[ok]), (val[ok] * amp).astype(np.float32))
    out = ndimage.gaussian_filter(thin, res / 512) * 2.5 + ndimage.gaussian_filter(thick, res / 170) * 4.0
    return np.clip(out, 0, 1)


@dataclass(frozen=True)
class _Lung:
    """A 2D lung: region ``f <= 1`` with ``f = max(elliptic radius, diaphragm level)`` (normalised coords)."""

    cx: float
    cy: float
    a: float  # half width at mid height
    b: float  # half height
    medial: float  # +1 if the medial side is towards +u

    def level(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        yy = (v - self.cy) / self.b
        # somewhat narrower apex than base
        xx = (u - self.cx) / (self.a * np.clip(0.88 + 0.18 * yy, 0.6, None))
        radius = np.sqrt(xx * xx + yy * yy)
        # diaphragm dome cuts the base: highest mid-lung, deepest laterally (costophrenic angle)
        xa = np.clip((u - self.cx) / self.a, -1.2, 1.2)
        dome = yy / (0.62 + 0.3 * xa * xa - 0.08 * xa * self.medial)
        return np.maximum(radius, dome)

    def hilum(self) -> tuple[float, float]:
        return self.cx + self.medial * 0.55 * self.a, self.cy + 0.15 * self.b


@dataclass(frozen=True)
class _Background:
    """Smooth anatomy at low resolution and where it put the heart (normalised coordinates)."""

    tissue: np.ndarray  # [base, base] attenuation
    shift: tuple[float, float]  # (u, v) offset of the whole chest
    heart_c: tuple[float, float]
    heart_r: tuple[float, float]


def _chest_background(rng: np.random.Generator, base: int, hard: bool = False) -> _Background:
    """Body, shoulders, mediastinum, spine, heart, posterior ribs, clavicles at ``base x base``.

    ``hard``: denser posterior ribs with sharper cortices, and anterior ribs (fainter, descending laterally),
    so that rib edges cross the apical and lateral pleura as they do on real films."""
    f32 = np.float32
    ub = np.linspace(-1, 1, base, dtype=f32)[None, :]
    vb = np.linspace(-1, 1, base, dtype=f32)[:, None]
    shift_u, shift_v = rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)
    u0, v0 = ub - shift_u, vb - shift_v
    body_w = rng.uniform(0.8, 0.92)
    body_level = (np.abs(u0) / (body_w * (1 + 0.08 * v0))) ** 4 + (np.abs(v0 - 0.15) / 1.3) ** 6
    body = expit((1 - body_level) * 25)
    tissue = body * (0.42 + 0.18 * (1 - u0 * u0)) + 0.04
    # shoulders/arms darker at the top corners: less tissue
    tissue -= 0.08 * body * np.clip(-v0 - 0.6, 0, None) * np.abs(u0)
    medi_half = 0.08 + 0.05 * np.clip(v0 + 0.2, 0, None)
    tissue += 0.16 * expit((medi_half - np.abs(u0 - 0.02)) * 60) * expit((0.55 - v0) * 20) * body
    tissue += np.exp(-((u0 / 0.05) ** 4)) * 0.1 * body  # spine
    heart_c = (rng.uniform(0.08, 0.16), rng.uniform(0.22, 0.32))
    heart_r = (rng.uniform(0.22, 0.3), rng.uniform(0.18, 0.24))
    heart_level = ((u0 - heart_c[0]) / heart_r[0]) ** 2 + ((v0 - heart_c[1]) / heart_r[1]) ** 2
    tissue += 0.15 * expit((1 - heart_level) * 8)
    # posterior ribs: bright curved bands (with a brighter cortex) from the spine out to the chest wall
    ribs = np.zeros_like(tissue)
    au = np.abs(u0)
    gap, top, thick = rng.uniform(0.11, 0.13), rng.uniform(-0.78, -0.7), rng.uniform(0.03, 0.04)
    for i in range(10):
        curve = top + i * gap - 0.1 * au + 0.55 * au * au
        dist = np.abs(v0 - curve) / thick
        band = np.clip(1 - dist, 0, 1) ** 0.5 + 0.6 * np.exp(-(((dist - 0.9) / 0.15) ** 2))
        ribs += band * ((au > 0.05) & (au < body_w * 0.97))
    clavicle = np.exp(-(((v0 - (-0.72 + 0.22 * (au - 0.3) ** 2 - 0.05 * au)) / 0.03) ** 2)) * expit((0.55 - au) * 30)
    tissue += body * (0.065 * ribs + 0.1 * clavicle)
    tissue += 0.03 * _smooth_noise(rng, (base, base), 6) * body
    if hard:  # drawn after everything else, so the easy mode's random stream is unchanged
        tissue += body * rng.uniform(0.02, 0.05) * ribs
        anterior = np.zeros_like(tissue)
        top_a, gap_a = rng.uniform(-0.6, -0.45), rng.uniform(0.15, 0.19)
        for i in range(5):
            curve = top_a + i * gap_a + 0.35 * au - 0.25 * au * au
            anterior += np.exp(-(((v0 - curve) / (0.8 * thick)) ** 2)) * ((au > 0.12) & (au < body_w * 0.9))
        tissue += body * rng.uniform(0.03, 0.05) * anterior
    return _Background(tissue.astype(f32), (shift_u, shift_v), heart_c, heart_r)


PNEUMOTHORAX_KINDS = ("apical", "lateral rim", "moderate")
"""Kinds of hard-mode pneumothorax: a small apical cap, a thin rim along the lateral chest wall, a moderate
collapse (the easy mode's smaller half)."""


@dataclass(frozen=True)
class _SubtlePneumothorax:
    """A hard-mode pneumothorax: collapse factors ``su`` / ``sv`` (1 = none) about a point at
    (``hilum_u`` x half width towards the mediastinum, ``hilum_v`` x half height below the lung centre), the
    fraction of the lung markings left in the gap, its extra lucency and the visceral pleural line
    (brightness, 0 = absent; width in pixels)."""

    kind: str
    su: float
    sv: float
    hilum_u: float
    hilum_v: float
    gap_markings: float
    lucency: float
    pleura: float
    pleura_px: float


def _draw_subtle_pneumothorax(rng: np.random.Generator) -> _SubtlePneumothorax:
    kind = PNEUMOTHORAX_KINDS[int(rng.choice(3, p=[0.35, 0.35, 0.3]))]
    if kind == "apical":  # collapse about a point low in the lung: the air collects over the apex
        sv, su, hilum_u, hilum_v = rng.uniform(0.9, 0.96), rng.uniform(0.985, 1.0), 0.2, 0.95
    elif kind == "lateral rim":  # collapse towards the mediastinum: a thin band along the lateral wall
        su, sv, hilum_u, hilum_v = rng.uniform(0.86, 0.94), rng.uniform(0.97, 0.995), 0.9, 0.2
    else:
        sv = rng.uniform(0.78, 0.92)
        su, hilum_u, hilum_v = min(0.98, sv * rng.uniform(1.0, 1.1)), 0.55, 0.55
    pleura = 0.0 if rng.uniform() < 0.15 else rng.uniform(0.03, 0.08)
    return _SubtlePneumothorax(
        kind, float(su), float(sv), hilum_u, hilum_v, float(rng.uniform(0.1, 0.5)), float(rng.uniform(0.01, 0.04)),
        float(pleura), float(rng.uniform(1.0, 2.0)),
    )  # fmt: skip


def _draw_lung(
    image: np.ndarray,
    mask: np.ndarray,
    lung: _Lung,
    u: np.ndarray,
    v: np.ndarray,
    bg: _Background,
    vessels: np.ndarray,
    lung_dark: float,
    rng: np.random.Generator | None,
    subtle: _SubtlePneumothorax | None = None,
) -> None:
    """Darken ``lung`` into ``image`` with its markings, in place, within the lung's bounding box.

    With ``rng`` (the pneumothorax side) the lung collapses towards a lower-medial point: the gap to the
    chest wall becomes marking-free air bounded by a bright pleural line, and is added to ``mask``.
    ``subtle`` (hard mode) replaces the collapse, the gap's look and the pleural line by its values.
    """
    res = vessels.shape[0]
    c0, c1 = np.searchsorted(u, [lung.cx - 1.4 * lung.a, lung.cx + 1.4 * lung.a])
    r0, r1 = np.searchsorted(v, [lung.cy - 1.05 * lung.b, lung.cy + 1.1 * lung.b])
    uu, vv = u[None, c0:c1], v[r0:r1, None]
    inside = lung.level(uu, vv) <= 1
    heart_box = ((uu - bg.heart_c[0]) / bg.heart_r[0]) ** 2 + ((vv - bg.heart_c[1]) / bg.heart_r[1]) ** 2
    inside &= heart_box > 1.05
    # collapsed-lung coordinates: identity unless this lung has the pneumothorax
    su = sv = 1.0
    hu_, hv_ = lung.hilum()
    if subtle is not None:
        su, sv = subtle.su, subtle.sv
        hu_ = lung.cx + lung.medial * subtle.hilum_u * lung.a
        hv_ = lung.cy + subtle.hilum_v * lung.b
    elif rng is not None:
        kind = rng.uniform()
        sv = rng.uniform(0.9, 0.97) if kind < 0.35 else rng.uniform(0.6, 0.9)  # small apical rim .. large
        su = min(0.98, sv * rng.uniform(1.0, 1.12))
        hv_ = lung.cy + 0.55 * lung.b
    cu = hu_ + (uu - hu_) / su
    cv = hv_ + (vv - hv_) / sv
    collapsed_level = lung.level(cu, cv)
    collapsed = inside & (collapsed_level <= 1)
    gap = inside & ~collapsed
    if rng is not None:
        # slivers cut off by the heart border would become spurious few-pixel "instances": they stay lung
        labels, n = ndimage.label(gap)
        if n > 1:
            areas = np.bincount(labels.ravel())[1:]
            gap = np.isin(labels, 1 + np.flatnonzero(areas >= 0.2 * areas.max()))
            collapsed = inside & ~gap
    rows, cols = np.nonzero(collapsed)
    coords = np.stack([(cv[rows, 0] + 1) * (res - 1) / 2, (cu[0, cols] + 1) * (res - 1) / 2])
    markings = np.zeros(inside.shape, np.float32)
    markings[rows, cols] = ndimage.map_coordinates(vessels, coords, order=1, mode="constant")
    sub = image[r0:r1, c0:c1]
    # air lowers attenuation; the collapsed lung is denser the more it collapsed
    density = 1.0 + 0.6 * (1 - su * sv)
    sub -= lung_dark * inside
    sub += collapsed * (0.16 * markings * density + 0.03 * (density - 1))
    if subtle is not None:
        # markings only faded in the gap (lung in front of / behind the air still projects onto it), little
        # extra lucency, a faint or absent visceral pleural line
        if subtle.gap_markings > 0:
            grow, gcol = np.nonzero(gap)
            at = np.stack([(vv[grow, 0] + 1) * (res - 1) / 2, (uu[0, gcol] + 1) * (res - 1) / 2])
            sub[grow, gcol] += 0.16 * subtle.gap_markings * ndimage.map_coordinates(vessels, at, order=1)
        sub -= subtle.lucency * gap
        pleura_w = subtle.pleura_px * (2.0 / image.shape[1]) / (lung.a * su)
        sub += subtle.pleura * (collapsed & (collapsed_level > 1 - pleura_w))
        mask[r0:r1, c0:c1] |= gap
    elif rng is not None:
        sub -= 0.05 * gap  # hyperlucent: no lung tissue at all
        pleura_w = rng.uniform(1.5, 2.5) * (2.0 / image.shape[1]) / (lung.a * su)  # 1.5-2.5 pixels
        pleura = collapsed & (collapsed_level > 1 - pleura_w)
        sub += rng.uniform(0.1, 0.14) * pleura
        mask[r0:r1, c0:c1] |= gap


def _curve_distance(points: np.ndarray, size: int) -> np.ndarray:
    """Distance in pixels ``[size, size]`` from every pixel to the polyline ``points [N, 2]`` (normalised
    ``(u, v)`` in [-1, 1]): the curve is rasterised, then one Euclidean distance transform."""
    from skimage.draw import line

    canvas = np.ones((size, size), bool)
    pix = np.round((np.asarray(points) + 1) * (size - 1) / 2).astype(int)
    for (c0, r0), (c1, r1) in zip(pix[:-1], pix[1:]):
        rr, cc = line(r0, c0, r1, c1)
        ok = (rr >= 0) & (rr < size) & (cc >= 0) & (cc < size)
        canvas[rr[ok], cc[ok]] = False
    return ndimage.distance_transform_edt(canvas).astype(np.float32)


def _bezier(p0: Sequence[float], p1: Sequence[float], p2: Sequence[float], n: int = 64) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * np.asarray(p0) + 2 * (1 - t) * t * np.asarray(p1) + t**2 * np.asarray(p2)


def _draw_skin_fold(image: np.ndarray, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> None:
    """A skin fold over the lateral chest, in place: a long curved edge, denser on its medial side, with at
    most a faint line, that runs across lung markings and past the lung outline (a pneumothorax mimic)."""
    side = 1.0 if rng.uniform() < 0.5 else -1.0
    u0, v0 = side * rng.uniform(0.45, 0.72), rng.uniform(-0.2, 0.2)
    bend, half = rng.uniform(0.1, 0.5), rng.uniform(0.35, 0.7)
    uu, vv = u[None, :], v[:, None]
    edge = u0 - side * bend * (vv - v0) ** 2  # convex towards the chest wall, like the pleura
    px = 2.0 / image.shape[1]
    signed = side * (edge - uu) / px  # > 0 on the medial (denser) side, in pixels
    extent = expit((half - np.abs(vv - v0)) / 0.05)
    step = rng.uniform(0.02, 0.05) * expit(signed / 1.5) * np.exp(-np.clip(signed, 0, None) / (0.08 / px))
    line = rng.uniform(0.0, 0.04) * np.exp(-((signed / 1.2) ** 2))
    image += ((step + line) * extent).astype(np.float32)


def _draw_devices(image: np.ndarray, rng: np.random.Generator) -> list[str]:
    """Chest tube, central line, ECG leads with electrodes, in place (any image, independent of the label:
    a tube must not be a shortcut to the answer); the names of what was drawn."""
    size = image.shape[0]
    px = 2.0 / size
    drawn: list[str] = []
    if rng.uniform() < 0.3:  # chest tube: enters laterally low, curves up towards the apex; radio-opaque walls
        side = 1.0 if rng.uniform() < 0.5 else -1.0
        start = (side * rng.uniform(0.75, 0.9), rng.uniform(0.2, 0.45))
        bend = (side * rng.uniform(0.55, 0.7), rng.uniform(-0.1, 0.1))
        end = (side * rng.uniform(0.3, 0.5), rng.uniform(-0.65, -0.45))
        d = _curve_distance(_bezier(start, bend, end), size) * px
        radius = rng.uniform(0.008, 0.014)
        image += rng.uniform(0.12, 0.22) * np.exp(-(((d - radius) / (0.35 * radius)) ** 2))
        drawn.append("chest tube")
    if rng.uniform() < 0.3:  # central venous line: subclavian, down into the mediastinum
        side = 1.0 if rng.uniform() < 0.5 else -1.0
        start = (side * rng.uniform(0.35, 0.55), rng.uniform(-0.85, -0.7))
        mid = (side * rng.uniform(0.1, 0.2), rng.uniform(-0.6, -0.5))
        end = (rng.uniform(-0.02, 0.06), rng.uniform(-0.2, 0.05))
        d = _curve_distance(_bezier(start, mid, end), size)
        image += rng.uniform(0.1, 0.2) * np.exp(-((d / max(0.8, 0.003 / px)) ** 2))
        drawn.append("central line")
    if rng.uniform() < 0.4:  # ECG leads: thin wires across the chest, ring electrodes at their ends
        for _ in range(int(rng.integers(1, 4))):
            start = (rng.uniform(-0.9, 0.9), rng.uniform(-0.95, 0.9))
            end = (rng.uniform(-0.8, 0.8), rng.uniform(-0.5, 0.9))
            mid = ((start[0] + end[0]) / 2 + rng.uniform(-0.3, 0.3), (start[1] + end[1]) / 2 + rng.uniform(-0.3, 0.3))
            d = _curve_distance(_bezier(start, mid, end), size)
            image += rng.uniform(0.06, 0.14) * np.exp(-((d / max(0.6, 0.002 / px)) ** 2))
            ring = np.hypot(*(np.mgrid[:size, :size] - (np.asarray(end[::-1]) + 1)[:, None, None] * (size - 1) / 2))
            ring_r = 0.025 / px
            image += rng.uniform(0.15, 0.25) * np.exp(-(((ring - ring_r) / max(0.8, 0.2 * ring_r)) ** 2))
        drawn.append("ECG leads")
    return drawn


def _position(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, float]]:
    """Patient positioning: rotation, magnification and a shift of the whole chest (image and mask bilinear,
    the mask thresholded at 0.5, so it stays the label of the image it goes with; fragments below 5 % of the
    largest region, which a thin rim resampled can leave, are dropped); the (degrees, scale, du, dv)."""
    size = image.shape[0]
    angle, scale = rng.uniform(-7, 7), rng.uniform(0.9, 1.08)
    shift = rng.uniform(-0.05, 0.05, 2) * size
    theta = np.deg2rad(angle)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]) / scale
    centre = (np.asarray(image.shape, float) - 1) / 2
    offset = centre - rot @ (centre + shift)
    moved = ndimage.affine_transform(image, rot, offset, order=1, mode="nearest")
    moved_mask = ndimage.affine_transform(mask.astype(np.float32), rot, offset, order=1, mode="constant") > 0.5
    labels, n = ndimage.label(moved_mask, structure=np.ones((3, 3), bool))
    if n > 1:
        areas = np.bincount(labels.ravel())[1:]
        moved_mask = np.isin(labels, 1 + np.flatnonzero(areas >= 0.05 * areas.max()))
    return moved.astype(np.float32), moved_mask, (float(angle), float(scale), float(shift[1]), float(shift[0]))


def _detector(image: np.ndarray, rng: np.random.Generator, bits_stored: int, hard: bool = False) -> np.ndarray:
    """Noise, a random gamma and a window into ``[0, 2**bits_stored - 1]``: uint16 ``[H, W]``.

    ``hard``: exposure varies per image too: an over/under-exposure gain and offset, an anode-heel gradient,
    detector blur, more noise and a wider gamma range."""
    f32 = np.float32
    if hard:
        size = image.shape[0]
        ramp = np.linspace(-1, 1, size, dtype=f32)
        heel = rng.uniform(-0.06, 0.06) * (ramp[:, None] if rng.uniform() < 0.5 else ramp[None, :])
        image = image * f32(rng.uniform(0.8, 1.2)) + f32(rng.uniform(-0.08, 0.08)) + heel
        image = ndimage.gaussian_filter(image, rng.uniform(0.0, 1.0) * size / 512)
        image += rng.standard_normal(image.shape, dtype=f32) * f32(rng.uniform(0.008, 0.03))
    else:
        image += rng.standard_normal(image.shape, dtype=f32) * f32(rng.uniform(0.006, 0.014))
    image = np.clip(image, 0, 1.2) / 1.2
    image **= f32(rng.uniform(0.6, 1.6) if hard else rng.uniform(0.8, 1.2))
    top_value = 2**bits_stored - 1
    lo, hi = rng.uniform(0.02, 0.1) * top_value, rng.uniform(0.85, 0.98) * top_value
    return np.clip(np.rint(lo + image * (hi - lo)), 0, top_value).astype(np.uint16)


@dataclass(frozen=True)
class RadiographFeatures:
    """What a radiograph phantom holds (for tests and for reading benchmark results by case).

    ``pneumothorax``: per lung with one (``"right"`` = image left / ``"left"``), the hard-mode kind
    (:data:`PNEUMOTHORAX_KINDS`; ``"easy"`` in the easy mode) and its visceral pleural line brightness
    (0 = absent). ``skin_folds``: how many skin-fold mimics; ``devices``: chest tube, central line, ECG
    leads; ``positioning``: (rotation degrees, magnification, shift columns, shift rows in pixels)."""

    hard: bool
    pneumothorax: tuple[tuple[str, str, float], ...] = ()
    skin_folds: int = 0
    devices: tuple[str, ...] = ()
    positioning: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 0.0)


def make_radiograph_phantom(
    size: int = 1024,
    positive: bool = False,
    rng: np.random.Generator | None = None,
    bits_stored: int = 12,
    base: int = 256,
    hard: bool = False,
    return_features: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, RadiographFeatures]:
    """Draw one PA chest radiograph phantom.

    Args:
        size: output rows = columns.
        positive: draw a pneumothorax (side, size from small apical rim to large, all random).
        rng: random generator (default: a fresh unseeded one).
        bits_stored: 12-16; the image uses most of ``[0, 2**bits_stored - 1]``.
        base: resolution at which smooth anatomy (body, bones, heart) is drawn before upsampling.
        hard: the hard mode (``docs/data.md``): subtle pneumothoraces (small apical cap, thin lateral rim or
            moderate; markings only faded in the gap, faint or absent pleural line; 15 % of positives
            bilateral), skin-fold mimics, chest tubes / central lines / ECG leads, denser and anterior ribs,
            per-image exposure, gamma, blur and noise, and patient positioning (rotation, magnification,
            shift). The easy mode's images are unchanged by its existence (same random stream).
        return_features: also return the :class:`RadiographFeatures` drawn.

    Returns:
        ``image`` uint16 ``[H, W]`` (display look: higher = more attenuation = brighter, as MONOCHROME2)
        and ``mask`` bool ``[H, W]``, the pneumothorax (all False if not ``positive``)
        (and the features with ``return_features``).
    """
    rng = np.random.default_rng() if rng is None else rng
    if not 12 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be 12-16, got {bits_stored}")
    f32 = np.float32
    bg = _chest_background(rng, min(base, size), hard)
    image = ndimage.zoom(bg.tissue, size / bg.tissue.shape[0], order=1, grid_mode=True, mode="nearest")
    mask = np.zeros((size, size), bool)
    # lungs, pneumothorax and fine markings at full resolution, in the same coordinates as the background
    u = np.linspace(-1, 1, size, dtype=f32) - f32(bg.shift[0])
    v = np.linspace(-1, 1, size, dtype=f32) - f32(bg.shift[1])
    lungs = [
        _Lung(
            rng.uniform(-0.43, -0.37), rng.uniform(-0.12, -0.06), rng.uniform(0.27, 0.32), rng.uniform(0.55, 0.62), 1
        ),
        _Lung(rng.uniform(0.37, 0.43), rng.uniform(-0.12, -0.06), rng.uniform(0.24, 0.29), rng.uniform(0.52, 0.6), -1),
    ]
    ptx_side = int(rng.integers(0, 2)) if positive else -1
    # three vessel trees per hilum, pointing up-laterally, laterally and down-laterally
    trees = [
        (np.array(lung.hilum()), angle)
        for lung in lungs
        for angle in np.pi / 2 + lung.medial * np.array([0.7, 1.4, 2.3]) + rng.uniform(-0.2, 0.2, 3)
    ]
    vessels = _vessel_canvas(rng, trees, 512)
    lung_dark = rng.uniform(0.3, 0.36)
    if not hard:
        for side, lung in enumerate(lungs):
            _draw_lung(image, mask, lung, u, v, bg, vessels, lung_dark, rng if side == ptx_side else None)
        easy = ((("right", "left")[ptx_side], "easy", 0.12),) if positive else ()
        features = RadiographFeatures(False, easy)
        out = _detector(image, rng, bits_stored), mask
        return (*out, features) if return_features else out
    sides = {ptx_side} if positive else set()
    if positive and rng.uniform() < 0.15:
        sides = {0, 1}
    drawn = []
    for side, lung in enumerate(lungs):
        subtle = _draw_subtle_pneumothorax(rng) if side in sides else None
        _draw_lung(image, mask, lung, u, v, bg, vessels, lung_dark, rng if subtle else None, subtle)
        if subtle is not None:
            drawn.append((("right", "left")[side], subtle.kind, subtle.pleura))
    folds = int(rng.choice([0, 0, 1, 1, 2]))  # on any image: a mimic must not be a cue for either label
    for _ in range(folds):
        _draw_skin_fold(image, u, v, rng)
    devices = _draw_devices(image, rng)
    image, mask, positioning = _position(image, mask, rng)
    features = RadiographFeatures(True, tuple(drawn), folds, tuple(devices), positioning)
    out = _detector(image, rng, bits_stored, hard=True), mask
    return (*out, features) if return_features else out


def mask_to_rle_rows(mask: np.ndarray) -> list[str]:
    """SIIM RLE rows of a ``[H, W]`` mask: one per 8-connected region (as the challenge lists instances),
    ``["-1"]`` if empty."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return [EMPTY_RLE]
    return [encode_siim_rle(labels == i) for i in range(1, n + 1)]


# ===================================================================================== radiograph files


@dataclass(frozen=True)
class RadiographCase:
    """Everything needed to draw and write one radiograph; fixed by the plan, so workers agree."""

    index: int
    positive: bool
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    photometric: str  # MONOCHROME1 | MONOCHROME2
    bits_stored: int
    transfer_syntax: str  # key of TRANSFER_SYNTAXES
    spacing_tag: str | None  # PixelSpacing | ImagerPixelSpacing | None
    spacing_mm: float
    study_date: str
    hard: bool = False  # draw with make_radiograph_phantom(hard=True)

    @property
    def relative_path(self) -> str:
        return f"{RADIOGRAPH_DIR}/{self.study_uid}/{self.series_uid}/{self.sop_uid}.dcm"


def _phantom_dataset(
    sop_class: str, sop_uid: str, study_uid: str, series_uid: str, patient_id: str, study_date: str
) -> Dataset:
    """The header every phantom file shares: file meta (explicit VR little endian), UIDs, patient, dates."""
    from pydicom.dataset import Dataset, FileMetaDataset

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = _EXPLICIT_VR_LE
    ds.file_meta.ImplementationClassUID = _uid("implementation")
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.PatientName = f"Phantom^{patient_id}"
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    return ds


def write_radiograph_dicom(path: str | Path, image: np.ndarray, case: RadiographCase) -> Path:
    """Write a ``[H, W]`` display-look uint16 image as a CR DICOM file described by ``case``.

    MONOCHROME1 files store ``2**BitsStored - 1 - image`` so that a reader's inversion restores the look.
    """

    path = Path(path)
    image = np.asarray(image)
    if image.ndim != 2 or image.dtype != np.uint16:
        raise ValueError(f"{path}: image must be uint16 [H, W], got {image.dtype} {image.shape}")
    top_value = 2**case.bits_stored - 1
    if int(image.max()) > top_value:
        raise ValueError(f"{path}: pixel value {int(image.max())} exceeds BitsStored={case.bits_stored}")
    stored = (top_value - image).astype(np.uint16) if case.photometric == "MONOCHROME1" else image

    ds = _phantom_dataset(_CR_IMAGE_STORAGE, case.sop_uid, case.study_uid, case.series_uid, case.patient_id,
                          case.study_date)  # fmt: skip
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = str(case.index)
    ds.StudyDescription = "Synthetic chest radiograph phantom"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]  # PA view: columns towards patient's left, rows towards feet
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = _MANUFACTURER
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    if case.spacing_tag is not None:
        setattr(ds, case.spacing_tag, [f"{case.spacing_mm:.4f}", f"{case.spacing_mm:.4f}"])
    ds.set_pixel_data(stored, case.photometric, case.bits_stored, generate_instance_uid=False)
    syntax = TRANSFER_SYNTAXES[case.transfer_syntax]
    if case.transfer_syntax in ("rle", "jpeg2000"):
        ds.compress(syntax, generate_instance_uid=False)
    elif case.transfer_syntax == "deflated":
        ds.file_meta.TransferSyntaxUID = syntax  # pydicom deflates the dataset on write
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def plan_radiographs(
    n: int,
    seed: int = 0,
    size: int = 1024,
    positive_fraction: float = 0.5,
    compressed_fraction: float = 0.3,
    monochrome1_fraction: float = 0.3,
    hard: bool = False,
) -> list[RadiographCase]:
    """Decide every radiograph's metadata up front from ``seed`` (so the result ignores worker count).

    Exactly ``round(n * positive_fraction)`` cases are positive (shuffled). Patients own 1-3 images each,
    so that splitting by image instead of by patient would leak. ``hard``: every case is drawn in the hard
    mode (the files' metadata are planned alike).
    """
    rng = _case_rng(seed, 2, 0)
    n_pos = int(round(n * positive_fraction))
    positive = np.zeros(n, bool)
    positive[rng.permutation(n)[:n_pos]] = True
    patients: list[str] = []
    while len(patients) < n:
        n_patients = len(patients) and int(patients[-1].rsplit("-", 1)[1]) + 1
        patients += [f"PHANTOM-{seed:04d}-{n_patients:05d}"] * int(rng.choice([1, 1, 2, 3]))
    compressed = ("rle", "jpeg2000", "deflated")
    cases = []
    for i in range(n):
        rc = rng.uniform(size=4)
        tag_draw = rng.uniform()
        spacing_tag = "PixelSpacing" if tag_draw < 0.7 else ("ImagerPixelSpacing" if tag_draw < 0.9 else None)
        cases.append(
            RadiographCase(
                index=i,
                positive=bool(positive[i]),
                patient_id=patients[i],
                study_uid=_uid(seed, "study", i),
                series_uid=_uid(seed, "series", i),
                sop_uid=_uid(seed, "sop", i),
                photometric="MONOCHROME1" if rc[0] < monochrome1_fraction else "MONOCHROME2",
                bits_stored=int(rng.choice([12, 14, 15, 16])),
                transfer_syntax=compressed[int(rc[2] * 3) % 3] if rc[1] < compressed_fraction else "explicit",
                spacing_tag=spacing_tag,
                spacing_mm=round(float(430.0 / size * rng.uniform(0.85, 1.0)), 4),
                study_date=f"2020{1 + int(rc[3] * 12):02d}{1 + i % 28:02d}",
                hard=hard,
            )
        )
    return cases


def draw_radiograph_case(case: RadiographCase, seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``(image, mask)`` that ``synthesize(seed=seed, size=size)`` writes for ``case`` (see
    :func:`make_radiograph_phantom`)."""
    rng = _case_rng(seed, 0, case.index)
    return make_radiograph_phantom(size, case.positive, rng, bits_stored=case.bits_stored, hard=case.hard)


def _radiograph_job(args: tuple[str, int, int, RadiographCase]) -> tuple[str, list[str]]:
    out_dir, seed, size, case = args
    image, mask = draw_radiograph_case(case, seed, size)
    write_radiograph_dicom(Path(out_dir) / case.relative_path, image, case)
    return case.sop_uid, mask_to_rle_rows(mask)


# ============================================================================================ CT drawing


def _segment_distance(points: np.ndarray, segments: Sequence[tuple[np.ndarray, np.ndarray, int]]) -> tuple:
    """For ``points [N, 3]``: distance to the nearest segment ``[N]`` and that segment's generation ``[N]``."""
    best = np.full(points.shape[0], np.inf, np.float32)
    best_gen = np.zeros(points.shape[0], np.int16)
    for start, end, gen in segments:
        d = (end - start).astype(np.float32)
        rel = points - start.astype(np.float32)
        t = np.clip(rel @ d / max(float(d @ d), 1e-9), 0, 1)
        dist = np.linalg.norm(rel - t[:, None] * d, axis=1)
        closer = dist < best
        best[closer], best_gen[closer] = dist[closer], gen
    return best, best_gen


@dataclass(frozen=True)
class CTFeatures:
    """What a CT phantom holds: the pneumothorax (kind ``"easy"`` / ``"small anterior"`` / ``"moderate"``,
    visceral pleura HU, -1000 = absent), bullae and emphysema mimics, the slice spacing (mm), the partial-volume
    blur across slices (sigma in slices) and the noise (HU)."""

    hard: bool
    pneumothorax: tuple[tuple[str, float], ...] = ()
    bullae: int = 0
    emphysema: bool = False
    slice_mm: float = 0.0
    slice_blur: float = 0.0
    noise_hu: float = 0.0


def make_ct_phantom(
    size: int = 128,
    slices: int = 48,
    positive: bool = False,
    rng: np.random.Generator | None = None,
    fov_mm: float = 360.0,
    length_mm: float = 240.0,
    hard: bool = False,
    return_features: bool = False,
) -> (
    tuple[np.ndarray, np.ndarray, tuple[float, float, float]]
    | tuple[np.ndarray, np.ndarray, tuple[float, float, float], CTFeatures]
):
    """Draw one chest CT phantom (axial slices; the stack runs inferior → superior along K).

    Args:
        size: in-plane voxels (I = J = size).
        slices: number of axial slices K.
        positive: draw a pneumothorax (anterior/lateral air of one lung, random side and size).
        rng: random generator (default: a fresh unseeded one).
        fov_mm: in-plane field of view; ``length_mm``: cranio-caudal coverage.
        hard: small anterior pneumothoraces with faint or absent pleura, bullae and emphysema as mimics, the
            coverage (hence slice spacing) varying by ±30 %, partial-volume blur across slices (thick slices)
            and 10-60 HU noise (``docs/data.md``). The easy mode's volumes are unchanged by its existence.
        return_features: also return the :class:`CTFeatures` drawn.

    Returns:
        ``hu`` int16 ``[I, J, K]`` (I = column = patient right → left, J = row = anterior → posterior,
        K = slice = inferior → superior), ``mask`` bool ``[I, J, K]`` (pneumothorax), and the voxel
        spacing ``(dx, dy, dz)`` in mm in array-axis order (and the features with ``return_features``).
    """
    rng = np.random.default_rng() if rng is None else rng
    f32 = np.float32
    if hard:
        length_mm *= rng.uniform(0.7, 1.3)
    spacing = (fov_mm / size, fov_mm / size, length_mm / slices)
    x = np.linspace(-1, 1, size, dtype=f32)[:, None, None]  # I: patient right (-) → left (+)
    y = np.linspace(-1, 1, size, dtype=f32)[None, :, None]  # J: anterior (-) → posterior (+)
    # z in the same unit as x, y (half the field of view), so that distances (vessels) are isotropic
    h = length_mm / fov_mm
    z = np.linspace(-h, h, slices, dtype=f32)[None, None, :]  # K: inferior (-) → superior (+)
    hu, body_r = _ct_torso(x, y, z, h, rng)
    heart_c = (rng.uniform(0.08, 0.16), rng.uniform(-0.22, -0.12), h * rng.uniform(-0.5, -0.3))
    heart = ((x - heart_c[0]) / 0.3) ** 2 + ((y - heart_c[1]) / 0.26) ** 2 + ((z - heart_c[2]) / (0.45 * h)) ** 2 <= 1
    mediastinum = (np.abs(x - 0.02) < 0.13) & (y > -0.55) & (y < 0.45)
    ptx_side = int(rng.integers(0, 2)) if positive else -1
    mask = np.zeros(hu.shape, bool)
    lungs = np.zeros(hu.shape, bool)
    drawn = []
    for side, sign in enumerate((-1.0, 1.0)):
        c = (sign * rng.uniform(0.36, 0.42), rng.uniform(-0.02, 0.06), h * rng.uniform(0.0, 0.1))
        r = (rng.uniform(0.27, 0.32), rng.uniform(0.38, 0.45), h * rng.uniform(0.85, 0.95))
        lung = _Lung3D(np.array(c, f32), np.array(r, f32), sign)
        inside = (lung.level(x, y, z) <= 1) & ~heart & ~mediastinum & (body_r < 0.8)
        lungs |= inside
        ptx = _draw_ct_lung(hu, mask, lung, inside, (x, y, z), 2.0 / size, rng, side == ptx_side, hard)
        if ptx is not None:
            drawn.append(ptx)
    hu[heart] = 40.0
    if not hard:
        hu += rng.normal(0, rng.uniform(12, 22), hu.shape).astype(f32)
        out = np.clip(np.rint(hu), -1024, 3071).astype(np.int16), mask, spacing
        return (*out, CTFeatures(False, tuple(drawn), slice_mm=spacing[2])) if return_features else out
    bullae, emphysema = _draw_ct_mimics(hu, lungs, mask, (x, y, z), rng)
    blur = float(rng.uniform(0.0, 1.2))
    if blur > 0.05:  # slices thicker than their spacing average the anatomy across neighbours
        hu = ndimage.gaussian_filter1d(hu, blur, axis=2, mode="nearest")
    noise = float(rng.uniform(10, 60))
    hu += rng.normal(0, noise, hu.shape).astype(f32)
    features = CTFeatures(True, tuple(drawn), bullae, emphysema, float(spacing[2]), blur, noise)
    out = np.clip(np.rint(hu), -1024, 3071).astype(np.int16), mask, spacing
    return (*out, features) if return_features else out


def _ct_torso(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, h: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """HU ``[I, J, K]`` of air, body (fat rim), ribs, sternum and spine; and the body's elliptic radius."""
    f32 = np.float32
    shape = (x.shape[0], y.shape[1], z.shape[2])
    bx, by = rng.uniform(0.78, 0.88), rng.uniform(0.55, 0.65)
    body_r = np.sqrt((x / bx) ** 2 + (y / by) ** 2) * np.ones_like(z)
    hu = np.full(shape, -1000.0, f32)
    hu[body_r <= 1] = 40.0
    hu[(body_r > 0.9) & (body_r <= 1)] = -100.0  # subcutaneous fat
    # ribs: oblique bands in the chest wall, every ~1/5 of the stack; sternum in front, spine behind
    angle = np.arctan2(y, x)
    rib_phase = (z / h * 2.6 + 0.25 * np.abs(np.sin(angle)) + rng.uniform(0, 1)) % 1.0
    ribs = (body_r > 0.8) & (body_r < 0.88) & (rib_phase < 0.28) & ~((np.abs(x) < 0.12) & (y < 0))
    hu[ribs] = 700.0
    hu[(np.abs(x) < 0.07) & (np.abs(y + by * 0.88) < 0.04) & (z > -0.6 * h) & np.ones(shape, bool)] = 600.0
    spine_r = np.sqrt((x / 0.11) ** 2 + ((y - by * 0.7) / 0.11) ** 2) * np.ones_like(z)
    hu[spine_r <= 1] = 350.0
    hu[(spine_r > 0.75) & (spine_r <= 1)] = 800.0  # cortical rim
    return hu, body_r


@dataclass(frozen=True)
class _Lung3D:
    """A CT lung: ellipsoid ``level <= 1`` whose in-plane radii shrink towards the apex."""

    c: np.ndarray  # centre (x, y, z)
    r: np.ndarray  # radii
    sign: float  # -1 right lung (x < 0), +1 left lung

    def level(self, px: np.ndarray, py: np.ndarray, pz: np.ndarray) -> np.ndarray:
        c, r = self.c, self.r
        taper = np.clip(1.15 - 0.45 * (pz - c[2]) / r[2], 0.5, 1.0)
        return np.sqrt(
            ((px - c[0]) / (r[0] * taper)) ** 2 + ((py - c[1]) / (r[1] * taper)) ** 2 + ((pz - c[2]) / r[2]) ** 2
        )


def _draw_ct_lung(
    hu: np.ndarray,
    mask: np.ndarray,
    lung: _Lung3D,
    inside: np.ndarray,
    xyz: tuple[np.ndarray, np.ndarray, np.ndarray],
    voxel: float,
    rng: np.random.Generator,
    pneumothorax: bool,
    hard: bool = False,
) -> tuple[str, float] | None:
    """Write the lung's HU (about -850, vessels) into ``hu`` in place; with ``pneumothorax`` the lung
    collapses towards a posterior-medial point, leaving -1000 HU air anteriorly/laterally (added to ``mask``).

    ``hard``: the pneumothorax is a small anterior one (air in front of the lung, where it collects in a
    supine patient) or a moderate one, with a faint or absent visceral pleura. Returns the pneumothorax's
    (kind, pleura HU; -1000 = absent), or None."""
    f32 = np.float32
    c, r, sign = lung.c, lung.r, lung.sign
    scale = np.ones(3, f32)
    hilum = np.array([c[0] - sign * 0.6 * r[0], c[1] + 0.1, c[2] - 0.1 * r[2]], f32)
    kind, pleura_hu = "easy", -250.0
    if pneumothorax and hard:
        if rng.uniform() < 0.6:
            kind = "small anterior"
            scale = np.array([rng.uniform(0.97, 1.0), rng.uniform(0.88, 0.96), rng.uniform(0.97, 1.0)], f32)
            hilum = np.array([c[0] - sign * 0.3 * r[0], c[1] + 1.0 * r[1], c[2] - 0.2 * r[2]], f32)
        else:
            kind = "moderate"
            s = rng.uniform(0.75, 0.9)
            scale = np.array([min(0.98, s * rng.uniform(1.0, 1.1)), s, min(0.98, s * rng.uniform(1.0, 1.1))], f32)
            hilum = np.array([c[0] - sign * 0.7 * r[0], c[1] + 0.75 * r[1], c[2] - 0.2 * r[2]], f32)
        pleura_hu = -1000.0 if rng.uniform() < 0.3 else float(rng.uniform(-750, -550))
    elif pneumothorax:
        s = rng.uniform(0.88, 0.95) if rng.uniform() < 0.35 else rng.uniform(0.6, 0.88)
        scale = np.array([min(0.97, s * rng.uniform(1.0, 1.1)), s, min(0.97, s * rng.uniform(1.0, 1.1))], f32)
        # collapse towards the posterior-medial hilum: the air collects anteriorly/laterally/apically
        hilum = np.array([c[0] - sign * 0.7 * r[0], c[1] + 0.75 * r[1], c[2] - 0.2 * r[2]], f32)
    x, y, z = xyz
    idx = np.nonzero(inside)
    pts = np.stack([x[idx[0], 0, 0], y[0, idx[1], 0], z[0, 0, idx[2]]], axis=1)
    collapsed_pts = hilum + (pts - hilum) / scale
    collapsed_level = lung.level(collapsed_pts[:, 0], collapsed_pts[:, 1], collapsed_pts[:, 2])
    collapsed = collapsed_level <= 1
    lung_hu = np.where(collapsed, -850.0 + 80.0 * (1 - scale.prod()), -1000.0).astype(f32)
    # vessels: 3D trees from the hilum, sampled at the collapsed-lung position (compressed markings)
    root = np.array([c[0] - sign * 0.45 * r[0], c[1], c[2]], np.float64)
    segments = []
    for up in (-1.2, -0.5, 0.0, 0.5, 1.2):  # fan out laterally, downwards and upwards
        direction = np.array([sign, rng.uniform(-0.4, 0.4), up])
        segments += _branching_tree(rng, root, direction, 0.15, 4, 0.6)
    dist, gen = _segment_distance(collapsed_pts.astype(f32), segments)
    radius = 0.025 * 0.8 ** gen.astype(f32)
    lung_hu += np.exp(-((dist / radius) ** 2)) * collapsed * 900.0
    if pneumothorax:
        pleura_w = 1.6 * voxel / (float(r[0]) * float(scale[0]))  # about 1.6 voxels
        if pleura_hu > -1000.0:
            lung_hu[collapsed & (collapsed_level > 1 - pleura_w)] = pleura_hu
        mask[idx] = ~collapsed
    hu[idx] = np.minimum(lung_hu, 60.0)
    return (kind, pleura_hu) if pneumothorax else None


def _draw_ct_mimics(
    hu: np.ndarray,
    lungs: np.ndarray,
    mask: np.ndarray,
    xyz: tuple[np.ndarray, np.ndarray, np.ndarray],
    rng: np.random.Generator,
) -> tuple[int, bool]:
    """Pneumothorax mimics inside the lungs but never in the pneumothorax, in place: bullae (round air spaces
    without vessels, thin wall, often subpleural) and centrilobular emphysema (scattered small low-attenuation
    holes). Returns (bullae, emphysema)."""
    x, y, z = xyz
    region = lungs & ~mask
    candidates = np.argwhere(region)
    bullae = int(rng.choice([0, 1, 2, 3])) if len(candidates) else 0
    for _ in range(bullae):
        i, j, k = candidates[int(rng.integers(len(candidates)))]
        radius = rng.uniform(0.03, 0.08)
        d = np.sqrt((x - x[i, 0, 0]) ** 2 + (y - y[0, j, 0]) ** 2 + (z - z[0, 0, k]) ** 2)
        wall = region & (d <= radius) & (d > radius - 0.012)
        hu[wall] = np.maximum(hu[wall], -700.0)
        hu[region & (d <= radius - 0.012)] = -1000.0
    emphysema = bool(rng.uniform() < 0.4)
    if emphysema:
        field = ndimage.gaussian_filter(rng.standard_normal(hu.shape).astype(np.float32), 1.0)
        holes = region & (field > np.quantile(field[region], rng.uniform(0.85, 0.95)))
        hu[holes] = np.minimum(hu[holes], -960.0)
    return bullae, emphysema


def ct_affine_ras(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS affine ``[4, 4]`` of a ``[I, J, K]`` phantom centred on the scanner origin.

    The DICOM series (LPS) puts voxel (i, j, k) at ``(x0 + i dx, y0 + j dy, z0 + k dz)``; RAS negates x, y.
    """
    dx, dy, dz = spacing
    origin_lps = -(np.asarray(shape[:3], float) - 1) / 2 * np.asarray(spacing, float)
    affine = np.diag([-dx, -dy, dz, 1.0])
    affine[:3, 3] = [-origin_lps[0], -origin_lps[1], origin_lps[2]]
    return affine


@dataclass(frozen=True)
class CTCase:
    index: int
    positive: bool
    name: str
    patient_id: str
    study_uid: str
    series_uid: str
    frame_uid: str
    hard: bool = False  # draw with make_ct_phantom(hard=True)


def write_ct_dicom_series(
    directory: str | Path, hu: np.ndarray, spacing: Sequence[float], case: CTCase, seed: int = 0
) -> list[Path]:
    """Write ``hu [I, J, K]`` as one axial CT series ``directory/slice_XXX.dcm`` (K files, LPS geometry).

    Each slice's ``pixel_array`` is ``[J, I]`` (rows = J), stored as ``HU + 1024`` (12 bit unsigned) with
    RescaleIntercept -1024, RescaleSlope 1.
    """

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    size_i, size_j, size_k = hu.shape
    dx, dy, dz = (float(s) for s in spacing)
    origin = -(np.asarray(hu.shape, float) - 1) / 2 * np.asarray([dx, dy, dz])
    stored = (hu.astype(np.int32) - _CT_INTERCEPT).clip(0, 4095).astype(np.uint16)
    paths = []
    for k in range(size_k):
        sop_uid = _uid(seed, "ct-sop", case.index, k)
        ds = _phantom_dataset(_CT_IMAGE_STORAGE, sop_uid, case.study_uid, case.series_uid, case.patient_id,
                              "20200101")  # fmt: skip
        ds.FrameOfReferenceUID = case.frame_uid
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.StudyID = str(case.index)
        ds.Modality = "CT"
        ds.BodyPartExamined = "CHEST"
        ds.Manufacturer = _MANUFACTURER
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientPosition = "HFS"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [f"{origin[0]:.4f}", f"{origin[1]:.4f}", f"{origin[2] + k * dz:.4f}"]
        ds.SliceLocation = f"{origin[2] + k * dz:.4f}"
        ds.PixelSpacing = [f"{dy:.6f}", f"{dx:.6f}"]  # (row spacing, column spacing)
        ds.SliceThickness = f"{dz:.4f}"
        ds.SpacingBetweenSlices = f"{dz:.4f}"
        ds.KVP = "120"
        ds.RescaleIntercept = _CT_INTERCEPT
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = -600, 1500  # lung window; readers must still return HU
        ds.set_pixel_data(np.ascontiguousarray(stored[:, :, k].T), "MONOCHROME2", 12, generate_instance_uid=False)
        path = directory / f"slice_{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_ct_nifti(image_path: str | Path, label_path: str | Path, hu: np.ndarray, mask: np.ndarray, spacing) -> None:
    """Write ``hu`` (int16) and ``mask`` (uint8) ``[I, J, K]`` as NIfTI with the RAS affine of the DICOM."""
    import nibabel as nib

    affine = ct_affine_ras(hu.shape, spacing)
    for path, data in ((image_path, hu.astype(np.int16)), (label_path, mask.astype(np.uint8))):
        img = nib.Nifti1Image(data, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(path))


def plan_ct(n: int, seed: int = 0, positive_fraction: float = 0.5, hard: bool = False) -> list[CTCase]:
    """CT cases: exactly ``round(n * positive_fraction)`` positive, one patient and series each (``hard``:
    drawn in the hard mode)."""
    rng = _case_rng(seed, 2, 1)
    positive = np.zeros(n, bool)
    positive[rng.permutation(n)[: int(round(n * positive_fraction))]] = True
    return [
        CTCase(
            index=i,
            positive=bool(positive[i]),
            name=f"ct_{i:03d}",
            patient_id=f"PHANTOM-CT-{seed:04d}-{i:04d}",
            study_uid=_uid(seed, "ct-study", i),
            series_uid=_uid(seed, "ct-series", i),
            frame_uid=_uid(seed, "ct-frame", i),
            hard=hard,
        )
        for i in range(n)
    ]


def draw_ct_case(
    case: CTCase, seed: int, size: int, slices: int
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """The ``(hu, mask, spacing)`` that ``synthesize`` writes for ``case`` (see :func:`make_ct_phantom`)."""
    return make_ct_phantom(size, slices, case.positive, _case_rng(seed, 1, case.index), hard=case.hard)


def _ct_job(args: tuple[str, int, int, int, CTCase]) -> tuple[str, bool]:
    out_dir, seed, size, slices, case = args
    out = Path(out_dir)
    hu, mask, spacing = draw_ct_case(case, seed, size, slices)
    write_ct_dicom_series(out / CT_DICOM_DIR / case.name, hu, spacing, case, seed)
    write_ct_nifti(
        out / CT_NIFTI_DIR / "images" / f"{case.name}.nii.gz",
        out / CT_NIFTI_DIR / "labels" / f"{case.name}.nii.gz",
        hu,
        mask,
        spacing,
    )
    return case.name, bool(mask.any())


# ============================================================================================ synthesis


@dataclass
class SynthSummary:
    out_dir: Path
    radiographs: int = 0
    radiographs_positive: int = 0
    ct: int = 0
    ct_positive: int = 0
    patients: int = 0
    seconds: float = 0.0
    radiograph_seconds: float = 0.0
    files: list[Path] = field(default_factory=list)

    @property
    def radiographs_per_minute(self) -> float:
        return 60.0 * self.radiographs / self.radiograph_seconds if self.radiograph_seconds else 0.0

    def __str__(self) -> str:
        return (
            f"{self.out_dir}: {self.radiographs} radiographs ({self.radiographs_positive} with pneumothorax, "
            f"{self.patients} patients, {self.radiographs_per_minute:.0f}/min), {self.ct} CT volumes "
            f"({self.ct_positive} with pneumothorax) in {self.seconds:.1f} s"
        )


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    existing = [out / name for name in _OUTPUTS if (out / name).exists()]
    if existing:
        if not overwrite:
            raise ValueError(f"{existing[0]} already exists; choose a new OUT_DIR or pass --overwrite")
        if not (out / _MARKER).is_file():
            # e.g. a real SIIM download with the same layout: never delete that
            raise ValueError(
                f"{out} holds {existing[0].name} but was not written by `pneumoseg synth`; not overwriting"
            )
        for path in existing:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARKER).write_text("written by `pneumoseg synth`; its outputs here may be replaced with --overwrite\n")


def _map(fn: Callable, jobs: list, workers: int) -> list:
    """Ordered map over processes (``workers`` > 1) or in-process; results never depend on ``workers``."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, jobs, chunksize=max(1, len(jobs) // (8 * workers))))


def synthesize(
    out_dir: str | Path,
    radiographs: int = 100,
    size: int = 1024,
    ct: int = 4,
    ct_size: int = 128,
    ct_slices: int = 48,
    positive_fraction: float = 0.5,
    seed: int = 0,
    compressed_fraction: float = 0.3,
    monochrome1_fraction: float = 0.3,
    workers: int | None = None,
    overwrite: bool = False,
    hard: bool = False,
) -> SynthSummary:
    """Write the phantom data set to ``out_dir`` (layout in the module docstring) and summarise it.

    ``hard``: radiographs and CT drawn in the hard mode (:func:`make_radiograph_phantom`,
    :func:`make_ct_phantom`; ``docs/data.md``).

    ``out_dir`` must not hold phantom outputs yet (stale files would disagree with the new CSV), unless
    ``overwrite`` and an earlier ``synthesize`` made them (its marker file is there): then they are removed.
    """
    for name, value in (
        ("positive_fraction", positive_fraction),
        ("compressed_fraction", compressed_fraction),
        ("monochrome1_fraction", monochrome1_fraction),
    ):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be within [0, 1], got {value}")
    if size < 32 or ct_size < 16 or ct_slices < 4:
        raise ValueError(f"sizes too small: size={size} (min 32), ct_size={ct_size} (16), ct_slices={ct_slices} (4)")
    if radiographs < 0 or ct < 0:
        raise ValueError(f"counts must be >= 0, got radiographs={radiographs}, ct={ct}")
    workers = (os.cpu_count() or 1) if workers is None else max(1, workers)
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)
    summary = SynthSummary(out_dir=out)
    start = time.perf_counter()

    cases = plan_radiographs(
        radiographs, seed, size, positive_fraction, compressed_fraction, monochrome1_fraction, hard=hard
    )
    if cases:
        results = _map(_radiograph_job, [(str(out), seed, size, c) for c in cases], workers)
        write_siim_csv(out / RLE_CSV, dict(results))
        summary.files += [out / c.relative_path for c in cases] + [out / RLE_CSV]
    summary.radiograph_seconds = time.perf_counter() - start
    summary.radiographs = len(cases)
    summary.radiographs_positive = sum(c.positive for c in cases)
    summary.patients = len({c.patient_id for c in cases})

    ct_cases = plan_ct(ct, seed, positive_fraction, hard=hard)
    ct_results = _map(_ct_job, [(str(out), seed, ct_size, ct_slices, c) for c in ct_cases], workers)
    summary.ct = len(ct_cases)
    summary.ct_positive = sum(positive for _, positive in ct_results)
    summary.seconds = time.perf_counter() - start
    return summary


# ================================================================================================== CLI


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """Register ``pneumoseg synth``."""
    parser = subparsers.add_parser(
        "synth",
        help="write synthetic chest radiograph (DICOM + SIIM RLE CSV) and CT (DICOM + NIfTI) phantoms",
        description="Write synthetic chest phantoms with exact pneumothorax masks: CR DICOM radiographs in "
        f"the SIIM-ACR layout (OUT_DIR/{RADIOGRAPH_DIR}/<study>/<series>/<sop>.dcm + OUT_DIR/{RLE_CSV}) and "
        f"CT volumes as DICOM series (OUT_DIR/{CT_DICOM_DIR}/<case>/) and NIfTI "
        f"(OUT_DIR/{CT_NIFTI_DIR}/images|labels/<case>.nii.gz). Same seed, same bytes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="output directory (created if missing)")
    parser.add_argument("--radiographs", type=int, default=100, metavar="N", help="number of chest radiographs")
    parser.add_argument("--size", type=int, default=1024, metavar="PX", help="radiograph rows = columns")
    parser.add_argument("--ct", type=int, default=4, metavar="N", help="number of chest CT volumes")
    parser.add_argument("--ct-size", type=int, default=128, metavar="PX", help="CT in-plane voxels (rows = columns)")
    parser.add_argument("--ct-slices", type=int, default=48, metavar="K", help="CT axial slices per volume")
    parser.add_argument(
        "--positive-fraction",
        type=float,
        default=0.5,
        metavar="F",
        help="fraction of cases (radiographs and CT separately) with a pneumothorax; the count is rounded",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    parser.add_argument(
        "--compressed-fraction",
        type=float,
        default=0.3,
        metavar="F",
        help="fraction of radiographs stored with a lossless compressed transfer syntax "
        "(RLE Lossless, JPEG 2000 Lossless or Deflated, in equal shares)",
    )
    parser.add_argument(
        "--monochrome1-fraction",
        type=float,
        default=0.3,
        metavar="F",
        help="fraction of radiographs stored as MONOCHROME1 (inverted pixel values; same look once read)",
    )
    parser.add_argument(
        "--hard",
        action="store_true",
        help="hard cases: subtle pneumothoraces (small apical cap, thin lateral rim, bilateral; faint or absent "
        "pleural line, markings only faded), skin folds, tubes and lines, rib overlap, exposure / gamma / "
        "positioning per image; CT: small anterior pneumothoraces, bullae and emphysema, varying slice "
        "thickness and noise (docs/data.md)",
    )
    parser.add_argument(
        "--workers", type=int, default=None, metavar="N", help="worker processes (default: number of CPUs)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the phantoms of an earlier `pneumoseg synth` run in OUT_DIR (without it, existing "
        "outputs are an error; directories not made by `pneumoseg synth` are never deleted)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        summary = _run(args)
    except ValueError as err:
        print(f"pneumoseg synth: error: {err}", file=sys.stderr)
        return 2
    print(summary)
    return 0


def _run(args: argparse.Namespace) -> SynthSummary:
    return synthesize(
        args.out_dir,
        radiographs=args.radiographs,
        size=args.size,
        ct=args.ct,
        ct_size=args.ct_size,
        ct_slices=args.ct_slices,
        positive_fraction=args.positive_fraction,
        seed=args.seed,
        compressed_fraction=args.compressed_fraction,
        monochrome1_fraction=args.monochrome1_fraction,
        workers=args.workers,
        overwrite=args.overwrite,
        hard=args.hard,
    )
