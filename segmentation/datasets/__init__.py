"""Dataset registry: `build_source(dataset, root, split)` and the incremental wrapper.

Add a dataset by writing a `SegmentationSource` subclass and registering a factory in `SOURCES`
(signature `(root: Path, split: str) -> SegmentationSource`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .ade import ADESource
from .base import DatasetError, SegmentationSource, StepSources
from .cityscapes import CIL_CITY_SETS, CITYSCAPES_CLASSES, CityscapesSource
from .coco import COCOSource, VOCInCocoIds, coco_voc_sources
from .incremental import IncrementalDataset, prepare_index
from .shapes import SHAPES_CLASSES, ShapesSource, ensure_shapes
from .transforms import EvalTransform, TrainTransform
from .voc import VOC_CLASSES, VOCSource


def _shapes(root: Path, split: str) -> SegmentationSource:
    # `root` is the general data root; the generated data lives in <root>/shapes (made on first use).
    # Accept the generated folder itself as root too.
    root = Path(root)
    if (root / "meta.json").is_file() and (root / "JPEGImages").is_dir():
        return ShapesSource(root, split)
    return ShapesSource(ensure_shapes(root), split)


SOURCES: dict[str, Callable[[Path, str], SegmentationSource]] = {
    "voc": VOCSource,
    "shapes": _shapes,
    "ade": ADESource,
    "cityscapes": CityscapesSource,  # all cities; CIL's per-stage city subsets: CityscapesSource(..., cities=...)
    "coco-voc": COCOSource,          # COCO side; WILSON's step >= 1 trains on VOCInCocoIds (STEP_SOURCES)
}
# Datasets whose sources change with the step: (root, step) -> StepSources. The others use SOURCES' train and val
# splits at every step (the val split tests too).
STEP_SOURCES: dict[str, Callable[[Path, int], StepSources]] = {"coco-voc": coco_voc_sources}
DATASETS = list(SOURCES)  # kept in sync by register_source


def register_source(name: str, factory: Callable[[Path, str], SegmentationSource]) -> None:
    SOURCES[name] = factory
    if name not in DATASETS:
        DATASETS.append(name)


def build_source(dataset: str, root: Path, split: str) -> SegmentationSource:
    """split: "train" (VOC: train_aug) or "val"."""
    try:
        factory = SOURCES[dataset]
    except KeyError:
        raise DatasetError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(sorted(SOURCES))}") from None
    return factory(Path(root), split)


def step_sources(dataset: str, root: Path, step: int) -> StepSources:
    if dataset in STEP_SOURCES:
        return STEP_SOURCES[dataset](Path(root), step)
    val = build_source(dataset, root, "val")
    return StepSources(build_source(dataset, root, "train"), val, val)


__all__ = [
    "ADESource", "CIL_CITY_SETS", "CITYSCAPES_CLASSES", "COCOSource", "CityscapesSource", "DATASETS", "SOURCES",
    "DatasetError", "EvalTransform", "IncrementalDataset", "SHAPES_CLASSES", "SegmentationSource", "ShapesSource", "StepSources",
    "TrainTransform", "VOCInCocoIds", "VOCSource", "VOC_CLASSES", "build_source", "ensure_shapes", "prepare_index",
    "register_source", "step_sources",
]
