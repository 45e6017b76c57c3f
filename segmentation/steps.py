"""One incremental step, from flags to the saved artifact, and the `--test` path.

Step t: build the model with one classifier per step so far, load step t-1's artifact into it, freeze a copy of
step t-1 as the teacher, train on the images of step t's classes (with a method that uses old data, the -M variants,
also on the exemplar memory that step t-1 chose), test on all classes seen so far, then write the artifact and its
metrics once, atomically.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from segmentation.config import Config, ConfigError, config_to_dict
from segmentation.datasets import (DatasetError, EvalTransform, IncrementalDataset, SegmentationSource, TrainTransform,
                                   step_sources)
from segmentation.datasets.image_labels import read_image_labels
from segmentation.datasets.transforms import collate_eval
from segmentation.engine import checkpoint as ckpt
from segmentation.engine import memory, runstate
from segmentation.engine.metrics import format_group_line, format_table, group_miou, named_groups
from segmentation.engine.preemption import Preempted, PreemptionFlag, parse_signal, requeue_on_rank0
from segmentation.engine.runstate import Position
from segmentation.engine.steplock import StepLock, StepLockedError, step_lock_path
from segmentation.engine.trainer import (ShardSampler, TrainSampler, Updater, build_optimizer, evaluate,
                                         lr_factor_fn, make_amp, seed_everything, train_one_epoch)
from segmentation.methods import METHODS, Method, Predict, StepInfo, build_method, predictor, saved_predictor
from segmentation.methods.base import TrainingSetPasses
from segmentation.models import build_segmenter, load_previous_step
from segmentation.tasks import Task, load_task
from segmentation.utils import dist
from segmentation.utils.io import SaveError, ensure_writable
from segmentation.utils.logging import make_writer
from segmentation.utils.visualize import sample_strip

log = logging.getLogger("segmentation")


@dataclass(frozen=True)
class StepData:
    train: IncrementalDataset
    val: IncrementalDataset
    test: IncrementalDataset
    extra_tests: dict[str, IncrementalDataset] = dataclasses.field(default_factory=dict)


def per_rank_batch(batch_size: int) -> int:
    world = dist.get_world_size()
    if batch_size < world or batch_size % world:
        raise ConfigError(f"--batch_size {batch_size} must be a multiple of the number of processes ({world}): "
                          f"it is the total batch, split evenly over ranks (e.g. --batch_size {world * max(batch_size // world, 1)})")
    return batch_size // world


def training_batch_per_rank(batch_size: int) -> int:
    """Training needs at least 2 images per rank: the head's image-pooling branch normalises one value per channel
    and image, and with a single image inplace_abn's InPlaceABNSync (and BatchNorm) fail on the first iteration."""
    batch = per_rank_batch(batch_size)
    if batch < 2:
        world = dist.get_world_size()
        raise ConfigError(
            f"--batch_size {batch_size} over {world} process(es) is 1 image per process; training needs at least 2 "
            f"(the DeepLabV3 head's image-pooling branch normalises one value per channel and image, which "
            f"InPlaceABNSync refuses). Use --batch_size {2 * world} or more, or fewer processes.")
    return batch


def weak_step(cfg: Config, step: int) -> bool:
    """Step t>0 of a method that learns from image labels (WILSON), or any step t>0 under --weakly."""
    return step > 0 and (cfg.weakly or cfg.image_labels is not None or METHODS[cfg.method].learns_from_image_labels)


def build_step_data(cfg: Config, task: Task, step: int) -> StepData:
    """Rank 0 builds the sources (generating `shapes` if needed) and the kept-image index caches first; the other
    ranks then only read the cached lists. Weak steps (t>0 of a method that learns from image labels, or --weakly)
    get training items without pixel labels."""
    weak = weak_step(cfg, step)

    def make() -> StepData:
        sources = step_sources(cfg.dataset, cfg.data_root, step, task)
        common = dict(task=task, step=step, overlap=cfg.overlap, seed=cfg.random_seed, test_future=cfg.test_future,
                      ignore_test_bg=cfg.ignore_test_bg)
        eval_tf = EvalTransform(cfg.crop_size, cfg.crop_val, cfg.eval_size)
        tags = None
        if weak and cfg.image_labels is not None:
            tags = (cfg.image_labels, read_image_labels(cfg.image_labels, task.class_names))
        return StepData(
            train=IncrementalDataset(sources.train, mode="train", weak=weak, image_labels=tags,
                                     transform=train_transform(cfg, sources.train),
                                     every_image=cfg.train_images == "all", **common),
            val=IncrementalDataset(sources.val, mode="val", transform=eval_tf, **common),
            test=IncrementalDataset(sources.test, mode="test", transform=eval_tf,
                                    every_image=cfg.test_images == "all", **common),
            extra_tests={name: IncrementalDataset(source, mode="test", transform=eval_tf,
                                                  every_image=cfg.test_images == "all", **common)
                         for name, source in sources.extra_tests.items()},
        )

    return dist.main_process_first(make)


def make_eval_loader(dataset: IncrementalDataset, cfg: Config, batch: int) -> DataLoader:
    sampler = ShardSampler(len(dataset), dist.get_rank(), dist.get_world_size())
    # Its own generator, so that evaluating between epochs draws nothing from the global torch RNG, whose state
    # a run state restores: a run resumed after an epoch end then matches one that validated there.
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=cfg.loader_workers(),
                      pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(0),
                      collate_fn=collate_eval)


def make_train_loader(dataset: IncrementalDataset, cfg: Config, batch: int, device: torch.device
                      ) -> tuple[DataLoader, TrainSampler]:
    sampler = TrainSampler(dataset, num_replicas=dist.get_world_size(), rank=dist.get_rank(), shuffle=True,
                           seed=cfg.random_seed, drop_last=True)
    workers = cfg.loader_workers()
    # Persistent workers: no re-fork (and dataset re-pickling) at every epoch; the sampler hands them the epoch.
    # Its own generator: the loader's worker seeds then do not consume the global torch RNG, whose state a run
    # state restores.
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(cfg.random_seed + dist.get_rank()))
    return loader, sampler


def add_exemplars(cfg: Config, task: Task, data: StepData, previous: dict[str, Any] | None
                  ) -> tuple[StepData, dict[str, int] | None]:
    """The exemplar memory that step t-1 chose (a method that uses old data: the -M variants) appended to the
    step's training set, looked up by image id in the same training source; images already in the set are not
    added twice, and labels go through the step's train remap (other steps' classes -> background). Returns the
    data and what the results record: {"exemplars": memory size, "added": images appended}, None for a method
    that uses no old data."""
    method = METHODS[cfg.method]
    if not method.uses_old_data:
        return data, None
    ids = method.memory_ids(previous["method_state"]) if previous is not None else []
    try:
        train = data.train.with_images(ids)
    except DatasetError as exc:
        raise ckpt.CheckpointError(f"{previous_artifact_path(cfg, task)} carries an exemplar memory that this "
                                   f"training data does not hold: {exc}. Was step {cfg.step - 1} trained on "
                                   f"another --data_root or split list?") from exc
    added = len(train) - len(data.train)
    if dist.is_main_process() and cfg.step > 0:
        log.info("exemplar memory of step %d: %d images, %d added to the %d training images of step %d (%d in the "
                 "set already)", cfg.step - 1, len(ids), added, len(data.train), cfg.step, len(ids) - added)
    return dataclasses.replace(data, train=train), {"exemplars": len(ids), "added": added}


def training_set_passes(dataset: IncrementalDataset, cfg: Config, batch: int, device: torch.device
                        ) -> TrainingSetPasses:
    """Loaders over the whole training set for Method.finish_step: rank r reads images r, r+W, ... once each, with
    the training augmentation of the last epoch (items keyed (k, epoch), as the training sampler keys them) or with
    the evaluation transform."""
    rank, world = dist.get_rank(), dist.get_world_size()
    shard = range(rank, len(dataset), world)

    def loader(keys: list, transform: Any) -> DataLoader:
        view = copy.copy(dataset)
        view.transform = transform
        return DataLoader(view, batch_size=batch, sampler=keys, num_workers=cfg.loader_workers(),
                          pin_memory=device.type == "cuda", collate_fn=collate_eval,
                          generator=torch.Generator().manual_seed(0))

    return TrainingSetPasses(
        augmented=lambda: loader([(k, cfg.epochs - 1) for k in shard], dataset.transform),
        plain=lambda: loader(list(shard), EvalTransform(cfg.crop_size, True, None)),
        device=device, num_images=len(dataset), image_ids=dataset.image_ids())


def train_transform(cfg: Config, source: SegmentationSource) -> TrainTransform:
    return TrainTransform(cfg.crop_size, scale=cfg.train_scale or source.train_scale, base_size=cfg.train_base_size,
                          color_jitter=cfg.color_jitter, divide_scale=cfg.train_scale_divide)


def head_pooling(crop_size: tuple[int, int], output_stride: int) -> tuple[int, int]:
    """The DeepLabV3 head's eval-time pooling window: the training crop's feature size."""
    return crop_size[0] // output_stride, crop_size[1] // output_stride


def say_if_memory_short(cfg: Config, task: Task, device: torch.device, batch: int, teacher: bool) -> None:
    """Rank 0 estimates the step's memory (engine/memory.py) and warns before training if it will not fit."""
    try:
        estimate = memory.estimate_training_bytes(
            lambda: build_model(cfg, task, cfg.step, None, device), batch, cfg.crop_size,
            amp=cfg.amp_enabled(device.type), teacher=teacher, optimizer_slots=2 if cfg.optimizer == "adam" else 1)
    except (RuntimeError, NotImplementedError, TypeError):  # a layer without meta support (the inplace_abn package)
        return
    memory.warn_if_too_big(
        estimate, memory.available_bytes(device),
        f"{batch} images of {cfg.crop_size[0]}x{cfg.crop_size[1]} per process, --backbone {cfg.backbone}",
        "Lower --batch_size (it is the total over all processes) or --crop_size, use more processes or GPUs, or "
        "--amp on a GPU.")


def build_model(cfg: Config, task: Task, step: int, pretrained: Path | None, device: torch.device) -> nn.Module:
    return build_segmenter(cfg.backbone, cfg.output_stride, cfg.norm_act, task.classes_per_step(step), pretrained,
                           pooling_size=head_pooling(cfg.crop_size, cfg.output_stride), device_type=device.type,
                           norm_impl=cfg.norm_impl, head=cfg.head)


def artifact_meta(cfg: Config, task: Task, step: int) -> dict[str, Any]:
    """What a step artifact is; step t+1 checks these fields before it trusts the file."""
    return {"dataset": cfg.dataset, "task": task.name, "overlap": cfg.overlap, "step": step,
            "classes_per_step": task.classes_per_step(step), "backbone": cfg.backbone,
            "output_stride": cfg.output_stride, "head": cfg.head, "method": cfg.method, "name": cfg.name}


def previous_artifact_path(cfg: Config, task: Task) -> Path:
    if cfg.step_ckpt is not None:
        return cfg.step_ckpt
    return ckpt.step_artifact_path(cfg.checkpoint_dir, cfg.dataset, task.name, cfg.overlap, cfg.name, cfg.step - 1)


def load_teacher(cfg: Config, task: Task, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    path = previous_artifact_path(cfg, task)
    if not path.is_file():
        raise ckpt.CheckpointError(
            f"step {cfg.step} starts from step {cfg.step - 1}'s artifact {path}, which does not exist. "
            f"Run --step {cfg.step - 1} first (same --name, --task, --overlap), or pass --step_ckpt PATH.")
    artifact = ckpt.load_artifact(path)
    artifact["meta"].setdefault("head", runstate.ADDED_FLAGS["head"])  # written before --head: the mib head
    expected = {k: v for k, v in artifact_meta(cfg, task, cfg.step - 1).items() if k not in ("method", "name")}
    ckpt.check_previous_artifact(path, artifact, expected)
    teacher = build_model(cfg, task, cfg.step - 1, None, device)
    try:
        teacher.load_state_dict(artifact["model_state"], strict=True)
    except RuntimeError as exc:
        raise ckpt.CheckpointError(f"{path} does not fit --backbone {cfg.backbone} / --norm_act {cfg.norm_act}: {exc}") from exc
    teacher.requires_grad_(False).eval()
    return teacher, artifact


@dataclass(frozen=True)
class ExistingArtifact:
    path: Path
    conflict: str | None  # None: complete, made by these flags from this parent; else why it is not this step's


def existing_artifact(cfg: Config, task: Task) -> ExistingArtifact | None:
    """The step's complete artifact, if there is one, and whether it is this command's: made by the same flags
    and trained from the previous-step artifact that is there now. None: no artifact, or an incomplete or unreadable
    file, which is not a result (it is trained again and replaced)."""
    path = ckpt.step_artifact_path(cfg.checkpoint_dir, cfg.dataset, task.name, cfg.overlap, cfg.name, cfg.step)
    if not path.is_file():
        return None
    try:
        meta = ckpt.load_artifact(path)["meta"]
    except ckpt.CheckpointError:
        return None
    saved, mine = runstate.saved_config(meta.get("config", {})), config_to_dict(cfg)
    wrong = [f"--{k} {flag_value(saved.get(k))} there, {flag_value(mine.get(k))} now"
             for k in runstate.RESUME_SENSITIVE_FLAGS if saved.get(k) != mine.get(k)]
    if wrong:
        more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        return ExistingArtifact(path, f"it was made by other flags ({'; '.join(wrong[:3])}{more})")
    parent = meta.get("parent")
    previous = previous_artifact_path(cfg, task) if cfg.step > 0 else None
    if parent and previous is not None and previous.is_file() and ckpt.file_sha256(previous) != parent["sha256"]:
        return ExistingArtifact(path, f"it was trained from an earlier version of {previous} (step {cfg.step - 1} "
                                      f"was trained again since)")
    return ExistingArtifact(path, None)


def flag_value(value: Any) -> str:
    return "not given" if value is None else repr(value)


def already_complete(cfg: Config, task: Task) -> Path | None:
    """The step's artifact when this command would make it again: then re-running the same command (a requeued
    job, a re-submitted chain) has nothing left to do."""
    existing = existing_artifact(cfg, task)
    return existing.path if existing is not None and existing.conflict is None else None


def refuse_to_replace(existing: ExistingArtifact) -> str:
    return (f"{existing.path} is a complete step, but {existing.conflict}: nothing was trained. Pass --replace to "
            f"train it again (the old one is then kept beside it as {existing.path.stem}.replaced-<date>.pth), or "
            f"choose another --name.")


def ensure_step_folders(cfg: Config, task: Task, lock_folder: Path) -> None:
    """The folders a step writes to (artifacts, run states and locks, logs) exist and are writable."""
    protocol = ckpt.protocol_dir(cfg.checkpoint_dir, cfg.dataset, task.name, cfg.overlap)
    for folder, flag in ((protocol, "--checkpoint_dir"), (lock_folder, "--checkpoint_dir"), (cfg.logdir, "--logdir")):
        ensure_writable(folder, flag)


def already_there(path: Path) -> bool:
    """A complete artifact at `path` (an incomplete or unreadable file is no result: it is simply overwritten)."""
    try:
        ckpt.load_artifact(path)
    except ckpt.CheckpointError:
        return False
    return True


def check_existing(cfg: Config, task: Task) -> tuple[str | None, Path | None]:
    """(why the step is refused, or None; its complete artifact, or None)."""
    existing = existing_artifact(cfg, task)
    if existing is None:
        return None, None
    if existing.conflict is None:
        return None, existing.path
    return (None if cfg.replace else refuse_to_replace(existing)), None


def model_memory_format(cfg: Config) -> torch.memory_format:
    """NHWC under --channels_last (faster oneDNN/cuDNN convolutions), else PyTorch's default NCHW."""
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


def run_step(cfg: Config, device: torch.device) -> None:
    """Train one step, unless it is complete; rank 0 holds the step's lock while it trains (engine/steplock.py)."""
    task = load_task(cfg.dataset, cfg.task)
    task.check_step(cfg.step)
    training_batch_per_rank(cfg.batch_size)  # a batch that does not split over the ranks is refused first
    lock = StepLock(step_lock_path(cfg.checkpoint_dir, cfg.dataset, task.name, cfg.overlap, cfg.name, cfg.step))
    refused = done = None
    if dist.is_main_process():
        try:
            ensure_step_folders(cfg, task, lock.path.parent)
            refused, done = check_existing(cfg, task)
        except SaveError as exc:
            refused = str(exc)
        if refused is None and done is None:
            try:
                lock.acquire()
                refused, done = check_existing(cfg, task)  # finished by the run that held the lock a moment ago?
                if refused is not None or done is not None:
                    lock.release()
            except StepLockedError as exc:
                refused = str(exc)
    refused, done = dist.broadcast_object((refused, done))
    if refused is not None:
        raise ConfigError(refused)
    if done is not None:
        if dist.is_main_process():
            log.info("step %d is already complete (%s, same flags, same previous step): nothing to do. Use another "
                     "--name to train it again.", cfg.step, done)
        return
    try:
        train_step(cfg, task, device)
    finally:
        if dist.is_main_process():
            lock.release()


def train_step(cfg: Config, task: Task, device: torch.device) -> None:
    """The step itself, under its lock (run_step)."""
    batch = training_batch_per_rank(cfg.batch_size)
    seed_everything(cfg.random_seed)
    data = build_step_data(cfg, task, cfg.step)
    log.info("%s %s step %d (%s): %d train / %d val / %d test images, classes %s", cfg.dataset, task.name, cfg.step,
             "overlap" if cfg.overlap else "disjoint", len(data.train), len(data.val), len(data.test),
             ", ".join(task.class_names[c] for c in task.new_classes(cfg.step)))
    if len(data.train) < cfg.batch_size:
        raise ConfigError(f"step {cfg.step} has only {len(data.train)} training images, fewer than --batch_size {cfg.batch_size}")

    teacher, previous = (load_teacher(cfg, task, device) if cfg.step > 0 else (None, None))
    data, old_data = add_exemplars(cfg, task, data, previous)
    # What this step starts from, recorded in its artifact: a step whose parent is trained again is not complete.
    parent = None
    if cfg.step > 0 and dist.is_main_process():
        parent_path = previous_artifact_path(cfg, task)
        parent = {"path": str(parent_path), "sha256": ckpt.file_sha256(parent_path)}
    from_imagenet = cfg.step == 0 or cfg.student_init == "imagenet"
    if from_imagenet and cfg.pretrained is None and dist.is_main_process():
        log.info("no --pretrained ImageNet weights: the backbone starts from random initialisation" +
                 (" (--student_init imagenet: the teacher's knowledge reaches it through the losses only)"
                  if cfg.step > 0 else ""))
    try:
        model = build_model(cfg, task, cfg.step, cfg.pretrained if from_imagenet else None, device)
    except (FileNotFoundError, ValueError) as exc:  # a wrong --pretrained file
        raise ConfigError(str(exc)) from exc
    if previous is not None and not from_imagenet:
        load_previous_step(model, previous["model_state"])  # fits: the teacher loaded the same state strictly

    if dist.is_main_process():
        say_if_memory_short(cfg, task, device, batch, teacher is not None)
    # On the device before the method is built: a method's statistics (EWC's Fisher) are made from the parameters.
    memory_format = model_memory_format(cfg)
    model.to(device, memory_format=memory_format)
    if teacher is not None:
        teacher.to(device, memory_format=memory_format)
    info = StepInfo(task=task, step=cfg.step, num_old=sum(task.classes_per_step(cfg.step)[:-1]) if cfg.step else 0,
                    num_classes=sum(task.classes_per_step(cfg.step)), epochs=cfg.epochs, norm_act=cfg.norm_act,
                    norm_impl=cfg.norm_impl, device_type=device.type, overlap=cfg.overlap,
                    seed=cfg.random_seed)
    method = build_method(cfg.method, info, model, teacher, cfg.method_options)
    method.init_new_classifier()
    if previous is not None:
        try:
            method.carry_over(tensors_to(previous["method_state"], device))
        except ValueError as exc:  # e.g. --regularizer ewc after a step trained without it
            raise ConfigError(f"{exc} (previous step: {cfg.step_ckpt or 'the default --step_ckpt'})") from exc
    if not method.needs_teacher:
        teacher = None

    train_model = wrap_ddp(model, device)
    extra = method.extra_modules()
    for module in extra.values():
        module.to(device, memory_format=memory_format)
    method.forward_modules = {name: wrap_ddp(module, device) for name, module in extra.items()}

    # Installed before the loader forks workers, so that they inherit the flag handler (see preemption.py).
    preemption = PreemptionFlag(parse_signal(cfg.preempt_signal)).install()
    train_loader, train_sampler = make_train_loader(data.train, cfg, batch, device)
    iters_per_epoch = len(train_loader)
    optimizer = build_optimizer(method.param_groups(cfg.step_lr()), cfg.momentum, cfg.weight_decay, cfg.optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor_fn(
        cfg.lr_policy, cfg.epochs * iters_per_epoch, cfg.lr_power, int(cfg.warmup_epochs * iters_per_epoch),
        cfg.lr_decay_step, cfg.lr_decay_factor, iters_per_epoch))
    amp, scaler = make_amp(cfg.amp_enabled(device.type), cfg.amp_dtype, device)
    protocol = ckpt.protocol_dir(cfg.checkpoint_dir, cfg.dataset, task.name, cfg.overlap)
    writer = make_writer(cfg.logdir / protocol.name / f"{cfg.name}_{cfg.step}", dist.is_main_process())
    method.before_training(train_loader, device)

    updater = Updater(optimizer, scheduler, scaler, after_backward=method.after_backward)
    training = TrainingState(model, optimizer, scheduler, scaler, method)
    state_dir = runstate.run_state_dir(cfg.checkpoint_dir, cfg.dataset, task.name, cfg.overlap, cfg.name, cfg.step)
    position = resume_or_start(cfg, state_dir, training)

    def save(pos: Position) -> None:
        runstate.save_run_state(state_dir, pos, training.state_dict(), config_to_dict(cfg), cfg.keep_run_states)

    def after_update(global_iter: int, stop: bool) -> None:
        epoch_, done_ = divmod(global_iter, iters_per_epoch)
        if stop:
            save(Position(epoch_, done_, global_iter))
            # Rank 0's reason for all: the ranks must agree on whether to requeue (a collective) or just stop.
            interrupted = bool(dist.broadcast_object(preemption.interrupted))
            reason = "interrupted (Ctrl-C or SIGTERM)" if interrupted else "preemption signal"
            message = f"{reason}: run state saved at iteration {global_iter}"
            if dist.is_main_process():  # now: `scontrol requeue` ends this job step at once, log and all
                log.info(message)
            # Requeue while every rank is still alive: under srun --kill-on-bad-exit a rank that exits first would
            # get rank 0 killed before `scontrol requeue`, and the job would end failed instead of requeued.
            requeued = False if interrupted else requeue_on_rank0()
            raise Preempted(message, requeued, interrupted)
        if cfg.save_interval and global_iter % cfg.save_interval == 0 and done_:  # epoch ends are saved below
            save(Position(epoch_, done_, global_iter))

    global_iter = position.global_iter
    try:
        for epoch in range(position.epoch, cfg.epochs):
            train_sampler.start_epoch(epoch, position.batch if epoch == position.epoch else 0, batch)
            means, global_iter = train_one_epoch(
                model=train_model, teacher=teacher, method=method, loader=train_loader, updater=updater, amp=amp,
                device=device, epoch=epoch, writer=writer, global_iter=global_iter, print_interval=cfg.print_interval,
                memory_format=memory_format, stop_requested=preemption, after_update=after_update)
            method.end_epoch(epoch)
            for module in (model, *method.extra_modules().values()):  # evaluate and save rank 0's statistics
                dist.broadcast_buffers(module)
            log.info("epoch %d/%d: %s", epoch + 1, cfg.epochs, " ".join(f"{k}={v:.4f}" for k, v in means.items()))
            save(Position(epoch + 1, 0, global_iter))
            if cfg.val_interval and ((epoch + 1) % cfg.val_interval == 0 or epoch + 1 == cfg.epochs) and len(data.val):
                validate(model, data.val, cfg, task, device, amp, writer, epoch, method)
    finally:
        preemption.uninstall()

    # The method's pass over the whole training set (STAR's statistics, the -M variants' memory), before the test:
    # what it finds is carried in the artifact. Deterministic, so a step resumed after its last epoch redoes it.
    model.eval()
    method.finish_step(training_set_passes(data.train, cfg, batch, device))
    results = test_model(model, data.test, cfg, task, cfg.step, device, amp)
    extra = test_extra(model, data, cfg, task, cfg.step, device, amp)

    def write_artifact() -> None:
        path = ckpt.step_artifact_path(cfg.checkpoint_dir, cfg.dataset, task.name, cfg.overlap, cfg.name, cfg.step)
        meta = artifact_meta(cfg, task, cfg.step) | {"config": config_to_dict(cfg), "parent": parent,
                                                     "metrics": summary(results) | extra, "old_data": old_data}
        states = dict(model_state=model.state_dict(), method_state=method.carry_state(), meta=meta,
                      extra_modules={k: m.state_dict() for k, m in method.extra_modules().items()})
        if cfg.replace and already_there(path):
            # The new artifact is written in full first: if that fails (no space), the old one stays where it was.
            staged = path.with_name(f".{path.stem}.staged{path.suffix}")
            ckpt.save_step_artifact(staged, **states)
            kept = ckpt.keep_aside(path)
            os.replace(staged, path)
            log.info("--replace: the previous artifact of step %d is kept as %s", cfg.step,
                     ", ".join(str(k) for k in kept))
        else:
            ckpt.save_step_artifact(path, **states)
        write_results(path, results, extra, cfg, task, old_data)
        runstate.remove_run_states(state_dir)
        if writer is not None:
            for group, values in {"test": results, **{f"test_{k}": v for k, v in extra.get("tests", {}).items()}}.items():
                for key in ("miou_all", "miou_old", "miou_new"):
                    if values[key] is not None:
                        writer.add_scalar(f"{group}/{key}", values[key], cfg.step)
            writer.close()
        log.info("step %d done: artifact %s", cfg.step, path)

    # Rank 0 writes; a failed write (no space, no permission) stops every rank with its error.
    dist.on_main_process(write_artifact)


@dataclass
class TrainingState:
    """What a run state holds besides the position and random states."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    method: Any

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "method": self.method.state_dict(),
                "extra_modules": {k: m.state_dict() for k, m in self.method.extra_modules().items()}}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])  # moves its state to the parameters' device itself
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.method.load_state_dict(tensors_to(state["method"], device))
        for k, module in self.method.extra_modules().items():
            module.load_state_dict(state["extra_modules"][k])


def resume_or_start(cfg: Config, state_dir: Path, training: TrainingState) -> Position:
    """Continue from the newest readable run state of this step, or start at iteration 0."""
    if cfg.no_resume:
        runstate.remove_run_states(state_dir)
        dist.barrier()
    found = runstate.find_resumable(state_dir)
    if found is None:
        return Position(0, 0, 0)
    path, state = found
    runstate.check_resumable(path, state, config_to_dict(cfg))
    try:
        training.load_state_dict(state, next(training.model.parameters()).device)
    except (KeyError, ValueError) as exc:  # written by another version of this code
        raise ckpt.CheckpointError(f"run state {path} cannot be resumed ({exc}); pass --no_resume to discard "
                                   f"{path.parent} and train the step from the start") from exc
    runstate.restore_rank_rng(path, state)
    position = Position(**state["position"])
    if dist.is_main_process():
        log.info("resuming from %s: epoch %d, %d batches done, iteration %d", path, position.epoch + 1,
                 position.batch, position.global_iter)
    return position


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP whenever a process group exists (one process under torchrun too: the same collectives as many); a module
    without trainable parameters is returned as it is (DDP refuses it)."""
    if not dist.is_initialized() or not any(p.requires_grad for p in model.parameters()):
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def tensors_to(tree: Any, device: torch.device) -> Any:
    """Every tensor of a nested dict/list state on `device` (states are loaded on the CPU)."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: tensors_to(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tensors_to(v, device) for v in tree)
    return tree


def validate(model: nn.Module, dataset: IncrementalDataset, cfg: Config, task: Task, device: torch.device,
             amp: Any, writer: Any, epoch: int, method: Method) -> None:
    """The step's val split: val images holding a class of this step, scored on all seen classes; the method's
    own views (WILSON's localizer: `val_cam/*`) scored and drawn beside the model's predictions."""
    result = evaluate(model=model, loader=make_eval_loader(dataset, cfg, per_rank_batch(cfg.batch_size)),
                      num_classes=sum(task.classes_per_step(cfg.step)), device=device, amp=amp,
                      sample_num=cfg.sample_num if dist.is_main_process() else 0,
                      memory_format=model_memory_format(cfg), method=method,
                      predict=predictor(cfg.method, cfg.method_options))
    names = task.seen_class_names(cfg.step)
    base, bg = num_base(task, cfg.step), task.has_background
    scored = {"val": result.matrix.compute(names, base, has_background=bg)}
    scored |= {f"val_{view}": matrix.compute(names, base, has_background=bg)
               for view, matrix in result.views.items()}
    for group, results in scored.items():
        log.info("%s after epoch %d: mIoU all %s, old %s, new %s", group, epoch + 1,
                 *(fmt(results[k]) for k in ("miou_all", "miou_old", "miou_new")))
    if writer is None:
        return
    for group, results in scored.items():
        for key in ("miou_all", "miou_old", "miou_new", "pixel_acc"):
            if results[key] is not None:
                writer.add_scalar(f"{group}/{key}", results[key], epoch + 1)
    if result.samples:
        columns = " | ".join(["image", "ground truth", "prediction", *result.view_names])
        writer.add_text("val/sample_columns", columns, epoch + 1)
    for k, sample in enumerate(result.samples):
        writer.add_image(f"val/sample_{k}", sample_strip(*sample), epoch + 1, dataformats="HWC")


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def num_base(task: Task, step: int) -> int:
    """Reported "old" classes are the base (step-0) classes, background included (where there is one), as in the
    papers' tables
    (15-1: 0-15 old, 16-20 new at every step); "new" are all classes added since."""
    return task.classes_per_step(step)[0]


def test_model(model: nn.Module, dataset: IncrementalDataset, cfg: Config, task: Task, step: int,
               device: torch.device, amp: Any, label: str = "test", predict: Predict | None = None) -> dict[str, Any]:
    """The test split scored on all seen classes (and per task group); `predict`: the rule that made the model
    (default: cfg's method's)."""
    groups = named_groups(task.group_parts(step))
    num_classes = sum(task.classes_per_step(step))
    # The group of all seen classes, if any, is the ordinary argmax: its matrix is the one already computed.
    everything = next((name for name, indices in groups.items() if len(indices) == num_classes), None)
    result = evaluate(model=model, loader=make_eval_loader(dataset, cfg, per_rank_batch(cfg.batch_size)),
                      num_classes=sum(task.classes_per_step(step)), device=device, amp=amp,
                      sample_num=8 if dist.is_main_process() else 0, memory_format=model_memory_format(cfg),
                      groups={k: v for k, v in groups.items() if k != everything},
                      predict=predict or predictor(cfg.method, cfg.method_options))
    results = result.matrix.compute(task.seen_class_names(step), num_base(task, step),
                                    has_background=task.has_background)
    results["samples"] = result.samples
    results["task_miou"] = {name: results["miou_all"] if name == everything else
                            group_miou(result.groups[name], groups[name]) for name in groups}
    if dist.is_main_process():
        log.info("%s after step %d (%d images, all classes seen so far):\n%s\nper task (CIL: argmax within each "
                 "task's classes, the others ignored): %s", label, step, len(dataset), format_table(results),
                 format_group_line(results["task_miou"]))
    return results


def test_extra(model: nn.Module, data: StepData, cfg: Config, task: Task, step: int, device: torch.device,
               amp: Any, predict: Predict | None = None) -> dict[str, Any]:
    """The step's further test sets (COCO-to-VOC: VOC val in COCO ids) as {"tests": {name: summary}}, or {}."""
    if not data.extra_tests:
        return {}
    return {"tests": {name: summary(test_model(model, dataset, cfg, task, step, device, amp, label=f"test on {name}",
                                               predict=predict))
                      for name, dataset in data.extra_tests.items()}}


SUMMARY_KEYS = ("miou_all", "miou_old", "miou_new", "miou_h", "miou_old_fg", "pixel_acc", "mean_acc", "class_iou",
                "task_miou")


def summary(results: dict[str, Any]) -> dict[str, Any]:
    return {k: results[k] for k in SUMMARY_KEYS if k in results}


def write_results(artifact: Path, results: dict[str, Any], extra: dict[str, Any], cfg: Config, task: Task,
                  old_data: dict[str, int] | None = None) -> None:
    """<name>_<step>.json beside the artifact (`tests`: the further test sets; `old_data`: the exemplars of earlier
    steps it trained on, None for a method that uses none), and a PNG of test images | ground truth | prediction."""
    record = {"dataset": cfg.dataset, "task": task.name, "overlap": cfg.overlap, "step": cfg.step,
              "method": cfg.method, "name": cfg.name, "weak": weak_step(cfg, cfg.step), "old_data": old_data,
              "old_classes_include_background": task.has_background,
              **summary(results), "confusion_matrix": results.get("confusion_matrix"), **extra}
    ckpt.atomic_json_dump(record, artifact.with_suffix(".json"))
    strips = [sample_strip(*s) for s in results.get("samples", [])]
    if strips:
        grid = np.concatenate(strips, axis=0)
        ckpt.atomic_write_bytes(artifact.with_name(artifact.stem + "_samples.png"),
                                lambda f: Image.fromarray(grid).save(f, format="PNG"))


# What an artifact was trained and evaluated with, which --test and --infer take from it: the model's shape and
# norm layers, and the evaluation protocol of its step.
ARTIFACT_FLAGS = ("dataset", "task", "overlap", "step", "backbone", "output_stride", "norm_act", "head", "crop_size",
                  "crop_val", "eval_size", "test_future", "test_images")


def load_artifact_model(cfg: Config, path: Path, device: torch.device) -> tuple[nn.Module, Config, Task, Predict]:
    """The artifact's model on `device`, the config it was made with (ARTIFACT_FLAGS from the artifact, the rest,
    --data_root included, from the command line), its task, and the prediction rule of the method that trained
    it."""
    artifact = ckpt.load_artifact(path)
    meta = artifact["meta"]
    saved = runstate.saved_config(meta.get("config", {}))
    values = {k: saved[k] for k in ARTIFACT_FLAGS if k in saved}
    values |= {k: meta[k] for k in ("dataset", "overlap", "step", "backbone", "output_stride")}
    values["task"] = meta["task"]
    for flag in ("crop_size", "eval_size"):
        if isinstance(values.get(flag), list):
            values[flag] = tuple(values[flag])
    art_cfg = dataclasses.replace(cfg, **values)
    if art_cfg.dataset != cfg.dataset or art_cfg.norm_act != cfg.norm_act:
        log.info("using the artifact's dataset %s, task %s and model flags (--norm_act %s, --backbone %s)",
                 art_cfg.dataset, art_cfg.task, art_cfg.norm_act, art_cfg.backbone)
    task = load_task(art_cfg.dataset, art_cfg.task)
    model = build_model(art_cfg, task, art_cfg.step, None, device)
    model.load_state_dict(artifact["model_state"], strict=True)
    model.to(device, memory_format=model_memory_format(cfg)).eval()
    return model, art_cfg, task, saved_predictor(saved)


def run_test(cfg: Config, device: torch.device) -> None:
    """--test --ckpt PATH: evaluate an artifact on the test split of its own step, as that step evaluated it."""
    model, test_cfg, task, predict = load_artifact_model(cfg, cfg.ckpt, device)
    step = test_cfg.step
    data = build_step_data(test_cfg, task, step)
    amp, _ = make_amp(cfg.amp_enabled(device.type), cfg.amp_dtype, device)
    results = test_model(model, data.test, test_cfg, task, step, device, amp, predict=predict)
    extra = test_extra(model, data, test_cfg, task, step, device, amp, predict=predict)
    if dist.is_main_process():
        out = cfg.ckpt.with_name(cfg.ckpt.stem + "_test.json")
        try:
            ckpt.atomic_json_dump({"checkpoint": str(cfg.ckpt), **summary(results), **extra}, out)
        except SaveError as exc:  # e.g. a shared, read-only artifact: the metrics were printed all the same
            raise SaveError(f"the test metrics above are complete, but {out} could not be written: {exc}") from exc
        log.info("wrote %s", out)
