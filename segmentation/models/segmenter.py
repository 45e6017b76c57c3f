"""Backbone + DeepLabV3 head + one 1x1 classifier per step; logits in learning order.

Adding a step appends a classifier: every existing state-dict key keeps its name and shape, so step t-1's
weights load into step t with only `cls.<t>.*` missing.
"""
from __future__ import annotations

from typing import Any, Collection

import torch
import torch.nn.functional as F
from torch import nn


class Segmenter(nn.Module):
    def __init__(self, body: nn.Module, head: nn.Module, classes_per_step: list[int], head_channels: int = 256) -> None:
        super().__init__()
        self.body, self.head = body, head
        self.classes_per_step = list(classes_per_step)
        self.cls = nn.ModuleList([nn.Conv2d(head_channels, c, 1) for c in classes_per_step])

    @property
    def num_classes(self) -> int:
        return sum(self.classes_per_step)

    def forward(self, x: torch.Tensor, features: Collection[str] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Logits (N x classes x H x W, upsampled to the input) and the features distillation methods read:
        body (last backbone stage), pre_logits (head output), attentions (pre-activation outputs of mod2..mod5,
        then pre_logits: PLOP's POD inputs) and logits_small (logits at feature resolution).

        `features` names the ones to return (default: all). A frozen teacher is asked only for what its method
        reads, so that under no_grad the others are freed as soon as the next layer has used them."""
        body, pre_activations = self.body(x)
        pre_logits = self.head(body)
        logits_small = torch.cat([cls(pre_logits) for cls in self.cls], dim=1)
        logits = F.interpolate(logits_small, size=x.shape[-2:], mode="bilinear", align_corners=False)
        found = {"body": body, "pre_logits": pre_logits, "attentions": [*pre_activations, pre_logits],
                 "logits_small": logits_small}
        if features is not None:
            found = {k: v for k, v in found.items() if k in features}
        return logits, found
