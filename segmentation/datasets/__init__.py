"""Dataset registry: `build_source(dataset, root, split)` and the incremental wrapper.

Add a dataset by writing a `SegmentationSource` subclass and registering a factory in `SOURCES`
(signature `(root: Path, split: str) -> SegmentationSource`), or, with no Python, by a `[layout]` table in its
`tasks/<name>.toml` (folders.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .ade import ADESource
from .base import DatasetError, SegmentationSource, StepSources
from .city_scenes import ensure_city_shapes
from .cityscapes import CITYSCAPES_CLASSES, CityscapesSource
from .coco import COCOSource, VOCInCocoIds, coco_voc_sources
from .folders import layout_source
from .generated import check_files
from .incremental import IncrementalDataset, TaskLike, prepare_index
from .shapes import SHAPES_CLASSES, ShapesHueSource, ShapesSource, ensure_shapes, ensure_shapes_hue
from .transforms import EvalTransform, TrainTransform
from .voc import VOC_CLASSES, VOCSource


def _city_shapes(root: Path, split: str, cities: tuple[str, ...] | None = None) -> SegmentationSource:
    # Like shapes: generated into <root>/city-shapes on first use; the generated folder itself is accepted too.
    root = Path(root)
    if (root / "meta.json").is_file() and (root / "leftImg8bit").is_dir():
        check_files(root)
        return CityscapesSource(root, split, cities=cities)
    return CityscapesSource(ensure_city_shapes(root), split, cities=cities)


def _generated_shapes(source: type[ShapesSource], ensure: Callable[[Path], Path]) -> Callable[[Path, str],
                                                                                       SegmentationSource]:
    """A factory for a generated shapes set: `root` is the general data root and the data lives in
    <root>/<its folder> (made on first use by `ensure`); the generated folder itself is accepted as root too."""
    def factory(root: Path, split: str) -> SegmentationSource:
        root = Path(root)
        if (root / "meta.json").is_file() and (root / "JPEGImages").is_dir():
            check_files(root)
            return source(root, split)
        return source(ensure(root), split)
    return factory


SOURCES: dict[str, Callable[[Path, str], SegmentationSource]] = {
    "voc": VOCSource,
    # (the generators are looked up when called, so that tests can make them small)
    "shapes": _generated_shapes(ShapesSource, lambda root: ensure_shapes(root)),
    # shapes whose hue tells the class: `make benchmark`'s data
    "shapes-hue": _generated_shapes(ShapesHueSource, lambda root: ensure_shapes_hue(root)),
    "ade": ADESource,
    "cityscapes": CityscapesSource,  # all cities, or a task's per-step `cities` (CIL's stages)
    "city-shapes": _city_shapes,     # built-in street scenes in the Cityscapes layout (CIL on a CPU)
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


def build_source(dataset: str, root: Path, split: str, **options: object) -> SegmentationSource:
    """split: "train" (VOC: train_aug) or "val". `options`: a loader's own, e.g. cities=... for Cityscapes."""
    factory = SOURCES.get(dataset) or _layout_factory(dataset)
    if factory is None:
        raise DatasetError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(sorted(SOURCES))}, or one "
                           f"whose tasks/{dataset}.toml has a [layout] table (README 'Your own dataset')")
    try:
        return factory(Path(root), split, **options)
    except TypeError as exc:
        if not options:
            raise
        raise DatasetError(f"the {dataset} loader takes no {', '.join(options)} (tasks/{dataset}.toml gives them): "
                           f"{exc}") from exc


def _layout_factory(dataset: str) -> Callable[..., SegmentationSource] | None:
    """A dataset described by its tasks file alone (segmentation/datasets/folders.py)."""
    from segmentation.tasks import dataset_layout

    found = dataset_layout(dataset)
    if found is None:
        return None
    layout, num_classes = found
    return lambda root, split: layout_source(dataset, num_classes, layout, root, split)


def step_sources(dataset: str, root: Path, step: int, task: TaskLike | None = None) -> StepSources:
    """The sources of one step. A task with per-step `cities` (CIL's stages) trains on that step's cities only;
    validation and test use the whole val split."""
    if dataset in STEP_SOURCES:
        return STEP_SOURCES[dataset](Path(root), step)
    cities = getattr(task, "train_cities", None)
    train = build_source(dataset, root, "train", **({"cities": cities[step]} if cities else {}))
    val = build_source(dataset, root, "val")
    return StepSources(train, val, val)


__all__ = [
    "ADESource", "CITYSCAPES_CLASSES", "COCOSource", "CityscapesSource", "DATASETS", "SOURCES",
    "DatasetError", "EvalTransform", "IncrementalDataset", "SHAPES_CLASSES", "SegmentationSource", "ShapesSource", "StepSources",
    "TrainTransform", "VOCInCocoIds", "VOCSource", "VOC_CLASSES", "build_source", "ensure_city_shapes", "ensure_shapes", "ensure_shapes_hue", "prepare_index",
    "register_source", "step_sources",
]
