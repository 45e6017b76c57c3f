"""ADE20K SceneParsing (ADEChallengeData2016): 150 classes plus 0 = "other", MiB/PLOP layout.

    <root>/ADEChallengeData2016/images/{training,validation}/ADE_{train,val}_XXXXXXXX.jpg
    <root>/ADEChallengeData2016/annotations/{training,validation}/ADE_{train,val}_XXXXXXXX.png   (gray, ids 0..150)

`root` may also be the ADEChallengeData2016 folder itself. The split list is the sorted file listing (MiB sorts
`os.listdir`), so index i means the same image as in MiB's cached `data/ade/<task>/train-<step>.npy`. Label values
pass through unchanged: 0 is "other" (unlabelled), which the tasks treat as background (as MiB, PLOP and SSUL do).
"""
from __future__ import annotations

from pathlib import Path

from .base import DatasetError, SegmentationSource

ADE_FOLDER = "ADEChallengeData2016"
_SPLIT_DIRS = {"train": "training", "val": "validation"}

_HOWTO = (
    "Download ADEChallengeData2016.zip (http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip, "
    "the MIT SceneParsing benchmark) and extract it so that <data_root>/ADEChallengeData2016/images/ and "
    "<data_root>/ADEChallengeData2016/annotations/ exist; point --data_root at the folder holding "
    "ADEChallengeData2016/ (or at ADEChallengeData2016/ itself)."
)


def find_ade_root(root: Path) -> Path:
    """The ADEChallengeData2016 folder: <root>/ADEChallengeData2016, or root itself when it has images/."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"ade data root {root} does not exist. {_HOWTO}")
    for candidate in (root / ADE_FOLDER, root):
        if (candidate / "images").is_dir():
            return candidate
    raise DatasetError(f"{root / ADE_FOLDER / 'images'} not found: {root} holds no ADEChallengeData2016 tree. "
                       f"{_HOWTO}")


class ADESource(SegmentationSource):
    name = "ade"
    num_classes = 151

    def __init__(self, root: Path, split: str) -> None:
        if split not in _SPLIT_DIRS:
            raise DatasetError(f"ade has splits {', '.join(_SPLIT_DIRS)}, not {split!r}")
        ade = find_ade_root(root)
        self._image_dir = ade / "images" / _SPLIT_DIRS[split]
        self._label_dir = ade / "annotations" / _SPLIT_DIRS[split]
        for folder in (self._image_dir, self._label_dir):
            if not folder.is_dir():
                raise DatasetError(f"{folder} not found (incomplete extraction?). {_HOWTO}")
        super().__init__(ade, split, self._list_ids())

    def _list_ids(self) -> list[str]:
        ids = sorted(p.stem for p in self._image_dir.glob("*.jpg"))
        if not ids:
            raise DatasetError(f"no .jpg images in {self._image_dir}. {_HOWTO}")
        labels = {p.stem for p in self._label_dir.glob("*.png")}
        missing = [i for i in ids if i not in labels]
        if missing:
            # Fail now with the list rather than at some random batch hours into training.
            raise DatasetError(f"{len(missing)} images of {self._image_dir} have no annotation in {self._label_dir} "
                               f"(first: {', '.join(missing[:3])}). {_HOWTO}")
        return ids

    def image_path(self, i: int) -> Path:
        return self._image_dir / f"{self.ids[i]}.jpg"

    def label_path(self, i: int) -> Path:
        return self._label_dir / f"{self.ids[i]}.png"
