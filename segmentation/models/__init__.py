"""Model construction and weight loading: `build_segmenter`, `load_previous_step`, `load_pretrained_body`."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from segmentation.models.deeplab import HEADS
from segmentation.models.erfnet import ERFNetDecoder, ERFNetEncoder, erfnet_classifier
from segmentation.models.norm import (NORM_IMPLS, TORCHVISION_KINDS, ABN, NormAct, inplace_abn_available,
                                      make_norm_act, package_preferred)
from segmentation.models.resnet import ResNet
from segmentation.models.segmenter import Segmenter
from segmentation.models.weights import WeightsError, convert_checkpoint, fit_problems, load_pretrained_body

__all__ = ["HEADS", "NORM_IMPLS", "ABN", "Segmenter", "WeightsError", "build_segmenter", "convert_checkpoint",
           "inplace_abn_available", "load_pretrained_body", "load_previous_step", "make_norm_act"]


# DKD's train_voc.py sets this momentum on every backbone BN (torchvision's default is 0.1); the head keeps 0.1.
DKD_BACKBONE_BN_MOMENTUM = 0.01


def build_segmenter(backbone: str, output_stride: int, norm_act: str, classes_per_step: list[int],
                    pretrained: Path | None = None, pooling_size: int | tuple[int, int] | None = None,
                    device_type: str | None = None, norm_impl: str = "auto", head: str = "mib") -> Segmenter:
    """DeepLabV3 on an InPlace-ABN-style ResNet (or ERFNet, `backbone="erfnet"`), one classifier per step. `pretrained`: converted ImageNet weights
    (pretrained/convert.py) loaded into the body with strict=True. `pooling_size`: eval-time pooling window of the
    head's global branch (crop_size // output_stride; None = global). `device_type` picks the norm implementation
    (see norm.make_norm_act; default: cuda when available); `norm_impl` which code computes the iabn kinds
    (norm.package_preferred). `head`: "mib" or "dkd" (deeplab.HEADS). With the norm kinds in TORCHVISION_KINDS
    the ResNet computes torchvision's function with DKD's backbone BN momentum, so with `head="dkd"` the network
    is DKD's and STAR's. The model is built on the CPU."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if head not in HEADS:
        raise ValueError(f"--head {head!r} is unknown; valid: {', '.join(HEADS)}")
    norm = make_norm_act(norm_act, device_type, prefer_package=package_preferred(norm_impl))
    if backbone == "erfnet":  # ERFNet is the whole network: encoder as body, decoder as head; output_stride is 8
        if head != "mib":
            raise ValueError(f"--head {head} is a DeepLabV3 head; ERFNet has its own decoder (use a ResNet backbone)")
        body = ERFNetEncoder(norm)
        if pretrained is not None:
            load_pretrained_body(body, pretrained)
        decoder = ERFNetDecoder(norm)
        return Segmenter(body, decoder, classes_per_step, decoder.out_channels, classifier=erfnet_classifier)
    body = build_resnet(backbone, norm_act, norm, output_stride)
    if pretrained is not None:
        load_pretrained_body(body, pretrained)
    return Segmenter(body, HEADS[head](body.out_channels, norm, output_stride, pooling_size=pooling_size),
                     classes_per_step)


def build_resnet(backbone: str, kind: str, norm: NormAct, output_stride: int) -> ResNet:
    """The torchvision variant with DKD's BN momentum for the TORCHVISION_KINDS, else inplace_abn's ResNet."""
    if kind in TORCHVISION_KINDS:
        return ResNet(backbone, functools.partial(norm, momentum=DKD_BACKBONE_BN_MOMENTUM), output_stride,
                      variant="torchvision")
    return ResNet(backbone, norm, output_stride)


def load_previous_step(model: Segmenter, state_dict: dict[str, torch.Tensor]) -> None:
    """Load step t-1 into step t (strict=False): the only keys allowed to be missing are those of the newest
    classifier `cls.{t}`; any other missing key, unexpected key or shape mismatch raises ValueError."""
    new_prefix = f"cls.{len(model.cls) - 1}."
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith(new_prefix)}
    problems = fit_problems(kept, state_dict)
    if problems:
        raise ValueError(f"previous-step weights do not fit this model: {problems} (loading step t-1 into step t "
                         f"may only leave {new_prefix}* missing)")
    model.load_state_dict(state_dict, strict=False)

