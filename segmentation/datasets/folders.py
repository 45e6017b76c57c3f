"""Your own dataset, from its `tasks/<name>.toml` alone: no Python.

The file's `[layout]` table says how the data sits under --data_root:

    [layout]
    kind = "folders"                  # images and masks matched by file name
    images = "images/{split}"         # default; {split} is train or val
    masks = "masks/{split}"           # default; a mask is <stem>.png beside nothing else: same stem as its image
    image_suffixes = [".jpg", ".jpeg", ".png"]

    [layout]
    kind = "voc"                      # Pascal VOC's folders: JPEGImages/<id>.jpg, SegmentationClass/<id>.png
    train_list = "train.txt"          # default; ids, one per line, under splits/ or ImageSets/Segmentation/
    val_list = "val.txt"

Masks are single-channel PNGs (gray or palette) whose values are the raw class ids of `classes` (0 is background
when `has_background = true`) and 255 for pixels to ignore; any other value stops the run, naming the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import DatasetError, SegmentationSource
from .voc import VOCSource, read_split_list

FOLDER_KEYS = {"kind", "images", "masks", "image_suffixes", "mask_suffix"}
VOC_KEYS = {"kind", "train_list", "val_list"}
SPLITS = ("train", "val")


def check_layout(where: str, layout: dict[str, Any]) -> None:
    """Raise ValueError naming the bad key (tasks.py turns it into a TaskError naming the file)."""
    kind = layout.get("kind")
    keys = {"folders": FOLDER_KEYS, "voc": VOC_KEYS}.get(kind)
    if keys is None:
        raise ValueError(f"{where}: [layout] kind must be \"folders\" or \"voc\", not {kind!r}")
    unknown = sorted(set(layout) - keys)
    if unknown:
        raise ValueError(f"{where}: [layout] keys {unknown} are not known for kind {kind!r} (known: "
                         f"{', '.join(sorted(keys))})")


class FolderSource(SegmentationSource):
    """Images and masks matched by file stem, one folder pair per split."""

    def __init__(self, root: Path, split: str, *, name: str, num_classes: int, images: str = "images/{split}",
                 masks: str = "masks/{split}", image_suffixes: tuple[str, ...] = (".jpg", ".jpeg", ".png"),
                 mask_suffix: str = ".png") -> None:
        if split not in SPLITS:
            raise DatasetError(f"{name}: splits are {', '.join(SPLITS)}, not {split!r}")
        self.name, self.num_classes = name, num_classes
        root = Path(root).expanduser()
        self._image_dir = root / images.format(split=split)
        self._mask_dir = root / masks.format(split=split)
        self._mask_suffix = mask_suffix
        howto = (f"tasks/{name}.toml's [layout] says images are in <data_root>/{images} and masks in "
                 f"<data_root>/{masks} ({{split}} = train, val); --data_root is {root}")
        for folder in (self._image_dir, self._mask_dir):
            if not folder.is_dir():
                raise DatasetError(f"{folder} not found: {howto}")
        suffixes = {s.lower() for s in image_suffixes}
        self._images = {p.stem: p for p in sorted(self._image_dir.iterdir()) if p.suffix.lower() in suffixes}
        if not self._images:
            raise DatasetError(f"no {'/'.join(sorted(suffixes))} images in {self._image_dir}: {howto}")
        missing = [stem for stem in self._images if not (self._mask_dir / f"{stem}{mask_suffix}").is_file()]
        if missing:
            raise DatasetError(f"{len(missing)} of {len(self._images)} images in {self._image_dir} have no mask "
                               f"{self._mask_dir}/<same name>{mask_suffix} (first: {missing[0]}): masks are "
                               f"matched to images by file name")
        super().__init__(root, split, sorted(self._images))

    def image_path(self, i: int) -> Path:
        return self._images[self.ids[i]]

    def label_path(self, i: int) -> Path:
        return self._mask_dir / f"{self.ids[i]}{self._mask_suffix}"


class VOCLayoutSource(VOCSource):
    """Pascal VOC's folders and id lists, with the dataset's own classes."""

    def __init__(self, root: Path, split: str, *, name: str, num_classes: int, train_list: str = "train.txt",
                 val_list: str = "val.txt") -> None:
        self.name, self.num_classes = name, num_classes
        self._list_name = {"train": train_list, "val": val_list}.get(split)
        if self._list_name is None:
            raise DatasetError(f"{name}: splits are {', '.join(SPLITS)}, not {split!r}")
        super().__init__(root, split)

    def _split_ids(self, root: Path, split: str) -> list[str]:
        tried = [root / d / self._list_name for d in ("splits", "ImageSets/Segmentation")]
        for path in tried:
            if path.is_file():
                return read_split_list(path, f"List the {split} image ids, one per line (tasks/{self.name}.toml's "
                                             f"[layout] {split}_list).")
        raise DatasetError(f"no {split} list: tried {', '.join(map(str, tried))} (tasks/{self.name}.toml's "
                           f"[layout] {split}_list)")


def layout_source(name: str, num_classes: int, layout: dict[str, Any], root: Path, split: str) -> SegmentationSource:
    options = {k: (tuple(v) if isinstance(v, list) else v) for k, v in layout.items() if k != "kind"}
    cls = FolderSource if layout["kind"] == "folders" else VOCLayoutSource
    return cls(root, split, name=name, num_classes=num_classes, **options)
