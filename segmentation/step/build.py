"""Building a step: its data, step t-1's artifact as the teacher, the model and the method (steps.py runs it)."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from segmentation.config import Config, ConfigError
from segmentation.datasets import (DatasetError, EvalTransform, IncrementalDataset, SegmentationSource, TrainTransform,
                                   step_sources)
from segmentation.datasets.image_labels import read_image_labels
from segmentation.datasets.transforms import collate_eval
from segmentation.engine import checkpoint as ckpt
from segmentation.engine import memory, runstate
from segmentation.engine.trainer import ShardSampler, TrainSampler, seed_everything
from segmentation.methods import METHODS, Method, StepInfo, build_method
from segmentation.models import build_segmenter, load_previous_step
from segmentation.tasks import Task
from segmentation.utils import dist

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


def train_transform(cfg: Config, source: SegmentationSource) -> TrainTransform:
    return TrainTransform(cfg.crop_size, scale=cfg.train_scale or source.train_scale, base_size=cfg.train_base_size,
                          color_jitter=cfg.color_jitter, divide_scale=cfg.train_scale_divide)


def head_pooling(crop_size: tuple[int, int], output_stride: int) -> tuple[int, int]:
    """The DeepLabV3 head's eval-time pooling window: the training crop's feature size."""
    return crop_size[0] // output_stride, crop_size[1] // output_stride


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


def model_memory_format(cfg: Config) -> torch.memory_format:
    """NHWC under --channels_last (faster oneDNN/cuDNN convolutions), else PyTorch's default NCHW."""
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


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


@dataclass
class BuiltStep:
    """Everything a step trains with, as build_step makes it."""

    data: StepData
    batch: int                        # images per rank
    model: nn.Module                  # on the device, unwrapped (its state is what is saved)
    train_model: nn.Module            # the same, wrapped in DDP when there is a process group
    teacher: nn.Module | None         # None when the method does not need one
    method: Method
    parent: dict[str, str] | None     # rank 0: step t-1's artifact and its hash, recorded in this one
    old_data: dict[str, int] | None   # the exemplars it trains on (the -M variants), for the results


def build_step(cfg: Config, task: Task, device: torch.device) -> BuiltStep:
    """The data (with step t-1's exemplar memory for a method that uses old data), step t-1's artifact as teacher,
    the model initialised from it, and the method with what step t-1 carried over."""
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
    model = build_student(cfg, task, previous, device)
    if dist.is_main_process():
        say_if_memory_short(cfg, task, device, batch, teacher is not None)
    # On the device before the method is built: a method's statistics (EWC's Fisher) are made from the parameters.
    memory_format = model_memory_format(cfg)
    model.to(device, memory_format=memory_format)
    if teacher is not None:
        teacher.to(device, memory_format=memory_format)
    method = build_step_method(cfg, task, model, teacher, previous, device)
    if not method.needs_teacher:
        teacher = None
    extra = method.extra_modules()
    for module in extra.values():
        module.to(device, memory_format=memory_format)
    method.forward_modules = {name: wrap_ddp(module, device) for name, module in extra.items()}
    return BuiltStep(data, batch, model, wrap_ddp(model, device), teacher, method, parent, old_data)


def build_student(cfg: Config, task: Task, previous: dict[str, Any] | None, device: torch.device) -> nn.Module:
    """Step 0 (and --student_init imagenet): the model from --pretrained; else step t-1's weights and a new
    classifier."""
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
    return model


def build_step_method(cfg: Config, task: Task, model: nn.Module, teacher: nn.Module | None,
                      previous: dict[str, Any] | None, device: torch.device) -> Method:
    """The method of this step, its new classifier initialised and step t-1's carried state handed over."""
    info = StepInfo(task=task, step=cfg.step, num_old=sum(task.classes_per_step(cfg.step)[:-1]) if cfg.step else 0,
                    num_classes=sum(task.classes_per_step(cfg.step)), epochs=cfg.epochs, norm_act=cfg.norm_act,
                    norm_impl=cfg.norm_impl, device_type=device.type, overlap=cfg.overlap, seed=cfg.random_seed)
    method = build_method(cfg.method, info, model, teacher, cfg.method_options)
    method.init_new_classifier()
    if previous is not None:
        try:
            method.carry_over(tensors_to(previous["method_state"], device))
        except ValueError as exc:  # e.g. --regularizer ewc after a step trained without it
            raise ConfigError(f"{exc} (previous step: {cfg.step_ckpt or 'the default --step_ckpt'})") from exc
    return method
