"""DeepLabV3 heads (--head): the anchors' ASPP (rates 6/12/18 at OS16, 12/24/32 at OS8) with its image-pooling
branch (`mib`), and DKD/STAR's, which adds Dropout(0.1) and a 3x3 conv + norm + activation after it (`dkd`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from segmentation.models.norm import NormAct


class DeepLabV3Head(nn.Module):
    def __init__(self, in_channels: int, norm_act: NormAct, output_stride: int = 16, hidden_channels: int = 256,
                 out_channels: int = 256, pooling_size: int | tuple[int, int] | None = None) -> None:
        super().__init__()
        rates = (6, 12, 18) if output_stride == 16 else (12, 24, 32)
        self.pooling_size = pooling_size
        self.map_convs = nn.ModuleList([nn.Conv2d(in_channels, hidden_channels, 1, bias=False)] + [
            nn.Conv2d(in_channels, hidden_channels, 3, padding=r, dilation=r, bias=False) for r in rates])
        self.map_bn = norm_act(hidden_channels * 4)
        self.global_pooling_conv = nn.Conv2d(in_channels, hidden_channels, 1, bias=False)
        self.global_pooling_bn = norm_act(hidden_channels)
        self.red_conv = nn.Conv2d(hidden_channels * 4, out_channels, 1, bias=False)
        self.pool_red_conv = nn.Conv2d(hidden_channels, out_channels, 1, bias=False)
        self.red_bn = norm_act(out_channels)
        gain = nn.init.calculate_gain("leaky_relu", 0.01)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight, gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.red_conv(self.map_bn(torch.cat([conv(x) for conv in self.map_convs], dim=1)))
        pool = self.pool_red_conv(self.global_pooling_bn(self.global_pooling_conv(self._pool(x))))
        if pool.shape[-2:] != out.shape[-2:]:
            pool = pool.expand(-1, -1, *out.shape[-2:])
        return self.red_bn(out + pool)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """Global mean in training; at test time a `pooling_size` window (the training crop's feature size), so
        larger test images see the same context as training crops, as in the anchors."""
        if self.training or self.pooling_size is None:
            return x.mean(dim=(2, 3), keepdim=True)
        ph, pw = (self.pooling_size, self.pooling_size) if isinstance(self.pooling_size, int) else self.pooling_size
        kh, kw = min(ph, x.shape[2]), min(pw, x.shape[3])
        pool = F.avg_pool2d(x, (kh, kw), stride=1)
        pad = ((kw - 1) // 2, kw // 2, (kh - 1) // 2, kh // 2)
        return F.pad(pool, pad, mode="replicate")


class DKDHead(DeepLabV3Head):
    """DKD's and STAR's head (DKD models/modules/aspp.py): the mib head, then Dropout(0.1) and an extra 3x3 conv
    (no bias) + the model's norm + activation, whose output is the features the classifiers read.

    The mib part is the same function as their per-branch ASPP: one norm over the concatenated branches with the
    pooled branch added after the projection equals a norm per branch and one projection of all five."""

    def __init__(self, in_channels: int, norm_act: NormAct, output_stride: int = 16, hidden_channels: int = 256,
                 out_channels: int = 256, pooling_size: int | tuple[int, int] | None = None,
                 dropout: float = 0.1) -> None:
        super().__init__(in_channels, norm_act, output_stride, hidden_channels, out_channels, pooling_size)
        self.dropout = nn.Dropout(dropout)
        self.last_conv = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.last_bn = norm_act(out_channels)
        self._init_as_dkd()

    def _init_as_dkd(self) -> None:
        """DKD's init: with BN + ReLU (its bn_sync) every conv Kaiming-normal; with a leaky-ReLU norm (its
        iabn_sync) MiB's Xavier, which the mib part already has."""
        if getattr(self.last_bn, "activation_param", None) == 0:  # leaky ReLU at slope 0: ReLU
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight)
        else:
            nn.init.xavier_normal_(self.last_conv.weight, nn.init.calculate_gain("leaky_relu", 0.01))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_bn(self.last_conv(self.dropout(super().forward(x))))


HEADS = {"mib": DeepLabV3Head, "dkd": DKDHead}
