"""Colourised label maps (VOC palette) for tensorboard and the PNG summaries."""
from __future__ import annotations

import numpy as np
import torch


def voc_palette(num_colors: int = 256) -> np.ndarray:
    """The Pascal VOC colour map (bit-interleaved class id); 255 is drawn white so ignored pixels stand out."""
    palette = np.zeros((num_colors, 3), dtype=np.uint8)
    for i in range(num_colors):
        c, r, g, b = i, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[i] = (r, g, b)
    palette[255] = (255, 255, 255)
    return palette


_PALETTE = voc_palette()


def colorize(label: np.ndarray | torch.Tensor) -> np.ndarray:
    """HxW class ids -> HxWx3 uint8 colours."""
    if isinstance(label, torch.Tensor):
        label = label.cpu().numpy()
    return _PALETTE[np.clip(label, 0, 255).astype(np.uint8)]


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def denormalize(image: torch.Tensor) -> np.ndarray:
    """3xHxW normalised tensor -> HxWx3 uint8."""
    array = image.detach().float().cpu().numpy().transpose(1, 2, 0) * IMAGENET_STD + IMAGENET_MEAN
    return (np.clip(array, 0, 1) * 255).astype(np.uint8)


def sample_strip(image: torch.Tensor, *maps: torch.Tensor) -> np.ndarray:
    """Image | each class map (ground truth, prediction, a method's views), side by side, H x W*(1+k) x 3 uint8."""
    return np.concatenate([denormalize(image), *(colorize(m) for m in maps)], axis=1)
