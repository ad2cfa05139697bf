"""pneumoseg.engine.adapters: the dual output through MONAI's engines as plain tensors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from mask_support import box_masks

from pneumoseg.engine.adapters import (
    MultiTaskLoss,
    MultiTaskOutputHandler,
    MultiTaskPrepareBatch,
    MultiTaskTarget,
    loss_terms,
)
from pneumoseg.losses import FusedMultiTaskLoss
from pneumoseg.networks import SCSEUNetOutput


def test_prepare_batch_derives_image_label_from_mask():
    masks = box_masks()
    image, target = MultiTaskPrepareBatch()({"image": torch.rand(4, 1, 16, 16), "label": masks}, "cpu")
    assert image.shape == (4, 1, 16, 16)
    assert isinstance(target, MultiTaskTarget)
    assert torch.equal(target.seg, masks)
    assert target.cls.tolist() == [[0.0], [1.0], [0.0], [1.0]]
    _, none = MultiTaskPrepareBatch()({"image": torch.rand(2, 1, 8, 8)}, "cpu")
    assert none is None


def test_loss_adapter_matches_fused_loss_and_keeps_terms():
    g = torch.Generator().manual_seed(1)
    pred = SCSEUNetOutput(torch.randn(4, 1, 16, 16, generator=g), torch.randn(4, 1, generator=g))
    masks = box_masks()
    adapter = MultiTaskLoss(cls_weight=0.3)
    reference = FusedMultiTaskLoss(cls_weight=0.3)(pred.seg, pred.cls, masks)
    total = adapter(pred, MultiTaskTarget(masks, (masks.flatten(1).amax(1, keepdim=True) > 0).float()))
    assert torch.allclose(total, reference.total)
    assert torch.allclose(adapter.last_terms.cls_bce, reference.cls_bce)
    assert torch.allclose(adapter(pred, masks), reference.total)  # a bare mask works too
    with pytest.raises(TypeError, match="SCSEUNetOutput"):
        adapter((pred.seg, pred.cls), masks)


def test_output_handler_exposes_plain_tensors():
    masks = box_masks()
    seg_logits = torch.where(masks > 0, 4.0, -4.0)  # confident and right
    cls_logits = torch.tensor([[-3.0], [3.0], [0.1], [3.0]])
    loss = MultiTaskLoss()
    total = loss(SCSEUNetOutput(seg_logits, cls_logits), masks)
    engine = SimpleNamespace(
        state=SimpleNamespace(
            output={
                "image": torch.zeros(4, 1, 16, 16),
                "label": MultiTaskTarget(masks, (masks.flatten(1).amax(1, keepdim=True) > 0).float()),
                "pred": SCSEUNetOutput(seg_logits, cls_logits),
                "loss": total,
            }
        )
    )
    MultiTaskOutputHandler(loss_function=loss, operating_threshold=0.5)(engine)
    out = engine.state.output
    assert torch.equal(out["pred"], masks)  # 0.5 threshold of sigmoid(+-4)
    assert out["seg_prob"].shape == (4, 1, 16, 16) and out["pred_cls"].shape == (4, 1)
    assert out["pred_label"].flatten().tolist() == [0.0, 1.0, 1.0, 1.0]
    assert out["label_cls"].flatten().tolist() == [0.0, 1.0, 0.0, 1.0]
    assert set(loss_terms(out)) == {"loss", "seg_bce", "seg_dice", "cls_bce"}
    # trainer form: one dict per image, scalars replicated (what MONAI's default trainer handlers read)
    from monai.handlers import from_engine

    engine.state.output = {
        "label": MultiTaskTarget(masks, (masks.flatten(1).amax(1, keepdim=True) > 0).float()),
        "pred": SCSEUNetOutput(seg_logits, cls_logits),
        "loss": total,
    }
    MultiTaskOutputHandler(loss_function=loss, decollate=True)(engine)
    items = engine.state.output
    assert isinstance(items, list) and len(items) == 4 and items[3]["pred"].shape == (1, 16, 16)
    assert float(from_engine(["loss"], first=True)(items)) == pytest.approx(float(total))
    assert loss_terms(items) == pytest.approx(loss_terms(out))
    engine.state.output = {"pred": seg_logits}
    with pytest.raises(TypeError, match="SCSEUNetOutput"):
        MultiTaskOutputHandler()(engine)


def test_pred_label_calls_the_operating_threshold_itself_positive():
    """sensitivity / specificity use the one convention: a probability at the threshold is positive."""
    logit = torch.logit(torch.tensor(0.25))
    engine = SimpleNamespace(
        state=SimpleNamespace(
            output={"pred": SCSEUNetOutput(torch.zeros(2, 1, 4, 4), torch.stack([logit, logit - 1e-3])[:, None])}
        )
    )
    MultiTaskOutputHandler(operating_threshold=float(torch.sigmoid(logit)))(engine)
    assert engine.state.output["pred_label"].flatten().tolist() == [1.0, 0.0]
