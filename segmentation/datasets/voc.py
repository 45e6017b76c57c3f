"""Pascal VOC 2012 with the SBD augmentation (train_aug = 10582 images, val = 1449), MiB/PLOP/WILSON layout."""
from __future__ import annotations

from pathlib import Path

from .base import DatasetError, SegmentationSource

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

# Split name -> list file names to try, in order, under splits/ and then ImageSets/Segmentation/.
_SPLIT_FILES = {
    "train": ("train_aug.txt",),
    "train_aug": ("train_aug.txt",),
    "val": ("val.txt",),
    "trainval": ("trainval_aug.txt", "trainval.txt"),
}
_LIST_DIRS = ("splits", "ImageSets/Segmentation", "ImageSets/SegmentationAug")
_LABEL_DIRS = ("SegmentationClassAug", "SegmentationClass")

_HOWTO = (
    "Point --data_root at the folder that holds JPEGImages/ and SegmentationClassAug/ (VOCdevkit/VOC2012 with the "
    "SBD-augmented labels, e.g. the SegmentationClassAug.zip used by MiB/PLOP/DeepLab). The split lists go in "
    "<root>/splits/: train_aug.txt (10582 ids, the VOC train + SBD minus VOC val list shipped with MiB/PLOP/WILSON "
    "under data/voc/splits/) and val.txt (1449 ids, VOC2012 ImageSets/Segmentation/val.txt)."
)


def palette() -> list[int]:
    """The standard 256-colour VOC palette (bit-interleaved), flat [r0, g0, b0, r1, ...]."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def read_split_list(path: Path, howto: str = _HOWTO) -> list[str]:
    """Image ids from a list file: plain ids, or MiB-style lines "/JPEGImages/x.jpg /SegmentationClassAug/x.png".
    An id listed twice is refused: it would weigh twice in training and count twice in evaluation."""
    ids: dict[str, int] = {}  # id -> its line number
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        first = line.split()[0]
        image_id = Path(first).stem if ("/" in first or "." in first) else first
        if image_id in ids:
            raise DatasetError(f"split list {path} names image {image_id!r} twice (lines {ids[image_id]} and "
                               f"{number}): it would count twice in training or evaluation. Remove the repeated line.")
        ids[image_id] = number
    if not ids:
        raise DatasetError(f"split list {path} is empty. {howto}")
    return list(ids)


def find_split_list(root: Path, split: str) -> Path:
    names = _SPLIT_FILES.get(split, (f"{split}.txt",))
    tried = [root / d / n for d in _LIST_DIRS for n in names]
    for path in tried:
        if path.is_file():
            return path
    raise DatasetError(f"no split list for split '{split}': tried {', '.join(map(str, tried))}. {_HOWTO}")


class VOCSource(SegmentationSource):
    name = "voc"
    num_classes = 21
    class_names = VOC_CLASSES

    def __init__(self, root: Path, split: str) -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DatasetError(f"{self.name} data root {root} does not exist. {_HOWTO}")
        if not (root / "JPEGImages").is_dir():
            raise DatasetError(f"{root}/JPEGImages/ not found: {root} is not a VOC-layout folder. {_HOWTO}")
        self._label_dir = next((root / d for d in _LABEL_DIRS if (root / d).is_dir()), None)
        if self._label_dir is None:
            raise DatasetError(f"{root}/SegmentationClassAug/ not found. {_HOWTO}")
        super().__init__(root, split, self._split_ids(root, split))

    def _split_ids(self, root: Path, split: str) -> list[str]:
        return read_split_list(find_split_list(root, split))

    def image_path(self, i: int) -> Path:
        return self.root / "JPEGImages" / f"{self.ids[i]}.jpg"

    def label_path(self, i: int) -> Path:
        return self._label_dir / f"{self.ids[i]}.png"
