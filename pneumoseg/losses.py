"""The fused multi-task loss of patent CN114743000A (claim 1, S3).

``L = w_seg * (w_bce * BCE(seg) + w_dice * SoftDice(seg)) + w_cls * BCE(cls, image label)``

where the image label is 1 when the mask has any positive pixel. The pixel-level (local) terms and
the image-level (global) term are computed from the two outputs of :class:`~pneumoseg.networks.SCSEUNet`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

__all__ = ["LossTerms", "FusedMultiTaskLoss", "image_label_from_mask"]


class LossTerms(NamedTuple):
    """The total loss (to back-propagate) and its unweighted parts (to log); all scalars."""

    total: torch.Tensor
    seg_bce: torch.Tensor
    seg_dice: torch.Tensor
    cls_bce: torch.Tensor


def image_label_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """``[B, C, *S]`` mask -> ``[B, 1]`` float image label: 1 where any pixel is positive."""
    return (mask.flatten(1) > 0.5).any(dim=1, keepdim=True).float()


class FusedMultiTaskLoss(nn.Module):
    """Weighted sum of pixel BCE + soft Dice (segmentation) and image-level BCE (classification).

    Args:
        seg_weight: w_seg, weight of the pixel-level (local) terms.
        cls_weight: w_cls, weight of the image-level (global) term.
        bce_weight: weight of pixel BCE inside the segmentation term.
        dice_weight: weight of soft Dice inside the segmentation term.
        smooth: Dice smoothing added to numerator and denominator. Equal on both sides, an empty
            prediction on an empty mask costs 0 and nothing is ever NaN; 1.0 (not MONAI's 1e-5)
            keeps a confident empty prediction (probabilities ~1e-9) on an empty mask near zero
            cost, where 1e-5 would charge it about 0.5.
        dice_per_image: compute soft Dice per image and average (like the SIIM metric) instead of
            over the whole batch (the default, as in segmentation_models_pytorch). Per image, an
            empty mask is only cheap once the summed probability is far below ``smooth``, which
            makes negative images dominate the gradient early in training.
        cls_pos_weight: optional ``pos_weight`` of the image-level BCE (class imbalance).

    Shapes: ``seg_logits``/``seg_target`` ``[B, 1, *S]``; ``cls_logits``/``cls_target`` ``[B, 1]``.
    """

    def __init__(
        self,
        seg_weight: float = 1.0,
        cls_weight: float = 0.5,
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        smooth: float = 1.0,
        dice_per_image: bool = False,
        cls_pos_weight: float | None = None,
    ) -> None:
        super().__init__()
        self.seg_weight = seg_weight
        self.cls_weight = cls_weight
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.dice = DiceLoss(
            sigmoid=True, smooth_nr=smooth, smooth_dr=smooth, batch=not dice_per_image, reduction="mean"
        )
        pos_weight = None if cls_pos_weight is None else torch.tensor([float(cls_pos_weight)])
        self.register_buffer("cls_pos_weight", pos_weight, persistent=False)

    def forward(
        self,
        seg_logits: torch.Tensor,
        cls_logits: torch.Tensor,
        seg_target: torch.Tensor,
        cls_target: torch.Tensor | None = None,
    ) -> LossTerms:
        if seg_logits.shape != seg_target.shape:
            raise ValueError(f"segmentation logits {tuple(seg_logits.shape)} vs target {tuple(seg_target.shape)}")
        seg_target = seg_target.float()
        if cls_target is None:
            cls_target = image_label_from_mask(seg_target)
        cls_target = cls_target.float().reshape(cls_logits.shape)
        # losses in fp32 even under autocast: BCE/Dice sums over 1e6 pixels lose precision in bf16
        seg_logits = seg_logits.float()
        cls_logits = cls_logits.float()
        seg_bce = F.binary_cross_entropy_with_logits(seg_logits, seg_target)
        seg_dice = self.dice(seg_logits, seg_target)
        cls_bce = F.binary_cross_entropy_with_logits(cls_logits, cls_target, pos_weight=self.cls_pos_weight)
        total = self.seg_weight * (self.bce_weight * seg_bce + self.dice_weight * seg_dice) + self.cls_weight * cls_bce
        return LossTerms(total, seg_bce.detach(), seg_dice.detach(), cls_bce.detach())
