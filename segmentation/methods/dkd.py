"""DKD (Baek et al., NeurIPS 2022): decomposed knowledge distillation with per-class sigmoids and an auxiliary
classifier, as its code implements it (github.com/cvlab-yonsei/DKD: models/model.py, models/loss.py,
trainer/trainer_voc.py, train_voc.py, configs/config_voc.json, configs/config_ade.json, utils/lr_scheduler.py).
Where the paper and the code differ, this follows the code.

Layout (sigmoid.py): channel c is class c in learning order; channel 0 (row 0 of the step-0 classifier cls[0]) is
DKD's auxiliary classifier (AC). No loss reads channel 0 of the model's output, and the prediction ignores it.
Notation: f = the head's output (`pre_logits`, stride 16), W_c and b_c = class c's classifier row, z_c = the logit
of class c upsampled to the input, sigma = sigmoid, BCE_p(z, y) = -[p y log sigma(z) + (1 - y) log(1 - sigma(z))]
(p = 1 unless stated), "old" = channels 1..num_old-1, "new" = this step's channels. Every mean is over the pixels
(or stride-16 positions) of the GLOBAL batch, in float32.

  L_mbce   = sum_{c in new} mean_pixels BCE_p(z_c, [y = c]); no ignore mask: 0 and 255 pixels are negatives
             (models/loss.py:59-90 WBCELoss), p = --pos_weight.
  L_ac     = mean_pixels BCE(z_aux, 0), z_aux = W_0 . f.detach() + b_0 upsampled to the input: every pixel is a
             negative for the AC, and the AC does not train the network under it (model.py:67-75, loss.py:110-120).
  L_kd     = sum_{c in old} mean_pixels BCE(z_c, sigma(z^old_c)) at full resolution (loss.py:93-107,
             trainer_voc.py:348-376).
  L_dkd+-  = sum_{c in old} mean_{stride-16 positions} BCE(z+-_c, sigma(z+-old_c)), with the bias-free decomposed
             logits z+_c = sum_k f_k max(W_ck, 0) and z-_c = sum_k f_k min(W_ck, 0) (model.py:77-99), each model with
             its own f and W (trainer_voc.py:348-376).
  step 0:  L_mbce + --loss_ac L_ac (trainer_voc.py:121-128; pos_weight 2 on VOC, script INIT_POSWEIGHT);
  t > 0:   L_mbce + --loss_kd L_kd + --loss_dkd_pos L_dkd+ + --loss_dkd_neg L_dkd- + --loss_ac L_ac
           (1, 5, 5, 5, 1: config_voc.json:75-82, the same on ADE).
  New classifier (t > 0): every row starts as a copy of the AC's weight and bias (model.py:110-115).
  Optimiser (train_voc.py:127-143): step 0 as sigmoid.step0_groups; t > 0: backbone at lr with weight decay 0, head
  (ASPP) and the old classifiers (the AC included) at 10 lr with weight decay 0, the new classifier at 10 lr with
  --weight_decay. Norm layers and dropout stay in eval mode at t > 0 and norm weights are not trained (SigmoidMethod,
  DKD's --freeze_bn).

What differs from the reference, on purpose:
  - Our InPlace-ABN head ends in leaky ReLU, so f can be negative and z+ is not guaranteed >= 0 (DKD's published
    runs use BN + ReLU, f >= 0). The split stays by the sign of the weight, as DKD's code splits it: it remains an
    exact decomposition z = z+ + z- + b, but "z+ = positive evidence" holds only approximately.
  - The AC is row 0 of cls[0], not a separate 1-channel classifier, so the checkpoint layout is every other method's.
    Its logit for the loss is computed here on the detached features (the model's own channel 0 is not detached, but
    no loss reads it).
  - Means over the global batch (DKD: per-rank means averaged by DDP; equal when ranks hold equal batches), and the
    terms in float32 whatever the autocast dtype (DKD: fp16 under AMP).
  - DKD's ADE schedule (WarmupPolyLR) multiplies a linear warm-up from 0.001 by the poly factor; our warm_poly warms
    up linearly from 1/warm-up iterations and then applies poly alone. The warm-up spans 20 % of the epochs as DKD's.
  - DKD-M (DKD with an exemplar memory) is the separate method dkd-m (memory_variants.py); this one uses no image
    of earlier steps.
Presets: pos_weight, lr and the warm-up here (they depend on the dataset and the step); DKD's network
(--norm_act syncbn_relu --head dkd), epochs, batch and schedule in tasks/voc.toml and tasks/ade.toml [defaults.dkd].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segmentation.methods.base import Batch, Outputs
from segmentation.methods.losses import global_mean, upcast
from segmentation.methods.options import option
from segmentation.methods.sigmoid import SigmoidMethod, class_bce, reference_lr, reference_warmup_epochs


def default_pos_weight(flags: dict[str, Any]) -> float:
    """DKD's pos_weight: ADE 35 at every step (config_ade.json:76); VOC 2 at step 0 (script INIT_POSWEIGHT) and 1
    later (config_voc.json). Datasets DKD did not run (shapes, COCO, Cityscapes) take VOC's values."""
    if flags.get("dataset") == "ade":
        return 35.0
    return 2.0 if int(flags.get("step", 0)) == 0 else 1.0


default_pos_weight.preset_text = "ADE 35; VOC and others 2 at step 0, 1 later"  # type: ignore[attr-defined]


@dataclass(frozen=True)
class DKDOptions:
    """DKD
    Baek et al., NeurIPS 2022: per-class sigmoids, an auxiliary classifier in channel 0, and distillation of the old
    classes' logits split by the sign of the classifier weights."""
    pos_weight: float = option(1.0, "weight of the positive term of the new classes' BCE (DKD: VOC 2 at step 0 and "
                               "1 later, ADE 35)")
    loss_kd: float = option(5.0, "weight of the distillation of the old classes' sigmoids, BCE(z, sigmoid(z_old))")
    loss_dkd_pos: float = option(5.0, "weight of the distillation of the positive parts z+ of the old logits")
    loss_dkd_neg: float = option(5.0, "weight of the distillation of the negative parts z- of the old logits")
    loss_ac: float = option(1.0, "weight of the auxiliary classifier's loss (every pixel a negative)")

    def __post_init__(self) -> None:
        if not self.pos_weight > 0:
            raise ValueError(f"--pos_weight {self.pos_weight}: must be positive")


# ---------------------------------------------------------------- the pieces of the losses

def conv1x1_float32(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A 1x1 convolution in float32 even under autocast (which would run it in bf16/fp16)."""
    with torch.autocast(device_type=features.device.type, enabled=False):
        return F.conv2d(upcast(features), upcast(weight), None if bias is None else upcast(bias))


def decomposed_logits(features: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z+, z-): the bias-free logits through the positive and the negative classifier weights; z+ + z- + b = z.
    `weight`: C x K x 1 x 1. The split uses torch.where as DKD's code does (no gradient to a weight that is 0)."""
    zero = torch.zeros_like(weight)
    positive = torch.where(weight > 0, weight, zero)
    negative = torch.where(weight < 0, weight, zero)
    return conv1x1_float32(features, positive), conv1x1_float32(features, negative)


def sigmoid_distillation_map(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per pixel, the sum over channels of BCE(z_c, sigmoid(z_old,c)) (DKD's KDLoss before its mean)."""
    target = torch.sigmoid(upcast(teacher_logits))
    return F.binary_cross_entropy_with_logits(upcast(logits), target, reduction="none").sum(1)


def auxiliary_logit(features: torch.Tensor, classifier: nn.Conv2d, size: torch.Size) -> torch.Tensor:
    """The AC's logit at `size`: row 0 of the step-0 classifier on the DETACHED features, so that the AC trains its
    own row only. Upsampled as Segmenter upsamples its logits."""
    small = conv1x1_float32(features.detach(), classifier.weight[0:1], classifier.bias[0:1])
    return F.interpolate(small, size=size, mode="bilinear", align_corners=False)


def auxiliary_loss(z_aux: torch.Tensor) -> torch.Tensor:
    """mean_pixels BCE(z_aux, 0) = softplus(z_aux): the AC learns that no pixel is of its class."""
    return global_mean(F.softplus(z_aux[:, 0]))


def classifier_weights(model: nn.Module) -> torch.Tensor:
    """Every step's 1x1 classifier rows in learning order, C x K x 1 x 1."""
    return torch.cat([cls.weight for cls in model.cls], dim=0)


# ---------------------------------------------------------------- the method

class DKD(SigmoidMethod):
    name = "dkd"
    Options = DKDOptions
    options: DKDOptions
    teacher_features = frozenset({"pre_logits"})
    flag_defaults = {"pos_weight": default_pos_weight, "lr": reference_lr, "warmup_epochs": reference_warmup_epochs}

    def __init__(self, info, model, teacher, options: DKDOptions) -> None:
        super().__init__(info, model, teacher, options)
        for cls in model.cls:  # ERFNet's classifier upsamples: there is no f . W to decompose
            if not (isinstance(cls, nn.Conv2d) and cls.kernel_size == (1, 1)):
                raise ValueError("--method DKD decomposes 1x1 classifiers (DeepLabV3's); this model's classifier is "
                                 f"a {type(cls).__name__}")

    @classmethod
    def step0_key(cls, options: DKDOptions) -> tuple:
        """DKD's own step 0: BCE with its step-0 pos_weight, and the AC trained beside it."""
        return ("dkd", "pos_weight", options.pos_weight, "loss_ac", options.loss_ac)

    @torch.no_grad()
    def init_new_classifier(self) -> None:
        """At t > 0 every new row starts as the AC: the new classes begin as "nothing here" everywhere."""
        if self.info.step == 0:
            return
        auxiliary, new = self.model.cls[0], self.model.cls[-1]
        new.weight.copy_(auxiliary.weight[0:1].expand_as(new.weight))
        new.bias.copy_(auxiliary.bias[0:1].expand_as(new.bias))

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        if self.info.step == 0:
            return self.step0_groups(base_lr)
        classifiers = self.model.cls
        old = [p for cls in classifiers[:-1] for p in self.trainable(cls)]
        return [{"params": self.trainable(self.model.body), "lr": base_lr, "weight_decay": 0.0, "name": "backbone"},
                {"params": self.trainable(self.model.head), "lr": 10 * base_lr, "weight_decay": 0.0, "name": "aspp"},
                {"params": old, "lr": 10 * base_lr, "weight_decay": 0.0, "name": "old_classifiers"},
                {"params": self.trainable(classifiers[-1]), "lr": 10 * base_lr, "name": "new_classifier"}]

    def losses(self, batch: Batch, outputs: Outputs, teacher_outputs: Outputs | None, epoch: int
               ) -> dict[str, torch.Tensor]:
        logits, features = outputs[0], outputs[1]["pre_logits"]
        o = self.options
        z_aux = auxiliary_logit(features, self.model.cls[0], logits.shape[-2:])
        terms = {"mbce": class_bce(logits, batch["label"], self.new_channels(), o.pos_weight),
                 "ac": o.loss_ac * auxiliary_loss(z_aux)}
        if teacher_outputs is None:
            return terms
        old = slice(1, self.info.num_old)
        terms["kd"] = o.loss_kd * global_mean(sigmoid_distillation_map(logits[:, old], teacher_outputs[0][:, old]))
        pos, neg = decomposed_logits(features, classifier_weights(self.model)[old])
        with torch.no_grad():
            old_pos, old_neg = decomposed_logits(teacher_outputs[1]["pre_logits"],
                                                 classifier_weights(self.teacher)[old])
        terms["dkd_pos"] = o.loss_dkd_pos * global_mean(sigmoid_distillation_map(pos, old_pos))
        terms["dkd_neg"] = o.loss_dkd_neg * global_mean(sigmoid_distillation_map(neg, old_neg))
        return terms
