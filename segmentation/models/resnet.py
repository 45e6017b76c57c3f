"""ResNet-18/50/101 with the module names of mapillary/inplace_abn's ResNet (as used by MiB, PLOP and WILSON).

Keeping the names (mod1.conv1, mod2.block1.convs.bn1, proj_conv, ...) lets the published ImageNet weights
`resnet101_iabn_sync.pth.tar` load with strict=True. Output stride 16 dilates mod5 by 2; 8 dilates mod4/mod5 by 2/4.

Two variants compute different functions with the same modules and keys:
- "inplace_abn" (MiB, PLOP, WILSON): leaky ReLU 0.01 after each residual sum; a dilated stage dilates every block.
- "torchvision" (DKD, STAR: `--norm_act bn_relu|syncbn_relu`): ReLU after each residual sum, and the first block
  of a dilated stage keeps the previous stage's dilation (torchvision's `replace_stride_with_dilation`, see
  torchvision.models.resnet.ResNet._make_layer), so torchvision's ImageNet weights compute what they were trained to.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from segmentation.models.norm import NormAct

VARIANTS = ("inplace_abn", "torchvision")
STRUCTURES = {
    "resnet18": ([2, 2, 2, 2], False),
    "resnet50": ([3, 4, 6, 3], True),
    "resnet101": ([3, 4, 23, 3], True),
}


class ResidualBlock(nn.Module):
    """Basic (two 3x3) or bottleneck (1x1, 3x3, 1x1) block; the last norm has no activation, the block's leaky ReLU
    (ReLU at slope 0) comes after the residual sum. The stride sits on the 3x3 convolution, as in inplace_abn and
    torchvision."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], norm_act: NormAct, stride: int, dilation: int,
                 slope: float = 0.01) -> None:
        super().__init__()
        self.slope = slope
        if len(channels) == 2:
            layers = [
                ("conv1", nn.Conv2d(in_channels, channels[0], 3, stride, dilation, dilation, bias=False)),
                ("bn1", norm_act(channels[0])),
                ("conv2", nn.Conv2d(channels[0], channels[1], 3, 1, dilation, dilation, bias=False)),
                ("bn2", norm_act(channels[1], activation="identity")),
            ]
        else:
            layers = [
                ("conv1", nn.Conv2d(in_channels, channels[0], 1, bias=False)),
                ("bn1", norm_act(channels[0])),
                ("conv2", nn.Conv2d(channels[0], channels[1], 3, stride, dilation, dilation, bias=False)),
                ("bn2", norm_act(channels[1])),
                ("conv3", nn.Conv2d(channels[1], channels[2], 1, bias=False)),
                ("bn3", norm_act(channels[2], activation="identity")),
            ]
        self.convs = nn.Sequential(OrderedDict(layers))
        if stride != 1 or in_channels != channels[-1]:
            self.proj_conv = nn.Conv2d(in_channels, channels[-1], 1, stride, bias=False)
            self.proj_bn = norm_act(channels[-1], activation="identity")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_activation(x))

    def activate(self, pre_activation: torch.Tensor) -> torch.Tensor:
        """The activation after the residual sum."""
        return F.relu(pre_activation) if self.slope == 0 else F.leaky_relu(pre_activation, self.slope)

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """convs(x) + shortcut before the block's activation (PLOP's `last=True` output, read by POD)."""
        residual = self.proj_bn(self.proj_conv(x)) if hasattr(self, "proj_conv") else x
        return self.convs(x) + residual


def block_dilations(num_blocks: int, dilation: int, previous_dilation: int, variant: str) -> list[int]:
    """Each block's dilation in a stage of dilation `dilation`: all equal (inplace_abn), or the first block at the
    previous stage's dilation (torchvision's replace_stride_with_dilation)."""
    first = previous_dilation if variant == "torchvision" else dilation
    return [first] + [dilation] * (num_blocks - 1)


class ResNet(nn.Module):
    def __init__(self, arch: str, norm_act: NormAct, output_stride: int = 16, variant: str = "inplace_abn") -> None:
        """`variant`: which function the blocks compute (module docstring); the modules and keys are the same."""
        super().__init__()
        if arch not in STRUCTURES:
            raise ValueError(f"--backbone {arch!r} is unknown; valid: {', '.join(STRUCTURES)}")
        if output_stride not in (8, 16):
            raise ValueError("--output_stride must be 8 or 16")
        if variant not in VARIANTS:
            raise ValueError(f"ResNet variant {variant!r} is unknown; valid: {', '.join(VARIANTS)}")
        structure, bottleneck = STRUCTURES[arch]
        self.arch = arch  # checked against the "arch" of a converted weights file
        self.variant = variant
        dilations = [1, 1, 1, 2] if output_stride == 16 else [1, 1, 2, 4]
        self.mod1 = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)),
            ("bn1", norm_act(64)),
            ("pool1", nn.MaxPool2d(3, stride=2, padding=1)),
        ]))
        in_channels = 64
        channels: tuple[int, ...] = (64, 64, 256) if bottleneck else (64, 64)
        previous_dilation = 1
        for mod_id, (num_blocks, dilation) in enumerate(zip(structure, dilations)):
            blocks = []
            per_block = block_dilations(num_blocks, dilation, previous_dilation, variant)
            for block_id, block_dilation in enumerate(per_block):
                # A stage downsamples in its first block unless it is dilated (or it is mod2, after the pool).
                stride = 2 if dilation == 1 and block_id == 0 and mod_id > 0 else 1
                block = ResidualBlock(in_channels, channels, norm_act, stride, block_dilation,
                                      slope=0.0 if variant == "torchvision" else 0.01)
                blocks.append((f"block{block_id + 1}", block))
                in_channels = channels[-1]
            previous_dilation = dilation
            self.add_module(f"mod{mod_id + 2}", nn.Sequential(OrderedDict(blocks)))
            channels = tuple(c * 2 for c in channels)
        self.out_channels = in_channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The last stage's output and the pre-activation outputs of mod2..mod5 (the sum inside each stage's last
        block before its activation, as PLOP's `attentions`); stage k+1 reads the activation of pre-activation k."""
        x = self.mod1(x)
        pre_activations = []
        for mod in (self.mod2, self.mod3, self.mod4, self.mod5):
            *blocks, last = mod
            for block in blocks:
                x = block(x)
            pre = last.pre_activation(x)
            x = last.activate(pre)
            pre_activations.append(pre)
        return x, pre_activations
