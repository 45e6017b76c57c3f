"""Training and evaluation loops as plain functions with explicit arguments (torchvision references style)."""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DistributedSampler, Sampler

from segmentation.datasets.transforms import normalize_batch
from segmentation.engine.metrics import (ConfusionMatrix, group_argmax, group_target,
                                         predictions_at_label_size, resize_prediction)
from segmentation.methods.base import Method
from segmentation.utils import dist
from segmentation.utils.logging import Progress


class NonFiniteLossError(RuntimeError):
    """A loss term was NaN or Inf on some rank; every rank stops before the optimizer step."""


class TrainSampler(DistributedSampler):
    """torch's DistributedSampler (order from seed + epoch) that can start an epoch after its first batches.

    A resumed job calls `start_epoch(epoch, batches_done, batch)` and sees exactly the batches it had not trained on.
    With any number of ranks, the first k global batches are the first k * total_batch indices of the epoch's
    permutation, so the same images are skipped whatever the rank count. It yields (index, epoch) pairs: the
    dataset draws the augmentation of that epoch even in persistent workers, which never see `set_epoch`.
    """

    skip = 0

    def start_epoch(self, epoch: int, batches_done: int, batch_per_rank: int) -> None:
        self.set_epoch(epoch)
        self.skip = batches_done * batch_per_rank

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        return ((i, epoch) for i in itertools.islice(super().__iter__(), self.skip, None))

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


def build_optimizer(param_groups: list[dict[str, Any]], momentum: float, weight_decay: float,
                    name: str = "sgd") -> torch.optim.Optimizer:
    """SGD with Nesterov momentum, as MiB, PLOP and WILSON use; or Adam (default betas, L2 weight decay), as CIL."""
    if name == "adam":
        return torch.optim.Adam(param_groups, lr=param_groups[0]["lr"], weight_decay=weight_decay)
    return torch.optim.SGD(param_groups, lr=param_groups[0]["lr"], momentum=momentum,
                           weight_decay=weight_decay, nesterov=momentum > 0)


def lr_factor_fn(policy: str, total_iters: int, power: float, warmup_iters: int, decay_step: int,
                 decay_factor: float, iters_per_epoch: int = 1) -> Callable[[int], float]:
    """Multiplier of the base lr at iteration `it` (schedules step once per iteration, except poly_epoch)."""
    total_iters = max(total_iters, 1)

    def poly(it: int) -> float:
        return max(1.0 - it / total_iters, 0.0) ** power

    if policy == "poly":
        return poly
    if policy == "poly_epoch":
        # CIL's LambdaLR(lambda epoch: (1 - (epoch - 1) / E) ** 0.9), stepped once per epoch, with epochs counted
        # from 0: epoch e trains at (1 - (e - 1) / E) ** 0.9, i.e. 1.0045 in the first epoch (E = 200) and
        # (2 / E) ** 0.9 in the last; one epoch ahead of poly's (1 - e / E) ** 0.9.
        iters_per_epoch = max(iters_per_epoch, 1)
        epochs = max(total_iters // iters_per_epoch, 1)
        return lambda it: max(1.0 - (it // iters_per_epoch - 1) / epochs, 0.0) ** power
    if policy == "warmup":  # WILSON's WarmUpPolyLR: the base lr until warmup_iters, then poly over the whole run
        return lambda it: 1.0 if it < warmup_iters else poly(it)
    if policy == "warm_poly":  # linear warm-up, then poly (SSUL's warm_poly)
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


def prepare_batch(batch: dict[str, Any], device: torch.device,
                  memory_format: torch.memory_format = torch.contiguous_format) -> dict[str, Any]:
    """Move a collated batch to the device and make the network's input there: uint8 pixels -> normalised float
    (padding 0), uint8 labels -> int64. Copies from pinned memory do not block the host."""
    out = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    out["image"] = normalize_batch(out["image"], out.pop("valid_box"), memory_format=memory_format)
    if "label" in out:  # a weakly supervised batch has none
        out["label"] = out["label"].long()
    return out


class LossMeter:
    """Sums of the loss terms kept on the device: adding costs no host sync; reading (at print intervals and epoch
    ends) costs one. Terms may differ between iterations (a method that adds a loss from some epoch on)."""

    def __init__(self) -> None:
        self.epoch: dict[str, tuple[torch.Tensor, int]] = {}
        self.window: dict[str, tuple[torch.Tensor, int]] = {}

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for store in (self.epoch, self.window):
            for name, value in values.items():
                total, count = store.get(name, (0.0, 0))
                store[name] = (total + value.detach().float(), count + 1)

    @staticmethod
    def _means(store: dict[str, tuple[torch.Tensor, int]]) -> dict[str, float]:
        if not store:
            return {}
        sums = torch.stack([torch.as_tensor(total) for total, _ in store.values()]).tolist()  # the one sync
        return {name: value / count for (name, (_, count)), value in zip(store.items(), sums)}

    def window_means(self) -> dict[str, float]:
        means, self.window = self._means(self.window), {}
        return means

    def epoch_means(self) -> dict[str, float]:
        return self._means(self.epoch)


MAX_SKIPPED_UPDATES = 25  # fp16: consecutive overflow skips (loss scale / 2**25) before the run is called broken


class Updater:
    """Backward, the all-rank decision and the update for one batch.

    One small all-reduce on the training device (NCCL has no CPU path) carries two flags: "some rank has a
    non-finite loss or gradient" and "some rank was asked to stop" (preemption); reading it is the loop's only host
    sync. It runs after backward, when the GPU queue is full, so the wait costs little. Non-finite values:
      - fp32 / bf16: every rank raises NonFiniteLossError before the update, so nothing non-finite is ever applied
        or saved in a run state;
      - fp16 with GradScaler: an overflow is the scaler's normal skipped update (it lowers the scale); the
        scheduler does not advance on it. MAX_SKIPPED_UPDATES skips in a row mean a real NaN: then it raises too.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 scaler: torch.amp.GradScaler, after_backward: Callable[[], None] = lambda: None) -> None:
        """`after_backward()` (Method.after_backward) runs once the update is known to be applied, with the
        all-reduced, unscaled gradients: statistics read there never see an overflowed or non-finite gradient."""
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.after_backward = after_backward
        self.skipped_in_a_row = 0

    def gradients(self) -> list[torch.Tensor]:
        return [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]

    def step(self, total: torch.Tensor, terms: dict[str, torch.Tensor], stop_requested: bool
             ) -> tuple[bool, bool, torch.Tensor]:
        """Returns (stop, applied, grad_norm): whether all ranks stop after this update, whether it was applied
        (False: an fp16 overflow skip), and the gradient norm (on the device)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)  # fp16: true gradients, and the scaler records its overflow check
        grad_norm = grad_total_norm(self.gradients(), total)
        bad = ~torch.isfinite(grad_norm)
        if not self.scaler.is_enabled():
            bad = bad | ~torch.isfinite(total.detach())
        nonfinite, stop = read_flags(all_ranks_flags(bad, stop_requested))
        if nonfinite:
            self.on_nonfinite(terms)
        else:
            self.skipped_in_a_row = 0
            self.after_backward()
        self.scaler.step(self.optimizer)  # fp16: skipped by the scaler on overflow; else optimizer.step()
        self.scaler.update()
        if not nonfinite:
            self.scheduler.step()
        return stop, not nonfinite, grad_norm

    def on_nonfinite(self, terms: dict[str, torch.Tensor]) -> None:
        values = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
        if not self.scaler.is_enabled():
            raise NonFiniteLossError(f"non-finite loss on some rank (this rank: {values}); stopping before the update")
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row > MAX_SKIPPED_UPDATES:
            raise NonFiniteLossError(
                f"non-finite loss on some rank: {self.skipped_in_a_row} fp16 updates in a row were skipped (loss "
                f"scale now {self.scaler.get_scale():.3g}; this rank: {values}). This is a NaN, not an overflow: "
                f"try --amp_dtype bf16, a lower --lr, or check the data")


def grad_total_norm(grads: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """2-norm of all gradients (foreach kernels, no host sync); inf or NaN iff some gradient element is."""
    if not grads:
        return torch.zeros((), device=like.device)
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)


def all_ranks_flags(bad: torch.Tensor, stop_requested: bool) -> torch.Tensor:
    """[any rank bad, any rank asked to stop] as float32 on `bad`'s device (built without a host-to-device copy),
    max-reduced over ranks. Kept apart from the read so that tests can check the collective's device."""
    flags = torch.stack([bad.to(torch.float32), torch.full((), float(stop_requested), device=bad.device)])
    return dist.all_reduce_max(flags)


def read_flags(flags: torch.Tensor) -> tuple[bool, bool]:
    nonfinite, stop = flags.tolist()
    return nonfinite > 0, stop > 0


def injected_nan(global_iter: int) -> bool:
    """Test hook: SEGMENTATION_INJECT_NAN="RANK:ITER" makes rank RANK's loss NaN at global iteration ITER (0-based),
    so the tests can prove that every rank stops before the update. Unset in normal runs."""
    spec = os.environ.get("SEGMENTATION_INJECT_NAN")
    if not spec:
        return False
    rank, it = (int(x) for x in spec.split(":"))
    return rank == dist.get_rank() and it == global_iter


def train_one_epoch(
    *, model: nn.Module, teacher: nn.Module | None, method: Method, loader: Any, updater: Updater,
    amp: AmpSettings, device: torch.device, epoch: int, writer: Any, global_iter: int, print_interval: int,
    memory_format: torch.memory_format = torch.contiguous_format,
    stop_requested: Callable[[], bool] = lambda: False,
    after_update: Callable[[int, bool], None] = lambda global_iter, stop: None,
) -> tuple[dict[str, float], int]:
    """One pass over the loader; returns the mean of each loss term and the updated global iteration.

    `stop_requested()` is this rank's preemption flag; `after_update(global_iter, stop)` runs after every update with
    the flag all ranks agreed on (it saves run states, and ends the step when stop is True). Loss values stay on the
    device and are read only every `print_interval` iterations.
    """
    model.train()
    method.train_mode()  # layers the method keeps frozen (DKD/STAR: norm layers and dropout at t>0)
    meter = LossMeter()
    progress = Progress(loader, len(loader), f"epoch {epoch + 1}", dist.is_main_process(), print_interval)
    for batch in progress:
        batch = prepare_batch(batch, device, memory_format)
        # The losses too run under autocast: a method's extra modules (WILSON's localizer) take the model's bf16
        # features; the loss functions upcast what they reduce.
        with amp.autocast():
            outputs = model(batch["image"])
            teacher_outputs = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_outputs = teacher(batch["image"], features=method.teacher_features)
            terms = method.losses(batch, outputs, teacher_outputs, epoch)
        total = sum(terms.values())
        if injected_nan(global_iter):
            total = total * float("nan")
        stop, applied, grad_norm = updater.step(total, terms, stop_requested())
        global_iter += 1
        if applied:  # an fp16 overflow skip's inf would swamp the means
            meter.add({**terms, "loss": total, "grad_norm": grad_norm})
        if progress.tick():
            scalars = meter.window_means()
            progress.report(scalars)
            if writer is not None:
                for k, v in scalars.items():
                    writer.add_scalar(f"train/{k}", v, global_iter)
                writer.add_scalar("train/lr", updater.optimizer.param_groups[0]["lr"], global_iter)
        after_update(global_iter, stop)
    return meter.epoch_means(), global_iter


Sample = tuple[torch.Tensor, ...]  # image, label, prediction, then each method view's prediction


@dataclass
class Evaluation:
    matrix: ConfusionMatrix                 # the model's predictions against the labels, summed over ranks
    samples: list[Sample]                   # up to `sample_num` pictures' worth, this rank's
    views: dict[str, ConfusionMatrix]       # each scored method view (WILSON's localizer), summed over ranks
    view_names: tuple[str, ...] = ()        # every view drawn in the samples, in order
    groups: dict[str, ConfusionMatrix] = dataclasses.field(default_factory=dict)  # CIL's per-task evaluation


@torch.no_grad()
def evaluate(
    *, model: nn.Module, loader: Any, num_classes: int, device: torch.device, amp: AmpSettings, sample_num: int = 0,
    memory_format: torch.memory_format = torch.contiguous_format, method: Method | None = None,
    groups: dict[str, tuple[int, ...]] | None = None,
    predict: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Evaluation:
    """Confusion matrix over the loader (all-reduced over ranks), up to `sample_num` samples; with `method` its own
    views (Method.eval_views) scored and drawn beside the model's predictions; with `groups` (name -> learning-order
    indices, metrics.named_groups) one matrix per group of CIL's "Task k" evaluation (metrics.group_argmax).
    Predictions are scored at the label's size: under --eval_size the network sees a resized image and its
    prediction is brought back to the label's size (nearest). `predict` turns the scores into labels: the trained
    method's rule (methods.predictor; default the argmax)."""
    model.eval()
    matrix = ConfusionMatrix(num_classes, device)
    views: dict[str, ConfusionMatrix] = {}
    view_names: tuple[str, ...] = ()
    samples: list[Sample] = []
    group_matrices = {name: ConfusionMatrix(num_classes, device) for name in (groups or {})}
    features = method.eval_features if method is not None else frozenset()
    for batch in loader:
        batch = prepare_batch(batch, device, memory_format)
        with amp.autocast():
            outputs = model(batch["image"], features=features)
            extra = method.eval_views(batch, outputs) if method is not None else {}
        label, label_size = batch["label"], batch.get("label_size")
        pred = predictions_at_label_size(predict(outputs[0]) if predict else outputs[0].argmax(dim=1), label,
                                         label_size)
        matrix.update(pred, label)
        for name, indices in (groups or {}).items():
            group_pred = predictions_at_label_size(group_argmax(outputs[0], indices), label, label_size)
            group_matrices[name].update(group_pred, group_target(label, indices))
        view_names = tuple(extra)
        for name, view in extra.items():
            if view.target is not None:
                views.setdefault(name, ConfusionMatrix(num_classes, device)).update(view.pred, view.target)
        image_size = tuple(batch["image"].shape[-2:])  # the pictures are drawn at the network's input size
        for i in range(min(sample_num - len(samples), pred.shape[0])):
            maps = (label[i:i + 1], pred[i:i + 1], *(view.pred[i:i + 1] for view in extra.values()))
            samples.append((batch["image"][i].cpu(), *(resize_prediction(m, image_size)[0].cpu() for m in maps)))
    matrix.all_reduce()
    for group_matrix in group_matrices.values():  # the same names on every rank: they come from the task
        group_matrix.all_reduce()
    # Rank 0 holds the first image whenever there is one, so its view names are the full set; a rank whose shard
    # is empty gets them from it and contributes zeros, rather than leaving the others waiting in an all-reduce.
    for name in dist.broadcast_object(sorted(views)):
        views.setdefault(name, ConfusionMatrix(num_classes, device)).all_reduce()
    return Evaluation(matrix, samples, views, view_names, group_matrices)


def seed_everything(seed: int) -> None:
    """Same initial weights on every rank; augmentation draws from per-sample generators, not from these."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
