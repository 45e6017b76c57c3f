"""The memory estimate said before a step trains (segmentation/engine/memory.py)."""
from __future__ import annotations

import logging

import torch
from torch import nn

from segmentation.engine import memory


def test_saved_activations_are_what_autograd_keeps():
    """Conv2d saves its input and weight; ReLU its output: counted exactly, on meta tensors (no memory)."""
    def build() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU())

    got = memory.saved_activation_bytes(build, batch=5, crop=(8, 10))
    conv_input, weight, relu_output = 5 * 3 * 8 * 10 * 4, 4 * 3 * 3 * 3 * 4, 5 * 4 * 8 * 10 * 4
    assert got == conv_input + weight + relu_output


def test_the_run_that_used_to_be_killed_is_called_out_and_the_shapes_default_is_not(caplog):
    """`run.py --dataset shapes` once padded 64-px images to 512 for a ResNet-101 with 24 images in one process and
    was killed on a 24 GiB machine without a word; that configuration is estimated far above 24 GiB, the dataset's
    own defaults (ResNet-18, OS 8, 64 px) far below."""
    from segmentation.config import parse_config
    from segmentation.step.build import build_model
    from segmentation.tasks import load_task

    def estimate(argv: list[str]) -> int:
        cfg = parse_config(argv)
        task = load_task(cfg.dataset, cfg.task)
        return memory.estimate_training_bytes(lambda: build_model(cfg, task, 0, None, torch.device("cpu")),
                                              cfg.batch_size, cfg.crop_size, amp=False, teacher=False,
                                              optimizer_slots=1)

    big = estimate(["--dataset", "shapes", "--task", "6-2", "--backbone", "resnet101", "--output_stride", "16",
                    "--crop_size", "512"])
    small = estimate(["--dataset", "shapes", "--task", "6-2"])
    assert big > 24 * memory.GIB and small < memory.GIB
    with caplog.at_level(logging.WARNING, logger="segmentation"):
        assert memory.warn_if_too_big(big, 24 * memory.GIB, "24 images of 512x512", "Lower --batch_size.")
        assert not memory.warn_if_too_big(small, 24 * memory.GIB, "", "")
    assert "GiB per process" in caplog.text and "Lower --batch_size" in caplog.text
