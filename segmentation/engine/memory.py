"""Will the step fit? An estimate of a training step's memory, said before the first iteration.

A run too big for the machine (a ResNet-101 at 512 x 512 with 24 images in one CPU process needs about 30 GiB)
is otherwise killed by the kernel with no message, or stops at the first iteration with a CUDA out-of-memory
error. The estimate needs no memory itself: the model is built on PyTorch's "meta" device (shapes only), one
forward runs on a meta batch, and torch.autograd's saved-tensor hooks add up what backward would keep. Then
parameters, gradients and the optimizer's state, and the teacher's weights.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import torch
from torch import nn

log = logging.getLogger("segmentation")

GIB = 2 ** 30


def saved_activation_bytes(build_model: Callable[[], nn.Module], batch: int, crop: tuple[int, int]) -> int:
    """Bytes autograd saves for backward in one training forward of `batch` images (float32), on meta tensors."""
    with torch.device("meta"):
        model = build_model().train()
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    x = torch.empty(max(batch, 2), 3, *crop, device="meta")  # 2: norm layers refuse one value per channel
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return saved * batch // max(batch, 2)


def estimate_training_bytes(build_model: Callable[[], nn.Module], batch: int, crop: tuple[int, int], *,
                            amp: bool, teacher: bool, optimizer_slots: int) -> int:
    """Saved activations (halved under autocast: bf16/fp16 activations), plus weights, gradients and the
    optimizer's `optimizer_slots` buffers per weight (SGD momentum 1, Adam 2), plus the teacher's weights."""
    activations = saved_activation_bytes(build_model, batch, crop)
    if amp:
        activations //= 2
    with torch.device("meta"):
        params = sum(p.numel() * p.element_size() for p in build_model().parameters())
    return activations + params * (2 + optimizer_slots + (1 if teacher else 0))


def available_bytes(device: torch.device) -> int | None:
    """Free memory this rank may use: the GPU's free memory, or on CPU the host's MemAvailable shared by this
    node's ranks. None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
                or 1)
    return available // max(local, 1)


def warn_if_too_big(estimate: int, available: int | None, what: str, fixes: str) -> bool:
    """Log why the step will probably not fit, before it starts; True if it said so."""
    if available is None or estimate <= available:
        return False
    log.warning("this step needs about %.1f GiB per process (%s) but %.1f GiB are free: it will probably be killed "
                "for lack of memory. %s", estimate / GIB, what, available / GIB, fixes)
    return True
