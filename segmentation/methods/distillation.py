"""The losses of MiB's code base, as one composable method: FT, LwF, LwF-MC, ILT, MiB, EWC, PI and RW are presets.

MiB's scripts (and PLOP's, which extend them) select a method with `--method` and then mix the individual flags
(`--method FT --loss_kd 100` is LwF; `--method MiB --regularizer ewc` adds EWC to MiB). The same holds here: every
method of this family reads every flag below, and its preset only changes their defaults. Per batch, at a step
t > 0 with teacher logits x_o over the C_old old classes (MiB's code, github.com/fcdl94/MiB: utils/loss.py, train.py):
  segmentation: CE on the step's labels; with --unce MiB's unbiased CE; with --icarl BCE over all classes;
  --loss_kd w:  w * KD (LwF, ILT: the mean over old channels of -q log p), or with --unkd MiB's unbiased KD;
  --loss_de w:  w * MSE(body, old body) (ILT);
  --icarl:      --icarl_importance * C_old * mean BCE(x[:, :C_old], sigmoid(x_o)) (LwF-MC, iCaRL's distillation);
  --regularizer ewc|pi|rw: --reg_importance * sum_theta F_theta (theta - theta*)^2 (regularizers.py).
Each term is averaged over the pixels of the global batch (the labelled ones for the supervised terms), so that a
2-rank run computes a 1-rank run's gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from segmentation.methods.base import Batch, Method, Outputs
from segmentation.methods.losses import (IGNORE_INDEX, bce_map, cross_entropy_map, feature_distillation,
                                         global_mean, knowledge_distillation_map, log_partition, upcast,
                                         unbiased_cross_entropy_map, unbiased_knowledge_distillation_map)
from segmentation.methods.options import option, switch
from segmentation.methods.regularizers import REGULARIZERS, ParameterRegularizer


@dataclass(frozen=True)
class DistillationOptions:
    """MiB family
    The flags of MiB's code, which mix freely (--method ft --loss_kd 100 is LwF); each method's preset only changes
    their defaults."""
    loss_kd: float = option(0.0, "weight of the distillation of the old model's outputs (KD; with --unkd MiB's "
                            "unbiased KD)")
    alpha: float = option(1.0, "scale of the teacher's logits in KD and UNKD, q = softmax(alpha * old logits)")
    unce: bool = switch(False, "MiB's unbiased cross-entropy: background absorbs the old classes")
    unkd: bool = switch(False, "MiB's unbiased distillation: the new classes fold into the student's background")
    init_balanced: bool = switch(False, "MiB's init of the new classifier from the background's (weights copied, "
                                 "bias - log(new classes + 1))")
    loss_de: float = option(0.0, "weight of the feature distillation MSE(body, old body) (ILT)")
    freeze: bool = switch(False, "steps t>0 train the head and classifiers only: the backbone keeps the previous "
                          "step's weights (ILT's variant)")
    icarl: bool = switch(False, "LwF-MC: BCE over all classes for the labels, plus iCaRL's distillation "
                         "BCE(old logits, sigmoid(teacher logits)) weighted by --icarl_importance")
    icarl_importance: float = option(1.0, "weight of iCaRL's distillation (--icarl)")
    regularizer: str | None = option(None, "parameter regularizer whose statistics carry from step to step: "
                                     "ewc, pi or rw", type=str.lower, choices=tuple(REGULARIZERS))
    reg_importance: float = option(1.0, "weight of the regularizer's penalty")
    reg_alpha: float = option(0.9, "EWC/RW: weight of the newest squared gradient in the Fisher's running mean")
    reg_no_normalize: bool = switch(False, "use the importances as they are, not rescaled to [0, 1] per tensor",
                                    negatable=False)
    reg_iterations: int = option(10, "RW: iterations between updates of the path-integral score")


class Distillation(Method):
    """The family's losses; a preset is a subclass that sets `flag_defaults`."""

    name = "distillation"
    Options = DistillationOptions
    options: DistillationOptions

    def __init__(self, info, model, teacher, options: DistillationOptions) -> None:
        super().__init__(info, model, teacher, options)
        if options.freeze and info.step > 0:  # before DDP wraps the model: frozen weights are not synchronised
            model.body.requires_grad_(False)
        # Statistics gathered this step, by regularizer name. Step 0 gathers those of every regularizer: there is
        # no penalty yet, so the weights it trains are the same whichever --regularizer asked, and EWC, PI and RW
        # share one step 0 (as a benchmark does), each reading its own statistics at step 1.
        self.gatherers: dict[str, ParameterRegularizer] = {}
        self.regularizer: ParameterRegularizer | None = None  # the one whose penalty this step pays
        if options.regularizer is not None:
            names = tuple(REGULARIZERS) if info.step == 0 else (options.regularizer,)
            self.gatherers = {n: REGULARIZERS[n](model, teacher if info.step > 0 else None, options) for n in names}
            self.regularizer = self.gatherers[options.regularizer]

    @classmethod
    def step0_key(cls, options: DistillationOptions) -> tuple:
        key: tuple = ("bce",) if options.icarl else ("ce",)
        if options.regularizer is not None:  # every regularizer's statistics are gathered while step 0 trains
            key += ("param-importance", options.reg_alpha, options.reg_iterations)
        return key

    @property
    def needs_teacher(self) -> bool:
        o = self.options
        return self.info.step > 0 and bool(o.loss_kd or o.loss_de or o.icarl or o.regularizer)

    @property
    def teacher_features(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"body"}) if self.options.loss_de else frozenset()

    @torch.no_grad()
    def init_new_classifier(self) -> None:
        """--init_balanced: new rows copy the background row; biases are shifted by -log(|C_new| + 1), background's
        too. The old model's background probability is then shared evenly between background and the new classes,
        so the first iterations start from the old model's predictions instead of random ones."""
        if self.info.step == 0 or not self.options.init_balanced:
            return
        classifiers = self.model.cls
        new_cls, bg_cls = classifiers[-1], classifiers[0]
        shifted_bias = bg_cls.bias[0] - math.log(new_cls.out_channels + 1)
        new_cls.weight.copy_(bg_cls.weight[0:1].expand_as(new_cls.weight))
        new_cls.bias.fill_(float(shifted_bias))
        bg_cls.bias[0] = shifted_bias

    def kd_weight(self) -> float:
        return self.options.loss_kd

    def losses(self, batch: Batch, outputs: Outputs, teacher_outputs: Outputs | None, epoch: int
               ) -> dict[str, torch.Tensor]:
        o, num_old = self.options, self.info.num_old
        logits, labels = outputs[0], batch["label"]
        valid = labels != IGNORE_INDEX
        log_den = None
        terms: dict[str, torch.Tensor] = {}
        if o.icarl:
            terms["bce"] = global_mean(bce_map(logits, labels), valid)
        elif o.unce and num_old > 0:
            logits, log_den = log_partition(logits)  # one float32 copy and one logsumexp for UNCE and UNKD
            terms["unce"] = global_mean(unbiased_cross_entropy_map(logits, labels, num_old, log_den), valid)
        else:
            terms["ce"] = global_mean(cross_entropy_map(logits, labels), valid)
        if teacher_outputs is not None:
            old_logits = teacher_outputs[0]
            if self.kd_weight():
                if o.unkd:
                    kd = unbiased_knowledge_distillation_map(logits, old_logits, o.alpha, log_den)
                    terms["unkd"] = self.kd_weight() * global_mean(kd)
                else:
                    terms["kd"] = self.kd_weight() * global_mean(knowledge_distillation_map(logits, old_logits, o.alpha))
            if o.loss_de:
                terms["de"] = o.loss_de * feature_distillation(outputs[1]["body"], teacher_outputs[1]["body"])
            if o.icarl:
                terms["icarl"] = o.icarl_importance * global_mean(icarl_distillation_map(logits, old_logits))
        if self.regularizer is not None and self.regularizer.penalizes:
            # The value is logged; its gradient is added in after_backward, after the statistics have read the
            # gradient of the losses alone (as MiB, which back-propagates the penalty separately).
            terms["reg"] = o.reg_importance * self.regularizer.penalty()
        return terms

    def after_backward(self) -> None:
        for gatherer in self.gatherers.values():
            gatherer.update()
        if self.regularizer is not None:
            self.regularizer.add_penalty_gradient(self.options.reg_importance)

    def carry_state(self) -> dict[str, Any]:
        return {name: g.carry_state() for name, g in self.gatherers.items()}

    def state_dict(self) -> dict[str, Any]:
        return {name: g.state_dict() for name, g in self.gatherers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [name for name in self.gatherers if name not in state]
        if missing:  # e.g. saved before step 0 gathered every regularizer's statistics
            raise ValueError(f"it holds no {', '.join(missing)} statistics")
        for name, gatherer in self.gatherers.items():
            gatherer.load_state_dict(state[name])

    def carry_over(self, state: dict[str, Any]) -> None:
        if self.regularizer is None:
            return
        name = self.options.regularizer
        if name not in state:
            held = ", ".join(sorted(state)) or "no regularizer statistics"
            raise ValueError(f"--regularizer {name}: the previous step's artifact holds {held}; train the previous "
                             f"steps with --regularizer {name} too (its statistics are gathered while they train)")
        self.regularizer.carry_over(state[name])


def icarl_distillation_map(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per pixel, the sum over old channels of BCE(x_c, sigmoid(x_o,c)): MiB's C_old * BCEWithLogits(mean)."""
    num_old = teacher_logits.shape[1]
    return torch.nn.functional.binary_cross_entropy_with_logits(
        upcast(logits[:, :num_old]), torch.sigmoid(upcast(teacher_logits)), reduction="none").sum(1)
