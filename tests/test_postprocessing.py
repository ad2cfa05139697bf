"""The post-processing rule, its one threshold convention, and the search of its thresholds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mask_support import box_masks
from monai.metrics import DiceMetric
from monai.transforms import AsDiscrete

from pneumoseg.model_record import PostprocessingThresholds
from pneumoseg.postprocessing import (
    PLAIN,
    DualOutputPostprocess,
    DualOutputPostprocessd,
    PostprocessingSearch,
    at_or_above,
)


def _siim_dice(masks: torch.Tensor, truth: torch.Tensor) -> float:
    metric = DiceMetric(ignore_empty=False)
    metric(masks, truth)
    return float(metric.aggregate())


def test_dual_output_postprocess_rule():
    prob = torch.zeros(1, 10, 10)
    prob[0, :3, :3] = 0.9  # 9 confident pixels
    prob[0, 3, :3] = 0.4  # a rim above bottom=0.3 only
    pp = DualOutputPostprocess(t_cls=0.5, top=0.8, min_area=5, bottom=0.3)
    assert pp(prob, 0.4).sum() == 0  # gated by the image probability
    assert pp(prob, torch.tensor([0.6])).sum() == 12  # kept: 9 core + 3 rim pixels at or above bottom
    assert DualOutputPostprocess(t_cls=0.5, top=0.8, min_area=10, bottom=0.3)(prob, 0.9).sum() == 0  # too small
    plain = PostprocessingThresholds(t_cls=0.0, top=0.5, min_area=0, bottom=0.5)
    d = DualOutputPostprocessd(keys="seg_prob", thresholds=plain)({"seg_prob": prob, "pred_cls": 0.1})
    assert d["pred"].sum() == 9


def test_one_threshold_convention_at_or_above_everywhere():
    """A probability equal to its threshold is positive: pixels (top, bottom), the image gate, MONAI's own."""
    prob = torch.full((1, 4, 4), 0.5)
    assert at_or_above(torch.tensor(0.5), 0.5) and not at_or_above(torch.tensor(0.4999), 0.5)
    assert bool((at_or_above(np.array([0.5]), 0.5)).all())  # arrays too (site evaluation's rates)
    assert DualOutputPostprocess(t_cls=0.5, top=0.5, min_area=16, bottom=0.5)(prob, 0.5).sum() == 16
    assert DualOutputPostprocess(t_cls=0.5001, top=0.5, min_area=0, bottom=0.5)(prob, 0.5).sum() == 0
    assert DualOutputPostprocess(t_cls=0.0, top=0.5001, min_area=1, bottom=0.5)(prob, 1.0).sum() == 0
    assert torch.equal(AsDiscrete(threshold=0.5)(prob), at_or_above(prob, 0.5).float())  # MONAI's convention
    # the search counts the same pixels as the rule
    search = PostprocessingSearch({"t_cls": [0.5], "top": [0.5], "min_area": [16], "bottom": [0.5]})
    truth = torch.ones(1, 1, 4, 4)
    search.update(prob[None], torch.tensor([[0.5]]), truth)
    assert search.dice(search.statistics(), PostprocessingThresholds(0.5, 0.5, 16, 0.5)) == pytest.approx(1.0)


def test_search_statistics_give_the_same_dice_as_applying_the_rule():
    g = torch.Generator().manual_seed(3)
    truth = box_masks(seed=3, b=6)
    prob = (0.6 * truth + 0.5 * torch.rand(6, 1, 16, 16, generator=g)).clamp(0, 1)
    prob[0, 0, 0, :4] = torch.tensor([0.2, 0.3, 0.4, 0.5])  # values exactly on grid points
    cls = torch.rand(6, 1, generator=g)
    cls[1, 0] = 0.3  # an image probability exactly on a gate value
    search = PostprocessingSearch()
    search.update(prob[:3], cls[:3], truth[:3])
    search.update(prob[3:], cls[3:], truth[3:])
    stats = search.statistics()
    for thresholds in (PLAIN, PostprocessingThresholds(0.3, 0.7, 25, 0.4), PostprocessingThresholds(0.5, 0.9, 10, 0.2)):
        pp = DualOutputPostprocess.from_thresholds(thresholds)
        masks = torch.stack([pp(p, c) for p, c in zip(prob, cls)])
        assert search.dice(stats, thresholds) == pytest.approx(_siim_dice(masks, truth), abs=1e-6)
    best, best_dice, summary = search.search(stats)
    assert summary["images"] == 6
    assert best_dice >= search.dice(stats, PLAIN) - 1e-9
    pp = DualOutputPostprocess.from_thresholds(best)
    assert best_dice == pytest.approx(_siim_dice(torch.stack([pp(p, c) for p, c in zip(prob, cls)]), truth), abs=1e-6)


def test_search_removes_false_positive_specks_with_min_area():
    truth = torch.zeros(2, 1, 16, 16)
    truth[1, 0, 2:10, 2:10] = 1
    prob = torch.zeros(2, 1, 16, 16)
    prob[0, 0, 0, 0] = 0.95  # one-pixel speck on a negative image
    prob[1, 0, 2:10, 2:10] = 0.95
    search = PostprocessingSearch({"t_cls": [0.0], "min_area": [0, 10]})
    search.update(prob, torch.ones(2, 1), truth)
    chosen, dice, _ = search.search()
    assert search.dice(search.statistics(), PLAIN) == pytest.approx(0.5)
    assert chosen.min_area == 10 and dice == pytest.approx(1.0)
