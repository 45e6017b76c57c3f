"""ImageNet backbone weights: conversion of the published files into our format, and loading into the body.

Our format (written by pretrained/convert.py): `{"state_dict": body state dict, "arch": "resnet101", "source": str}`.
Sources:
- inplace_abn's `resnet101_iabn_sync.pth.tar`: `{"state_dict": {"module.mod1.conv1.weight", ...,
  "module.classifier.fc.weight/bias"}}`. Our ResNet keeps its module names, so only the `module.` prefix and the
  ImageNet classifier go; the 2018 files may predate BatchNorm's `num_batches_tracked`, which we add as 0.
- torchvision's resnet18/50/101 state dicts: conv1/bn1/layerN.M.*/downsample.0|1/fc -> mod1.conv1/mod1.bn1/
  mod{N+1}.block{M+1}.convs.*/proj_conv|proj_bn. The architectures match block for block: torchvision's v1.5
  bottleneck puts the stride on the 3x3 conv2, and so does inplace_abn's ResidualBlock (its basic block strides conv1
  in both). What differs is the function, not the shapes: torchvision uses ReLU and BN scale w, we use leaky ReLU
  0.01 (and |w| + eps with iabn*); and at OS16/8 torchvision's `replace_stride_with_dilation` keeps the first block of
  a dilated stage at the previous dilation, whereas inplace_abn dilates every block of the stage. With
  `--norm_act bn_relu|syncbn_relu` our ResNet computes torchvision's function (models/resnet.py, variant
  "torchvision"), so these weights are then exact.
- ERFNet's ImageNet-pretrained encoder `erfnet_encoder_pretrained.pth.tar` (erfnet_pytorch, which CIL loads):
  `{"state_dict": {"module.features.encoder.initial_block.conv.weight", ..., "module.classifier.linear.*"}}`; our
  ERFNetEncoder keeps the authors' names, so the prefix and the ImageNet classifier go. A whole trained ERFNet
  (`encoder.*`, `decoder.*`, with or without `module.`) gives its encoder the same way.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segmentation.models.resnet import STRUCTURES

FORMATS = ("inplace_abn", "torchvision", "erfnet", "ours")
_ERFNET_PREFIXES = ("features.encoder.", "encoder.")  # the ImageNet encoder file; a whole ERFNet


class WeightsError(ValueError):
    """A weights file that cannot be used; the message names the file and what is wrong."""


def read_weights_file(path: Path) -> Any:
    """torch.load with weights_only=True (plain tensors in dicts, as all supported files are), clear errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist; see pretrained/README.md for where to get it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or pickled objects weights_only refuses
        raise WeightsError(f"{path} is not a readable weights file ({type(e).__name__}: {e})") from e


def detect_format(raw: Any) -> str:
    if isinstance(raw, dict) and isinstance(raw.get("arch"), str) and "source" in raw \
            and isinstance(raw.get("state_dict"), dict):
        return "ours"
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    if not isinstance(state, dict) or not state:
        return "unknown"
    keys = [k.removeprefix("module.") for k in state]
    if any(k.startswith(p + "initial_block.") for k in keys for p in _ERFNET_PREFIXES):
        return "erfnet"
    if any(k.startswith("mod1.") for k in keys):
        return "inplace_abn"
    if any(k.startswith("layer1.") for k in keys):
        return "torchvision"
    return "unknown"


def _torchvision_key(key: str) -> str:
    key = re.sub(r"^conv1\.", "mod1.conv1.", key)
    key = re.sub(r"^bn1\.", "mod1.bn1.", key)
    block = lambda m: f"mod{int(m[1]) + 1}.block{int(m[2]) + 1}."  # noqa: E731
    key = re.sub(r"^layer(\d)\.(\d+)\.downsample\.0\.", lambda m: block(m) + "proj_conv.", key)
    key = re.sub(r"^layer(\d)\.(\d+)\.downsample\.1\.", lambda m: block(m) + "proj_bn.", key)
    return re.sub(r"^layer(\d)\.(\d+)\.", lambda m: block(m) + "convs.", key)


def _with_num_batches_tracked(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add BatchNorm's `num_batches_tracked` (0) where a norm layer lacks it, so strict loading never depends on
    state-dict version metadata."""
    out = dict(state)
    for key in state:
        if key.endswith(".running_mean"):
            out.setdefault(key.removesuffix("running_mean") + "num_batches_tracked", torch.tensor(0, dtype=torch.long))
    return out


def convert_state_dict(raw: Any, fmt: str) -> dict[str, torch.Tensor]:
    """Body state dict in our key names from a published inplace_abn or torchvision checkpoint."""
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    if fmt == "inplace_abn":
        body = {k.removeprefix("module."): v for k, v in state.items()}
        body = {k: v for k, v in body.items() if not k.startswith("classifier.")}
    elif fmt == "torchvision":
        body = {_torchvision_key(k): v for k, v in state.items() if not k.startswith("fc.")}
    elif fmt == "erfnet":
        keys = {k.removeprefix("module."): v for k, v in state.items()}
        prefix = next(p for p in _ERFNET_PREFIXES if any(k.startswith(p) for k in keys))
        # output_conv: the encoder's own 1x1 prediction layer (ERFNet's encoder-only training), not part of the body
        body = {k.removeprefix(prefix): v for k, v in keys.items()
                if k.startswith(prefix) and not k.startswith(prefix + "output_conv.")}
    else:
        raise WeightsError(f"cannot convert format {fmt!r}; known: inplace_abn, torchvision, erfnet")
    return _with_num_batches_tracked({k: v for k, v in body.items() if isinstance(v, torch.Tensor)})


def infer_arch(state: dict[str, torch.Tensor]) -> str | None:
    """resnet18/50/101 from the number of blocks per stage and the block type (conv3 = bottleneck)."""
    counts = []
    for mod in range(2, 6):
        ids = {int(m[1]) for k in state if (m := re.match(rf"mod{mod}\.block(\d+)\.", k))}
        counts.append(max(ids, default=0))
    bottleneck = any(".convs.conv3." in k for k in state)
    for arch, (structure, is_bottleneck) in STRUCTURES.items():
        if structure == counts and is_bottleneck == bottleneck:
            return arch
    return None


def convert_checkpoint(raw: Any, source: str, fmt: str = "auto") -> dict[str, Any]:
    """Our format from a loaded published checkpoint; checks that it loads strictly into our ResNet."""
    fmt = detect_format(raw) if fmt == "auto" else fmt
    if fmt == "ours":
        return raw
    if fmt not in ("inplace_abn", "torchvision", "erfnet"):
        raise WeightsError(f"{source}: not an inplace_abn or torchvision ResNet checkpoint (no mod1.*/layer1.* keys) "
                           f"nor an ERFNet one (no features.encoder.*/encoder.* keys)")
    state = convert_state_dict(raw, fmt)
    if fmt == "erfnet":
        return {"state_dict": state, "arch": "erfnet", "source": f"{fmt}:{source}"}
    arch = infer_arch(state)
    if arch is None:
        raise WeightsError(f"{source}: not a ResNet-18/50/101 ({fmt} format, but the block layout matches none)")
    return {"state_dict": state, "arch": arch, "source": f"{fmt}:{source}"}


def fit_problems(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str | None:
    """None if `state` has exactly the keys and shapes of `own` (a model's state dict), else what differs.
    Checked before loading: load_state_dict's RuntimeError is long and names no file."""
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if not (mismatched or missing or unexpected):
        return None
    return (f"{len(mismatched)} shape mismatches {mismatched[:3]}, {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}")


def check_fits(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], what: str) -> None:
    problems = fit_problems(own, state)
    if problems:
        raise WeightsError(f"{what} does not fit this model: {problems}")


def load_pretrained_body(body: nn.Module, path: Path) -> dict[str, Any]:
    """Load converted ImageNet weights into the body (ResNet or ERFNet encoder) with strict=True. A published file that was not
    converted yet is converted on the fly (same code as pretrained/convert.py). Returns the converted checkpoint."""
    path = Path(path)
    raw = read_weights_file(path)
    converted = convert_checkpoint(raw, str(path))
    arch = getattr(body, "arch", None)
    if arch is not None and converted["arch"] != arch:
        raise WeightsError(f"--pretrained {path} holds {converted['arch']} weights but --backbone is {arch}")
    state = _with_num_batches_tracked(converted["state_dict"])
    check_fits(body.state_dict(), state, f"--pretrained {path}")
    body.load_state_dict(state, strict=True)
    return converted
