"""COCO(-stuff) things for WILSON's COCO-to-VOC task ("coco-voc"), in WILSON's layout.

    <root>/images/{train2017,val2017}/<id>.jpg
    <root>/annotations/{train2017,val2017}/<id>.png       gray PNG: 0 = background, 1..90 = COCO thing ids, 255 = void
    <root>/split/{train,val}.txt                          optional id lists (WILSON ships them); else sorted listing

`root` may also be the folder holding coco/ (WILSON's --data_root). The label PNGs are NOT the raw COCO-stuff
`stuffthingmaps_trainval2017` (0-based: person = 0, 255 = unlabeled): WILSON's data/coco/make_annotation.py shifts
them by +1 and sends every stuff class to 0, which gives the values above. Raw 0-based maps would be silently off by
one class, so convert them first. `load_label` maps the ids no annotation uses (tasks/coco-voc.toml `ignore`) and
every value 91..254 (91 = "hair brush" after the shift) to 255, as WILSON's ignore_labels do.

What WILSON's coco-voc uses per step (dataset/__init__.py get_dataset):
  step 0: train and val on COCO (train2017 / val2017), test on COCO val2017.
  step 1: train and val on Pascal VOC (train_aug / val) with labels rewritten into COCO ids
          (data/make_cocovoc.py -> SegmentationClassAugAsCoco), test still on COCO val2017.
`VOCInCocoIds` is that VOC source: the VOC layout, labels mapped on the fly with VOC_TO_COCO (0 and 255 kept), read
from <data_root>/voc beside <data_root>/coco (WILSON's data/ folder); `coco_voc_sources` says which source serves
which role at each step, and adds the step's test on VOC val in COCO ids (the paper's "VOC 61-80" column).
Note: WILSON's dataset/voc.py has a `coco_map = [1, 2, 3, 4, 5, 6, 7, 9, 16, ...]`; that list is only the
SORTED set of COCO ids of the VOC classes (it is not indexed by VOC id: VOC 1 is aeroplane, COCO 1 is person).
The mapping WILSON actually applies to the labels is the dict in data/make_cocovoc.py, copied as VOC_TO_COCO.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from .base import DatasetError, SegmentationSource, StepSources
from .voc import VOCSource, read_split_list

NUM_COCO_CLASSES = 91  # 0 = background, 1..90 = COCO category ids (with gaps)
# tasks/coco-voc.toml `ignore` (WILSON dataset/coco.py ignore_labels minus 91, which is >= NUM_COCO_CLASSES anyway).
COCO_IGNORE_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)

# WILSON data/make_cocovoc.py: VOC class id -> COCO category id.
VOC_TO_COCO = {
    0: 0, 1: 5, 2: 2, 3: 16, 4: 9, 5: 44, 6: 6, 7: 3, 8: 17, 9: 62, 10: 21,
    11: 67, 12: 18, 13: 19, 14: 4, 15: 1, 16: 64, 17: 20, 18: 63, 19: 7, 20: 72, 255: 255,
}

_SPLITS = {"train": "train2017", "val": "val2017"}
# annotations_my first: in WILSON's own data/coco folder, make_annotation.py writes the converted labels there and
# annotations/ holds the raw 0-based COCO-stuff maps, which would read one class off, silently.
# data/prepare_coco.py writes the converted labels to annotations/ and nothing to annotations_my/.
_LABEL_DIRS = ("annotations_my", "annotations")

_HOWTO = (
    "Expected WILSON's COCO layout: <data_root>/images/{train2017,val2017}/*.jpg (COCO 2017 images) and "
    "<data_root>/annotations/{train2017,val2017}/*.png made from COCO-stuff stuffthingmaps_trainval2017.zip by "
    "WILSON's data/coco/make_annotation.py (0 = background, 1..90 = COCO ids, 255 = void); optional "
    "<data_root>/split/{train,val}.txt id lists (WILSON's data/coco/split/). --data_root may also be the folder "
    "that holds coco/."
)


def coco_label_lut(ignore_ids: Iterable[int] = COCO_IGNORE_IDS) -> np.ndarray:
    """uint8[256]: identity on 0..90, 255 on the unused ids and on 91..255."""
    lut = np.full(256, 255, np.uint8)
    lut[:NUM_COCO_CLASSES] = np.arange(NUM_COCO_CLASSES, dtype=np.uint8)
    lut[list(ignore_ids)] = 255
    return lut


def voc_to_coco_lut() -> np.ndarray:
    """uint8[256]: VOC id -> COCO id; values that are not VOC ids become 255."""
    lut = np.full(256, 255, np.uint8)
    for voc_id, coco_id in VOC_TO_COCO.items():
        lut[voc_id] = coco_id
    return lut


def find_coco_root(root: Path) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"coco data root {root} does not exist. {_HOWTO}")
    for candidate in (root, root / "coco"):
        if (candidate / "images").is_dir():
            return candidate
    raise DatasetError(f"{root / 'images'} not found: {root} is not a WILSON COCO folder. {_HOWTO}")


class COCOSource(SegmentationSource):
    name = "coco-voc"
    num_classes = NUM_COCO_CLASSES

    def __init__(self, root: Path, split: str, ignore_ids: Iterable[int] = COCO_IGNORE_IDS) -> None:
        if split not in _SPLITS:
            raise DatasetError(f"coco has splits {', '.join(_SPLITS)}, not {split!r}")
        base = find_coco_root(root)
        folder = _SPLITS[split]
        self._image_dir = base / "images" / folder
        if not self._image_dir.is_dir():
            raise DatasetError(f"{self._image_dir} not found. {_HOWTO}")
        label_dir = next((base / d / folder for d in _LABEL_DIRS if (base / d / folder).is_dir()), None)
        if label_dir is None:
            raise DatasetError(f"{base / 'annotations' / folder} not found. {_HOWTO}")
        self._label_dir = label_dir
        self.lut = coco_label_lut(ignore_ids)
        split_file = base / "split" / f"{split}.txt"
        ids = read_split_list(split_file, _HOWTO) if split_file.is_file() else self._list_ids()
        super().__init__(base, split, ids)

    def _list_ids(self) -> list[str]:
        ids = sorted(p.stem for p in self._image_dir.glob("*.jpg"))
        if not ids:
            raise DatasetError(f"no .jpg images in {self._image_dir}. {_HOWTO}")
        return ids

    def image_path(self, i: int) -> Path:
        return self._image_dir / f"{self.ids[i]}.jpg"

    def label_path(self, i: int) -> Path:
        return self._label_dir / f"{self.ids[i]}.png"

    def load_label(self, i: int) -> np.ndarray:
        """HxW uint8 COCO ids (0 = background), unused ids and void = 255."""
        return np.take(self.lut, super().load_label(i))


class VOCInCocoIds(VOCSource):
    """Pascal VOC (train_aug / val, VOC layout) with labels in COCO ids: WILSON coco-voc step >= 1 train/val data."""

    name = "voc-in-coco"  # own cache files: same ids as "voc" but other label values
    num_classes = NUM_COCO_CLASSES

    def __init__(self, root: Path, split: str) -> None:
        super().__init__(root, split)
        self.lut = voc_to_coco_lut()

    def load_label(self, i: int) -> np.ndarray:
        raw = super().load_label(i)
        bad = np.flatnonzero(np.bincount(raw.ravel(), minlength=256)[21:255]) + 21
        if bad.size:
            # Mapping them to 255 would hide a broken (e.g. colour-coded) VOC mask.
            raise DatasetError(f"VOC label {self.label_path(i)} has values {bad.tolist()} outside 0..20 and 255")
        return np.take(self.lut, raw)


def find_voc_beside_coco(root: Path) -> Path:
    """COCO-to-VOC steps >= 1 read Pascal VOC from <data_root>/voc (WILSON's data/{coco,voc}); when --data_root is
    the COCO folder itself, from the folder beside it."""
    root = Path(root).expanduser()
    candidates = [root / "voc"]
    if (root / "images").is_dir():  # --data_root is the coco folder
        candidates.append(root.parent / "voc")
    for candidate in candidates:
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise DatasetError(
        f"COCO-to-VOC step >= 1 trains on Pascal VOC with its labels read as COCO ids, and found no VOC folder: "
        f"tried {', '.join(map(str, candidates))}. Put the VOC layout (JPEGImages/, SegmentationClassAug/, "
        f"splits/train_aug.txt and val.txt) in <data_root>/voc beside <data_root>/coco, as WILSON's data/ folder.")


def coco_voc_sources(root: Path, step: int) -> StepSources:
    """WILSON's COCO-to-VOC: step 0 trains and validates on COCO; step 1 on VOC in COCO ids. Every step is tested
    on COCO val (all classes seen); steps >= 1 also on VOC val in COCO ids."""
    coco_val = COCOSource(root, "val")
    if step == 0:
        return StepSources(COCOSource(root, "train"), coco_val, coco_val)
    voc = find_voc_beside_coco(root)
    voc_val = VOCInCocoIds(voc, "val")
    return StepSources(VOCInCocoIds(voc, "train"), voc_val, coco_val, {"voc": voc_val})
