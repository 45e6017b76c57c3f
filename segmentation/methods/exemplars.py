"""The -M variants' exemplar memory (DKD-M, STAR-M): a class-balanced set of earlier steps' training images that
the next step trains on beside its own (DKD utils/memory.py:46-175, train_voc.py:74-82; STAR runs the same code).

At the end of step s (Method.finish_step, model in eval mode):
  1. Candidates: every image of step s's training set, which already holds the memory step s was given (step/build.py
     appends it), each with the classes it shows, background excluded: those of its label (at step s a label shows
     step s's classes only; 0 = background or another step's class, 255 = void) and, from step 1 on, pseudo-labels:
     a label-0 pixel takes the model's top class among channels 1.. when that class's sigmoid is >= 0.9
     (utils/memory.py:94-105).
  2. Selection (utils/memory.py:127-147): the candidates shuffled, the seen classes (background excluded) in a
     random order, then round-robin over the classes, each time taking the first not-yet-chosen candidate that
     shows the class, until `mem_size` images are chosen. The memory is `mem_size` images in all, not per class.
  3. Their image ids travel in the step artifact's method state ({"memory_ids": [...]}); step s+1 appends those
     images to its training set, labels masked to its own classes as every training label is (step/build.py).

What differs from the reference, on purpose:
  - When: the reference selects at the START of step t, with model t-1 over step t-1's data; we select at the END
    of step t-1, which is the same model on the same data, and carry the ids in the artifact (the reference writes
    step_t/memory.json).
  - The reference lists step t-1's memory entries beside the pass over step t-1's training set, so an image can be
    a candidate twice; here the memory is part of the training set, each image once.
  - Channel 0 is never a class here (DKD's auxiliary classifier, STAR's unused slot: class c sits at channel c in
    both, sigmoid.py). STAR's copy of the sampler also skips channel 0, which in STAR's own layout is class 1, so
    there class 1 is never pseudo-labelled and the other pseudo-labels shift down by one (STAR utils/memory.py:101-
    102). We skip no class.
  - The draws come from a generator seeded by (--random_seed, step), not NumPy's global state, and the candidates
    are gathered from every rank in training-set order: the memory is the same under any number of processes.
  - The selection stops when no class can add an image (the reference's loop would never end then).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segmentation.methods.base import Method, TrainingSetPasses
from segmentation.methods.losses import IGNORE_INDEX
from segmentation.methods.options import option
from segmentation.utils import dist

log = logging.getLogger("segmentation")

PSEUDO_LABEL_CONFIDENCE = 0.9   # utils/memory.py:105: a sigmoid at least this high makes a pseudo-label

Candidate = tuple[str, frozenset[int]]   # (image id, classes it shows in learning order, background excluded)


# ---------------------------------------------------------------- selection

def round_robin(candidates: Sequence[Candidate], classes: Sequence[int], mem_size: int) -> list[str]:
    """Visit `classes` in the given order, again and again, each time taking the first not-yet-chosen candidate
    that shows the class, until `mem_size` images are chosen or no class can add one. The chosen ids, in the order
    they were taken."""
    cursor = dict.fromkeys(classes, 0)   # per class: every candidate before it is taken or lacks the class
    taken: set[int] = set()
    chosen: list[str] = []

    def next_candidate(cls: int) -> int | None:
        k = cursor[cls]
        while k < len(candidates) and (k in taken or cls not in candidates[k][1]):
            k += 1
        cursor[cls] = k
        return k if k < len(candidates) else None

    while len(chosen) < mem_size:
        added = False
        for cls in classes:
            k = next_candidate(cls)
            if k is None:
                continue
            taken.add(k)
            chosen.append(candidates[k][0])
            added = True
            if len(chosen) == mem_size:
                break
        if not added:
            break
    return chosen


def choose_exemplars(candidates: Sequence[Candidate], classes: Sequence[int], mem_size: int,
                     rng: np.random.Generator) -> list[str]:
    """DKD utils/memory.py:127-147: the candidates shuffled, then the classes in a random order, then round_robin.
    `candidates` in training-set order, so that the same generator gives the same memory on any number of ranks."""
    shuffled = [candidates[k] for k in rng.permutation(len(candidates))]
    order = [classes[k] for k in rng.permutation(len(classes))]
    return round_robin(shuffled, order, mem_size)


def memory_rng(seed: int, step: int) -> np.random.Generator:
    """The draws of the memory chosen at the end of `step` under --random_seed `seed`."""
    return np.random.default_rng((seed, step))


# ---------------------------------------------------------------- candidates

def pseudo_labelled(labels: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Labels N x H x W with each label-0 pixel replaced by the model's top class among channels 1.. where that
    class's sigmoid is >= 0.9 (utils/memory.py:99-105: the sigmoid first, then the max, as there). `scores`
    N x C x h x w logits, resized bilinearly to the labels' size if they differ."""
    if scores.shape[-2:] != labels.shape[-2:]:
        scores = F.interpolate(scores.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    confidence, top = torch.sigmoid(scores[:, 1:].float()).max(dim=1)
    return torch.where((labels == 0) & (confidence >= PSEUDO_LABEL_CONFIDENCE), top + 1, labels)


def image_classes(labels: torch.Tensor, scores: torch.Tensor | None = None) -> list[frozenset[int]]:
    """Per image of a batch, the classes it shows, background (0) and void (255) excluded; with the model's
    `scores`, its pseudo-labels too (pseudo_labelled)."""
    if scores is not None:
        labels = pseudo_labelled(labels, scores)
    return [frozenset(v for v in torch.unique(label).tolist() if v not in (0, IGNORE_INDEX)) for label in labels]


@dataclass(frozen=True)
class Candidates:
    images: list[Candidate]   # the training set in its order, each image with the classes it shows
    pseudo_labelled: int      # images to which the model's pseudo-labels added a class


@torch.no_grad()
def collect_candidates(model: nn.Module, passes: TrainingSetPasses, pseudo_labels: bool) -> Candidates:
    """Every image of the training set once (passes.plain(): the evaluation transform), with the classes it shows,
    gathered from all ranks and put in training-set order. The model is asked only when `pseudo_labels`."""
    from segmentation.engine.trainer import prepare_batch  # the engine imports the methods: import here

    found: list[tuple[int, frozenset[int], bool]] = []   # (source index, classes, whether pseudo-labels added one)
    for raw in passes.plain():
        batch = prepare_batch(raw, passes.device)
        labelled = image_classes(batch["label"])
        shown = image_classes(batch["label"], model(batch["image"], features=())[0]) if pseudo_labels else labelled
        found += zip(batch["index"].tolist(), shown, (a != b for a, b in zip(shown, labelled)))
    gathered = [item for part in dist.all_gather_object(found) for item in part]
    order = {index: k for k, index in enumerate(passes.image_ids)}
    gathered.sort(key=lambda item: order[item[0]])
    return Candidates([(passes.image_ids[index], classes) for index, classes, _ in gathered],
                      sum(added for _, _, added in gathered))


# ---------------------------------------------------------------- what DKD-M and STAR-M add to their method

@dataclass(frozen=True)
class MemoryOptions:
    """Exemplar memory
    The -M variants: at the end of each step a class-balanced memory of the step's training images is chosen, and
    the next step trains on it beside its own images (refused by --forbid_old_data)."""
    mem_size: int = option(100, "images in the exemplar memory, over all classes seen so far (not per class)")

    def __post_init__(self) -> None:
        if self.mem_size < 0:
            raise ValueError(f"--mem_size {self.mem_size}: must be >= 0 (0: no memory)")
        parent = super()
        if hasattr(parent, "__post_init__"):  # the method's own options' checks (MemoryOptions comes first)
            parent.__post_init__()  # type: ignore[misc]


def memory_size_preset(voc: int, ade: int):
    """A --mem_size preset by dataset: `ade` on ADE20K, `voc` on VOC and every other dataset (the built-in shapes)."""
    def preset(flags: dict[str, Any]) -> int:
        return ade if flags.get("dataset") == "ade" else voc

    preset.preset_text = f"VOC and others {voc}, ADE {ade}"  # type: ignore[attr-defined]
    return preset


class ExemplarMemory(Method):
    """Mixin before a method (class DKDM(ExemplarMemory, DKD)): after the method's own finish_step, chooses the
    memory over the step's training set and carries its image ids to the next step. The method's Options must
    extend MemoryOptions."""

    uses_old_data = True

    def __init__(self, info, model, teacher, options) -> None:
        super().__init__(info, model, teacher, options)
        self.memory: list[str] = []   # image ids chosen at the end of this step

    @classmethod
    def memory_ids(cls, carried: dict[str, Any]) -> list[str]:
        return list(carried.get("memory_ids", []))

    def finish_step(self, passes: TrainingSetPasses) -> None:
        super().finish_step(passes)
        step = self.info.step
        candidates = collect_candidates(self.model, passes, pseudo_labels=step > 0)
        classes = list(range(1, self.info.num_classes))  # every class seen so far; channel 0 is not a class
        self.memory = choose_exemplars(candidates.images, classes, self.options.mem_size,
                                       memory_rng(self.info.seed, step))
        if dist.is_main_process():
            log.info("exemplar memory for step %d: %d of %d training images (--mem_size %d; pseudo-labels added a "
                     "class to %d images), showing %d of the %d classes seen so far", step + 1, len(self.memory),
                     len(candidates.images), self.options.mem_size, candidates.pseudo_labelled,
                     len(covered(candidates.images, self.memory)), len(classes))

    def carry_over(self, state: dict[str, Any]) -> None:
        if "memory_ids" not in state:  # else the step would silently train without old data
            raise ValueError(f"--method {self.name.upper()} trains on the exemplar memory that step "
                             f"{self.info.step - 1} chose at its end, but that step's artifact carries none (it was "
                             f"trained by a method without -M): train step {self.info.step - 1} with --method "
                             f"{self.name.upper()} too")
        super().carry_over(state)

    def carry_state(self) -> dict[str, Any]:
        return {**super().carry_state(), "memory_ids": list(self.memory)}


def covered(candidates: Sequence[Candidate], chosen: Sequence[str]) -> set[int]:
    """The classes the chosen images show."""
    picked = set(chosen)
    return {c for image_id, classes in candidates if image_id in picked for c in classes}
