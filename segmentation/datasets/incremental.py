"""One step of a class-incremental task over a raw source: MiB-family image filter, learning-order remap.

Filtering (MiB's dataset/voc.py `filter_images`, on RAW labels; `labels` = new classes of the step, background 0
excluded):
  train overlap : keep an image if it contains any class of `labels`
  train disjoint: ... and every class in it is in labels + old + [0, 255] (no future class present); for a task
                  without background this is the overlap rule (future pixels are ignored, not background)
  val           : val images with any class of `labels` (always the overlap rule)
  test          : val images with any seen class
With `every_image` (--train_images all / --test_images all) train keeps every image that the disjoint rule allows
(CIL trains a stage on every image of its cities, also those without a pixel of the stage's classes) and test
keeps every val image (WILSON tests each step on all of VOC val); val is unchanged.
Remap (256-entry LUT on the uint8 label, before any geometry): learning order = task.seen_classes(step).
  train    : new classes -> their index; old and future -> 0 (255 when the task has no background); 255 stays 255
  val/test : seen classes -> their index; future -> 0 (test_future="background", PLOP/WILSON) or 255 ("ignore", MiB)
"""
from __future__ import annotations

import copy
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from segmentation.utils.io import atomic_write_bytes

from .base import DatasetError, SegmentationSource
from .image_labels import tag_matrix
from .transforms import EvalTransform

IGNORE = 255
MODES = ("train", "val", "test")


class TaskLike(Protocol):
    dataset: str
    name: str
    has_background: bool
    steps: tuple[tuple[int, ...], ...]

    def new_classes(self, step: int) -> tuple[int, ...]: ...
    def old_classes(self, step: int) -> tuple[int, ...]: ...
    def seen_classes(self, step: int) -> tuple[int, ...]: ...


# ---------------------------------------------------------------- cache files (atomic, shared by all ranks)

def default_cache_dir(source: SegmentationSource) -> Path:
    return source.root / ".cache"


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """Readers never see a partial file; racing writers write the same content and the last rename wins."""
    atomic_write_bytes(path, lambda f: np.save(f, array))


def _load(path: Path, rows: int | None = None) -> np.ndarray | None:
    """The cached array, or None when missing / unreadable / of the wrong length (then it is recomputed)."""
    try:
        arr = np.load(path)
    except (OSError, ValueError, EOFError):
        return None
    if rows is not None and arr.shape[0] != rows:
        return None
    return arr


def _image_classes(source: SegmentationSource, i: int) -> np.ndarray:
    present = np.bincount(source.load_label(i).ravel(), minlength=256) > 0
    check_label_values(present, source.num_classes, source.label_path(i))
    return present


def check_label_values(present: np.ndarray, num_classes: int, path: Path) -> None:
    """present: bool[256] of values found in a raw label. Anything but dataset classes and 255 is a data error."""
    bad = np.flatnonzero(present[num_classes:IGNORE]) + num_classes
    if bad.size:
        raise DatasetError(
            f"label {path} contains values {bad.tolist()} that are neither classes 0..{num_classes - 1} nor 255 "
            f"(ignore). Is it an RGB/colour-coded or wrongly converted mask? Regenerate it as class-id PNG.")


def class_matrix(source: SegmentationSource, cache_dir: Path | None = None, workers: int | None = None) -> np.ndarray:
    """bool [len(source), 256]: which raw values each label contains. One pass over all labels, then cached as
    `<cache>/<dataset>-<split>-<idskey>-classes.npy` (the key changes when the split list changes)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(source)
    path = cache / f"{source.name}-{source.split}-{source.ids_key()}-classes.npy"
    cached = _load(path, rows=len(source))
    if cached is not None:
        return cached
    workers = workers or min(8, os.cpu_count() or 1)
    # PNG decoding (zlib) releases the GIL, so threads give a real speed-up without pickling the source.
    with ThreadPoolExecutor(workers) as pool:
        rows = list(pool.map(lambda i: _image_classes(source, i), range(len(source))))
    matrix = np.stack(rows) if rows else np.zeros((0, 256), bool)
    _save_atomic(path, matrix)
    return matrix


# ---------------------------------------------------------------- filtering

def _fg(classes: tuple[int, ...] | list[int], has_background: bool) -> list[int]:
    return [c for c in classes if not (has_background and c == 0)]


def select_indices(present: np.ndarray, task: TaskLike, step: int, mode: str, overlap: bool,
                   every_image: bool = False) -> np.ndarray:
    """Indices (into the split list) of the images kept for this step and mode; `present` as from class_matrix.
    `every_image` drops the class filter of train and test (module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    bg = task.has_background
    labels = _fg(task.seen_classes(step) if mode == "test" else task.new_classes(step), bg)
    if every_image and mode != "val":
        keep = np.ones(len(present), bool)
    else:
        keep = present[:, labels].any(axis=1) if labels else np.zeros(len(present), bool)
    # Disjoint drops images holding a future class because it would be labelled background. Without a background
    # class (Cityscapes, CIL) future pixels are ignored (255) instead, so they leak nothing and the image stays:
    # CIL's stages are disjoint by their cities, while every street scene shows every kind of class.
    if mode == "train" and not overlap and bg:
        allowed = np.zeros(256, bool)
        allowed[list(task.seen_classes(step))] = True
        allowed[IGNORE] = True
        if bg:
            allowed[0] = True
        keep &= ~present[:, ~allowed].any(axis=1)
    return np.flatnonzero(keep).astype(np.int64)


def index_path(cache: Path, source: SegmentationSource, task: TaskLike, step: int, mode: str, overlap: bool,
               every_image: bool = False) -> Path:
    """`<cache>/<dataset>-<task>[-ov]/<mode>[-all]-<step>-<idskey>.npy` (MiB's data/<ds>/<task>[-ov]/train-<step>.npy
    plus the split-list key). The ov/disjoint distinction only changes train; val and test share one file."""
    ov = "-ov" if overlap or mode != "train" else ""
    every = "-all" if every_image and mode != "val" else ""
    return cache / f"{source.name}-{task.name}{ov}" / f"{mode}{every}-{step}-{source.ids_key()}.npy"


def prepare_index(source: SegmentationSource, task: TaskLike, step: int, mode: str, overlap: bool,
                  cache_dir: Path | None = None, every_image: bool = False) -> np.ndarray:
    """Load or compute (and cache atomically) the kept-image indices. Call on rank 0 before a barrier to spare the
    other ranks the label pass; racing calls are safe anyway (atomic renames, identical content)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(source)
    path = index_path(cache, source, task, step, mode, overlap, every_image)
    idx = _load(path)
    if idx is not None and (idx.size == 0 or idx.max() < len(source)):
        return idx
    idx = select_indices(class_matrix(source, cache), task, step, mode, overlap, every_image)
    _save_atomic(path, idx)
    return idx


# ---------------------------------------------------------------- remapping

def build_lut(task: TaskLike, step: int, mode: str, num_classes: int, test_future: str = "background",
              ignore_background: bool = False) -> np.ndarray:
    """uint8[256]: raw dataset id -> learning-order id (or 0 / 255). Values outside the dataset are rejected
    before the LUT is applied (check_label_values), so their entries do not matter. `ignore_background` (val and
    test only, PLOP's --ignore_test_bg): every pixel that would read as background is ignored instead; with
    test_future "ignore" that is MiB's ADE evaluation, which ignores ADE's class 0 ("other")."""
    if test_future not in ("background", "ignore"):
        raise ValueError(f"test_future must be 'background' or 'ignore', got {test_future!r}")
    order = list(task.seen_classes(step))
    bg = task.has_background
    if mode == "train":
        fill = 0 if bg else IGNORE
        visible = set(task.new_classes(step)) | ({0} if bg else set())
    else:
        fill = 0 if (bg and test_future == "background") else IGNORE
        visible = set(order)
    lut = np.full(256, fill, np.uint8)
    for k, c in enumerate(order):
        if c in visible:
            lut[c] = k
    if ignore_background and bg and mode != "train":
        lut[lut == 0] = IGNORE
    lut[IGNORE] = IGNORE
    return lut


# ---------------------------------------------------------------- dataset

class IncrementalDataset(Dataset):
    """Items: {"image": 3xHxW uint8, "label": HxW uint8 (learning order, 255 ignore), "valid_box": int32
    [y0, y1, x0, x1] (image pixels; the rest is padding), "image_labels": float [num new classes] multi-hot (from the
    full remapped label, before cropping), "index": source index}; `transforms.normalize_batch` makes the float input.

    Augmentation randomness of item i in epoch e = np.random.default_rng((seed, e, source index)). The key is k, or
    (k, e) as the training sampler yields it: the epoch then travels with the index, so persistent loader workers,
    which hold their own copy of the dataset, still draw the right epoch's augmentation."""

    def __init__(self, source: SegmentationSource, task: TaskLike, step: int, mode: str = "train",
                 overlap: bool = True, transform: Callable[..., Any] | None = None, seed: int = 0,
                 test_future: str = "background", cache_dir: Path | None = None, weak: bool = False,
                 image_labels: tuple[Path, dict[str, set[int]]] | None = None, ignore_test_bg: bool = False,
                 every_image: bool = False) -> None:
        if not 0 <= step < len(task.steps):
            raise ValueError(f"step {step} out of range for task {task.name} ({len(task.steps)} steps)")
        if (weak or image_labels is not None) and mode != "train":
            raise ValueError("weak (image-level) supervision applies to the training split only")
        self.source, self.task, self.step, self.mode = source, task, step, mode
        self.overlap, self.seed, self.epoch = overlap, seed, 0
        self.transform = transform if transform is not None else EvalTransform(crop_val=False)
        # Weak: items carry the image and its image-level labels, never a pixel label. `present` holds each image's
        # class set (from the cached mask pass, or from a hand-written file, and then no mask is read at all).
        self.weak = weak or image_labels is not None
        self.present: np.ndarray | None = None
        if image_labels is not None:
            self.present = tag_matrix(source, image_labels[1], image_labels[0])
            self.indices = select_indices(self.present, task, step, mode, overlap, every_image)
        else:
            self.indices = prepare_index(source, task, step, mode, overlap, cache_dir, every_image)
            if self.weak:
                self.present = class_matrix(source, cache_dir)
        self.lut = build_lut(task, step, mode, source.num_classes, test_future, ignore_test_bg)
        # image_labels: the step's new classes (background excluded) in learning order, looked up on raw ids
        # (identical to looking them up on the remapped label, since new classes are kept in every mode).
        self.new_raw = np.array(_fg(task.new_classes(step), task.has_background), np.int64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def image_ids(self) -> dict[int, str]:
        """The set's images in its order: source index -> image id (SegmentationSource.ids)."""
        return {int(i): self.source.ids[int(i)] for i in self.indices}

    def with_images(self, ids: Sequence[str]) -> IncrementalDataset:
        """A copy that also holds the source's images `ids` (an exemplar memory of earlier steps), appended after
        the set's own in the given order, each image once. Their labels go through this set's remap, so in train
        mode the classes of other steps read as background, as DKD masks its memory (DKD dataset.py:501-520)."""
        where = {image_id: i for i, image_id in enumerate(self.source.ids)}
        missing = [image_id for image_id in ids if image_id not in where]
        if missing:
            raise DatasetError(f"image id(s) {', '.join(map(repr, missing[:5]))} are not in the {self.source.name} "
                               f"{self.source.split} split ({self.source.root})")
        held = set(self.indices.tolist())
        added: list[int] = []
        for image_id in ids:
            i = where[image_id]
            if i not in held:
                held.add(i)
                added.append(i)
        extended = copy.copy(self)
        extended.indices = np.concatenate([self.indices, np.asarray(added, np.int64)])
        return extended

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        k, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        i = int(self.indices[k])
        if self.weak:
            return self._weak_item(i, epoch)
        raw = self.source.load_label(i)
        present = np.bincount(raw.ravel(), minlength=256) > 0
        check_label_values(present, self.source.num_classes, self.source.label_path(i))
        label = np.take(self.lut, raw)  # np.take on uint8: one vectorised pass, stays uint8 through the geometry
        image = self.source.open_image(i)
        if image.size != raw.shape[::-1]:
            image.close()
            raise DatasetError(f"image {self.source.image_path(i)} is {image.size[0]}x{image.size[1]} but label "
                               f"{self.source.label_path(i)} is {raw.shape[1]}x{raw.shape[0]}; they must match")
        rng = np.random.default_rng((self.seed, epoch, i))
        try:
            img_t, lbl_t, box = self.transform(image, label, rng)
        except OSError as exc:  # truncated / corrupt JPEG data surfaces at decode time, inside the transform
            raise DatasetError(f"cannot decode image {self.source.image_path(i)}: {exc}. "
                               f"Re-extract or re-download this file.") from exc
        finally:
            image.close()
        return {"image": img_t, "label": lbl_t, "valid_box": box,
                "image_labels": torch.from_numpy(present[self.new_raw].astype(np.float32)), "index": i}

    def _weak_item(self, i: int, epoch: int) -> dict[str, Any]:
        """The image (augmented exactly as a full item would be) and its image-level labels; no mask is read, so
        no pixel label can reach the method."""
        image = self.source.open_image(i)
        placeholder = np.zeros(image.size[::-1], np.uint8)  # the transform's geometry depends on the size alone
        rng = np.random.default_rng((self.seed, epoch, i))
        try:
            img_t, _, box = self.transform(image, placeholder, rng)
        except OSError as exc:
            raise DatasetError(f"cannot decode image {self.source.image_path(i)}: {exc}. "
                               f"Re-extract or re-download this file.") from exc
        finally:
            image.close()
        present = self.present[i]
        return {"image": img_t, "valid_box": box, "index": i,
                "image_labels": torch.from_numpy(present[self.new_raw].astype(np.float32))}
