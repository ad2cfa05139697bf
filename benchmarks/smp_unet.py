"""The peer: segmentation_models_pytorch's ``Unet("resnet34", decoder_attention_type="scse", aux_params=...)``.

smp 0.6.0 cannot be imported without torchvision (``segmentation_models_pytorch/__init__`` imports every
encoder family, and its ResNet encoders subclass ``torchvision.models.resnet.ResNet``), and this project does
not install torchvision. So the peer is smp's ``Unet`` rebuilt here from smp 0.6.0's source, module by module
and with smp's parameter names, so that a state dict saved by smp loads strictly into it:

* encoder: torchvision's ResNet34 (MONAI's ``resnet34`` with torchvision's names and shapes, as
  :mod:`pneumoseg.networks` uses it), stride 32, features ``[x, stem, layer1..4]``; one input channel with a
  re-initialised first convolution (smp's ``patch_first_conv(pretrained=False)``);
* ``UnetDecoder``: five ``UnetDecoderBlock`` (nearest up-sampling to the skip's size, concatenation, scSE on
  the concatenation, two conv3x3-BN-ReLU, scSE), no centre block (ResNet encoders), widths 256-128-64-32-16;
* ``SegmentationHead``: conv3x3 to one logit at the input resolution;
* ``ClassificationHead`` (``aux_params={"classes": 1, "dropout": 0.2}``): global average pool of layer4,
  dropout, linear;
* smp's ``SCSEModule``: ``x * cSE(x) + x * sSE(x)`` with a ``C // 16`` bottleneck and a random sSE conv;
* smp's initialisation: decoder convolutions Kaiming-uniform, heads Xavier-uniform, biases 0.

``forward`` returns :class:`pneumoseg.networks.SCSEUNetOutput` ``(seg, cls)`` logits (smp returns the tuple
``(masks, labels)``), so the benchmark trains and scores it with exactly the code the bundle uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pneumoseg.networks import SCSEUNetOutput, _resnet34_trunk

__all__ = ["SmpUnet"]


class SCSEModule(nn.Module):
    def __init__(self, in_channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.cSE = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, in_channels // reduction, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels // reduction, in_channels, 1),
            nn.Sigmoid(),
        )
        self.sSE = nn.Sequential(nn.Conv2d(in_channels, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.cSE(x) + x * self.sSE(x)


class Attention(nn.Module):
    def __init__(self, name: str | None, in_channels: int) -> None:
        super().__init__()
        self.attention = SCSEModule(in_channels) if name == "scse" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x)


class Conv2dReLU(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UnetDecoderBlock(nn.Module):
    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, attention: str | None) -> None:
        super().__init__()
        self.conv1 = Conv2dReLU(in_channels + skip_channels, out_channels)
        self.attention1 = Attention(attention, in_channels + skip_channels)
        self.conv2 = Conv2dReLU(out_channels, out_channels)
        self.attention2 = Attention(attention, out_channels)

    def forward(self, x: torch.Tensor, size: list[int], skip: torch.Tensor | None) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode="nearest")
        if skip is not None:
            x = self.attention1(torch.cat([x, skip], dim=1))
        return self.attention2(self.conv2(self.conv1(x)))


class UnetDecoder(nn.Module):
    def __init__(
        self,
        encoder_channels: tuple[int, ...] = (1, 64, 64, 128, 256, 512),
        decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16),
        attention: str | None = "scse",
    ) -> None:
        super().__init__()
        reversed_channels = encoder_channels[1:][::-1]
        in_channels = [reversed_channels[0], *decoder_channels[:-1]]
        skip_channels = [*reversed_channels[1:], 0]
        self.center = nn.Identity()
        self.blocks = nn.ModuleList(
            UnetDecoderBlock(i, s, o, attention) for i, s, o in zip(in_channels, skip_channels, decoder_channels)
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        sizes = [list(f.shape[2:]) for f in features][::-1]
        features = features[1:][::-1]
        x = self.center(features[0])
        skips = features[1:]
        for i, block in enumerate(self.blocks):
            x = block(x, sizes[i + 1], skips[i] if i < len(skips) else None)
        return x


class ResNetEncoder(nn.Module):
    """torchvision's ResNet34 without ``fc`` / ``avgpool``; ``forward`` -> ``[x, stem, layer1, ..., layer4]``."""

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        trunk = _resnet34_trunk(2, in_channels)
        self.conv1, self.bn1, self.relu, self.maxpool = trunk.conv1, trunk.bn1, trunk.act, trunk.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4
        self.conv1.reset_parameters()  # smp's patch_first_conv(pretrained=False) for in_channels != 3

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = [x]
        x = self.relu(self.bn1(self.conv1(x)))
        features.append(x)
        x = self.layer1(self.maxpool(x))
        features.append(x)
        for layer in (self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        return features


class SmpUnet(nn.Module):
    """``smp.Unet("resnet34", encoder_weights=None, in_channels=1, classes=1, decoder_attention_type="scse",
    aux_params={"classes": 1, "dropout": 0.2})``; ``[B, 1, H, W]`` (H, W multiples of 32) ->
    ``SCSEUNetOutput(seg [B, 1, H, W], cls [B, 1])`` logits."""

    def __init__(self, in_channels: int = 1, attention: str | None = "scse", dropout: float = 0.2) -> None:
        super().__init__()
        self.encoder = ResNetEncoder(in_channels)
        self.decoder = UnetDecoder(attention=attention)
        self.segmentation_head = nn.Sequential(nn.Conv2d(16, 1, 3, padding=1), nn.Identity(), nn.Identity())
        self.classification_head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(p=dropout, inplace=True), nn.Linear(512, 1), nn.Identity()
        )
        self._initialize()

    def _initialize(self) -> None:  # smp.base.initialization
        for m in self.decoder.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        for head in (self.segmentation_head, self.classification_head):
            for m in head.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> SCSEUNetOutput:
        features = self.encoder(x)
        return SCSEUNetOutput(self.segmentation_head(self.decoder(features)), self.classification_head(features[-1]))
