"""Norm + activation layers selected by --norm_act.

`iabn_sync`, `iabn`: InPlace-ABN (Rota Bulò et al.), the anchors' layer. `--norm_impl inplace_abn` uses the
`inplace_abn` package (InPlaceABNSync gets group=WORLD: without it newer torch versions silently skip the sync,
inplace_abn #219); by default (`auto`, see package_preferred) `ABN` below computes the same thing in plain PyTorch,
y = act((x - mu) / sqrt(var + eps) * (|w| + eps) + b), with the same parameter names as BatchNorm2d, so InPlace-ABN
ImageNet weights and our checkpoints load either way.
`abn` is the non-inplace ABN (scale w, not |w|+eps); `bn` and `syncbn` are batch norm (+ leaky ReLU).
`bn_relu` and `syncbn_relu` are batch norm + ReLU, DKD's and STAR's layers; with them the ResNet computes
torchvision's function (see TORCHVISION_KINDS and models/resnet.py).

Why our own synchronised layer instead of nn.SyncBatchNorm: it refuses CPU tensors, and the CPU/gloo path is what
lets the tests prove that a 2-rank run equals a 1-rank run. It gathers per-rank statistics with
torch.distributed.nn.functional.all_gather, which carries gradients, so the backward pass is synchronised too.
inplace_abn's own InPlaceABNSync has CUDA kernels only, so on CPU `iabn_sync` in a process group is our ABN as well.
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
KINDS = ("iabn_sync", "iabn", "abn", "bn", "syncbn", "bn_relu", "syncbn_relu")
# Kinds whose network is DKD/STAR's: torchvision's ResNet (ReLU, its dilation pattern), BN momentum 0.01 there.
TORCHVISION_KINDS = ("bn_relu", "syncbn_relu")


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
        # With one rank the synchronised statistics are the local ones: F.batch_norm (cuDNN/oneDNN) computes them.
        if self.training and self.sync and dist.get_world_size() > 1:
            y = self._sync_batch_norm(x)
        else:
            y = F.batch_norm(x, self.running_mean, self.running_var, self.scale(), self.bias,
                             self.training, self.momentum, self.eps)
            if self.training:
                self.num_batches_tracked.add_(1)
        if self.activation == "leaky_relu":
            # slope 0 (the bn_relu kinds) is ReLU; F.relu gives +0, not -0, for negative inputs
            return F.relu(y) if self.activation_param == 0 else F.leaky_relu(y, self.activation_param)
        return y

    def _sync_batch_norm(self, x: torch.Tensor) -> torch.Tensor:
        """Per-rank mean and squared deviations, combined exactly across ranks (Chan et al.'s parallel variance):
        stable where E[x^2] - E[x]^2 would cancel, so 1 and 2 ranks agree to float precision."""
        xf = x.float()
        local_mean = xf.mean(dim=(0, 2, 3))
        local_m2 = ((xf - local_mean[None, :, None, None]) ** 2).sum(dim=(0, 2, 3))
        count = local_mean.new_full((1,), float(x.numel() // x.shape[1]))  # a fill kernel, no host-to-device copy
        stats = torch.stack(dist.all_gather_with_grad(torch.cat([count, local_mean, local_m2])))
        counts, means, m2s = stats[:, :1], stats[:, 1:1 + x.shape[1]], stats[:, 1 + x.shape[1]:]
        total = counts.sum()
        mean = (counts * means).sum(0) / total
        m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
        var = m2 / total
        with torch.no_grad():
            unbiased = m2 / (total - 1).clamp(min=1)
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean.detach())
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * unbiased.detach())
            self.num_batches_tracked.add_(1)
        inv = torch.rsqrt(var + self.eps) * self.scale()
        y = (xf - mean[None, :, None, None]) * inv[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


IABN_BUILD_HINT = ("the inplace_abn package is not installed; build it with "
                   "`bash tools/build_inplace_abn.sh .venv/bin/python` (see README), or use --norm_act iabn/iabn_sync "
                   "without requiring the package: the pure-PyTorch ABN computes the same function")


def _real_inplace_abn(kind: str, device_type: str) -> NormAct | None:
    """The package's layer for `kind`, or None where it cannot run here.

    InPlaceABNSync's statistics reduction (`_backend.reduce_statistics`) has only CUDA kernels ("all_mean must be a
    CUDA tensor"), so `iabn_sync` on CPU is our ABN; `iabn` uses InPlaceABN, which has CPU kernels.
    """
    classes = _autocast_safe_classes()
    if kind == "iabn_sync":
        # On CPU always our ABN, with or without a process group: then 1 and N ranks run the same code.
        if device_type != "cuda":
            return None
        if dist.is_initialized():
            return functools.partial(classes["InPlaceABNSync"], group=torch.distributed.group.WORLD)
    return classes["InPlaceABN"]


@functools.cache
def _autocast_safe_classes() -> dict[str, type[nn.Module]]:
    """inplace_abn's layers, casting the input to the weight's dtype and to NCHW order first.

    Its kernels require x to have the weight's dtype ("weight is not compatible with x"), but under autocast the
    convolutions emit bf16/fp16. Casting up makes the layer work with --amp (it is then in-place on the float copy).
    Subclasses, so isinstance checks and state-dict keys are the package's.
    """
    import inplace_abn

    def make(base: type[nn.Module]) -> type[nn.Module]:
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.weight is not None and x.dtype != self.weight.dtype:
                x = x.to(self.weight.dtype)
            # Its kernels also require NCHW-contiguous input; a no-op except under --channels_last.
            return base.forward(self, x.contiguous())

        return type(base.__name__, (base,), {"forward": forward, "__module__": __name__})

    return {name: make(getattr(inplace_abn, name)) for name in ("InPlaceABN", "InPlaceABNSync")}


NORM_IMPLS = ("auto", "pytorch", "inplace_abn")


def package_preferred(impl: str) -> bool:
    """--norm_impl: which code computes the iabn kinds (the maths, and so the weights, are the same).

    auto = our PyTorch layer on every device (`pytorch` says so explicitly; `auto` may become per-device once the
    GPU benchmark rows are measured). On CUDA the package's layer costs a host sync per layer in backward
    (`dweight[weight < 0] *= -1`, ~107 per ResNet-101 step), an fp32 copy of every norm input under AMP and an NCHW
    copy under --channels_last, where F.batch_norm (cuDNN) takes bf16 and channels-last as they are. On CPU ours
    measured faster too (README, "Norm layers"). `inplace_abn` asks for the package: its in-place activations save
    memory (a larger batch per GPU; benchmarks/train_loop.py --max_batch measures it).
    """
    if impl not in NORM_IMPLS:
        raise ValueError(f"--norm_impl {impl!r} is unknown; valid: {', '.join(NORM_IMPLS)}")
    return impl == "inplace_abn"


def make_norm_act(kind: str, device_type: str | None = None, prefer_package: bool = False,
                  require_package: bool = False) -> NormAct:
    """Factory `(channels, activation="leaky_relu", activation_param=0.01) -> nn.Module` for --norm_act `kind`
    (the TORCHVISION_KINDS default to activation_param=0: ReLU).

    `device_type` ("cuda"/"cpu", default: cuda when available) decides whether inplace_abn's CUDA-only sync layer
    can be used. `prefer_package=True` uses the inplace_abn package's layers where they can run (see
    package_preferred). `require_package=True` makes the iabn kinds fail with a clear message instead of falling
    back when the package is missing or cannot run here.
    """
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if kind in ("iabn_sync", "iabn"):
        real = _real_inplace_abn(kind, device_type) if (prefer_package or require_package) and inplace_abn_available() else None
        if real is not None:
            return real
        if require_package:
            why = IABN_BUILD_HINT if not inplace_abn_available() else \
                "inplace_abn's InPlaceABNSync needs CUDA tensors (no CPU kernels for the synchronised reduction)"
            raise ImportError(f"--norm_act {kind} with the real InPlace-ABN was required, but {why}")
        return functools.partial(ABN, abs_weight=True, sync=kind == "iabn_sync")
    if kind in ("abn", "bn"):  # the same layer: F.batch_norm with weight w, then the activation
        return functools.partial(ABN, abs_weight=False, sync=False)
    if kind == "syncbn":  # not nn.SyncBatchNorm: it refuses CPU tensors ("expected input tensor to be on GPU")
        return functools.partial(ABN, abs_weight=False, sync=True)
    if kind in TORCHVISION_KINDS:  # ReLU unless a caller asks for "identity" (the last norm of a residual block)
        return functools.partial(ABN, activation_param=0.0, abs_weight=False, sync=kind == "syncbn_relu")
    raise ValueError(f"--norm_act {kind!r} is unknown; valid: {', '.join(KINDS)}")
