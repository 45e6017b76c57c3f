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
from torch.utils.data import default_collate

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


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _jitter_colour(pixels: torch.Tensor, strength: tuple[float, float, float, float],
                   rng: np.random.Generator) -> torch.Tensor:
    """torchvision's ColorJitter(brightness, contrast, saturation, hue) with its factors drawn from `rng` (the
    sample's generator, not torch's global one): the four adjustments in a random order, each with a factor
    uniform in [1 - s, 1 + s] (hue: a shift in [-h, h])."""
    from torchvision.transforms.v2 import functional as TF

    brightness, contrast, saturation, hue = strength
    ops = {
        0: lambda x, f: TF.adjust_brightness(x, f), 1: lambda x, f: TF.adjust_contrast(x, f),
        2: lambda x, f: TF.adjust_saturation(x, f), 3: lambda x, f: TF.adjust_hue(x, f),
    }
    ranges = {0: (max(0.0, 1 - brightness), 1 + brightness), 1: (max(0.0, 1 - contrast), 1 + contrast),
              2: (max(0.0, 1 - saturation), 1 + saturation), 3: (-hue, hue)}
    for k in rng.permutation(4):
        lo, hi = ranges[int(k)]
        if hi > lo:
            pixels = ops[int(k)](pixels, float(rng.uniform(lo, hi)))
    return pixels


class TrainTransform:
    """Optional resize to `base_size` (CIL: 512x1024), random scale s uniform in `scale` (with `divide_scale` the
    size is divided by s instead, as CIL's RandomRescale: s in [1, 1.5] zooms out by 0.67-1), pad (mean / 255) to
    the crop, random crop of `crop_size` (an int, or (height, width)), random horizontal flip, optional colour
    jitter."""

    def __init__(self, crop_size: int | tuple[int, int] = 512, scale: tuple[float, float] = (0.5, 2.0),
                 flip: bool = True, base_size: tuple[int, int] | None = None,
                 color_jitter: tuple[float, float, float, float] | None = None, divide_scale: bool = False) -> None:
        self.crop_size = _size(crop_size)
        self.scale = scale
        self.flip = flip
        self.base_size = base_size
        self.color_jitter = color_jitter
        self.divide_scale = divide_scale

    @staticmethod
    def _axis(full: int, s: float, crop: int, rng: np.random.Generator) -> tuple[tuple[int, int], int, int]:
        """One axis: source interval (original pixels), output length, offset of the output in the crop canvas."""
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
        if self.divide_scale:
            s = 1.0 / s
        sy, sx = (s * self.base_size[0] / h, s * self.base_size[1] / w) if self.base_size else (s, s)
        crop_h, crop_w = self.crop_size
        xs, ow, px = self._axis(w, sx, crop_w, rng)
        ys, oh, py = self._axis(h, sy, crop_h, rng)
        flip = self.flip and bool(rng.random() < 0.5)
        pixels, factor = _decode(image, (math.ceil(w * sx), math.ceil(h * sy)))
        src, lbl = _resize_pair(pixels, factor, label, xs, ys, (ow, oh), flip)
        if self.color_jitter is not None:
            src = _jitter_colour(src.contiguous(), self.color_jitter, rng)
        if (ow, oh) == (crop_w, crop_h):
            return src.contiguous(), _tensor(lbl), full_box(crop_h, crop_w)
        img_t = torch.zeros((3, crop_h, crop_w), dtype=torch.uint8)  # padding: normalize_batch sets it to the mean
        lbl_t = torch.full((crop_h, crop_w), IGNORE, dtype=torch.uint8)
        img_t[:, py:py + oh, px:px + ow] = src
        lbl_t[py:py + oh, px:px + ow] = _tensor(lbl)
        return img_t, lbl_t, torch.tensor([py, py + oh, px, px + ow], dtype=torch.int32)


class EvalTransform:
    """Resize the short side to crop_size and centre-crop crop_size, image and label (MiB/PLOP/WILSON `--crop_val`; a
    (height, width) crop is covered by the smallest resize that fits it); or the image resized to `eval_size` (CIL:
    512x1024) with the label at its own size; or the full image as it is."""

    def __init__(self, crop_size: int | tuple[int, int] = 512, crop_val: bool = True,
                 eval_size: tuple[int, int] | None = None) -> None:
        self.crop_size = _size(crop_size)
        self.crop_val = crop_val
        self.eval_size = eval_size

    def __call__(self, image: Image.Image, label: np.ndarray, rng: np.random.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, w = label.shape
        if image.size != (w, h):
            raise ValueError(f"image size {image.size} != label size {(w, h)}")
        if self.eval_size is not None:
            # Only the image is resized; the label keeps its size, and the prediction is brought to it (nearest)
            # before scoring, as CIL scores Cityscapes at 1024x2048 what its network predicts at 512x1024.
            eh, ew = self.eval_size
            pixels, _ = _decode(image, (ew, eh))
            src = _pixels_tensor(pixels)
            if src.shape[1:] != (eh, ew):
                src = F.interpolate(src[None], size=(eh, ew), mode="bilinear", align_corners=False, antialias=True)[0]
            return src.contiguous(), _tensor(label), full_box(eh, ew)
        if not self.crop_val:
            pixels, _ = _decode(image, (w, h))
            return _pixels_tensor(pixels).contiguous(), _tensor(label), full_box(h, w)
        crop_h, crop_w = self.crop_size
        # torchvision Resize(int) + CenterCrop for a square crop: short side -> crop, then the centred crop window,
        # which is the centred (crop / s)-pixel source window on each axis.
        s = max(crop_h / h, crop_w / w)
        xs, ys = self._centre(w, s, crop_w), self._centre(h, s, crop_h)
        pixels, factor = _decode(image, (math.ceil(w * s), math.ceil(h * s)))
        src, lbl = _resize_pair(pixels, factor, label, xs, ys, (crop_w, crop_h), False)
        return src.contiguous(), _tensor(lbl), full_box(crop_h, crop_w)

    @staticmethod
    def _centre(full: int, s: float, crop: int) -> tuple[int, int]:
        src_len = min(full, max(1, round(crop / s)))
        start = (full - src_len) // 2
        return start, start + src_len


def collate_eval(items: list[dict]) -> dict:
    """torch's default collate, except that labels of different sizes (whole labels beside images resized to
    --eval_size) are padded with 255 to the largest, their own sizes kept as "label_size" (N x 2)."""
    sizes = [tuple(item["label"].shape) for item in items] if items and "label" in items[0] else []
    if len(set(sizes)) <= 1:
        return default_collate(items)
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    labels = torch.full((len(items), height, width), IGNORE, dtype=torch.uint8)
    for label, item in zip(labels, items):
        h, w = item["label"].shape
        label[:h, :w] = item["label"]
    batch = default_collate([{k: v for k, v in item.items() if k != "label"} for item in items])
    batch["label"], batch["label_size"] = labels, torch.tensor(sizes, dtype=torch.int64)
    return batch
