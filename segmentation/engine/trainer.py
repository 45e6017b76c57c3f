"""Training and evaluation loops as plain functions with explicit arguments (torchvision references style)."""
from __future__ import annotations

import contextlib
import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DistributedSampler, Sampler

from segmentation.engine.metrics import ConfusionMatrix
from segmentation.methods.base import Method
from segmentation.utils import dist
from segmentation.utils.logging import Progress


class NonFiniteLossError(RuntimeError):
    """A loss term was NaN or Inf on some rank; every rank stops before the optimizer step."""


class TrainSampler(DistributedSampler):
    """torch's DistributedSampler (order from seed + epoch) that can start an epoch after its first batches.

    A resumed job calls `start_epoch(epoch, batches_done, batch)` and sees exactly the batches it had not trained on.
    With any number of ranks, the first k global batches are the first k * total_batch indices of the epoch's
    permutation, so the same images are skipped whatever the rank count.
    """

    skip = 0

    def start_epoch(self, epoch: int, batches_done: int, batch_per_rank: int) -> None:
        self.set_epoch(epoch)
        self.skip = batches_done * batch_per_rank

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return super().__len__() - self.skip


class ShardSampler(Sampler[int]):
    """Rank r evaluates indices r, r+W, r+2W, ... with no padding, so no image is counted twice.

    torch's DistributedSampler pads the last round with repeated images, which biases the metrics of the anchors.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_optimizer(param_groups: list[dict[str, Any]], momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with Nesterov momentum, as MiB, PLOP and WILSON use."""
    return torch.optim.SGD(param_groups, lr=param_groups[0]["lr"], momentum=momentum,
                           weight_decay=weight_decay, nesterov=momentum > 0)


def lr_factor_fn(policy: str, total_iters: int, power: float, warmup_iters: int, decay_step: int,
                 decay_factor: float) -> Callable[[int], float]:
    """Multiplier of the base lr at iteration `it` (schedules step once per iteration, not per epoch)."""
    total_iters = max(total_iters, 1)

    def poly(it: int) -> float:
        return max(1.0 - it / total_iters, 0.0) ** power

    if policy == "poly":
        return poly
    if policy == "warmup":
        warmup_iters = min(max(warmup_iters, 1), total_iters)
        return lambda it: (it + 1) / warmup_iters if it < warmup_iters else poly(it)
    if policy == "step":
        return lambda it: decay_factor ** (it // max(decay_step, 1))
    return lambda it: 1.0


@dataclass
class AmpSettings:
    enabled: bool
    dtype: torch.dtype
    device_type: str

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def make_amp(enabled: bool, dtype_name: str, device: torch.device) -> tuple[AmpSettings, torch.amp.GradScaler]:
    dtype = torch.float16 if dtype_name == "fp16" else torch.bfloat16
    if enabled and dtype == torch.float16 and device.type != "cuda":
        raise ValueError("--amp_dtype fp16 needs a GPU; use --amp_dtype bf16 on CPU")
    scaler = torch.amp.GradScaler(device.type, enabled=enabled and dtype == torch.float16)
    return AmpSettings(enabled, dtype, device.type), scaler


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass
class EpochStats:
    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0

    def add(self, terms: dict[str, float]) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


def check_finite_and_stop(total: torch.Tensor, terms: dict[str, torch.Tensor], stop_requested: bool) -> bool:
    """One all-reduce per iteration decides two things for all ranks together: whether any rank saw a non-finite
    loss (then every rank raises before the update), and whether any rank was asked to stop (a preemption signal;
    then every rank stops after this update). Returns the second."""
    flags = torch.tensor([0.0 if math.isfinite(total.item()) else 1.0, float(stop_requested)])
    dist.all_reduce_max(flags)
    if flags[0].item() > 0:
        values = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
        raise NonFiniteLossError(f"non-finite loss on some rank (this rank: {values}); stopping before the update")
    return bool(flags[1].item() > 0)


def injected_nan(global_iter: int) -> bool:
    """Test hook: SEGMENTATION_INJECT_NAN="RANK:ITER" makes rank RANK's loss NaN at global iteration ITER (0-based),
    so the tests can prove that every rank stops before the update. Unset in normal runs."""
    spec = os.environ.get("SEGMENTATION_INJECT_NAN")
    if not spec:
        return False
    rank, it = (int(x) for x in spec.split(":"))
    return rank == dist.get_rank() and it == global_iter


def train_one_epoch(
    *, model: nn.Module, teacher: nn.Module | None, method: Method, loader: Any, optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler, amp: AmpSettings,
    device: torch.device, epoch: int, writer: Any, global_iter: int, print_interval: int,
    stop_requested: Callable[[], bool] = lambda: False,
    after_update: Callable[[int, bool], None] = lambda global_iter, stop: None,
) -> tuple[dict[str, float], int]:
    """One pass over the loader; returns the mean of each loss term and the updated global iteration.

    `stop_requested()` is this rank's preemption flag; `after_update(global_iter, stop)` runs after every update with
    the flag all ranks agreed on (it saves run states, and ends the step when stop is True).
    """
    model.train()
    stats = EpochStats()
    progress = Progress(loader, len(loader), f"epoch {epoch + 1}", dist.is_main_process(), print_interval)
    for batch in progress:
        batch = to_device(batch, device)
        with amp.autocast():
            outputs = model(batch["image"])
            teacher_outputs = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_outputs = teacher(batch["image"])
        terms = method.losses(batch, outputs, teacher_outputs, epoch)
        total = sum(terms.values())
        if injected_nan(global_iter):
            total = total * float("nan")
        stop = check_finite_and_stop(total, terms, stop_requested())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        global_iter += 1
        scalars = {k: v.item() for k, v in terms.items()}
        scalars["loss"] = total.item()
        stats.add(scalars)
        progress.update(**scalars)
        if writer is not None and global_iter % print_interval == 0:
            for k, v in scalars.items():
                writer.add_scalar(f"train/{k}", v, global_iter)
            writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], global_iter)
        after_update(global_iter, stop)
    return stats.means(), global_iter


@torch.no_grad()
def evaluate(
    *, model: nn.Module, loader: Any, num_classes: int, device: torch.device, amp: AmpSettings, sample_num: int = 0,
) -> tuple[ConfusionMatrix, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Confusion matrix over the loader (all-reduced over ranks) and up to `sample_num` (image, label, pred)."""
    model.eval()
    matrix = ConfusionMatrix(num_classes, device)
    samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for batch in loader:
        batch = to_device(batch, device)
        with amp.autocast():
            logits = model(batch["image"])[0]
        pred = logits.argmax(dim=1)
        matrix.update(pred, batch["label"])
        for i in range(min(sample_num - len(samples), pred.shape[0])):
            samples.append((batch["image"][i].cpu(), batch["label"][i].cpu(), pred[i].cpu()))
    matrix.all_reduce()
    return matrix, samples


def seed_everything(seed: int) -> None:
    """Same initial weights on every rank; augmentation draws from per-sample generators, not from these."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
