"""MiB (Cermelli et al., CVPR 2020): unbiased CE, unbiased KD and a balanced init of the new classifier."""
from __future__ import annotations

import math

import torch

from segmentation.methods.base import Batch, Method, Outputs, supervised_ce
from segmentation.methods.losses import (global_mean, log_partition, unbiased_cross_entropy_map,
                                         unbiased_knowledge_distillation_map)


def default_kd_weight(task_name: str) -> float:
    """MiB's authors used 100 for the 15-1 protocols (MiB issue #22, hard-coded in MiBv2) and 10 elsewhere."""
    return 100.0 if task_name.startswith(("15-1", "15-5s")) else 10.0


class MiB(Method):
    name = "mib"

    def kd_weight(self) -> float:
        weight = self.options.get("loss_kd")
        return default_kd_weight(self.info.task.name) if weight is None else float(weight)

    @torch.no_grad()
    def init_new_classifier(self) -> None:
        """New rows copy the background row; biases are shifted by -log(|C_new| + 1), background's bias too.

        The background probability mass of the old model is then shared evenly between background and the new
        classes, so the first iterations start from the old model's predictions instead of random ones.
        """
        if self.info.step == 0:
            return
        classifiers = self.model.cls
        new_cls, bg_cls = classifiers[-1], classifiers[0]
        shifted_bias = bg_cls.bias[0] - math.log(new_cls.out_channels + 1)
        new_cls.weight.copy_(bg_cls.weight[0:1].expand_as(new_cls.weight))
        new_cls.bias.fill_(float(shifted_bias))
        bg_cls.bias[0] = shifted_bias

    def losses(self, batch: Batch, outputs: Outputs, teacher_outputs: Outputs | None, epoch: int) -> dict[str, torch.Tensor]:
        logits, labels = outputs[0], batch["label"]
        if teacher_outputs is None:
            return {"ce": supervised_ce(logits, labels)}
        num_old = self.info.num_old
        logits, log_den = log_partition(logits)  # one float32 copy and one logsumexp for both terms
        unce = global_mean(unbiased_cross_entropy_map(logits, labels, num_old, log_den), labels != 255)
        unkd = global_mean(unbiased_knowledge_distillation_map(logits, teacher_outputs[0], self.options["alpha"],
                                                               log_den))
        return {"unce": unce, "unkd": self.kd_weight() * unkd}
