"""Post-processing of the dual output (segmentation probability + image probability) into a mask.

The rule (SIIM-ACR winners' "triplet", gated by the classification head)::

    mask = empty                                   unless p_cls >= t_cls
    mask = empty                                   unless count(p_seg >= top) >= min_area
    mask = p_seg >= bottom                         otherwise

**The threshold convention of pneumoseg** is :func:`at_or_above`: a probability equal to its threshold is
positive, for pixels (``top``, ``bottom``) and images (``t_cls``, the operating threshold behind
``pred_label`` / sensitivity / specificity, site evaluation's rates). It is MONAI's (``AsDiscrete(threshold=)``)
and scikit-learn's (``roc_curve``) convention, so a threshold read off a ROC curve means the same here.

``t_cls = 0, top = bottom = 0.5, min_area = 0`` (:data:`PLAIN`) is plain thresholding at 0.5, what the
evaluator uses during training. The values inference uses live in the model record
(:class:`~pneumoseg.model_record.PostprocessingThresholds`, ``models/model_record.json``); ``evaluate.json``
searches them on the validation split (:class:`PostprocessingSearch`) and writes them there.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

from pneumoseg.model_record import PostprocessingThresholds

__all__ = [
    "PLAIN",
    "at_or_above",
    "DualOutputPostprocess",
    "DualOutputPostprocessd",
    "PostprocessingSearch",
]

logger = logging.getLogger(__name__)

PLAIN = PostprocessingThresholds(t_cls=0.0, top=0.5, min_area=0, bottom=0.5)
"""Plain thresholding at 0.5, no image gate: the evaluator's rule during training and the search's baseline."""

_Values = TypeVar("_Values")


def at_or_above(values: _Values, threshold: float) -> _Values:
    """``values >= threshold`` (tensor or array of probabilities -> booleans): the one threshold convention."""
    return values >= threshold  # type: ignore[operator,return-value]


class DualOutputPostprocess(Transform):
    """Mask from the segmentation probability of ONE image and its image-level probability.

    Args:
        t_cls, top, min_area, bottom: see the module docstring (:class:`PostprocessingThresholds`).

    ``__call__(seg_prob [C, *S], cls_prob scalar or [1]) -> mask [C, *S]`` (float 0/1, same type).
    ``min_area`` counts pixels (voxels for a volume) at the resolution the mask is computed at.
    """

    def __init__(self, t_cls: float, top: float, min_area: int, bottom: float) -> None:
        self.thresholds = PostprocessingThresholds(float(t_cls), float(top), int(min_area), float(bottom))

    @classmethod
    def from_thresholds(cls, thresholds: PostprocessingThresholds) -> DualOutputPostprocess:
        """The rule with a record's thresholds (``record.postprocessing``)."""
        return cls(thresholds.t_cls, thresholds.top, thresholds.min_area, thresholds.bottom)

    def __call__(self, seg_prob: torch.Tensor, cls_prob: torch.Tensor | float) -> torch.Tensor:
        t = self.thresholds
        cls_value = float(torch.as_tensor(cls_prob).reshape(-1)[0])
        if not at_or_above(cls_value, t.t_cls) or int(at_or_above(seg_prob, t.top).sum()) < t.min_area:
            return torch.zeros_like(seg_prob)
        return at_or_above(seg_prob, t.bottom).to(seg_prob.dtype)


class DualOutputPostprocessd(MapTransform):
    """Dictionary version of :class:`DualOutputPostprocess`.

    Args:
        keys: key(s) of segmentation probabilities ``[C, *S]``.
        thresholds: the rule's values (e.g. ``record.postprocessing``).
        cls_key: key of the image probability.
        output_key: where to write the mask (default: overwrite ``keys``).
    """

    def __init__(
        self,
        keys: KeysCollection,
        thresholds: PostprocessingThresholds,
        cls_key: str = "pred_cls",
        output_key: str | Sequence[str] | None = "pred",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.cls_key = cls_key
        out = list(self.keys) if output_key is None else [output_key] if isinstance(output_key, str) else output_key
        if len(out) != len(self.keys):
            raise ValueError(f"{len(self.keys)} keys but {len(out)} output keys")
        self.output_key = dict(zip(self.keys, out))
        self.postprocess = DualOutputPostprocess.from_thresholds(thresholds)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.output_key[key]] = self.postprocess(d[key], d[self.cls_key])
        return d


DEFAULT_GRID: dict[str, tuple[float, ...]] = {
    "t_cls": (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    "top": (0.5, 0.6, 0.7, 0.8, 0.9),
    "min_area": (0, 10, 25, 50, 100, 200, 400),
    "bottom": (0.2, 0.3, 0.4, 0.5, 0.6),
}


class PostprocessingSearch:
    """Grid search of ``(t_cls, top, min_area, bottom)`` maximising the mean per-image SIIM Dice.

    Per image only sufficient statistics are kept (no probability maps): the image probability, the
    truth area, the area at or above each ``top`` and, for each ``bottom``, the predicted area and its
    overlap with the truth. So the search costs O(images x grid) memory whatever the image size.
    ``min_area`` of the grid is in pixels at the resolution the statistics are collected at.

    Usage: :meth:`update` per batch (``seg_prob``/``truth`` ``[B, 1, *S]``, ``cls_prob`` ``[B, 1]``),
    then :meth:`search` (after :meth:`gather` under DDP).
    """

    def __init__(self, grid: Mapping[str, Sequence[float]] | None = None) -> None:
        grid = {**DEFAULT_GRID, **(grid or {})}
        self.grid = {k: tuple(float(v) for v in grid[k]) for k in DEFAULT_GRID}
        self.reset()

    def reset(self) -> None:
        self._rows: list[torch.Tensor] = []

    def update(self, seg_prob: torch.Tensor, cls_prob: torch.Tensor, truth: torch.Tensor) -> None:
        b = seg_prob.shape[0]
        p = seg_prob.detach().float().reshape(b, -1)
        t = at_or_above(truth.detach().float().reshape(b, -1), 0.5)
        tops = torch.tensor(self.grid["top"], device=p.device)
        bottoms = torch.tensor(self.grid["bottom"], device=p.device)
        area_top = at_or_above(p[:, None, :], tops[None, :, None]).sum(-1).float()  # [B, n_top]
        pred_b = at_or_above(p[:, None, :], bottoms[None, :, None])  # [B, n_bottom, N]
        inter = (pred_b & t[:, None, :]).sum(-1).float()
        area_b = pred_b.sum(-1).float()
        row = torch.cat(
            [cls_prob.detach().float().reshape(b, 1), t.sum(-1, keepdim=True).float(), area_top, inter, area_b], dim=1
        )
        self._rows.append(row.cpu())

    def statistics(self) -> torch.Tensor:
        """``[N, 2 + n_top + 2 n_bottom]`` rows collected so far."""
        width = 2 + len(self.grid["top"]) + 2 * len(self.grid["bottom"])
        return torch.cat(self._rows) if self._rows else torch.zeros(0, width)

    def gather(self) -> torch.Tensor:
        """Statistics of all ranks (all-gather under DDP, a no-op otherwise)."""
        from monai.utils import evenly_divisible_all_gather

        stats = self.statistics()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
            stats = evenly_divisible_all_gather(stats.to(device), concat=True).cpu()
        return stats

    def dice(self, stats: torch.Tensor, thresholds: PostprocessingThresholds) -> float:
        """Mean per-image SIIM Dice of ``thresholds`` (each value must be on the grid)."""
        ci = self.grid["t_cls"].index(float(thresholds.t_cls))
        ai = self.grid["min_area"].index(float(thresholds.min_area))
        ti = self.grid["top"].index(float(thresholds.top))
        bi = self.grid["bottom"].index(float(thresholds.bottom))
        return float(self._dice_table(stats)[ci, ai, ti, :, bi].mean())

    def _dice_table(self, stats: torch.Tensor) -> torch.Tensor:
        """Per-image Dice for every grid point: ``[n_t_cls, n_min_area, n_top, N, n_bottom]``."""
        n_top, n_bottom = len(self.grid["top"]), len(self.grid["bottom"])
        cls_prob, truth = stats[:, 0], stats[:, 1]
        area_top = stats[:, 2 : 2 + n_top]
        inter = stats[:, 2 + n_top : 2 + n_top + n_bottom]
        area_b = stats[:, 2 + n_top + n_bottom :]
        kept_dice = torch.where(
            (area_b + truth[:, None]) > 0, 2 * inter / (area_b + truth[:, None]).clamp_min(1e-9), torch.ones_like(inter)
        )  # [N, n_bottom]
        empty_dice = (truth == 0).float()  # an emptied mask scores 1 on a negative image, 0 on a positive one
        t_cls = torch.tensor(self.grid["t_cls"])
        min_area = torch.tensor(self.grid["min_area"])
        keep = at_or_above(cls_prob[None, None, None, :], t_cls[:, None, None, None]) & (
            area_top.T[None, None, :, :] >= min_area[None, :, None, None]
        )  # [n_t_cls, n_min_area, n_top, N]
        return torch.where(keep[..., None], kept_dice[None, None, None], empty_dice[None, None, None, :, None])

    def search(self, stats: torch.Tensor | None = None) -> tuple[PostprocessingThresholds, float, dict[str, Any]]:
        """Best thresholds, their mean Dice, and a summary (ties go to the simplest: smallest values)."""
        stats = self.gather() if stats is None else stats
        if stats.shape[0] == 0:
            raise ValueError("post-processing search: no validation images were seen")
        mean = self._dice_table(stats).mean(dim=3)  # [n_t_cls, n_min_area, n_top, n_bottom]
        best = float(mean.max())
        names = ("t_cls", "min_area", "top", "bottom")
        # first index in C order = smallest values, since every grid axis is sorted ascending
        for idx in itertools.product(*(range(s) for s in mean.shape)):
            if float(mean[idx]) >= best - 1e-12:
                break
        chosen = {n: self.grid[n][i] for n, i in zip(names, idx)}
        best_thresholds = PostprocessingThresholds(
            chosen["t_cls"], chosen["top"], int(chosen["min_area"]), chosen["bottom"]
        )
        summary = {"images": int(stats.shape[0]), "grid": {k: list(v) for k, v in self.grid.items()}}
        return best_thresholds, best, summary
