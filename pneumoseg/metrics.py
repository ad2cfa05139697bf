"""Segmentation metrics of the SIIM-ACR challenge, as MONAI cumulative metrics and Ignite handlers.

SIIM scores the mean of per-image Dice where an empty prediction on an empty truth counts 1 (MONAI's
``DiceMetric`` gives NaN there, or 0 with ``ignore_empty=False``, neither matching). ``positive_only``
restricts the mean to images whose truth is not empty: the segmentation quality where there is
something to segment. Image-level ROC-AUC, sensitivity and specificity use MONAI's own ``ROCAUC`` and
``ConfusionMatrix`` handlers on the ``pred_cls`` / ``pred_label`` / ``label_cls`` keys that
:class:`pneumoseg.workflows.MultiTaskOutputHandler` puts in ``engine.state.output``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import CumulativeIterationMetric

__all__ = ["SIIMDiceMetric", "SIIMDice"]


class SIIMDiceMetric(CumulativeIterationMetric):
    """Mean per-image Dice, empty prediction on empty truth = 1.

    Args:
        positive_only: average over images with a non-empty truth only (NaN if there are none).

    ``__call__(y_pred, y)`` with binary ``[B, C, *S]`` tensors (or lists of ``[C, *S]``); the buffer holds
    ``[B, 2]`` rows (Dice, truth non-empty) so that both means come from the same pass and DDP gathers them.
    """

    def __init__(self, positive_only: bool = False) -> None:
        super().__init__()
        self.positive_only = positive_only

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            raise ValueError("SIIMDiceMetric needs the ground truth")
        if y_pred.shape != y.shape:
            raise ValueError(f"prediction {tuple(y_pred.shape)} and truth {tuple(y.shape)} differ in shape")
        b = y_pred.shape[0]
        p = y_pred.reshape(b, -1) > 0.5
        t = y.reshape(b, -1) > 0.5
        denominator = (p.sum(1) + t.sum(1)).float()
        inter = (p & t).sum(1).float()
        dice = torch.where(denominator > 0, 2 * inter / denominator.clamp_min(1), torch.ones_like(denominator))
        return torch.stack([dice, t.any(1).float()], dim=1)

    def aggregate(self) -> torch.Tensor:
        rows = self.get_buffer()
        if not isinstance(rows, torch.Tensor) or rows.numel() == 0:
            return torch.tensor(float("nan"))
        rows = rows.reshape(-1, 2)
        if self.positive_only:
            rows = rows[rows[:, 1] > 0]
            if rows.shape[0] == 0:
                return torch.tensor(float("nan"))
        return rows[:, 0].mean()


class SIIMDice(IgniteMetricHandler):
    """Ignite handler of :class:`SIIMDiceMetric` (default inputs: output keys ``pred`` and ``label``)."""

    def __init__(
        self,
        positive_only: bool = False,
        output_transform: Callable = from_engine(["pred", "label"]),
        save_details: bool = False,
    ) -> None:
        super().__init__(SIIMDiceMetric(positive_only), output_transform=output_transform, save_details=save_details)
