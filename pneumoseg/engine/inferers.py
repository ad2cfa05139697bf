"""Inferers for the dual-output network: CPU autocast, and CT volumes slice by slice with the image head."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import Inferer, SimpleInferer, SliceInferer
from torch import nn

from pneumoseg.engine.flags import as_flag
from pneumoseg.networks import SCSEUNetOutput

__all__ = ["AutocastInferer", "DualOutputSliceInferer"]


class AutocastInferer(SimpleInferer):
    """``SimpleInferer`` under ``torch.autocast`` (e.g. opt-in bf16 on CPU, which the engines' ``amp`` does
    not cover: MONAI autocasts on CUDA only). Disabled, it is exactly ``SimpleInferer``."""

    def __init__(self, enabled: bool = False, device_type: str = "cpu", dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.enabled = as_flag(enabled, "cpu_bf16")
        self.device_type = device_type
        self.dtype = dtype

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        context = torch.autocast(self.device_type, dtype=self.dtype) if self.enabled else contextlib.nullcontext()
        with context:
            out = network(inputs, *args, **kwargs)
        if isinstance(out, SCSEUNetOutput):  # downstream sigmoid/metrics in fp32
            return SCSEUNetOutput(out.seg.float(), out.cls.float())
        return out


class _SegmentationCapture(nn.Module):
    """Segmentation view that also records every call's image logits (used inside SliceInferer)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.cls_logits: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        self.cls_logits.append(out.cls.detach())
        return out.seg


class DualOutputSliceInferer(Inferer):
    """2D network over a 3D volume ``[B, C, I, J, K]`` slice by slice along K (MONAI ``SliceInferer`` over
    the segmentation output); returns ``SCSEUNetOutput(seg=[B, 1, I, J, K], cls=[B, 1])`` where the volume's
    image logit is the maximum over its slices (a pneumothorax anywhere makes the volume positive).

    ``roi_size``: in-plane window ``(I, J)``; ``-1`` takes the full extent (one window per slice).
    A 2D input ``[B, C, H, W]`` is passed straight to the network.
    """

    def __init__(self, roi_size: Sequence[int] = (-1, -1), sw_batch_size: int = 8, **kwargs: Any) -> None:
        super().__init__()
        self.roi_size = tuple(roi_size)
        self.sw_batch_size = sw_batch_size
        self.kwargs = kwargs

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if inputs.dim() == 4:
            return network(inputs)
        capture = _SegmentationCapture(network)
        inferer = SliceInferer(
            roi_size=self.roi_size, sw_batch_size=self.sw_batch_size, spatial_dim=2, progress=False, **self.kwargs
        )
        seg = inferer(inputs, capture)
        # SliceInferer walks the volumes of the batch in order, each in sw_batch_size chunks of slices
        cls = torch.cat(capture.cls_logits).reshape(inputs.shape[0], -1).amax(dim=1, keepdim=True)
        return SCSEUNetOutput(torch.as_tensor(seg), cls)
