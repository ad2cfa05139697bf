"""FusedMultiTaskLoss on known cases."""

from __future__ import annotations

import math

import pytest
import torch

from pneumoseg.losses import FusedMultiTaskLoss, image_label_from_mask

CONFIDENT = 20.0  # |logit| of a confident prediction: sigmoid(-20) ~ 2e-9


def masks() -> torch.Tensor:
    target = torch.zeros(2, 1, 32, 32)
    target[0, :, 4:14, 6:16] = 1  # image 0 positive (100 px), image 1 empty
    return target


@pytest.mark.parametrize("dice_per_image", [False, True])
def test_perfect_prediction_costs_nothing(dice_per_image):
    target = masks()
    seg = (target * 2 - 1) * CONFIDENT
    cls = torch.tensor([[CONFIDENT], [-CONFIDENT]])
    terms = FusedMultiTaskLoss(dice_per_image=dice_per_image)(seg, cls, target)
    assert terms.total.item() < 1e-4
    assert all(math.isfinite(t.item()) for t in terms)


@pytest.mark.parametrize("dice_per_image", [False, True])
def test_empty_prediction_on_empty_mask_costs_nothing(dice_per_image):
    target = torch.zeros(3, 1, 16, 16)
    terms = FusedMultiTaskLoss(dice_per_image=dice_per_image)(
        torch.full_like(target, -CONFIDENT), torch.full((3, 1), -CONFIDENT), target
    )
    assert terms.seg_dice.item() < 1e-4
    assert terms.total.item() < 1e-4
    assert not any(torch.isnan(t) for t in terms)


def test_all_wrong_prediction_is_maximal():
    target = masks()
    seg = (1 - target * 2) * CONFIDENT  # every pixel wrong, confidently
    cls = torch.tensor([[-CONFIDENT], [CONFIDENT]])
    terms = FusedMultiTaskLoss()(seg, cls, target)
    assert terms.seg_dice.item() > 0.99
    assert terms.seg_bce.item() == pytest.approx(CONFIDENT, rel=1e-3)
    assert terms.cls_bce.item() == pytest.approx(CONFIDENT, rel=1e-3)


def test_positive_image_with_empty_prediction():
    target = masks()[:1]
    seg = torch.full_like(target, -CONFIDENT)
    terms = FusedMultiTaskLoss()(seg, torch.tensor([[-CONFIDENT]]), target)
    # soft Dice with smoothing 1 on a 100-px lesion: 1 - 1 / (100 + 1)
    assert terms.seg_dice.item() == pytest.approx(1 - 1 / 101, abs=1e-4)
    assert terms.cls_bce.item() == pytest.approx(CONFIDENT, rel=1e-3)  # missed the positive image
    # the missed pixels cost CONFIDENT each in BCE, averaged over 32*32 pixels
    assert terms.seg_bce.item() == pytest.approx(CONFIDENT * 100 / 1024, rel=1e-3)


def test_total_is_the_weighted_sum_of_the_parts():
    torch.manual_seed(0)
    target = masks()
    seg, cls = torch.randn_like(target), torch.randn(2, 1)
    loss = FusedMultiTaskLoss(seg_weight=2.0, cls_weight=0.3, bce_weight=0.7, dice_weight=1.5)
    terms = loss(seg, cls, target)
    expected = 2.0 * (0.7 * terms.seg_bce + 1.5 * terms.seg_dice) + 0.3 * terms.cls_bce
    torch.testing.assert_close(terms.total, expected)
    # and the parts are what they claim to be
    probs = torch.sigmoid(seg)
    dice = 1 - (2 * (probs * target).sum() + 1) / (probs.sum() + target.sum() + 1)
    torch.testing.assert_close(terms.seg_dice, dice)
    torch.testing.assert_close(
        terms.cls_bce, torch.nn.functional.binary_cross_entropy_with_logits(cls, torch.tensor([[1.0], [0.0]]))
    )


def test_image_label_is_derived_from_the_mask_unless_given():
    target = masks()
    assert image_label_from_mask(target).tolist() == [[1.0], [0.0]]
    loss = FusedMultiTaskLoss()
    seg = torch.zeros_like(target)
    cls = torch.tensor([[3.0], [3.0]])
    derived = loss(seg, cls, target).cls_bce
    given = loss(seg, cls, target, cls_target=torch.tensor([[1.0], [1.0]])).cls_bce
    assert given.item() < derived.item()


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="segmentation logits"):
        FusedMultiTaskLoss()(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1), torch.zeros(1, 1, 8, 9))


def test_gradients_flow_to_both_outputs():
    target = masks()
    seg = torch.zeros_like(target, requires_grad=True)
    cls = torch.zeros(2, 1, requires_grad=True)
    FusedMultiTaskLoss()(seg, cls, target).total.backward()
    assert seg.grad.abs().sum() > 0 and cls.grad.abs().sum() > 0
