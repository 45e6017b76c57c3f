"""CIL (Klingner et al., ITSC 2020): new classes from new data only, old ones kept by entropy-weighted distillation.

Written from the paper and its code (github.com/ifnspaml/CIL_Segmentation: train_erfnet_incremental.py's
compute_losses, models/train/losses.py). At step t > 0, with
x the student's logits over all C_t classes, x_o the teacher's over the C_old old ones and T the temperature:
  - cross-entropy on the pixels labelled with a new class, normalised over ALL classes (log_softmax over C_t, then
    the new channels), so that a new-class pixel also pushes the old classes' probabilities down;
  - distillation of the old channels on every other pixel (not labelled new: void, old, background):
    T^2 * w_i * (-sum_c q_ic log p_ic), q = softmax(x_o / T), log p = log_softmax(x / T) over all C_t channels sliced
    to the old ones, w_i = 1 + lambda_GS * H_bits(q_i) (the teacher's entropy in bits: uncertain pixels weigh more);
    averaged over those pixels.
Step 0 is plain cross-entropy. The student starts from ImageNet weights (`--student_init imagenet`, the paper's
choice and this method's preset) or from the teacher (`--student_init previous`). Flags keep CIL's names: `--temp`
(T, default 1) and `--lambda_GS` (default 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from segmentation.methods.base import Batch, Method, Outputs, supervised_ce
from segmentation.methods.losses import IGNORE_INDEX, global_mean
from segmentation.methods.options import option


def new_class_cross_entropy_map(logits: torch.Tensor, labels: torch.Tensor, num_old: int) -> torch.Tensor:
    """-log p(y) for pixels labelled with a new class (y >= num_old), p = softmax over every class; 0 elsewhere."""
    log_p = torch.log_softmax(logits.float(), dim=1)
    is_new = (labels >= num_old) & (labels != IGNORE_INDEX)
    target = torch.where(is_new, labels, torch.zeros_like(labels))
    return -log_p.gather(1, target.unsqueeze(1)).squeeze(1) * is_new


def entropy_bits(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy over dim 1 in bits (0 log 0 = 0)."""
    return -torch.special.xlogy(probs, probs).sum(dim=1) / math.log(2.0)


def entropy_weighted_distillation_map(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                                      lambda_gs: float) -> torch.Tensor:
    """T^2 * (1 + lambda_GS * H_bits(q)) * (-sum_{c<C_old} q_c log p_c) per pixel (N x H x W), with
    q = softmax(teacher / T) and log p = log_softmax(student / T) over all channels, then sliced to the old ones."""
    num_old = teacher_logits.shape[1]
    q = torch.softmax(teacher_logits.float() / temperature, dim=1)
    log_p = torch.log_softmax(logits.float() / temperature, dim=1)[:, :num_old]
    weight = 1.0 + lambda_gs * entropy_bits(q)
    return temperature ** 2 * weight * -(q * log_p).sum(dim=1)


@dataclass(frozen=True)
class CILOptions:
    """CIL
    Klingner et al., ITSC 2020; see the README."""
    temp: float = option(1.0, "distillation temperature T")
    lambda_GS: float = option(1.0, "entropy weighting of the distillation, w = 1 + lambda_GS * H_bits(teacher)")


class CIL(Method):
    name = "cil"
    Options = CILOptions
    options: CILOptions
    flag_defaults = {"student_init": "imagenet"}

    @classmethod
    def step0_key(cls, options: CILOptions) -> tuple:
        return ("ce",)  # step 0 is plain CE (supervised_ce), the MiB family's step 0

    def losses(self, batch: Batch, outputs: Outputs, teacher_outputs: Outputs | None, epoch: int
               ) -> dict[str, torch.Tensor]:
        logits, labels = outputs[0], batch["label"]
        if teacher_outputs is None:
            return {"ce": supervised_ce(logits, labels)}
        num_old = self.info.num_old
        is_new = (labels >= num_old) & (labels != IGNORE_INDEX)
        ce = global_mean(new_class_cross_entropy_map(logits, labels, num_old), is_new)
        kd = global_mean(entropy_weighted_distillation_map(logits, teacher_outputs[0], self.options.temp,
                                                           self.options.lambda_GS), ~is_new)
        return {"ce": ce, "kd": kd}
