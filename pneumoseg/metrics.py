"""The SIIM-ACR segmentation metrics, on MONAI's ``DiceMetric``.

SIIM-ACR scores the mean over images of Dice where an empty prediction on an empty truth counts 1: MONAI's
``DiceMetric(ignore_empty=False)`` (per image, one channel, mean over images). The bundle configs use it
through MONAI's ``IgniteMetricHandler`` as ``val_siim_dice``. Restricted to images whose truth is not empty
(segmentation quality where there is something to segment, ``val_siim_dice_positive``) it is
``DiceMetric(ignore_empty=True)``, except when no image is positive: MONAI's mean is then 0, which would read
as "every pneumothorax missed"; :class:`PositiveImageDiceMetric` says NaN (no value) instead.

Both take binary ``[B, 1, *S]`` masks (0/1: the post-processed ``pred`` and the ``label`` that
:class:`pneumoseg.engine.adapters.MultiTaskOutputHandler` puts in ``engine.state.output``). Image-level ROC-AUC,
sensitivity and specificity are MONAI's ``ROCAUC`` and ``ConfusionMatrix`` handlers on ``pred_cls`` /
``pred_label`` / ``label_cls``.
"""

from __future__ import annotations

import torch
from monai.metrics import DiceMetric

__all__ = ["PositiveImageDiceMetric"]


class PositiveImageDiceMetric(DiceMetric):
    """Mean Dice over the images whose truth is not empty; NaN when there are none (MONAI's mean gives 0).

    ``__call__(y_pred, y)`` with binary ``[B, 1, *S]`` tensors; a cumulative metric (DDP-gathered like
    ``DiceMetric``).
    """

    def __init__(self) -> None:
        super().__init__(include_background=True, reduction="mean", get_not_nans=True, ignore_empty=True)

    def aggregate(self, reduction: str | None = None) -> torch.Tensor:  # type: ignore[override]
        dice, positive_images = super().aggregate(reduction)
        return dice if float(positive_images.sum()) > 0 else torch.tensor(float("nan"))
