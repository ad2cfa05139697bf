"""The multi-task scSE U-Net of patent CN114743000A.

Read top to bottom: the scSE attention block, the ResNet34 encoder it corrects, the decoder block,
the decoder (centre block + four skip-fusing blocks), the hypercolumn segmentation head, the
classification head, and :class:`SCSEUNet` that wires them together. :class:`SegmentationView`
exposes the segmentation output alone, for MONAI inferers and for TorchScript/ONNX export.

Layer numbering follows the patent, which counts ResNet34's layers as the ResNet paper does::

    patent layer 1 = stem (conv1 7x7/2, bn, relu)        -> [B,  64, H/2 ]
    patent layer 2 = maxpool + layer1 (conv2_x, 3 blocks) -> [B,  64, H/4 ]
    patent layer 3 = layer2 (conv3_x, 4 blocks)           -> [B, 128, H/8 ]
    patent layer 4 = layer3 (conv4_x, 6 blocks)           -> [B, 256, H/16]
    patent layer 5 = layer4 (conv5_x, 3 blocks)           -> [B, 512, H/32]

Every encoder stage output is corrected by scSE; the corrected tensor both feeds the next stage and
is the skip connection. The decoder max-pools layer 5 once more (to H/64, the "centre"), so the
network's total stride is 64. See ``docs/architecture.md`` for the figure, the claim-to-code table
and where the patent is ambiguous.

Output contract (used by the loss, the workflows, inference and export)::

    SCSEUNet(x: [B, C_in, *S]) -> SCSEUNetOutput(
        seg=[B, out_channels, *S]  segmentation logits at the input resolution,
        cls=[B, 1]                 image-level pneumothorax logit)

Both outputs are logits; apply ``torch.sigmoid`` for probabilities.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv, Pool
from monai.networks.nets import resnet34
from torch import nn

__all__ = [
    "ChannelSE",
    "SpatialSE",
    "SCSEBlock",
    "ResNet34Encoder",
    "DecoderBlock",
    "UNetDecoder",
    "HypercolumnHead",
    "ClassificationHead",
    "SCSEUNetOutput",
    "SCSEUNet",
    "SegmentationView",
    "load_torchvision_resnet34",
]

ENCODER_CHANNELS: tuple[int, ...] = (64, 64, 128, 256, 512)
"""Output channels of the five ResNet34 stages (patent layers 1..5)."""

TOTAL_STRIDE = 64
"""Down-sampling factor from the input to the centre block (stride-2 stem, max-pool, 3 strided
stages, the extra max-pool of the centre)."""


# ---------------------------------------------------------------------------------------------
# scSE attention (claim 4)
# ---------------------------------------------------------------------------------------------
class ChannelSE(nn.Module):
    """Channel squeeze & excitation (cSE): ``U * sigmoid(W2 relu(W1 gap(U)))``.

    Args:
        channels: C, channels of ``U``.
        reduction: r; the bottleneck has ``max(1, C // r)`` units.

    Shapes: ``[B, C, *S] -> [B, C, *S]``.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = x.flatten(2).mean(dim=2)  # global average pool, any number of spatial dims
        weights = torch.sigmoid(self.fc2(F.relu(self.fc1(squeezed))))
        for _ in range(x.dim() - 2):  # [B, C] -> [B, C, 1, ...]; a loop, since TorchScript has no splat
            weights = weights.unsqueeze(-1)
        return x * weights


class SpatialSE(nn.Module):
    """Spatial squeeze & excitation (sSE): ``U * sigmoid(conv1x1(U))`` with one output channel.

    Shapes: ``[B, C, *S] -> [B, C, *S]``.
    """

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        self.conv = Conv[Conv.CONV, spatial_dims](channels, 1, kernel_size=1)
        # zero init: the gate starts at exactly 0.5 everywhere. A random 1x1 conv over non-negative
        # (post-ReLU) features would start the gate anywhere in ~0.1-0.7 depending on the stage and
        # scale pretrained encoder features by that much.
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv(x))


class SCSEBlock(nn.Module):
    """Concurrent spatial and channel SE: ``cSE(U) + sSE(U)`` (the patent adds the two branches).

    At initialisation the sSE gate is exactly 0.5 (zero-initialised conv) and the cSE gates are close
    to 0.5, so the block starts close to the identity and does not disturb pretrained encoder features.

    Shapes: ``[B, C, *S] -> [B, C, *S]``.
    """

    def __init__(self, spatial_dims: int, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.cse = ChannelSE(channels, reduction)
        self.sse = SpatialSE(spatial_dims, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cse(x) + self.sse(x)


# ---------------------------------------------------------------------------------------------
# Encoder (claim 2, S1.1)
# ---------------------------------------------------------------------------------------------
def _resnet34_trunk(spatial_dims: int, in_channels: int) -> nn.Module:
    # MONAI's ResNet with these arguments has exactly torchvision's parameter names and shapes
    # (conv1, bn1, layer1..4), so torchvision-layout checkpoints load strictly.
    return resnet34(
        spatial_dims=spatial_dims,
        n_input_channels=in_channels,
        conv1_t_size=7,
        conv1_t_stride=2,
        bias_downsample=False,
        feed_forward=False,
    )


class ResNet34Encoder(nn.Module):
    """ResNet34 (BasicBlocks 3-4-6-3, 7x7 stride-2 stem, max-pool) with scSE after every stage.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (1 for radiographs and CT).
        reduction: scSE reduction ratio r.
        pretrained_path: optional local torchvision-layout ``resnet34`` checkpoint (2D only);
            see :func:`load_torchvision_resnet34`. Nothing is ever downloaded.
        scse: correct every stage by scSE (the patent); ``False`` leaves the plain ResNet34 stages (ablation).

    ``forward`` returns the five scSE-corrected stage outputs, patent layers 1..5::

        [B, 64, S/2], [B, 64, S/4], [B, 128, S/8], [B, 256, S/16], [B, 512, S/32]
    """

    out_channels: tuple[int, ...] = ENCODER_CHANNELS

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        reduction: int = 16,
        pretrained_path: str | os.PathLike | None = None,
        scse: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        trunk = _resnet34_trunk(spatial_dims, in_channels)
        if pretrained_path is not None:
            load_torchvision_resnet34(trunk, pretrained_path, in_channels, spatial_dims)
        # keep the trunk's own module names (conv1, bn1, layer1..) so checkpoints map one to one
        self.conv1 = trunk.conv1
        self.bn1 = trunk.bn1
        self.act = trunk.act
        self.maxpool = trunk.maxpool
        self.layer1 = trunk.layer1
        self.layer2 = trunk.layer2
        self.layer3 = trunk.layer3
        self.layer4 = trunk.layer4
        self.scse = nn.ModuleList(
            [SCSEBlock(spatial_dims, c, reduction) if scse else nn.Identity() for c in self.out_channels]
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features: list[torch.Tensor] = []
        x = self.scse[0](self.act(self.bn1(self.conv1(x))))
        features.append(x)
        x = self.scse[1](self.layer1(self.maxpool(x)))
        features.append(x)
        x = self.scse[2](self.layer2(x))
        features.append(x)
        x = self.scse[3](self.layer3(x))
        features.append(x)
        x = self.scse[4](self.layer4(x))
        features.append(x)
        return features


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained encoder checkpoint not found: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle of arbitrary objects is refused, never executed
        raise ValueError(f"{path}: not a loadable tensor checkpoint ({exc})") from exc
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (torchvision resnet34 layout)")
    return loaded


def load_torchvision_resnet34(
    trunk: nn.Module, path: str | os.PathLike, in_channels: int, spatial_dims: int = 2
) -> None:
    """Load a torchvision-layout ``resnet34`` state dict into a MONAI ResNet34 trunk, strictly.

    The classifier (``fc.*``) of the checkpoint is ignored on purpose; any other missing or
    unexpected key, or a shape mismatch, raises ``ValueError`` listing the keys. For
    ``in_channels != 3`` the RGB stem is adapted: summed over RGB for 1 channel (a grey image is
    R=G=B), otherwise the RGB filters are repeated cyclically and rescaled by ``3 / in_channels``.
    """
    if spatial_dims != 2:
        raise ValueError(f"{path}: torchvision resnet34 weights are 2D; spatial_dims={spatial_dims}")
    state = {k.removeprefix("module."): v for k, v in _read_state_dict(path).items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    stem = state.get("conv1.weight")
    if stem is not None and stem.dim() == 4 and stem.shape[1] == 3 and in_channels != 3:
        if in_channels == 1:
            stem = stem.sum(dim=1, keepdim=True)
        else:
            repeats = math.ceil(in_channels / 3)
            stem = stem.repeat(1, repeats, 1, 1)[:, :in_channels] * (3.0 / in_channels)
        state["conv1.weight"] = stem
    expected = {k: v for k, v in trunk.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{path} is not a torchvision-layout resnet34 checkpoint: "
            f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
            f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}; "
            f"shape mismatches {mismatched[:20]}"
        )
    trunk.load_state_dict(state, strict=False)  # strictness was checked above; fc is not loaded


# ---------------------------------------------------------------------------------------------
# Decoder (claim 3, S2.1-S2.5)
# ---------------------------------------------------------------------------------------------
class DecoderBlock(nn.Module):
    """Up-sample x2, then (conv-norm-ReLU) x2, then scSE.

    The input is the previous block's output, already concatenated with the encoder skip of the
    same resolution (the concatenation happens in :class:`UNetDecoder`).

    Shapes: ``[B, in_channels, *S] -> [B, out_channels, *2S]``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        reduction: int = 16,
        norm: str | tuple = "batch",
        upsample_mode: str = "nearest",
    ) -> None:
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=2.0, mode=upsample_mode)
        self.conv1 = Convolution(spatial_dims, in_channels, out_channels, kernel_size=3, act="relu", norm=norm)
        self.conv2 = Convolution(spatial_dims, out_channels, out_channels, kernel_size=3, act="relu", norm=norm)
        self.scse = SCSEBlock(spatial_dims, out_channels, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scse(self.conv2(self.conv1(self.upsample(x))))


class UNetDecoder(nn.Module):
    """Centre block + four skip-fusing blocks (patent S2.1-S2.5).

    Block 1 up-samples the max-pooled layer 5 (the centre); block k = 2..5 concatenates block
    k-1's output with the scSE-corrected encoder layer 7-k (5, 4, 3, 2) and up-samples. Returns the
    outputs of all five blocks (each scSE-corrected), coarsest first::

        [B, c1, S/32], [B, c2, S/16], [B, c3, S/8], [B, c4, S/4], [B, c5, S/2]
    """

    def __init__(
        self,
        spatial_dims: int,
        encoder_channels: Sequence[int] = ENCODER_CHANNELS,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        reduction: int = 16,
        norm: str | tuple = "batch",
        upsample_mode: str = "nearest",
    ) -> None:
        super().__init__()
        if len(decoder_channels) != 5:
            raise ValueError(f"decoder_channels needs 5 entries (one per block), got {decoder_channels}")
        self.centre_pool = Pool[Pool.MAX, spatial_dims](kernel_size=2, stride=2)
        # encoder layers 5, 4, 3, 2 are fused by blocks 2..5; layer 1 (the stem) is not fused
        skips = [encoder_channels[4], encoder_channels[3], encoder_channels[2], encoder_channels[1]]
        in_channels = [encoder_channels[4]] + [c + s for c, s in zip(decoder_channels[:4], skips)]
        self.blocks = nn.ModuleList(
            DecoderBlock(spatial_dims, cin, cout, reduction, norm, upsample_mode)
            for cin, cout in zip(in_channels, decoder_channels)
        )

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        skips = [features[4], features[3], features[2], features[1]]
        x = self.centre_pool(features[4])
        outputs: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            if i > 0:
                x = torch.cat([x, skips[i - 1]], dim=1)
            x = block(x)
            outputs.append(x)
        return outputs


# ---------------------------------------------------------------------------------------------
# Heads (claim 3 S2.6 and claim 1 S1)
# ---------------------------------------------------------------------------------------------
class HypercolumnHead(nn.Module):
    """Segmentation head over the fused decoder outputs (patent S2.6).

    With ``hypercolumn=True`` all decoder block outputs are up-sampled to the finest one's
    resolution (S/2) and concatenated; otherwise only the last block's output is used (ablation).
    Then 1x1 conv-norm-ReLU (channel reduction, keeps the wide hypercolumn cheap), a 3x3 conv to
    ``out_channels`` logits, and x2 up-sampling to the input resolution.

    The hypercolumn is computed without materialising it: the 1x1 convolution is applied to each
    decoder output at its own resolution (with that output's slice of the weight) and the reduced
    maps are up-sampled and summed. Linear interpolation and a 1x1 convolution commute, so this equals
    ``reduce(cat(upsample(d_i)))`` exactly (up to rounding) with the same parameters, while moving
    32 instead of 496 channels through the interpolation (about 16% of the network's CPU time).

    Shapes: list of ``[B, c_i, S/2^(5-i)]`` -> ``[B, out_channels, S]``.
    """

    def __init__(
        self,
        spatial_dims: int,
        decoder_channels: Sequence[int],
        out_channels: int = 1,
        head_channels: int = 32,
        hypercolumn: bool = True,
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__()
        self.hypercolumn = hypercolumn
        self.interp_mode = "bilinear" if spatial_dims == 2 else "trilinear"
        self.fused_channels: list[int] = list(decoder_channels) if hypercolumn else [decoder_channels[-1]]
        in_channels = sum(self.fused_channels)
        self.reduce = Convolution(spatial_dims, in_channels, head_channels, kernel_size=1, act="relu", norm=norm)
        self.out = Conv[Conv.CONV, spatial_dims](head_channels, out_channels, kernel_size=3, padding=1)

    def _conv1x1(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return F.conv2d(x, weight)
        return F.conv3d(x, weight)

    def forward(self, decoder_outputs: list[torch.Tensor]) -> torch.Tensor:
        finest = decoder_outputs[-1]
        fused = decoder_outputs if self.hypercolumn else [finest]
        size = finest.shape[2:]
        weight = self.reduce.conv.weight
        reduced = self._conv1x1(finest, weight[:, weight.shape[1] - self.fused_channels[-1] :])
        start = 0
        for i in range(len(fused) - 1):
            channels = self.fused_channels[i]
            part = self._conv1x1(fused[i], weight[:, start : start + channels])
            reduced = reduced + F.interpolate(part, size=size, mode=self.interp_mode, align_corners=False)
            start += channels
        bias = self.reduce.conv.bias
        if bias is not None:
            reduced = reduced + bias.view([1, -1] + [1] * (reduced.dim() - 2))
        logits = self.out(self.reduce.adn(reduced))
        return F.interpolate(logits, scale_factor=2.0, mode=self.interp_mode, align_corners=False)


class ClassificationHead(nn.Module):
    """Image-level head (patent S1): global average pool -> dropout -> linear -> one logit.

    Shapes: ``[B, C, *S] -> [B, 1]``.
    """

    def __init__(self, in_channels: int = ENCODER_CHANNELS[-1], dropout: float = 0.2) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(x.flatten(2).mean(dim=2)))


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------
class SCSEUNetOutput(NamedTuple):
    """``seg``: ``[B, out_channels, *S]`` segmentation logits; ``cls``: ``[B, 1]`` image logit."""

    seg: torch.Tensor
    cls: torch.Tensor


class SCSEUNet(nn.Module):
    """Multi-task U-Net: ResNet34 encoder + scSE + decoder + hypercolumn + classification head.

    Args:
        spatial_dims: 2 (radiographs, CT slices) or 3 (CT volumes).
        in_channels: input channels.
        out_channels: segmentation channels (1: pneumothorax).
        decoder_channels: output channels of decoder blocks 1..5.
        reduction: scSE reduction ratio r (the bottleneck never drops below 1 unit).
        head_channels: channels of the hypercolumn head's 1x1 reduction.
        hypercolumn: fuse all decoder outputs (patent S2.6); ``False`` for the ablation.
        encoder_scse: scSE after every encoder stage (patent claim 2); ``False`` for the ablation (the
            decoder keeps its scSE).
        cls_dropout: dropout before the classification layer.
        norm: normalisation of the decoder convolutions (MONAI norm factory name).
        upsample_mode: interpolation of the decoder blocks' x2 up-sampling.
        pad_input: pad inputs whose size is not a multiple of 64 (the total stride) and crop the
            output back; ``False`` raises ``ValueError`` naming the nearest valid size.
        pretrained_path: local torchvision-layout resnet34 checkpoint for the encoder (2D only).

    Shapes: ``[B, in_channels, *S] -> SCSEUNetOutput(seg=[B, out_channels, *S], cls=[B, 1])``.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        reduction: int = 16,
        head_channels: int = 32,
        hypercolumn: bool = True,
        cls_dropout: float = 0.2,
        norm: str | tuple = "batch",
        upsample_mode: str = "nearest",
        pad_input: bool = True,
        pretrained_path: str | os.PathLike | None = None,
        encoder_scse: bool = True,
    ) -> None:
        super().__init__()
        # the constructor arguments, for the model record (pneumoseg.model_record.describe_network): what
        # this network is travels with its weights as data. pretrained_path is not kept: the weights carry it
        self.init_kwargs = {
            "spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": out_channels,
            "decoder_channels": [int(c) for c in decoder_channels], "reduction": reduction,
            "head_channels": head_channels, "hypercolumn": hypercolumn, "cls_dropout": cls_dropout,
            "norm": norm, "upsample_mode": upsample_mode, "pad_input": pad_input, "encoder_scse": encoder_scse,
        }  # fmt: skip
        self.spatial_dims = spatial_dims
        self.pad_input = pad_input
        self.total_stride = TOTAL_STRIDE  # an attribute, since TorchScript cannot read module globals
        self.encoder = ResNet34Encoder(spatial_dims, in_channels, reduction, pretrained_path, encoder_scse)
        self.decoder = UNetDecoder(
            spatial_dims, ResNet34Encoder.out_channels, decoder_channels, reduction, norm, upsample_mode
        )
        self.seg_head = HypercolumnHead(spatial_dims, decoder_channels, out_channels, head_channels, hypercolumn, norm)
        self.cls_head = ClassificationHead(ResNet34Encoder.out_channels[-1], cls_dropout)

    def _padding(self, spatial: list[int]) -> list[int]:
        """``F.pad`` amounts (last dim first) bringing every spatial size to a multiple of 64."""
        pads: list[int] = []
        for size in spatial[::-1]:
            extra = (self.total_stride - size % self.total_stride) % self.total_stride
            pads += [extra // 2, extra - extra // 2]
        return pads

    def forward(self, x: torch.Tensor) -> SCSEUNetOutput:
        spatial = list(x.shape[2:])
        pads = self._padding(spatial)
        padded = sum(pads) > 0
        if padded:
            if not self.pad_input:
                nearest = [int(math.ceil(s / self.total_stride)) * self.total_stride for s in spatial]
                raise ValueError(
                    f"input size {spatial} is not a multiple of {self.total_stride}; "
                    f"nearest valid size {nearest} (or construct with pad_input=True)"
                )
            x = F.pad(x, pads)
        features = self.encoder(x)
        seg = self.seg_head(self.decoder(features))
        cls = self.cls_head(features[-1])
        if padded:
            seg = _crop(seg, pads, spatial)
        return SCSEUNetOutput(seg, cls)


def _crop(x: torch.Tensor, pads: list[int], spatial: list[int]) -> torch.Tensor:
    """Undo ``F.pad(x, pads)`` for the trailing spatial dims (``pads`` is last-dim-first)."""
    n = len(spatial)
    for d in range(n):
        before = pads[2 * (n - 1 - d)]
        x = x.narrow(2 + d, before, spatial[d])
    return x


class SegmentationView(nn.Module):
    """The segmentation output of a :class:`SCSEUNet` alone: ``[B, C, *S] -> [B, out, *S]`` logits.

    MONAI's SlidingWindowInferer / SliceInferer stitch spatial outputs only (a ``[B, 1]`` image
    logit cannot be stitched), and TorchScript/ONNX exports of a single tensor are simplest to
    consume; this wrapper shares the network's parameters (no copy).
    """

    def __init__(self, network: SCSEUNet) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x).seg
