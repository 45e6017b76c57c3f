"""Fine-tuning: cross-entropy on the current step's labels, nothing against forgetting (the lower bound)."""
from __future__ import annotations

import torch

from segmentation.methods.base import Batch, Method, Outputs, supervised_ce


class FineTuning(Method):
    name = "ft"

    @property
    def needs_teacher(self) -> bool:
        return False

    def losses(self, batch: Batch, outputs: Outputs, teacher_outputs: Outputs | None, epoch: int) -> dict[str, torch.Tensor]:
        return {"ce": supervised_ce(outputs[0], batch["label"])}
