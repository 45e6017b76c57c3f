"""DeepLabV3 head with the anchors' ASPP (rates 6/12/18 at OS16, 12/24/32 at OS8) and image-pooling branch."""
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
