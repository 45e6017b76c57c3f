"""PLOP (Douillard et al., CVPR 2021): entropy pseudo-labels of the old classes and local POD distillation.

A member of the MiB family (distillation.py): it reads the family's flags too (the preset sets --init_balanced), and
at step 0 it is the family's plain CE. At a step t > 0, with the teacher's softmax p over its C_old classes and
C_t = the student's classes (PLOP's code: github.com/arthurdouillard/CVPR2021_PLOP, train.py and utils/loss.py):

  pseudo-labels (--pseudo entropy): a background pixel (label < C_old) takes the teacher's argmax y^ if its
      normalised entropy u = H(p) / log(C_t) is below the class threshold tau[y^], else it is ignored (255);
      H is PLOP's `entropy`, -(1 / log C_old) * MEAN_c p_c log p_c. tau_c = max(median of u over the training set's
      background pixels predicted c, --threshold), found by one teacher pass before the first epoch
      (`before_training`). The loss is plain CE over all classes on these labels; with --classif_adaptive_factor
      each image's CE is scaled by confident background pixels / (background pixels + 1e-6), so 0 for an image
      without background pixels (PLOP's code since January 2022; 0/0 = NaN before, its issue #25).
  POD (--pod local): for each attention map (pre-activations of mod2..mod5, the head's output, and with
      --pod_logits the logits at feature resolution), squared, embedded by local POD, the per-sample Frobenius
      distance between the teacher's and the student's embeddings, averaged over the batch, times its factor and
      sqrt(C_t / C_new); the sum is divided by the number of maps. A scale whose windows are under one pixel (a map
      under 4 px at scale 4) adds nothing, as in PLOP, where such windows are empty slices (no NaN).

Where this differs from PLOP's code, on purpose:
  - the histogram median is a true median (PLOP's `find_median` adds the bin index to its running count instead of
    the bin's count), over --pseudo_nb_bins 10000 bins instead of 100 (see PLOPOptions.pseudo_nb_bins);
  - the CE is averaged over the valid pixels of the global batch, as the family's CE here (PLOP: `.mean()` over all
    pixels of each rank, ignored ones counted as 0);
  - POD windows are H//s high and W//s wide (PLOP: W//s for both; the same on PLOP's square crops).
  - --pod_logits_factor always weights the logits (PLOP's pod_options "after" weights the LAST map, which is the
    head's output when --pod_logits is off).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from segmentation.methods.base import Batch, Outputs
from segmentation.methods.distillation import Distillation, DistillationOptions
from segmentation.methods.losses import IGNORE_INDEX, cross_entropy_map, global_mean, upcast
from segmentation.methods.options import option, switch
from segmentation.utils import dist

log = logging.getLogger("segmentation")

POD_SCALES = (1, 2, 4)            # PLOP's --spp_scales default
SEGMENTATION_TERMS = ("ce", "unce", "bce")  # the family's label terms, replaced by PLOP's pseudo-labelled CE


@dataclass(frozen=True)
class PLOPOptions(DistillationOptions):
    """PLOP
    With PLOP's flag names: local POD distillation of the attention maps and entropy pseudo-labels of the old
    classes; the MiB family's flags above mix in."""
    pod: str = option("none", "POD distillation of the attention maps: local (PLOP), or none", type=str.lower,
                      choices=("local", "none"))
    pod_factor: float = option(0.01, "POD weight of the backbone's and the head's maps")
    pod_logits: bool = switch(False, "also distil the logits at feature resolution with POD (new classes summed "
                              "into background)")
    pod_logits_factor: float = option(0.0005, "POD weight of the logits (PLOP sets it through --pod_options JSON, "
                                      "switch.after.factor; a plain flag here)")
    no_pod_schedule: bool = switch(False, "do not scale POD by sqrt(classes seen / new classes)", negatable=False)
    pseudo: str = option("none", "pseudo-labels of the old classes on background pixels: entropy (PLOP), or none",
                         type=str.lower, choices=("entropy", "none"))
    threshold: float = option(0.001, "floor of the per-class entropy thresholds (the class's median entropy)")
    pseudo_nb_bins: int = option(10000, "histogram bins over [0, 1] for the median entropy: the median is exact to "
                                 "1/bins; entropies lie below 1 / (C_old log C_t), about 0.02 on VOC, so PLOP's "
                                 "100 bins put them all in 2-3 bins")
    classif_adaptive_factor: bool = switch(False, "with --pseudo: scale each image's CE by its share of confident "
                                           "background pixels")
    classif_adaptive_min_factor: float = option(0.0, "lower bound of the adaptive factor")

    def __post_init__(self) -> None:
        if self.pseudo == "entropy" and (self.unce or self.icarl):
            raise ValueError("--pseudo entropy trains plain CE on the old classes' pseudo-labels; --unce / --icarl "
                             "would fold them back into background: drop one of them")
        if self.pseudo_nb_bins < 1:
            raise ValueError(f"--pseudo_nb_bins {self.pseudo_nb_bins}: needs at least one bin")


class PLOP(Distillation):
    name = "plop"
    Options = PLOPOptions
    options: PLOPOptions
    # PLOP's preset (its argparser's `--method PLOP`), pod_options' logits factor included.
    flag_defaults = {"pod": "local", "pod_factor": 0.01, "pod_logits": True, "pod_logits_factor": 0.0005,
                     "pseudo": "entropy", "threshold": 0.001, "classif_adaptive_factor": True,
                     "init_balanced": True}

    def __init__(self, info, model, teacher, options: PLOPOptions) -> None:
        super().__init__(info, model, teacher, options)
        self.thresholds: torch.Tensor | None = None  # C_old entropy thresholds, set by before_training

    @property
    def uses_pod(self) -> bool:
        return self.options.pod == "local"

    @property
    def uses_pseudo(self) -> bool:
        return self.options.pseudo == "entropy"

    @property
    def needs_teacher(self) -> bool:
        return self.info.step > 0 and (super().needs_teacher or self.uses_pod or self.uses_pseudo)

    @property
    def teacher_features(self) -> frozenset[str]:  # type: ignore[override]
        if not self.uses_pod:
            return super().teacher_features
        return super().teacher_features | {"attentions"} | ({"logits_small"} if self.options.pod_logits else set())

    @torch.no_grad()
    def before_training(self, loader: Iterable[Batch], device: torch.device) -> None:
        super().before_training(loader, device)
        if self.info.step == 0 or not self.uses_pseudo:
            return
        assert self.teacher is not None
        histograms = teacher_entropy_histograms(self.teacher, loader, device, self.info.num_old,
                                                self.info.num_classes, self.options.pseudo_nb_bins)
        dist.all_reduce_sum(histograms)  # integer counts: every rank gets the same, exact sums
        self.thresholds = entropy_thresholds(histograms, self.options.threshold).to(device)
        if dist.is_main_process():
            log.info("PLOP entropy thresholds per old class: %s",
                     " ".join(f"{t:.5f}" for t in self.thresholds.tolist()))

    def losses(self, batch: Batch, outputs: Outputs, teacher_outputs: Outputs | None, epoch: int
               ) -> dict[str, torch.Tensor]:
        if teacher_outputs is None or not self.uses_pseudo:
            terms = super().losses(batch, outputs, teacher_outputs, epoch)
        else:
            terms = self.pseudo_label_terms(batch, outputs, teacher_outputs, epoch)
        if teacher_outputs is not None and self.uses_pod:
            terms["pod"] = self.pod_loss(outputs[1], teacher_outputs[1])
        return terms

    def pseudo_label_terms(self, batch: Batch, outputs: Outputs, teacher_outputs: Outputs, epoch: int
                           ) -> dict[str, torch.Tensor]:
        if self.thresholds is None:
            raise RuntimeError("PLOP's entropy thresholds are missing: before_training must run first")
        o, num_old = self.options, self.info.num_old
        labels, confident, background = entropy_pseudo_labels(
            batch["label"], teacher_outputs[0], self.thresholds, num_old, self.info.num_classes)
        ce = cross_entropy_map(outputs[0], labels)
        if o.classif_adaptive_factor:
            ce = ce * adaptive_factor(confident, background, o.classif_adaptive_min_factor)[:, None, None]
        # PLOP averages with `.mean()` over all pixels of its rank; here the valid pixels of the global batch, as
        # the family's CE, so that 2 ranks compute a 1-rank run's gradient.
        terms = {"ce": global_mean(ce, labels != IGNORE_INDEX)}
        if o.loss_kd or o.loss_de or o.regularizer:
            # The family's other terms, on the pseudo-labels as PLOP; its label term is replaced by the one above
            # (computed there and dropped: only with these extra terms on).
            family = super().losses({**batch, "label": labels}, outputs, teacher_outputs, epoch)
            terms.update({k: v for k, v in family.items() if k not in SEGMENTATION_TERMS})
        return terms

    def pod_loss(self, features: dict[str, Any], teacher_features: dict[str, Any]) -> torch.Tensor:
        o = self.options
        pairs = [(old, new, o.pod_factor) for old, new in zip(teacher_features["attentions"], features["attentions"])]
        if o.pod_logits:
            new_logits = fold_new_channels(features["logits_small"], self.info.num_old)
            pairs.append((teacher_features["logits_small"], new_logits, o.pod_logits_factor))
        schedule = 1.0 if o.no_pod_schedule else math.sqrt(self.info.num_classes /
                                                           (self.info.num_classes - self.info.num_old))
        # Per sample, then one mean over the global batch (a mean over the batch of each layer, as PLOP, since the
        # sum over layers and the mean commute): exact whatever the shards' sizes, one all-reduce.
        per_sample = sum(factor * pod_distance(old, new) for old, new, factor in pairs)
        return global_mean(per_sample) * schedule / len(pairs)

    def state_dict(self) -> dict[str, Any]:
        # Recomputed at every start (before_training runs before a resume), but kept so that a resumed run uses
        # exactly the thresholds it started with, whatever float rounding a GPU's teacher pass has.
        state = super().state_dict()
        if self.thresholds is not None:
            state["plop_thresholds"] = self.thresholds
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        thresholds = state.pop("plop_thresholds", None)
        if thresholds is not None:
            self.thresholds = thresholds
        super().load_state_dict(state)


# --- entropy pseudo-labels -------------------------------------------------------------------------------------

def plop_entropy(probs: torch.Tensor) -> torch.Tensor:
    """PLOP's `entropy` (after ESL, Saporta et al.): -(1 / log C) * MEAN over the C channels of p log p, per pixel.

    The mean (not the sum) and its 1e-8s are PLOP's; callers divide by log(C_t) a second time, as PLOP does."""
    factor = 1.0 / math.log(probs.shape[1] + 1e-8)
    return -factor * torch.mean(probs * torch.log(probs + 1e-8), dim=1)


def normalized_entropy(teacher_logits: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the teacher's argmax, its entropy / log C_t) per pixel. C_t is the student's class count: PLOP's
    `max_entropy = log(nb_current_classes)`, which includes the step's new classes."""
    probs = torch.softmax(upcast(teacher_logits), dim=1)
    return probs.argmax(dim=1), plop_entropy(probs) / math.log(num_classes)


def entropy_histogram(values: torch.Tensor, classes: torch.Tensor, num_rows: int, nb_bins: int) -> torch.Tensor:
    """num_rows x nb_bins int64 counts: `values` in [0, 1] binned by floor(v * nb_bins) (the last bin takes 1),
    one row per class of `classes`."""
    bins = torch.clamp((values * nb_bins).long(), min=0, max=nb_bins - 1)
    flat = classes.long() * nb_bins + bins
    return torch.bincount(flat.reshape(-1), minlength=num_rows * nb_bins).view(num_rows, nb_bins)


def histogram_median(histograms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(median per row, float64; whether the row has any count) of rows of counts over [0, 1].

    The median bin is the first whose cumulative count reaches half the total; the median is interpolated linearly
    inside it (counts assumed spread evenly over the bin), so it is exact to one bin width, 1 / nb_bins."""
    counts = histograms.to(torch.float64)
    nb_bins = counts.shape[1]
    cumulative = counts.cumsum(dim=1)
    total = cumulative[:, -1]
    half = total / 2
    index = (cumulative < half[:, None]).sum(dim=1).clamp(max=nb_bins - 1)  # cumulative is non-decreasing
    in_bin = counts.gather(1, index[:, None])[:, 0]
    before = cumulative.gather(1, index[:, None])[:, 0] - in_bin
    median = (index.to(torch.float64) + (half - before) / in_bin.clamp(min=1.0)) / nb_bins
    has_pixels = total > 0
    return torch.where(has_pixels, median, torch.zeros_like(median)), has_pixels


def entropy_thresholds(histograms: torch.Tensor, floor: float) -> torch.Tensor:
    """PLOP's tau_c = max(median_c, --threshold): a class with no pixel starts at 0 as in PLOP, hence the floor."""
    median, _ = histogram_median(histograms)
    return median.clamp(min=floor).to(torch.float32)


def teacher_memory_format(teacher: torch.nn.Module) -> torch.memory_format:
    """The format the step put the teacher in (NHWC under --channels_last): read from its first k > 1 kernel."""
    for p in teacher.parameters():
        if p.dim() == 4 and p.shape[-1] > 1:
            return torch.contiguous_format if p.is_contiguous() else torch.channels_last
    return torch.contiguous_format


@torch.no_grad()
def teacher_entropy_histograms(teacher: torch.nn.Module, loader: Iterable[Batch], device: torch.device,
                               num_old: int, num_classes: int, nb_bins: int) -> torch.Tensor:
    """One pass of the teacher over this rank's shard: the histograms (teacher classes x bins) of the normalised
    entropy of the pixels labelled background (label 0, PLOP's `mask_bg`), per predicted class. float32, no
    autocast. The shard is the training loader's epoch-0 order, so a restart sees the same images."""
    from segmentation.engine.trainer import prepare_batch  # the engine imports the methods: import here

    memory_format = teacher_memory_format(teacher)
    was_training = teacher.training
    teacher.eval()
    # Allocated up front: a rank with an empty shard still joins the all-reduce with the same shape.
    histograms = torch.zeros(num_old, nb_bins, dtype=torch.int64, device=device)
    for raw in loader:
        batch = prepare_batch(raw, device, memory_format)
        logits, _ = teacher(batch["image"], features=())
        pseudo, values = normalized_entropy(logits, num_classes)
        background = batch["label"] == 0
        histograms += entropy_histogram(values[background], pseudo[background], num_old, nb_bins)
    teacher.train(was_training)
    return histograms


def entropy_pseudo_labels(labels: torch.Tensor, teacher_logits: torch.Tensor, thresholds: torch.Tensor,
                          num_old: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels, confident, background): background pixels (label < C_old) take the teacher's class where its
    normalised entropy is below that class's threshold, else 255; other pixels keep their label."""
    pseudo, values = normalized_entropy(teacher_logits, num_classes)
    confident = values < thresholds[pseudo]
    background = labels < num_old
    new_labels = torch.where(background, torch.where(confident, pseudo, torch.full_like(pseudo, IGNORE_INDEX)),
                             labels)
    return new_labels, confident, background


def adaptive_factor(confident: torch.Tensor, background: torch.Tensor, min_factor: float) -> torch.Tensor:
    """Per image, confident background pixels / (background pixels + 1e-6) (PLOP's classif_adaptive_factor, as in
    its train.py since commit b70fb8f, January 2022), at least `min_factor`. An image without background pixels
    gets 0, as there: its CE counts for nothing (before that commit 0/0 gave NaN, PLOP issue #25)."""
    num = (confident & background).sum(dim=(1, 2)).to(torch.float32)
    den = background.sum(dim=(1, 2)).to(torch.float32)
    return (num / (den + 1e-6)).clamp(min=min_factor)


# --- local POD -------------------------------------------------------------------------------------------------

def local_pod(x: torch.Tensor, scales: Sequence[int] = POD_SCALES) -> torch.Tensor:
    """N x D local POD embedding of N x C x H x W maps: at each scale s, the s x s windows of H//s x W//s pixels,
    each giving its mean over width (C x h) and its mean over height (C x w), all concatenated. Rows and columns
    beyond s windows are left out, as in PLOP; a scale whose windows would be empty is skipped. The order of the
    entries differs from PLOP's loop, which leaves the Frobenius distance between two embeddings unchanged."""
    n, c, h, w = x.shape
    parts = []
    for s in scales:
        kh, kw = h // s, w // s
        if kh == 0 or kw == 0:
            continue
        windows = x[:, :, :s * kh, :s * kw].reshape(n, c, s, kh, s, kw)
        parts.append(windows.mean(dim=5).reshape(n, -1))  # mean over each window's width
        parts.append(windows.mean(dim=3).reshape(n, -1))  # mean over each window's height
    return torch.cat(parts, dim=1)


def pod_distance(old: torch.Tensor, new: torch.Tensor, scales: Sequence[int] = POD_SCALES) -> torch.Tensor:
    """||local_pod(old^2) - local_pod(new^2)||_F per sample, N (PLOP's prepro "pow"; the caller averages)."""
    old, new = upcast(old), upcast(new)
    difference = local_pod(old.pow(2), scales) - local_pod(new.pow(2), scales)
    return torch.linalg.vector_norm(difference, dim=1)


def fold_new_channels(logits: torch.Tensor, num_old: int) -> torch.Tensor:
    """PLOP's "sum" for the logits' channel mismatch: the new classes' logits are added to background's and only
    the old channels kept, N x C_old x H x W like the teacher's."""
    background = logits[:, :1] + logits[:, num_old:].sum(dim=1, keepdim=True)
    return torch.cat([background, logits[:, 1:num_old]], dim=1)
