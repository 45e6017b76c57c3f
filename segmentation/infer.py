"""`run.py --infer IMAGE_OR_FOLDER ... --ckpt ARTIFACT`: predictions for images, as CIL's inference.py.

For every image it writes `<stem>_pred.png` (the predicted classes in the dataset's colours: Cityscapes' for
cityscapes and city-shapes, VOC's otherwise) and `<stem>_overlay.png` (the prediction blended over the image) into
--infer_out. With --gt (one mask per image, or a folder of masks named like the images) it prints each image's mIoU
over the classes present in its mask, and their mean. Masks are read as the dataset's own labels (Cityscapes
`*_gtFine_labelIds.png` are mapped to trainIds). The model runs on the image resized to the artifact's --eval_size
when it has one (its prediction brought to the image's size, nearest, as the evaluation does), else on the whole
image; the prediction has the image's size.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from segmentation.config import Config, ConfigError
from segmentation.datasets.cityscapes import TRAIN_ID_LUT
from segmentation.datasets.incremental import build_lut
from segmentation.datasets.transforms import normalize_batch
from segmentation.engine.metrics import ConfusionMatrix, resize_prediction
from segmentation.utils.visualize import voc_palette

log = logging.getLogger("segmentation")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Cityscapes' colours of its 19 trainIds (cityscapesScripts labels.py), for the datasets that use them.
CITYSCAPES_COLOURS = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]


def dataset_palette(dataset: str) -> np.ndarray:
    """256 x 3 colours of raw class ids (255, "nothing", white)."""
    palette = voc_palette()
    if dataset in ("cityscapes", "city-shapes"):
        palette[:len(CITYSCAPES_COLOURS)] = CITYSCAPES_COLOURS
        palette[len(CITYSCAPES_COLOURS):255] = 0
    return palette


def list_images(paths: list[Path]) -> list[Path]:
    images: list[Path] = []
    for path in paths:
        if path.is_dir():
            images += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            images.append(path)
        else:
            raise ConfigError(f"--infer {path}: no such file or folder")
    if not images:
        raise ConfigError(f"--infer {' '.join(map(str, paths))}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return images


def match_masks(images: list[Path], gt: list[Path] | None) -> list[Path | None]:
    """One mask per image: the --gt files in order, or from --gt folders the file whose name starts with the
    image's stem (Cityscapes: `x_leftImg8bit.png` -> `x_gtFine_labelIds.png`)."""
    if not gt:
        return [None] * len(images)
    if all(p.is_file() for p in gt):
        if len(gt) != len(images):
            raise ConfigError(f"--gt gives {len(gt)} masks for {len(images)} images; give one per image, or a folder")
        return list(gt)
    masks = {}
    for folder in gt:
        if not folder.is_dir():
            raise ConfigError(f"--gt {folder}: no such file or folder")
        for p in folder.rglob("*.png"):
            masks[p.name] = p
    found: list[Path | None] = []
    for image in images:
        stem = image.stem.removesuffix("_leftImg8bit")
        candidates = [p for name, p in masks.items() if name.startswith(stem) and
                      (name == f"{stem}.png" or "labelIds" in name)]
        if not candidates:
            raise ConfigError(f"--gt: no mask for {image.name} (looked for {stem}.png or {stem}*labelIds.png)")
        found.append(candidates[0])
    return found


def read_mask(path: Path, dataset: str) -> np.ndarray:
    """Raw dataset ids of a mask file; Cityscapes labelIds become trainIds (the ids its task files use)."""
    with Image.open(path) as img:
        if img.mode not in ("P", "L"):
            raise ConfigError(f"--gt {path} has mode {img.mode}: expected a palette or gray PNG of class ids")
        mask = np.asarray(img, dtype=np.uint8)
    if dataset in ("cityscapes", "city-shapes") and "labelIds" in path.name:
        mask = np.take(TRAIN_ID_LUT, mask)
    return mask


@torch.no_grad()
def predict(model: torch.nn.Module, image: Image.Image, cfg: Config, device: torch.device,
            rule: Callable[[torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
    """Learning-order class ids, H x W at the image's size; `rule`: the trained method's (default: the argmax)."""
    rule = rule or (lambda scores: scores.argmax(1))
    rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    pixels = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None]
    if cfg.eval_size is not None:
        pixels = F.interpolate(pixels.float(), size=cfg.eval_size, mode="bilinear", align_corners=False,
                               antialias=True).round().clamp(0, 255).to(torch.uint8)
    box = torch.tensor([[0, pixels.shape[2], 0, pixels.shape[3]]], dtype=torch.int32)
    x = normalize_batch(pixels.to(device), box)
    logits = model(x, features=())[0]
    if cfg.eval_size is not None:  # as the evaluation scores it: the prediction at eval size, resized (nearest)
        return resize_prediction(rule(logits), (h, w))[0].cpu().numpy().astype(np.uint8)
    if logits.shape[-2:] != (h, w):
        logits = F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)
    return rule(logits)[0].cpu().numpy().astype(np.uint8)


def run_inference(cfg: Config, device: torch.device) -> None:
    from segmentation.step.finish import load_artifact_model

    if cfg.ckpt is None:
        raise ConfigError("--infer needs --ckpt PATH (the step artifact to predict with)")
    model, art_cfg, task, rule = load_artifact_model(cfg, cfg.ckpt, device)
    seen = np.array(task.seen_classes(art_cfg.step), np.uint8)  # learning order -> raw dataset ids
    lut = build_lut(task, art_cfg.step, "test", task.num_classes, art_cfg.test_future, art_cfg.ignore_test_bg)
    palette = dataset_palette(art_cfg.dataset)
    images = list_images(cfg.infer)
    masks = match_masks(images, cfg.gt)
    out = cfg.infer_out
    out.mkdir(parents=True, exist_ok=True)
    scores = []
    skipped = 0
    for image_path, mask_path in zip(images, masks):
        try:
            with Image.open(image_path) as opened:
                image = opened.convert("RGB")  # decodes now: a damaged file fails here, not in the model
        except (OSError, ValueError) as exc:  # not an image, truncated, ...: the others are still predicted
            log.warning("--infer: skipping %s, which is not a readable image (%s)", image_path, exc)
            skipped += 1
            continue
        pred = predict(model, image, art_cfg, device, rule)
        rgb = np.asarray(image)
        colours = palette[seen[pred]]
        Image.fromarray(colours).save(out / f"{image_path.stem}_pred.png")
        Image.fromarray((0.5 * rgb + 0.5 * colours).astype(np.uint8)).save(out / f"{image_path.stem}_overlay.png")
        line = f"{image_path}: {out / (image_path.stem + '_pred.png')}"
        if mask_path is not None:
            target = np.take(lut, read_mask(mask_path, art_cfg.dataset))
            if target.shape != pred.shape:
                raise ConfigError(f"--gt {mask_path} is {target.shape[1]}x{target.shape[0]} but {image_path} is "
                                  f"{pred.shape[1]}x{pred.shape[0]}")
            matrix = ConfusionMatrix(len(seen))
            matrix.update(torch.from_numpy(pred), torch.from_numpy(target))
            names = task.seen_class_names(art_cfg.step)
            miou = matrix.compute(names, len(seen), has_background=task.has_background)["miou_all"]
            scores.append(miou)
            line += f", mIoU {'-' if miou is None else f'{100 * miou:.2f}'} % ({mask_path.name})"
        print(line, flush=True)
    if skipped == len(images):
        raise ConfigError(f"--infer: none of the {len(images)} files is a readable image (see the warnings above)")
    present = [s for s in scores if s is not None]
    if present:
        print(f"mean mIoU over {len(present)} images: {100 * float(np.mean(present)):.2f} %")
