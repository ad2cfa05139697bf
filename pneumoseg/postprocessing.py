"""Post-processing of the dual output (segmentation probability + image probability) into a mask.

The rule (SIIM-ACR winners' "triplet", gated by the classification head)::

    mask = empty                                   if p_cls < t_cls
    mask = empty                                   if count(p_seg > top) < min_area
    mask = p_seg > bottom                          otherwise

``t_cls = 0, top = bottom = 0.5, min_area = 0`` is plain thresholding at 0.5 (the training default).
The values used at inference are read from a small JSON file (``configs/postprocessing.json`` in the
bundle) that ``evaluate.json`` rewrites after searching them on the validation set
(:class:`PostprocessingSearch`), so ``inference.json`` itself is never rewritten.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

__all__ = [
    "PostprocessingParams",
    "load_postprocessing_params",
    "save_postprocessing_params",
    "DualOutputPostprocess",
    "DualOutputPostprocessd",
    "PostprocessingSearch",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PostprocessingParams:
    """``t_cls`` image-probability gate, ``top`` / ``min_area`` / ``bottom`` the SIIM triplet."""

    t_cls: float = 0.0
    top: float = 0.5
    min_area: int = 0
    bottom: float = 0.5


def load_postprocessing_params(path: str | os.PathLike | None, **overrides: Any) -> PostprocessingParams:
    """Read ``{"t_cls", "top", "min_area", "bottom"}`` from ``path`` (missing file -> defaults, logged).

    ``overrides`` that are not ``None`` win over the file.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_file():
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err})") from None
            known = set(PostprocessingParams.__dataclass_fields__)
            unknown = set(raw) - known - {"search", "comment"}
            if unknown:
                raise ValueError(f"{path}: unknown post-processing keys {sorted(unknown)}; expected {sorted(known)}")
            values = {k: raw[k] for k in known if k in raw}
        else:
            logger.warning("post-processing file %s not found; using defaults %s", path, PostprocessingParams())
    values.update({k: v for k, v in overrides.items() if v is not None})
    params = PostprocessingParams(**values)
    params = PostprocessingParams(float(params.t_cls), float(params.top), int(params.min_area), float(params.bottom))
    return params


def save_postprocessing_params(path: str | os.PathLike, params: PostprocessingParams, **extra: Any) -> None:
    """Write the parameters (and e.g. the search results under ``extra``) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**asdict(params), **extra}, indent=1) + "\n")


class DualOutputPostprocess(Transform):
    """Mask from the segmentation probability of ONE image and its image-level probability.

    Args:
        t_cls, top, min_area, bottom: see the module docstring; ``None`` takes the value from
            ``params_file`` (or the default).
        params_file: optional JSON file with the four values.

    ``__call__(seg_prob [C, *S], cls_prob scalar or [1]) -> mask [C, *S]`` (float 0/1, same type).
    ``min_area`` counts pixels (voxels for a volume) at the resolution the mask is computed at.
    """

    def __init__(
        self,
        t_cls: float | None = None,
        top: float | None = None,
        min_area: int | None = None,
        bottom: float | None = None,
        params_file: str | os.PathLike | None = None,
    ) -> None:
        self.params = load_postprocessing_params(params_file, t_cls=t_cls, top=top, min_area=min_area, bottom=bottom)

    def __call__(self, seg_prob: torch.Tensor, cls_prob: torch.Tensor | float) -> torch.Tensor:
        p = self.params
        cls_value = float(torch.as_tensor(cls_prob).reshape(-1)[0])
        if cls_value < p.t_cls or int((seg_prob > p.top).sum()) < p.min_area:
            return torch.zeros_like(seg_prob)
        return (seg_prob > p.bottom).to(seg_prob.dtype)


class DualOutputPostprocessd(MapTransform):
    """Dictionary version of :class:`DualOutputPostprocess`.

    Args:
        keys: key(s) of segmentation probabilities ``[C, *S]``.
        cls_key: key of the image probability.
        output_key: where to write the mask (default: overwrite ``keys``).
    """

    def __init__(
        self,
        keys: KeysCollection = "seg_prob",
        cls_key: str = "pred_cls",
        output_key: str | Sequence[str] | None = "pred",
        t_cls: float | None = None,
        top: float | None = None,
        min_area: int | None = None,
        bottom: float | None = None,
        params_file: str | os.PathLike | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.cls_key = cls_key
        out = list(self.keys) if output_key is None else [output_key] if isinstance(output_key, str) else output_key
        if len(out) != len(self.keys):
            raise ValueError(f"{len(self.keys)} keys but {len(out)} output keys")
        self.output_key = dict(zip(self.keys, out))
        self.postprocess = DualOutputPostprocess(t_cls, top, min_area, bottom, params_file)

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
    truth area, the area above each ``top`` and, for each ``bottom``, the predicted area and its
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
        t = truth.detach().float().reshape(b, -1) > 0.5
        tops = torch.tensor(self.grid["top"], device=p.device)
        bottoms = torch.tensor(self.grid["bottom"], device=p.device)
        area_top = (p[:, None, :] > tops[None, :, None]).sum(-1).float()  # [B, n_top]
        pred_b = p[:, None, :] > bottoms[None, :, None]  # [B, n_bottom, N]
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

    def dice(self, stats: torch.Tensor, params: PostprocessingParams) -> float:
        """Mean per-image SIIM Dice of ``params`` (its ``top``/``bottom`` must be on the grid)."""
        ti = self.grid["top"].index(float(params.top))
        bi = self.grid["bottom"].index(float(params.bottom))
        return float(self._dice_table(stats)[:, :, ti, :, bi][self._index(params)].mean())

    def _index(self, params: PostprocessingParams) -> tuple[int, int]:
        return self.grid["t_cls"].index(float(params.t_cls)), self.grid["min_area"].index(float(params.min_area))

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
        keep = (cls_prob[None, None, None, :] >= t_cls[:, None, None, None]) & (
            area_top.T[None, None, :, :] >= min_area[None, :, None, None]
        )  # [n_t_cls, n_min_area, n_top, N]
        return torch.where(keep[..., None], kept_dice[None, None, None], empty_dice[None, None, None, :, None])

    def search(self, stats: torch.Tensor | None = None) -> tuple[PostprocessingParams, float, dict[str, Any]]:
        """Best parameters, their mean Dice, and a summary (ties go to the simplest: smallest values)."""
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
        params = PostprocessingParams(chosen["t_cls"], chosen["top"], int(chosen["min_area"]), chosen["bottom"])
        summary = {"images": int(stats.shape[0]), "grid": {k: list(v) for k, v in self.grid.items()}}
        return params, best, summary


def per_image_dice(pred: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor) -> float:
    """SIIM Dice of one binary mask pair (empty vs empty = 1)."""
    p = torch.as_tensor(pred).bool()
    t = torch.as_tensor(truth).bool()
    denominator = int(p.sum()) + int(t.sum())
    return 1.0 if denominator == 0 else 2.0 * int((p & t).sum()) / denominator
