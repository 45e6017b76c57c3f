"""What DKD and STAR share (STAR is a fork of DKD's code, github.com/cvlab-yonsei/DKD): per-class sigmoid outputs
with no background channel, the class-wise BCE, the prediction rule, frozen norm layers at t>0 and the optimiser
groups.

Channel layout. Our model keeps one output channel per seen class in learning order, channel 0 being background's
slot. These methods have no background class: a pixel is background when no class is confident. DKD puts its
auxiliary classifier in channel 0; STAR leaves it unused (no loss reads it, so it never trains). Class c is channel c
in both, so predictions, metrics and checkpoints keep the layout of every other method.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segmentation.methods.base import Method
from segmentation.methods.losses import global_mean, upcast

# Both references' schedules (configs/config_*.json and scripts): lr at step 0 and at t > 0, by dataset.
REFERENCE_LR = {"voc": (1e-3, 1e-4), "ade": (2.5e-3, 2.5e-4)}
WARMUP_SHARE = 0.2  # ADE's WarmupPolyLR warms up over the first 20 % of the iterations


def reference_lr(flags: dict[str, Any]) -> float | None:
    """The references' lr on VOC and ADE, a tenth of it at t > 0; None elsewhere (our own default then applies)."""
    rates = REFERENCE_LR.get(str(flags.get("dataset")))
    if rates is None:
        return None
    return rates[0] if int(flags.get("step") or 0) == 0 else rates[1]


reference_lr.preset_text = "VOC 1e-3, 1e-4 at t>0; ADE 2.5e-3, 2.5e-4"  # type: ignore[attr-defined]


def reference_warmup_epochs(flags: dict[str, Any]) -> float | None:
    """Under warm_poly (ADE's preset) the warm-up spans the references' 20 % of the run; None otherwise."""
    if flags.get("lr_policy") != "warm_poly" or flags.get("epochs") is None:
        return None
    return WARMUP_SHARE * float(flags["epochs"])


reference_warmup_epochs.preset_text = "20 % of --epochs under warm_poly"  # type: ignore[attr-defined]


def sigmoid_prediction(scores: torch.Tensor) -> torch.Tensor:
    """0 (background) where every class has sigmoid(z_c) <= 0.5, else the class of the largest logit; channel 0 is
    not a class (DKD trainer_voc.py:230-237). sigmoid(z) > 0.5 iff z > 0."""
    classes = scores[:, 1:]
    best, index = classes.max(dim=1)
    return torch.where(best > 0, index + 1, torch.zeros_like(index))


def class_bce(logits: torch.Tensor, labels: torch.Tensor, classes: range, pos_weight: float) -> torch.Tensor:
    """sum over c in `classes` of the mean over ALL pixels of BCE_p(z_c, [y = c]), with
    BCE_p(z, y) = -[p y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))]. As DKD's and STAR's code (loss.py:59-90):
    no ignore mask, so void (255) pixels count as negatives. Averaged over the pixels of the global batch.
    `classes` is a range of channels: a slice of the logits, and class ids made on the device (no host copy per
    iteration)."""
    z = upcast(logits[:, classes.start:classes.stop])
    ids = torch.arange(classes.start, classes.stop, device=labels.device)
    target = (labels[:, None] == ids[None, :, None, None]).to(z.dtype)
    weight = torch.full((), float(pos_weight), dtype=z.dtype, device=z.device)
    per_pixel = F.binary_cross_entropy_with_logits(z, target, pos_weight=weight, reduction="none").sum(1)
    return global_mean(per_pixel)


def is_norm(module: nn.Module) -> bool:
    """BatchNorm and every layer built like it (our ABN, inplace_abn's layers): they hold running statistics."""
    return isinstance(module, nn.modules.batchnorm._NormBase) or hasattr(module, "running_mean")


def norm_parameters(model: nn.Module) -> set[nn.Parameter]:
    return {p for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)}


class SigmoidMethod(Method):
    """Sigmoid outputs, the threshold prediction rule, and DKD's `--freeze_bn` at t>0: every norm layer and dropout in
    eval mode, norm weights left out of the optimiser (model.py:117-153, trainer_voc.py:321-328)."""

    def __init__(self, info, model, teacher, options) -> None:
        super().__init__(info, model, teacher, options)
        if not getattr(info.task, "has_background", True):  # (tests build methods without a task)
            raise ValueError(f"--method {self.name.upper()} predicts background where no class is confident, so it "
                             f"needs a task with a background class; {info.task.name} has none")
        if info.step > 0:
            for p in norm_parameters(model):
                p.requires_grad_(False)

    @classmethod
    def predict(cls, scores: torch.Tensor, options: Any) -> torch.Tensor:
        return sigmoid_prediction(scores)

    def train_mode(self) -> None:
        if self.info.step == 0:
            return
        for module in self.model.modules():
            if is_norm(module) or isinstance(module, nn.modules.dropout._DropoutNd):
                module.eval()

    def new_channels(self) -> range:
        """This step's classes (at step 0 the base classes, background's channel 0 excluded)."""
        return range(max(self.info.num_old, 1), self.info.num_classes)

    def old_channels(self) -> range:
        return range(1, self.info.num_old)

    def trainable(self, module: nn.Module) -> list[nn.Parameter]:
        return [p for p in module.parameters() if p.requires_grad]

    def step0_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """Step 0 of both (train_voc.py:127-143): backbone at lr, head and classifiers at 10 lr, weight decay as
        --weight_decay (1e-4)."""
        return [{"params": self.trainable(self.model.body), "lr": base_lr, "name": "backbone"},
                {"params": self.trainable(self.model.head), "lr": 10 * base_lr, "name": "aspp"},
                {"params": self.trainable(self.model.cls), "lr": 10 * base_lr, "name": "classifiers"}]
