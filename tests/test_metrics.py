"""SIIM-ACR Dice is MONAI's DiceMetric: equality with the challenge's definition, computed independently."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import DiceMetric

from pneumoseg.metrics import PositiveImageDiceMetric


def _siim_dice_per_image(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """The challenge's definition, image by image: 2|P∩T| / (|P| + |T|), an empty P on an empty T scoring 1."""
    scores = []
    for p, t in zip(pred.reshape(len(pred), -1).astype(bool), truth.reshape(len(truth), -1).astype(bool)):
        total = p.sum() + t.sum()
        scores.append(1.0 if total == 0 else 2.0 * (p & t).sum() / total)
    return np.array(scores)


def _cases(seed: int = 0, n: int = 40, size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Every kind of image: empty on empty, specks on empty, missed positives, partial and exact overlaps."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.zeros(n, 1, size, size)
    pred = torch.zeros(n, 1, size, size)
    for i in range(n):
        kind = i % 5
        box = torch.randint(0, size // 2, (4,), generator=g).tolist()
        if kind in (2, 3, 4):  # positive image
            truth[i, 0, box[0] : box[0] + 4, box[1] : box[1] + 5] = 1
        if kind == 1:  # false positive speck on a negative image
            pred[i, 0, box[2], box[3]] = 1
        if kind == 3:  # partial overlap
            pred[i, 0, box[0] + 1 : box[0] + 6, box[1] : box[1] + 3] = 1
        if kind == 4:  # exact
            pred[i] = truth[i]
    return pred, truth  # kind 0: empty on empty; kind 2: a missed pneumothorax


def test_dice_metric_without_ignore_empty_is_the_siim_score():
    pred, truth = _cases()
    expected = _siim_dice_per_image(pred.numpy(), truth.numpy())
    metric = DiceMetric(ignore_empty=False)
    metric(pred[:17], truth[:17])  # two batches, as an evaluator feeds it
    metric(pred[17:], truth[17:])
    assert float(metric.aggregate()) == pytest.approx(expected.mean(), abs=1e-6)
    assert {0.0, 1.0} <= set(np.round(expected, 6))  # the cases include both extremes and values between
    assert ((expected > 0) & (expected < 1)).any()


def test_positive_image_dice_is_the_mean_over_positive_images_and_nan_without_any():
    pred, truth = _cases(seed=1)
    expected = _siim_dice_per_image(pred.numpy(), truth.numpy())
    positive = truth.flatten(1).amax(1).numpy() > 0
    metric = PositiveImageDiceMetric()
    metric(pred, truth)
    assert float(metric.aggregate()) == pytest.approx(expected[positive].mean(), abs=1e-6)
    # images without a pneumothorax only: no value (MONAI's plain mean would say 0, "all missed")
    negatives = torch.from_numpy(~positive)
    none = PositiveImageDiceMetric()
    none(pred[negatives], truth[negatives])
    assert torch.isnan(none.aggregate())
    plain = DiceMetric(ignore_empty=True)
    plain(pred[negatives], truth[negatives])
    assert float(plain.aggregate()) == 0.0


def test_ignite_handler_as_the_configs_use_it():
    """``val_siim_dice`` as train.json declares it: MONAI's handler on the output keys pred / label."""
    from ignite.engine import Engine

    pred, truth = _cases(seed=2, n=10)
    batches = [{"pred": pred[:6], "label": truth[:6]}, {"pred": pred[6:], "label": truth[6:]}]
    engine = Engine(lambda e, batch: batch)
    handler = IgniteMetricHandler(
        DiceMetric(ignore_empty=False), output_transform=from_engine(["pred", "label"]), save_details=False
    )
    handler.attach(engine, "val_siim_dice")
    engine.run(batches)
    expected = _siim_dice_per_image(pred.numpy(), truth.numpy()).mean()
    assert engine.state.metrics["val_siim_dice"] == pytest.approx(expected, abs=1e-6)
