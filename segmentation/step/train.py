"""Training a step: its epochs, with resume, run states, preemption and validation (steps.py runs it)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segmentation.config import Config, config_to_dict
from segmentation.datasets import IncrementalDataset
from segmentation.engine import checkpoint as ckpt
from segmentation.engine import runstate
from segmentation.engine.preemption import Preempted, PreemptionFlag, parse_signal, requeue_on_rank0
from segmentation.engine.runstate import Position
from segmentation.engine.trainer import (AmpSettings, Updater, build_optimizer, evaluate, lr_factor_fn, make_amp,
                                         train_one_epoch)
from segmentation.methods import Method, predictor
from segmentation.step.build import (BuiltStep, make_eval_loader, make_train_loader, model_memory_format,
                                     per_rank_batch, tensors_to)
from segmentation.step.finish import fmt, num_base
from segmentation.tasks import Task
from segmentation.utils import dist
from segmentation.utils.logging import make_writer
from segmentation.utils.visualize import sample_strip

log = logging.getLogger("segmentation")


@dataclass
class TrainedStep:
    """What finishing a step needs from its training."""

    amp: AmpSettings
    writer: Any           # tensorboard's, on rank 0; None elsewhere
    state_dir: Path       # the run states, removed once the artifact is written


def train_epochs(cfg: Config, task: Task, built: BuiltStep, device: torch.device) -> TrainedStep:
    """The epochs left (resumed from the newest run state of this step, if any), with run states saved every
    --save_interval iterations, at epoch ends and on preemption, and validation every --val_interval epochs."""
    method, batch = built.method, built.batch
    memory_format = model_memory_format(cfg)
    # Installed before the loader forks workers, so that they inherit the flag handler (see preemption.py).
    preemption = PreemptionFlag(parse_signal(cfg.preempt_signal)).install()
    train_loader, train_sampler = make_train_loader(built.data.train, cfg, batch, device)
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
    training = TrainingState(built.model, optimizer, scheduler, scaler, method)
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
                model=built.train_model, teacher=built.teacher, method=method, loader=train_loader, updater=updater,
                amp=amp, device=device, epoch=epoch, writer=writer, global_iter=global_iter,
                print_interval=cfg.print_interval, memory_format=memory_format, stop_requested=preemption,
                after_update=after_update)
            method.end_epoch(epoch)
            for module in (built.model, *method.extra_modules().values()):  # evaluate and save rank 0's statistics
                dist.broadcast_buffers(module)
            log.info("epoch %d/%d: %s", epoch + 1, cfg.epochs, " ".join(f"{k}={v:.4f}" for k, v in means.items()))
            save(Position(epoch + 1, 0, global_iter))
            if cfg.val_interval and ((epoch + 1) % cfg.val_interval == 0 or epoch + 1 == cfg.epochs) and len(built.data.val):
                validate(built.model, built.data.val, cfg, task, device, amp, writer, epoch, method)
    finally:
        preemption.uninstall()
    return TrainedStep(amp, writer, state_dir)


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
