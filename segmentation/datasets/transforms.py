"""Joint image/label transforms, seeded only by the `numpy.random.Generator` passed in.

Every call is `transform(image: PIL.Image, label: np.ndarray HxW uint8, rng) -> (pixels, label, box)`: pixels a
uint8 3xHxW tensor, label a uint8 HxW tensor (remapped by the LUT before the geometry; 255 = ignore, padding too),
box int32 [y0, y1, x0, x1], the part of the canvas that holds image pixels (the rest is padding).
Batches travel to the GPU as uint8 (4x less than float32 images, 8x less than int64 labels) and are normalised
there by `normalize_batch`, which also sets the padding to 0 (the mean colour): the same numbers the CPU would give.

Scale + pad + crop are done as
"resize only the source region that ends up in the crop": a 2x upscale of a VOC image costs one 512x512 resize,
not a 1000x750 one. JPEGs are decoded at reduced size (`draft`) when the scale allows; the image is resized with
torch's uint8 bilinear kernel (about 2x faster than PIL's), the label with PIL NEAREST (faster than torch's).
No per-pixel Python anywhere.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE = 255



def _tensor(arr: np.ndarray) -> torch.Tensor:
    """np.asarray(PIL image) is read-only; the tensors made here are only ever read (copied, flipped, resized),
    so torch's warning about that is silenced instead of paying for a copy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(arr))


def _pixels_tensor(pixels: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW view (channels-last memory, which torch's uint8 resize kernel prefers)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(pixels).permute(2, 0, 1)


def normalize_batch(pixels: torch.Tensor, boxes: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN,
                    std: tuple[float, ...] = IMAGENET_STD,
                    memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 N x 3 x H x W (on any device) -> float32 (x - mean) / std, with 0 outside each sample's box.

    Elementwise sub and mul are exactly rounded, so the result is bit-identical on CPU and GPU. No host sync: the
    padding mask is built from the boxes on the device."""
    device = pixels.device
    mean255 = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1).mul_(255).to(device, non_blocking=True)
    inv_std255 = (1.0 / (torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)).to(device, non_blocking=True)
    images = pixels.to(dtype=torch.float32, memory_format=memory_format)
    images.sub_(mean255).mul_(inv_std255)
    boxes = boxes.to(device, non_blocking=True)
    rows = torch.arange(images.shape[2], device=device)
    cols = torch.arange(images.shape[3], device=device)
    inside_rows = (rows >= boxes[:, :1]) & (rows < boxes[:, 1:2])   # N x H
    inside_cols = (cols >= boxes[:, 2:3]) & (cols < boxes[:, 3:4])  # N x W
    inside = inside_rows[:, None, :, None] & inside_cols[:, None, None, :]
    return images.masked_fill_(~inside, 0.0)


def full_box(height: int, width: int) -> torch.Tensor:
    return torch.tensor([0, height, 0, width], dtype=torch.int32)


def _decode(image: Image.Image, want: tuple[int, int]) -> tuple[np.ndarray, int]:
    """HxWx3 uint8 pixels, decoded at the smallest JPEG DCT scale (1, 1/2, 1/4, 1/8) still >= `want`; returns the
    pixels and the integer reduction factor (1 for other formats or an already decoded image)."""
    full_w = image.size[0]
    if image.format == "JPEG":  # no-op once decoded (PIL checks the pending tile)
        image.draft("RGB", want)
    if image.mode != "RGB":
        image = image.convert("RGB")
    factor = max(1, round(full_w / image.size[0]))
    return np.asarray(image), factor


def _region(lo: int, hi: int, factor: int, full: int) -> tuple[int, int]:
    """Source interval [lo, hi) widened to multiples of the decode factor, so image and label regions coincide."""
    lo = (lo // factor) * factor
    hi = min(full, -(-hi // factor) * factor)
    return lo, hi


def _resize_pair(pixels: np.ndarray, factor: int, label: np.ndarray, xs: tuple[int, int], ys: tuple[int, int],
                 out_size: tuple[int, int], flip: bool) -> tuple[torch.Tensor, np.ndarray]:
    """Crop [ys, xs) (label pixels) from both, optionally mirror, resize to out_size (w, h).
    Returns image 3xhxw uint8 tensor and label hxw uint8 array."""
    h, w = label.shape
    x0, x1 = _region(*xs, factor, w)
    y0, y1 = _region(*ys, factor, h)
    src = _pixels_tensor(pixels[y0 // factor:-(-y1 // factor), x0 // factor:-(-x1 // factor)])
    lbl = label[y0:y1, x0:x1]
    if flip:
        src, lbl = src.flip(-1), lbl[:, ::-1]
    ow, oh = out_size
    if src.shape[1:] != (oh, ow):
        src = F.interpolate(src[None], size=(oh, ow), mode="bilinear", align_corners=False, antialias=True)[0]
    if lbl.shape != (oh, ow):
        lbl = np.asarray(Image.fromarray(np.ascontiguousarray(lbl)).resize((ow, oh), Image.NEAREST))
    return src, lbl


class TrainTransform:
    """Random scale in `scale`, pad (mean / 255) to crop_size, random crop_size crop, random horizontal flip."""

    def __init__(self, crop_size: int = 512, scale: tuple[float, float] = (0.5, 2.0), flip: bool = True) -> None:
        self.crop_size = crop_size
        self.scale = scale
        self.flip = flip

    def _axis(self, full: int, s: float, rng: np.random.Generator) -> tuple[tuple[int, int], int, int]:
        """One axis: source interval (original pixels), output length, offset of the output in the crop canvas."""
        crop = self.crop_size
        scaled = max(1, round(full * s))
        if scaled > crop:  # crop: a crop-long window of the scaled image, i.e. crop/s source pixels
            src_len = max(1, min(full, round(crop / s)))
            start = int(rng.integers(0, full - src_len + 1))
            return (start, start + src_len), crop, 0
        # pad: the whole axis is used, and where it lands in the canvas is random too
        return (0, full), scaled, int(rng.integers(0, crop - scaled + 1))

    def __call__(self, image: Image.Image, label: np.ndarray, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, w = label.shape
        if image.size != (w, h):
            raise ValueError(f"image size {image.size} != label size {(w, h)}")
        s = float(rng.uniform(*self.scale))
        xs, ow, px = self._axis(w, s, rng)
        ys, oh, py = self._axis(h, s, rng)
        flip = self.flip and bool(rng.random() < 0.5)
        pixels, factor = _decode(image, (math.ceil(w * s), math.ceil(h * s)))
        src, lbl = _resize_pair(pixels, factor, label, xs, ys, (ow, oh), flip)
        crop = self.crop_size
        if (ow, oh) == (crop, crop):
            return src.contiguous(), _tensor(lbl), full_box(crop, crop)
        img_t = torch.zeros((3, crop, crop), dtype=torch.uint8)  # padding: normalize_batch sets it to the mean
        lbl_t = torch.full((crop, crop), IGNORE, dtype=torch.uint8)
        img_t[:, py:py + oh, px:px + ow] = src
        lbl_t[py:py + oh, px:px + ow] = _tensor(lbl)
        return img_t, lbl_t, torch.tensor([py, py + oh, px, px + ow], dtype=torch.int32)


class EvalTransform:
    """Resize the short side to crop_size and centre-crop crop_size (MiB/PLOP/WILSON `--crop_val`), or full size."""

    def __init__(self, crop_size: int = 512, crop_val: bool = True) -> None:
        self.crop_size = crop_size
        self.crop_val = crop_val

    def __call__(self, image: Image.Image, label: np.ndarray, rng: np.random.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, w = label.shape
        if image.size != (w, h):
            raise ValueError(f"image size {image.size} != label size {(w, h)}")
        if not self.crop_val:
            pixels, _ = _decode(image, (w, h))
            return _pixels_tensor(pixels).contiguous(), _tensor(label), full_box(h, w)
        crop = self.crop_size
        # torchvision Resize(int) + CenterCrop: short side -> crop, then the centred crop x crop window, which is
        # the centred (crop / s)-pixel source window on each axis.
        s = crop / min(w, h)
        xs, ys = self._centre(w, s), self._centre(h, s)
        pixels, factor = _decode(image, (math.ceil(w * s), math.ceil(h * s)))
        src, lbl = _resize_pair(pixels, factor, label, xs, ys, (crop, crop), False)
        return src.contiguous(), _tensor(lbl), full_box(crop, crop)

    def _centre(self, full: int, s: float) -> tuple[int, int]:
        src_len = min(full, max(1, round(self.crop_size / s)))
        start = (full - src_len) // 2
        return start, start + src_len
