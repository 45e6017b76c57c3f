"""Image-level labels written by hand: which classes each image holds, for weakly supervised steps (--image_labels).

Two formats, chosen by the file's suffix:
  CSV   one image per line: `image_id,class,class,...` (a header line `image,labels` or `image_id,...` is skipped;
        classes may also be separated by ';' or '|' inside one field)
  JSON  {"image_id": ["class", ...], ...}
Class names are the dataset's (tasks/<dataset>.toml), matched case-insensitively; an image id is the name the split
list uses (for VOC `2007_000032`). Background needs no tag. With such a file a weak step reads no mask at all.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np

from .base import DatasetError, SegmentationSource


def read_image_labels(path: Path, class_names: tuple[str, ...] | list[str]) -> dict[str, set[int]]:
    """image id -> raw class ids. DatasetError names the file, the line and the unknown class or bad entry."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"--image_labels {path}: no such file (CSV `image_id,class,...` or JSON "
                           f"{{\"image_id\": [\"class\", ...]}})")
    lookup = {name.lower(): c for c, name in enumerate(class_names)}

    def ids_of(names: list[str], where: str) -> set[int]:
        unknown = [n for n in names if n.lower() not in lookup]
        if unknown:
            raise DatasetError(f"{where}: unknown class {', '.join(map(repr, unknown))}; the dataset's classes are "
                               f"{', '.join(class_names)}")
        return {lookup[n.lower()] for n in names}

    def unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
        seen: dict[str, object] = {}
        for key, value in pairs:
            if key in seen:
                raise DatasetError(f"--image_labels {path} names image {key!r} twice; give each image one entry")
            seen[key] = value
        return seen

    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(), object_pairs_hook=unique_keys)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"--image_labels {path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise DatasetError(f"--image_labels {path}: expected an object {{\"image_id\": [\"class\", ...]}}")
        return {str(k): ids_of([str(n) for n in v], f"{path} ({k})") for k, v in data.items()}
    labels: dict[str, set[int]] = {}
    lines: dict[str, int] = {}
    with path.open(newline="") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            fields = [x.strip() for field in row for x in re.split(r"[;|]", field) if x.strip()]
            if not fields or (line_no == 1 and fields[0].lower() in ("image", "image_id", "id")):
                continue
            if fields[0] in lines:  # two lines for one image: which one holds its classes?
                raise DatasetError(f"--image_labels {path} names image {fields[0]!r} twice (lines "
                                   f"{lines[fields[0]]} and {line_no}); give each image one line")
            lines[fields[0]] = line_no
            labels[fields[0]] = ids_of(fields[1:], f"{path}:{line_no}")
    return labels


def tag_matrix(source: SegmentationSource, labels: dict[str, set[int]], path: Path) -> np.ndarray:
    """bool [len(source), 256] like incremental.class_matrix, from the file instead of the masks (background
    counted present in every image, as a mask would have it)."""
    missing = [i for i in source.ids if i not in labels]
    if missing:
        raise DatasetError(f"--image_labels {path} has no entry for {len(missing)} image(s) of the {source.split} "
                           f"split, e.g. {', '.join(missing[:3])}; add a line for each (an image with no class of "
                           f"interest gets a line with its id alone)")
    present = np.zeros((len(source), 256), bool)
    present[:, 0] = True
    for row, image_id in enumerate(source.ids):
        present[row, sorted(labels[image_id])] = True
    return present
