"""Cityscapes (fine annotations) in the 19 official trainIds, no background class (as CIL).

    <root>/leftImg8bit/{train,val}/<city>/<city>_xxxxxx_yyyyyy_leftImg8bit.png
    <root>/gtFine/{train,val}/<city>/<city>_xxxxxx_yyyyyy_gtFine_labelIds.png

Image ids are "<city>/<city>_xxxxxx_yyyyyy", sorted. `load_label` reads the labelIds PNG (shipped in
gtFine_trainvaltest.zip, no preprocessing needed) and maps it to trainIds with the cityscapesScripts table; every
other id (void, unlabeled, ego vehicle, license plate, ...) becomes 255. tasks/cityscapes.toml lists its classes in
trainId order, so raw class id == trainId.

CIL trains each stage on its own set of train cities (`cities=`): tasks/cityscapes.toml lists them per step.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from .base import DatasetError, SegmentationSource

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)

# cityscapesScripts helpers/labels.py: labelId -> trainId for the 19 evaluated classes.
LABEL_TO_TRAIN = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}


def _train_id_lut() -> np.ndarray:
    lut = np.full(256, 255, np.uint8)
    for label_id, train_id in LABEL_TO_TRAIN.items():
        lut[label_id] = train_id
    return lut


TRAIN_ID_LUT = _train_id_lut()

_IMAGE_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelIds.png"
_SPLITS = ("train", "val")

_HOWTO = (
    "Download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from https://www.cityscapes-dataset.com "
    "(login required) and extract both into one folder, so that <data_root>/leftImg8bit/{train,val}/<city>/ and "
    "<data_root>/gtFine/{train,val}/<city>/ exist; point --data_root at that folder."
)


def find_cityscapes_root(root: Path) -> Path:
    """root itself when it holds leftImg8bit/, else <root>/cityscapes."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"cityscapes data root {root} does not exist. {_HOWTO}")
    for candidate in (root, root / "cityscapes"):
        if (candidate / "leftImg8bit").is_dir():
            return candidate
    raise DatasetError(f"{root / 'leftImg8bit'} not found: {root} is not a Cityscapes folder. {_HOWTO}")


class CityscapesSource(SegmentationSource):
    name = "cityscapes"
    num_classes = 19
    class_names = CITYSCAPES_CLASSES

    def __init__(self, root: Path, split: str, cities: Iterable[str] | None = None) -> None:
        if split not in _SPLITS:
            raise DatasetError(f"cityscapes has splits {', '.join(_SPLITS)}, not {split!r}")
        base = find_cityscapes_root(root)
        self._image_dir = base / "leftImg8bit" / split
        self._label_dir = base / "gtFine" / split
        for folder in (self._image_dir, self._label_dir):
            if not folder.is_dir():
                raise DatasetError(f"{folder} not found (incomplete extraction?). {_HOWTO}")
        self.cities = self._select_cities(cities)
        super().__init__(base, split, self._list_ids())
        if cities is not None:
            # The split list (hence the index cache key) already differs per city subset; the name keeps cache
            # files of different subsets apart for a human reading the cache folder too.
            self.name = f"cityscapes-{'+'.join(self.cities)}" if len(self.cities) <= 3 else \
                f"cityscapes-{len(self.cities)}cities"

    def _select_cities(self, cities: Iterable[str] | None) -> tuple[str, ...]:
        available = sorted(p.name for p in self._image_dir.iterdir() if p.is_dir())
        if cities is None:
            return tuple(available)
        wanted = tuple(sorted(set(cities)))
        unknown = [c for c in wanted if c not in available]
        if unknown:
            raise DatasetError(f"cities {unknown} not found in {self._image_dir}; available: {', '.join(available)}")
        return wanted

    def _list_ids(self) -> list[str]:
        ids = []
        for city in self.cities:
            for path in sorted((self._image_dir / city).glob(f"*{_IMAGE_SUFFIX}")):
                ids.append(f"{city}/{path.name[:-len(_IMAGE_SUFFIX)]}")
        if not ids:
            raise DatasetError(f"no *{_IMAGE_SUFFIX} images under {self._image_dir}. {_HOWTO}")
        missing = [i for i in ids if not (self._label_dir / f"{i}{_LABEL_SUFFIX}").is_file()]
        if missing:
            raise DatasetError(f"{len(missing)} images have no {_LABEL_SUFFIX} under {self._label_dir} "
                               f"(first: {', '.join(missing[:3])}). {_HOWTO}")
        return ids

    def image_path(self, i: int) -> Path:
        return self._image_dir / f"{self.ids[i]}{_IMAGE_SUFFIX}"

    def label_path(self, i: int) -> Path:
        return self._label_dir / f"{self.ids[i]}{_LABEL_SUFFIX}"

    def load_label(self, i: int) -> np.ndarray:
        """HxW uint8 trainIds (0..18), 255 = void."""
        return np.take(TRAIN_ID_LUT, super().load_label(i))
