"""ERFNet (Romera et al., T-ITS 2018), the network of CIL (Klingner et al., ITSC 2020), as body + head + classifiers.

The architecture and module names follow the authors' erfnet_pytorch (train/erfnet.py), which CIL uses unchanged:
  encoder: DownsamplerBlock 3->16, DownsamplerBlock 16->64, 5 x non_bottleneck_1d(64, dropout 0.03, dilation 1),
           DownsamplerBlock 64->128, 2 x [non_bottleneck_1d(128, 0.3, d) for d in 2, 4, 8, 16]   -> 128 ch at 1/8
  decoder: UpsamplerBlock 128->64, 2 x non_bottleneck_1d(64, 0, 1), UpsamplerBlock 64->16,
           2 x non_bottleneck_1d(16, 0, 1)                                                    -> 16 ch at 1/2
  output:  ConvTranspose2d(16, classes, 2, stride 2)                                          -> full resolution
Here the encoder is the Segmenter's `body`, the decoder its `head`, and the output layer is one transposed
convolution per step (`cls.<t>`), so ERFNet grows by steps exactly as DeepLabV3 does. Keeping the authors' names
(`initial_block.conv`, `layers.3.conv3x1_2`, ...) lets their checkpoints convert by renaming prefixes only
(pretrained/convert.py).

Every batch norm (eps 1e-3, as ERFNet) comes from --norm_act with an identity activation, followed by ReLU as in
ERFNet; the ImageNet encoder was trained with plain batch norm, so load it with `--norm_act bn` or `syncbn`
(InPlace-ABN's |w| + eps scale would read its negative scales wrongly).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segmentation.models.norm import NormAct

BN_EPS = 1e-3


def _norm(norm_act: NormAct, channels: int) -> nn.Module:
    return norm_act(channels, activation="identity", eps=BN_EPS)


class DownsamplerBlock(nn.Module):
    """Strided 3x3 conv (out - in channels) beside a 2x2 max pool of the input, concatenated, then BN + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, norm_act: NormAct) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels - in_channels, 3, stride=2, padding=1, bias=True)
        self.pool = nn.MaxPool2d(2, stride=2)
        self.bn = _norm(norm_act, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(torch.cat([self.conv(x), self.pool(x)], dim=1)))


class NonBottleneck1d(nn.Module):
    """ERFNet's factorised residual block: (3x1, ReLU, 1x3, BN, ReLU, dilated 3x1, ReLU, dilated 1x3, BN,
    dropout) + input, ReLU."""

    def __init__(self, channels: int, dropout: float, dilation: int, norm_act: NormAct) -> None:
        super().__init__()
        self.conv3x1_1 = nn.Conv2d(channels, channels, (3, 1), padding=(1, 0), bias=True)
        self.conv1x3_1 = nn.Conv2d(channels, channels, (1, 3), padding=(0, 1), bias=True)
        self.bn1 = _norm(norm_act, channels)
        self.conv3x1_2 = nn.Conv2d(channels, channels, (3, 1), padding=(dilation, 0), dilation=(dilation, 1),
                                   bias=True)
        self.conv1x3_2 = nn.Conv2d(channels, channels, (1, 3), padding=(0, dilation), dilation=(1, dilation),
                                   bias=True)
        self.bn2 = _norm(norm_act, channels)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv3x1_1(x))
        out = F.relu(self.bn1(self.conv1x3_1(out)))
        out = F.relu(self.conv3x1_2(out))
        out = self.bn2(self.conv1x3_2(out))
        if self.dropout.p:
            out = self.dropout(out)
        return F.relu(out + x)


class UpsamplerBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, norm_act: NormAct) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1, bias=True)
        self.bn = _norm(norm_act, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class ERFNetEncoder(nn.Module):
    """The body: 128 channels at 1/8 resolution. Returns (features, []) like ResNet's (features, pre-activations);
    ERFNet has no stage pre-activations for POD-style distillation."""

    out_channels = 128
    arch = "erfnet"

    def __init__(self, norm_act: NormAct) -> None:
        super().__init__()
        self.initial_block = DownsamplerBlock(3, 16, norm_act)
        layers: list[nn.Module] = [DownsamplerBlock(16, 64, norm_act)]
        layers += [NonBottleneck1d(64, 0.03, 1, norm_act) for _ in range(5)]
        layers.append(DownsamplerBlock(64, 128, norm_act))
        for _ in range(2):
            layers += [NonBottleneck1d(128, 0.3, d, norm_act) for d in (2, 4, 8, 16)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = self.initial_block(x)
        for layer in self.layers:
            out = layer(out)
        return out, []


class ERFNetDecoder(nn.Module):
    """The head: 16 channels at 1/2 resolution; the per-step transposed convolutions (`erfnet_classifier`) finish
    the upsampling."""

    out_channels = 16

    def __init__(self, norm_act: NormAct) -> None:
        super().__init__()
        self.layers = nn.ModuleList([
            UpsamplerBlock(128, 64, norm_act), NonBottleneck1d(64, 0.0, 1, norm_act), NonBottleneck1d(64, 0.0, 1, norm_act),
            UpsamplerBlock(64, 16, norm_act), NonBottleneck1d(16, 0.0, 1, norm_act), NonBottleneck1d(16, 0.0, 1, norm_act),
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def erfnet_classifier(in_channels: int, num_classes: int) -> nn.Module:
    """ERFNet's output layer for one step's classes: a 2x2 transposed convolution back to full resolution."""
    return nn.ConvTranspose2d(in_channels, num_classes, 2, stride=2, padding=0, output_padding=0, bias=True)
