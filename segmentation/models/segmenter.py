"""Backbone + DeepLabV3 head + one 1x1 classifier per step; logits in learning order.

Adding a step appends a classifier: every existing state-dict key keeps its name and shape, so step t-1's
weights load into step t with only `cls.<t>.*` missing.
"""
from __future__ import annotations

from typing import Any, Callable, Collection

import torch
import torch.nn.functional as F
from torch import nn


def conv1x1_classifier(in_channels: int, num_classes: int) -> nn.Module:
    """DeepLabV3's classifier of one step: a 1x1 convolution on the head's features."""
    return nn.Conv2d(in_channels, num_classes, 1)


class Segmenter(nn.Module):
    def __init__(self, body: nn.Module, head: nn.Module, classes_per_step: list[int], head_channels: int = 256,
                 classifier: Callable[[int, int], nn.Module] = conv1x1_classifier) -> None:
        """`classifier(head_channels, classes)` makes one step's output layer (ERFNet's upsamples 2x)."""
        super().__init__()
        self.body, self.head = body, head
        self.classes_per_step = list(classes_per_step)
        self.cls = nn.ModuleList([classifier(head_channels, c) for c in classes_per_step])

    @property
    def num_classes(self) -> int:
        return sum(self.classes_per_step)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Every step's classifier on any N x head_channels x h x w tensor: the head's output, or features a method
        makes itself (STAR's synthetic old-class features, grid-sampled background features); N x classes x h x w."""
        return torch.cat([cls(features) for cls in self.cls], dim=1)

    def forward(self, x: torch.Tensor, features: Collection[str] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Logits (N x classes x H x W, upsampled to the input) and the features distillation methods read:
        body (last backbone stage), pre_logits (head output), attentions (pre-activation outputs of mod2..mod5,
        then pre_logits: PLOP's POD inputs) and logits_small (logits at feature resolution).

        `features` names the ones to return (default: all). A frozen teacher is asked only for what its method
        reads, so that under no_grad the others are freed as soon as the next layer has used them."""
        body, pre_activations = self.body(x)
        pre_logits = self.head(body)
        logits_small = self.classify(pre_logits)
        logits = logits_small
        if logits.shape[-2:] != x.shape[-2:]:  # DeepLabV3: 1/OS resolution; ERFNet's classifier is at full size
            logits = F.interpolate(logits_small, size=x.shape[-2:], mode="bilinear", align_corners=False)
        found = {"body": body, "pre_logits": pre_logits, "attentions": [*pre_activations, pre_logits],
                 "logits_small": logits_small}
        if features is not None:
            found = {k: v for k, v in found.items() if k in features}
        return logits, found
