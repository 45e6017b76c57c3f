"""Model construction and weight loading: `build_segmenter`, `load_previous_step`, `load_imagenet_weights`."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from segmentation.models.deeplab import DeepLabV3Head
from segmentation.models.norm import ABN, make_norm_act
from segmentation.models.resnet import ResNet
from segmentation.models.segmenter import Segmenter

__all__ = ["ABN", "Segmenter", "build_segmenter", "load_imagenet_weights", "load_previous_step", "make_norm_act"]


def build_segmenter(backbone: str, output_stride: int, norm_act: str, classes_per_step: list[int],
                    pretrained: Path | None = None, pooling_size: int | None = None,
                    device_type: str = "cpu") -> Segmenter:
    """`device_type` picks the norm implementation (see norm.make_norm_act); the model is built on the CPU."""
    norm = make_norm_act(norm_act, device_type)
    body = ResNet(backbone, norm, output_stride)
    if pretrained is not None:
        load_imagenet_weights(body, pretrained)
    head = DeepLabV3Head(body.out_channels, norm, output_stride, pooling_size=pooling_size)
    return Segmenter(body, head, classes_per_step)


def _torchvision_to_ours(key: str) -> str:
    """torchvision ResNet names -> inplace_abn ResNet names (same architecture, stride on the 3x3 conv)."""
    key = re.sub(r"^conv1\.", "mod1.conv1.", key)
    key = re.sub(r"^bn1\.", "mod1.bn1.", key)
    key = re.sub(r"^layer(\d)\.(\d+)\.downsample\.0\.", lambda m: f"mod{int(m[1]) + 1}.block{int(m[2]) + 1}.proj_conv.", key)
    key = re.sub(r"^layer(\d)\.(\d+)\.downsample\.1\.", lambda m: f"mod{int(m[1]) + 1}.block{int(m[2]) + 1}.proj_bn.", key)
    return re.sub(r"^layer(\d)\.(\d+)\.", lambda m: f"mod{int(m[1]) + 1}.block{int(m[2]) + 1}.convs.", key)


def imagenet_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Backbone weights from inplace_abn's published .pth.tar (`state_dict`, `module.` prefix, classifier.fc)
    or from torchvision's ResNet state dicts; the ImageNet classifier is dropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--pretrained {path} does not exist; see pretrained/README.md for where to get it")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or pickled objects weights_only refuses
        raise ValueError(f"--pretrained {path} is not a readable weights file ({type(e).__name__}: {e})") from e
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    if not isinstance(state, dict):
        raise ValueError(f"--pretrained {path} holds a {type(state).__name__}, not a state dict")
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.").removeprefix("body.")
        if key.startswith(("classifier.", "fc.")):
            continue
        cleaned[_torchvision_to_ours(key) if key.startswith(("layer", "conv1.", "bn1.")) else key] = value
    return cleaned


def _shape_mismatches(module: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Keys present on both sides with different shapes (load_state_dict would raise a bare RuntimeError)."""
    own = module.state_dict()
    return [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
            if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]


def load_imagenet_weights(body: nn.Module, path: Path) -> None:
    state = imagenet_state_dict(path)
    mismatched = _shape_mismatches(body, state)
    if mismatched:
        raise ValueError(f"--pretrained {path} does not fit this backbone: {len(mismatched)} shape mismatches "
                         f"(e.g. {mismatched[:3]}). Check --backbone against the file.")
    missing, unexpected = body.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"--pretrained {path} does not fit this backbone: {len(missing)} missing keys "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). "
                         "Check --backbone against the file.")


def load_previous_step(model: Segmenter, state_dict: dict[str, torch.Tensor]) -> None:
    """Load step t-1 into step t: the only keys allowed to be missing are those of the newest classifier."""
    new_prefix = f"cls.{len(model.cls) - 1}."
    mismatched = _shape_mismatches(model, state_dict)
    if mismatched:
        raise ValueError(f"previous-step weights do not fit this model: shape mismatches {mismatched[:5]}")
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    wrong = [k for k in missing if not k.startswith(new_prefix)]
    if wrong or unexpected:
        raise ValueError(f"previous-step weights do not fit this model: missing {wrong[:5]}, unexpected {unexpected[:5]}")
