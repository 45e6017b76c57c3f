"""One incremental step, from flags to the saved artifact, and the `--test` path.

Step t, in order (each part in segmentation/step/):
  build   (build.py)   the images of step t's classes (with a method that uses old data, the -M variants, also the
                       exemplar memory that step t-1 chose), step t-1's artifact loaded into the model and frozen as
                       the teacher, the method with what step t-1 carried over;
  train   (train.py)   the epochs, resumable from run states, with validation;
  finish  (finish.py)  the method's pass over the training set, the test on all classes seen so far, then the
                       artifact and its metrics, written once, atomically.
"""
from __future__ import annotations

import logging

import torch

from segmentation.config import Config, ConfigError
from segmentation.engine.steplock import StepLock, StepLockedError, step_lock_path
from segmentation.step.build import build_step, training_batch_per_rank
from segmentation.step.existing import check_existing, ensure_step_folders
from segmentation.step.finish import finish_step, run_test
from segmentation.step.train import train_epochs
from segmentation.tasks import Task, load_task
from segmentation.utils import dist
from segmentation.utils.io import SaveError

__all__ = ["run_step", "run_test", "train_step"]

log = logging.getLogger("segmentation")


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
    built = build_step(cfg, task, device)
    trained = train_epochs(cfg, task, built, device)
    finish_step(cfg, task, built, trained, device)
