"""The raw-dataset interface every dataset implements.

A *source* is one split of one dataset, read in the dataset's own class ids. Everything incremental (filtering,
remapping into learning order, image-level labels) lives in `incremental.py` and works on any source.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


class DatasetError(ValueError):
    """Bad or missing data on disk; the message names the file and says how to fix it."""


class SegmentationSource:
    """One split of a segmentation dataset: image i and its label, raw class ids, 255 = ignore."""

    name: str = ""
    num_classes: int = 0  # dataset classes including background (where the dataset has one)
    # Random rescaling range of the training augmentation: the anchors' 0.5-2 for natural images.
    train_scale: tuple[float, float] = (0.5, 2.0)

    def __init__(self, root: Path, split: str, ids: list[str]) -> None:
        self.root = Path(root)
        self.split = split
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, i: int) -> Path:
        raise NotImplementedError

    def label_path(self, i: int) -> Path:
        raise NotImplementedError

    def ids_key(self) -> str:
        """Short hash of the split list: cached per-image data is only valid for this exact list and order."""
        return hashlib.sha1("\n".join(self.ids).encode()).hexdigest()[:10]

    def open_image(self, i: int) -> Image.Image:
        """The image opened lazily (header only), so a transform can ask JPEG for a reduced-size decode (draft)."""
        path = self.image_path(i)
        try:
            return Image.open(path)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"cannot read image {path}: {exc}. Re-extract or re-download this file.") from exc

    def load_image(self, i: int) -> Image.Image:
        path = self.image_path(i)
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, ValueError) as exc:
            raise DatasetError(f"cannot read image {path}: {exc}. Re-extract or re-download this file.") from exc

    def load_label(self, i: int) -> np.ndarray:
        """HxW uint8 array in raw dataset class ids (255 = ignore)."""
        path = self.label_path(i)
        try:
            with Image.open(path) as img:
                if img.mode not in ("P", "L"):
                    # An RGB colour-coded mask would silently turn into garbage class ids.
                    raise DatasetError(
                        f"label {path} has mode {img.mode}; expected a palette ('P') or gray ('L') PNG of class ids")
                # mode "P" palette PNGs keep their indices with np.asarray; never convert("L") them.
                return np.asarray(img, dtype=np.uint8)
        except (OSError, ValueError) as exc:
            if isinstance(exc, DatasetError):
                raise
            raise DatasetError(f"cannot read label {path}: {exc}. Re-extract or re-download this file.") from exc


@dataclass(frozen=True)
class StepSources:
    """The sources of one step: training, the step's validation, the test set every result is reported on, and
    further named test sets (COCO-to-VOC's VOC val in COCO ids, the paper's last column)."""

    train: SegmentationSource
    val: SegmentationSource
    test: SegmentationSource
    extra_tests: dict[str, SegmentationSource] = field(default_factory=dict)
