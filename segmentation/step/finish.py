"""Finishing a step: the method's end-of-step pass, the test, the artifact and its results; and `--test`, which
evaluates an artifact as its step did (steps.py runs them)."""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from segmentation.config import Config, config_to_dict
from segmentation.datasets import EvalTransform, IncrementalDataset
from segmentation.datasets.transforms import collate_eval
from segmentation.engine import checkpoint as ckpt
from segmentation.engine import runstate
from segmentation.engine.metrics import format_group_line, format_table, group_miou, named_groups
from segmentation.engine.trainer import evaluate, make_amp
from segmentation.methods import Predict, predictor, saved_predictor
from segmentation.methods.base import TrainingSetPasses
from segmentation.step.build import (BuiltStep, StepData, artifact_meta, build_model, build_step_data,
                                     make_eval_loader, model_memory_format, per_rank_batch, weak_step)
from segmentation.step.existing import already_there
from segmentation.tasks import Task, load_task
from segmentation.utils import dist
from segmentation.utils.io import SaveError
from segmentation.utils.visualize import sample_strip

if TYPE_CHECKING:
    from segmentation.step.train import TrainedStep

log = logging.getLogger("segmentation")


def finish_step(cfg: Config, task: Task, built: BuiltStep, trained: "TrainedStep", device: torch.device) -> None:
    """The method's pass over the whole training set (STAR's statistics, the -M variants' memory), the test on every
    class seen so far, then the artifact and its results, written once by rank 0."""
    model, method = built.model, built.method
    # What the method finds here is carried in the artifact. Deterministic, so a step resumed after its last epoch
    # redoes it.
    model.eval()
    method.finish_step(training_set_passes(built.data.train, cfg, built.batch, device))
    results = test_model(model, built.data.test, cfg, task, cfg.step, device, trained.amp)
    extra = test_extra(model, built.data, cfg, task, cfg.step, device, trained.amp)

    def write_artifact() -> None:
        path = ckpt.step_artifact_path(cfg.checkpoint_dir, cfg.dataset, task.name, cfg.overlap, cfg.name, cfg.step)
        meta = artifact_meta(cfg, task, cfg.step) | {"config": config_to_dict(cfg), "parent": built.parent,
                                                     "metrics": summary(results) | extra, "old_data": built.old_data}
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
        write_results(path, results, extra, cfg, task, built.old_data)
        runstate.remove_run_states(trained.state_dir)
        writer = trained.writer
        if writer is not None:
            for group, values in {"test": results, **{f"test_{k}": v for k, v in extra.get("tests", {}).items()}}.items():
                for key in ("miou_all", "miou_old", "miou_new"):
                    if values[key] is not None:
                        writer.add_scalar(f"{group}/{key}", values[key], cfg.step)
            writer.close()
        log.info("step %d done: artifact %s", cfg.step, path)

    # Rank 0 writes; a failed write (no space, no permission) stops every rank with its error.
    dist.on_main_process(write_artifact)


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
        device=device, image_ids=dataset.image_ids())


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
