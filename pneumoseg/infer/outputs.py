"""One scan's model output -> its files and its report row (runs in the writer thread).

post-processing (the record's thresholds, at model resolution) -> MONAI's inversion of the scan's
inference chain (``Invertd``: back to the source geometry, bilinear, threshold 0.5) -> measures (pixels,
area / volume, connected components) -> files: the mask (``mask.png`` / ``mask.nii.gz``), the overlay, then
the DICOM SEG last and on its own: a SEG that fails costs that file alone (the row stays ``ok`` with a
warning naming the output, never a header value) -> the scan's record, last of all.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pneumoseg.infer.dataset import ScanDataset
from pneumoseg.infer.discovery import Scan
from pneumoseg.infer.records import ScanRecords
from pneumoseg.infer.writers import (
    file_digest,
    remove_stale_temporaries,
    write_dicom_seg,
    write_mask_nifti,
    write_mask_png,
    write_overlay_png,
)
from pneumoseg.model_record import TrainedModel

__all__ = ["FORMATS", "ScanOutputs", "base_row", "parse_formats", "scan_formats"]

FORMATS = ("nifti", "seg", "png", "overlay")
"""``nifti``: mask of volumes / NIfTI inputs; ``png``: mask of radiographs; ``seg``: DICOM SEG (DICOM
inputs); ``overlay``: preview PNG."""


def parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    """``"nifti,seg"`` (or a list) -> the formats in :data:`FORMATS` order; unknown names raise."""
    items = [f.strip().lower() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip()]
    unknown = sorted(set(items) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown output format(s) {unknown}; choose from {','.join(FORMATS)}")
    return tuple(f for f in FORMATS if f in items)


def scan_formats(formats: Sequence[str], scan: Scan) -> tuple[str, ...]:
    """The ``formats`` that apply to ``scan`` (mask PNG for 2D, NIfTI for volumes, SEG for DICOM)."""
    out = []
    for f in formats:
        if f == "png" and scan.is_volume or f == "nifti" and not scan.is_volume:
            continue
        if f == "seg" and scan.kind not in ("radiograph", "series"):
            continue
        out.append(f)
    return tuple(out)


def base_row(scan: Scan) -> dict[str, Any]:
    """The report columns discovery fills (before any processing)."""
    return {
        "scan_id": scan.scan_id,
        "input": scan.source,
        "kind": scan.kind,
        "series_uid": scan.series_uid,
        "modality": scan.modality,
        "body_part": scan.body_part,
        "status": scan.status,
        "reason": scan.reason,
        "warnings": "; ".join(scan.warnings),
    }


class ScanOutputs:
    """Writes scans' outputs and records under ``records.output_dir``.

    Args:
        records: the run's :class:`~pneumoseg.infer.records.ScanRecords`.
        formats: requested formats (:func:`parse_formats`).
        dataset: the run's :class:`~pneumoseg.infer.dataset.ScanDataset` (its chains are inverted).
        models: ``{image kind: model}``: the post-processing and the SEG's algorithm identification.
    """

    def __init__(
        self,
        records: ScanRecords,
        formats: Sequence[str],
        dataset: ScanDataset,
        models: Mapping[str, TrainedModel],
    ) -> None:
        from pneumoseg.data.transforms import invert_prediction_transforms
        from pneumoseg.postprocessing import DualOutputPostprocess

        self.records = records
        self.formats = tuple(formats)
        self.dataset = dataset
        self.models = dict(models)
        self._postprocess = {
            kind: DualOutputPostprocess.from_thresholds(model.record.postprocessing)
            for kind, model in self.models.items()
        }
        self._invert: dict[int, Any] = {}  # MONAI's inversion of each chain, built once
        self._make_inverse = lambda chain: invert_prediction_transforms(chain, sigmoid=False, threshold=None)

    # ------------------------------------------------------------------------------------------- rows
    def error_row(self, scan: Scan, message: str, seconds: float) -> dict[str, Any]:
        """The row of a scan that failed; its previous outputs go (they no longer hold)."""
        self.records.remove(scan)
        return {**base_row(scan), "status": "error", "reason": message, "seconds": round(seconds, 3)}

    # ----------------------------------------------------------------------------------------- finish
    def finish(
        self, scan: Scan, item: Mapping[str, Any], seg_prob: torch.Tensor, cls_prob: float, seconds: float
    ) -> dict[str, Any]:
        """Post-process, invert to the source geometry, measure, write outputs and the record; the row."""
        start = time.perf_counter()
        model = self.models[scan.image_kind]
        mask = self._source_mask(scan, item, self._postprocess[scan.image_kind](seg_prob, cls_prob))
        row = {**base_row(scan), **self._measures(scan, item, mask), "status": "ok"}
        row["probability"] = round(float(cls_prob), 6)
        warnings = list(scan.warnings) + list(item.get("warnings", []))
        formats = scan_formats(self.formats, scan)
        if not scan.is_volume and item["spacing_missing"]:
            seg_note = "; SEG written with 1 mm" if "seg" in formats else ""
            warnings.append(f"no pixel spacing: area_mm2 not reported{seg_note}")

        folder = self.records.folder(scan)
        remove_stale_temporaries(folder)
        self.records.remove(scan)  # record, then outputs: a kill from here on leaves the scan to be redone
        outputs: dict[str, dict[str, Any]] = {}

        def written(path: Path, column: str) -> None:
            outputs[path.name] = file_digest(path)
            row[column] = path.relative_to(self.records.output_dir).as_posix()

        if "png" in formats:
            written(write_mask_png(folder / "mask.png", mask), "mask")
        if "nifti" in formats:
            written(write_mask_nifti(folder / "mask.nii.gz", mask, item["affine"]), "mask")
        if "overlay" in formats:
            background, overlay_mask, caption = self._overlay_view(scan, item["display"].numpy(), mask)
            written(write_overlay_png(folder / "overlay.png", background, overlay_mask, cls_prob, caption), "overlay")
        if "seg" in formats:  # last, and on its own: a SEG that fails costs that file alone
            try:
                left_out = self._write_seg(scan, item, mask, model, folder / "seg.dcm")
            except Exception as e:  # the reason is the exception's type only: messages may quote header values
                warnings.append(f"seg.dcm not written ({type(e).__name__} while building the DICOM SEG)")
            else:
                written(folder / "seg.dcm", "seg")
                if left_out:
                    warnings.append(f"seg.dcm: non-conformant header value(s) left out: {', '.join(left_out)}")
        row["warnings"] = "; ".join(warnings)
        row["seconds"] = round(seconds + time.perf_counter() - start, 3)
        self.records.write(scan, row, outputs, formats, model.fingerprint)
        return row

    def _source_mask(self, scan: Scan, item: Mapping[str, Any], mask_small: torch.Tensor) -> np.ndarray:
        """The model-resolution mask back in the source geometry: MONAI's inversion of the scan's chain."""
        from monai.data import MetaTensor

        from pneumoseg.postprocessing import at_or_above

        if not bool(mask_small.any()):  # most scans: the inverse of an empty mask is empty, ~5 ms saved
            return np.zeros(item["shape"], dtype=bool)
        chain = self.dataset.chain(scan, item["affine"], item["shape"])
        invert = self._invert.setdefault(id(chain), self._make_inverse(chain))
        image = MetaTensor(item["image"], meta=item["image_meta"], applied_operations=item["image_ops"])
        pred = MetaTensor(mask_small.float(), meta=dict(image.meta))
        mask = at_or_above(torch.as_tensor(invert({"image": image, "pred": pred})["pred"])[0].numpy(), 0.5)
        if list(mask.shape) != list(item["shape"]):
            raise RuntimeError(f"{scan.source}: inverted mask {mask.shape} != source {item['shape']}")
        return mask

    @staticmethod
    def _measures(scan: Scan, item: Mapping[str, Any], mask: np.ndarray) -> dict[str, Any]:
        """Positive, pixels, components (8 / 26-connected), and area (mm², radiographs) or volume (mL)."""
        from scipy import ndimage

        n = int(mask.sum())
        structure = np.ones((3,) * mask.ndim, bool)
        out: dict[str, Any] = {
            "positive": "yes" if n > 0 else "no",
            "mask_pixels": n,
            "components": int(ndimage.label(mask, structure=structure)[1]) if n else 0,
        }
        spacing = item["spacing"]
        if scan.is_volume:
            out["volume_ml"] = round(n * float(np.prod(spacing)) / 1000.0, 3)
        elif not item["spacing_missing"]:
            out["area_mm2"] = round(n * spacing[0] * spacing[1], 2)
        return out

    def _write_seg(
        self, scan: Scan, item: Mapping[str, Any], mask: np.ndarray, model: TrainedModel, path: Path
    ) -> list[str]:
        """The SEG over the scan's DICOM sources; frame k on the source instance of layer k (by its
        SOPInstanceUID, as the series reader sorted the slices), never by file order."""
        headers = list(item["headers"])
        if scan.is_volume:
            frames = np.ascontiguousarray(mask.transpose(2, 1, 0))  # [I, J, K] -> [K, J = Rows, I = Columns]
            uids = [str(h.get("SOPInstanceUID", "")) for h in headers]
            if len(headers) != frames.shape[0] or uids != list(item["slice_sop_uids"]):
                raise ValueError("the SEG's source instances do not match the volume's slices")
        else:
            frames = mask[None]
        return write_dicom_seg(
            path,
            headers,
            frames,
            model.name,
            model.version,
            uid_seed=f"{scan.scan_id}|{model.fingerprint}",
            source_frame=scan.frame,
        )

    @staticmethod
    def _overlay_view(scan: Scan, display: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
        """2D: as is. Volumes: the source slice (K) with the largest mask area (the middle one if empty),
        transposed to ``[J, I]`` so that it looks like the DICOM slice (rows = J)."""
        if not scan.is_volume:
            return display, mask, ""
        areas = mask.sum(axis=(0, 1))
        k = int(np.argmax(areas)) if areas.max() > 0 else mask.shape[2] // 2
        return display[:, :, k].T, mask[:, :, k].T, f"slice {k + 1}/{mask.shape[2]}"
