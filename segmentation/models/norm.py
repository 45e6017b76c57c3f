"""Norm + activation layers selected by --norm_act.

`iabn_sync`, `iabn`: InPlace-ABN (Rota Bulò et al.), the anchors' layer. When the `inplace_abn` package is installed
we use it (InPlaceABNSync gets group=WORLD: without it newer torch versions silently skip the sync, inplace_abn #219).
Otherwise `ABN` below computes the same thing in plain PyTorch: y = act((x - mu) / sqrt(var + eps) * (|w| + eps) + b),
with the same parameter names as BatchNorm2d, so InPlace-ABN ImageNet weights and our checkpoints load either way.
`abn` is the non-inplace ABN (scale w, not |w|+eps); `bn` and `syncbn` are batch norm (+ leaky ReLU).

Why our own synchronised layer instead of nn.SyncBatchNorm: it refuses CPU tensors, and the CPU/gloo path is what
lets the tests prove that a 2-rank run equals a 1-rank run. It gathers per-rank statistics with
torch.distributed.nn.functional.all_gather, which carries gradients, so the backward pass is synchronised too.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from segmentation.utils import dist

NormAct = Callable[..., nn.Module]
ACTIVATIONS = ("leaky_relu", "identity")


def inplace_abn_available() -> bool:
    try:
        import inplace_abn  # noqa: F401
    except ImportError:
        return False
    return True


class ABN(nn.BatchNorm2d):
    """Batch norm + activation with InPlace-ABN's maths (`abs_weight=True`) or plain BN's (`abs_weight=False`).

    `sync=True` computes the statistics over all ranks (and over the single process when there is no group).
    """

    def __init__(self, num_features: int, activation: str = "leaky_relu", activation_param: float = 0.01,
                 eps: float = 1e-5, momentum: float = 0.1, abs_weight: bool = True, sync: bool = False) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation, self.activation_param = activation, activation_param
        self.abs_weight, self.sync = abs_weight, sync

    def scale(self) -> torch.Tensor:
        return self.weight.abs() + self.eps if self.abs_weight else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.sync:
            y = self._sync_batch_norm(x)
        else:
            y = F.batch_norm(x, self.running_mean, self.running_var, self.scale(), self.bias,
                             self.training, self.momentum, self.eps)
            if self.training:
                self.num_batches_tracked.add_(1)
        if self.activation == "leaky_relu":
            return F.leaky_relu(y, self.activation_param)
        return y

    def _sync_batch_norm(self, x: torch.Tensor) -> torch.Tensor:
        """Per-rank mean and squared deviations, combined exactly across ranks (Chan et al.'s parallel variance):
        stable where E[x^2] - E[x]^2 would cancel, so 1 and 2 ranks agree to float precision."""
        xf = x.float()
        count = torch.tensor(float(x.numel() // x.shape[1]), device=x.device)
        local_mean = xf.mean(dim=(0, 2, 3))
        local_m2 = ((xf - local_mean[None, :, None, None]) ** 2).sum(dim=(0, 2, 3))
        if dist.get_world_size() > 1:
            stats = torch.stack(_all_gather_with_grad(torch.cat([count.expand(1), local_mean, local_m2])))
            counts, means, m2s = stats[:, :1], stats[:, 1:1 + x.shape[1]], stats[:, 1 + x.shape[1]:]
            total = counts.sum()
            mean = (counts * means).sum(0) / total
            m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
        else:
            total, mean, m2 = count, local_mean, local_m2
        var = m2 / total
        with torch.no_grad():
            unbiased = m2 / (total - 1).clamp(min=1)
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean.detach())
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * unbiased.detach())
            self.num_batches_tracked.add_(1)
        inv = torch.rsqrt(var + self.eps) * self.scale()
        y = (xf - mean[None, :, None, None]) * inv[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def _all_gather_with_grad(tensor: torch.Tensor) -> list[torch.Tensor]:
    # torch.distributed.nn.functional.all_gather is the public collective with autograd; torch 2.x marks it
    # deprecated in favour of a private module, so we keep it and silence the per-call warning.
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return list(all_gather(tensor))


def _real_inplace_abn(kind: str) -> NormAct:
    import inplace_abn

    if kind == "iabn_sync" and dist.is_initialized():
        return functools.partial(inplace_abn.InPlaceABNSync, group=torch.distributed.group.WORLD)
    return inplace_abn.InPlaceABN


def make_norm_act(kind: str, device_type: str = "cpu", prefer_package: bool = True) -> NormAct:
    """Factory `(channels, activation="leaky_relu", activation_param=0.01) -> nn.Module` for --norm_act `kind`.

    inplace_abn's synchronised reduction only has CUDA kernels, so on CPU `iabn_sync` always uses our ABN.
    """
    if kind in ("iabn_sync", "iabn"):
        usable = kind == "iabn" or device_type == "cuda"
        if prefer_package and usable and inplace_abn_available():
            return _real_inplace_abn(kind)
        return functools.partial(ABN, abs_weight=True, sync=kind == "iabn_sync")
    if kind in ("abn", "bn"):
        return functools.partial(ABN, abs_weight=False, sync=False)
    if kind == "syncbn":
        return functools.partial(ABN, abs_weight=False, sync=True)
    raise ValueError(f"--norm_act {kind!r} is unknown; valid: iabn_sync, iabn, abn, bn, syncbn")
