"""pneumoseg.engine.inferers: CT volumes slice by slice with the image head; CPU autocast."""

from __future__ import annotations

import torch

from pneumoseg.engine.inferers import AutocastInferer, DualOutputSliceInferer
from pneumoseg.networks import SCSEUNet


def test_slice_inferer_returns_3d_mask_and_max_slice_logit():
    torch.manual_seed(0)
    net = SCSEUNet(decoder_channels=(16, 8, 8, 8, 8), head_channels=8).eval()
    volume = torch.rand(1, 1, 64, 64, 3)
    with torch.no_grad():
        out = DualOutputSliceInferer(roi_size=(64, 64), sw_batch_size=2)(volume, net)
        per_slice = [net(volume[..., k]) for k in range(3)]
    assert out.seg.shape == (1, 1, 64, 64, 3)
    assert torch.allclose(out.seg[..., 1], per_slice[1].seg, atol=1e-5)
    assert torch.allclose(out.cls, torch.stack([o.cls for o in per_slice]).amax(0), atol=1e-5)


def test_autocast_inferer_bf16_returns_fp32():
    net = SCSEUNet(decoder_channels=(16, 8, 8, 8, 8), head_channels=8).eval()
    with torch.no_grad():
        out = AutocastInferer(enabled=True)(torch.rand(1, 1, 64, 64), net)
        ref = AutocastInferer(enabled=False)(torch.rand(1, 1, 64, 64), net)
    assert out.seg.dtype == torch.float32 and ref.seg.dtype == torch.float32
