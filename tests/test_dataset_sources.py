"""Real-dataset sources (ADE20K, Cityscapes, COCO for coco-voc, VOC in COCO ids) on tiny fixtures written in each
dataset's true on-disk layout, then one real task step through IncrementalDataset."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segmentation.datasets import (ADESource, COCOSource, CityscapesSource, DatasetError,
                                   IncrementalDataset, VOCInCocoIds, build_source)
from segmentation.datasets.coco import COCO_IGNORE_IDS, VOC_TO_COCO
from segmentation.datasets.voc import palette
from segmentation.tasks import load_task

H, W = 12, 16


def _stripes(values: list[int]) -> np.ndarray:
    """First value everywhere, then one 2-px vertical stripe per further value."""
    lbl = np.full((H, W), values[0], np.uint8)
    for k, v in enumerate(values[1:]):
        lbl[:, 2 * k + 1: 2 * k + 3] = v
    return lbl


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)  # .jpg -> JPEG, .png -> PNG, by suffix


def _gray(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label, mode="L").save(path)


def _item_label(ds: IncrementalDataset, source_index: int) -> np.ndarray:
    k = int(np.flatnonzero(ds.indices == source_index)[0])
    item = ds[k]
    assert item["image"].shape == (3, H, W)
    return item["label"].numpy()


# ------------------------------------------------------------------------------------------------ ADE20K

ADE_TRAIN = {"ADE_train_00000002": [0, 5], "ADE_train_00000001": [0, 120, 3], "ADE_train_00000003": [7, 140, 0]}
ADE_VAL = {"ADE_val_00000001": [0, 101], "ADE_val_00000002": [150, 0]}


@pytest.fixture()
def ade_root(tmp_path: Path) -> Path:
    base = tmp_path / "data" / "ADEChallengeData2016"
    for split, sets in (("training", ADE_TRAIN), ("validation", ADE_VAL)):
        for n, (stem, values) in enumerate(sets.items()):
            _image(base / "images" / split / f"{stem}.jpg", n)
            _gray(base / "annotations" / split / f"{stem}.png", _stripes(values))
    return tmp_path / "data"


def test_ade_ids_paths_and_labels(ade_root: Path) -> None:
    src = build_source("ade", ade_root, "train")
    assert isinstance(src, ADESource) and src.num_classes == 151
    assert src.ids == sorted(ADE_TRAIN)  # sorted listing, as MiB
    for i, stem in enumerate(src.ids):
        assert src.image_path(i) == ade_root / "ADEChallengeData2016/images/training" / f"{stem}.jpg"
        assert src.load_image(i).size == (W, H)
        np.testing.assert_array_equal(src.load_label(i), _stripes(ADE_TRAIN[stem]))  # values pass through
    val = ADESource(ade_root / "ADEChallengeData2016", "val")  # root = the ADEChallengeData2016 folder itself
    assert val.ids == sorted(ADE_VAL) and val.label_path(0).parent.name == "validation"


def test_ade_missing_folders(ade_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="ADEChallengeData2016.zip") as err:
        ADESource(tmp_path / "empty_root_missing", "train")
    assert "empty_root_missing" in str(err.value)
    (tmp_path / "other").mkdir()
    with pytest.raises(DatasetError, match=r"other/ADEChallengeData2016/images"):
        ADESource(tmp_path / "other", "train")
    ann = ade_root / "ADEChallengeData2016/annotations/validation"
    for p in ann.iterdir():
        p.unlink()
    ann.rmdir()
    with pytest.raises(DatasetError, match=str(ann)):
        ADESource(ade_root, "val")


def test_ade_incremental_100_50_step1(ade_root: Path, tmp_path: Path) -> None:
    task = load_task("ade", "100-50")
    src = ADESource(ade_root, "train")
    ds = IncrementalDataset(src, task, 1, mode="train", overlap=True, cache_dir=tmp_path / "cache")
    kept = [src.ids[i] for i in ds.indices]
    assert kept == ["ADE_train_00000001", "ADE_train_00000003"]  # the images with a class in 101..150
    lbl = _item_label(ds, src.ids.index("ADE_train_00000001"))
    # learning order of 100-50 is the identity; old class 3 -> background in train, new 120 kept.
    np.testing.assert_array_equal(lbl, _stripes([0, 120, 0]))
    assert ds[0]["image_labels"].shape == (50,)


# ------------------------------------------------------------------------------------------------ Cityscapes

ALL_IDS = list(range(34)) + [255]
CS_TRAIN = {  # city -> list of (frame, labelIds values)
    "aachen": [("000000_000019", [7, 11, 26]), ("000001_000019", ALL_IDS)],
    "hanover": [("000000_000005", [0, 8, 24])],
    "jena": [("000003_000019", [1, 21, 23])],
}
CS_VAL = {"frankfurt": [("000000_000294", [7, 33])], "lindau": [("000000_000019", [26, 11])]}
EXPECTED_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                     26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def _cs_label(values: list[int]) -> np.ndarray:
    if values is ALL_IDS:  # every labelId 0..33 and 255, one pixel each
        flat = np.full(H * W, 0, np.uint8)
        flat[:len(values)] = values
        return flat.reshape(H, W)
    return _stripes(values)


@pytest.fixture()
def cs_root(tmp_path: Path) -> Path:
    root = tmp_path / "cityscapes"
    n = 0
    for split, cities in (("train", CS_TRAIN), ("val", CS_VAL)):
        for city, frames in cities.items():
            for frame, values in frames:
                stem = f"{city}_{frame}"
                _image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", n)
                _gray(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", _cs_label(values))
                n += 1
    return root


def test_cityscapes_toml_uses_train_id_order() -> None:
    from segmentation.datasets.cityscapes import CITYSCAPES_CLASSES, TRAIN_ID_LUT
    task = load_task("cityscapes", "5-6-8")
    assert task.class_names == CITYSCAPES_CLASSES and not task.has_background
    assert len(TRAIN_ID_LUT) == 256


def test_cityscapes_ids_and_train_id_mapping(cs_root: Path) -> None:
    src = build_source("cityscapes", cs_root, "train")
    assert src.num_classes == 19
    assert src.ids == ["aachen/aachen_000000_000019", "aachen/aachen_000001_000019",
                       "hanover/hanover_000000_000005", "jena/jena_000003_000019"]
    assert src.image_path(0) == cs_root / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    assert src.label_path(0) == cs_root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png"
    assert src.load_image(2).mode == "RGB" and src.load_image(2).size == (W, H)
    np.testing.assert_array_equal(src.load_label(0), _stripes([0, 2, 13]))
    full = src.load_label(1).ravel()[:len(ALL_IDS)]
    expected = [EXPECTED_TRAIN_ID.get(v, 255) for v in ALL_IDS]
    assert full.tolist() == expected
    assert (src.load_label(1).ravel()[len(ALL_IDS):] == 255).all()  # padding = labelId 0 (unlabeled) -> void


def test_cityscapes_city_filter_and_errors(cs_root: Path, tmp_path: Path) -> None:
    stage1 = CityscapesSource(cs_root, "train", cities=["hanover", "aachen"])  # fixture holds 2 of CIL's set-1 cities
    assert [i.split("/")[0] for i in stage1.ids] == ["aachen", "aachen", "hanover"]
    stages = load_task("cityscapes", "cil").train_cities
    with pytest.raises(DatasetError, match=r"\['dusseldorf', 'strasbourg'\] not found"):  # a city missing on disk
        CityscapesSource(cs_root, "train", cities=stages[0])
    assert CityscapesSource(cs_root, "train", cities=["jena"]).ids == ["jena/jena_000003_000019"]
    union = load_task("cityscapes", "offline").train_cities[0]
    assert len(union) == 17 and set(union) == set(stages[0] + stages[1] + stages[2])  # CIL's city sets 0..3
    assert not set(stages[0]) & set(stages[1]) and not set(stages[1]) & set(stages[2])
    with pytest.raises(DatasetError, match="zurich"):
        CityscapesSource(cs_root, "train", cities=["zurich"])
    # root may be the folder holding cityscapes/
    assert CityscapesSource(tmp_path, "val").ids[0] == "frankfurt/frankfurt_000000_000294"
    with pytest.raises(DatasetError, match=str(tmp_path / "nothing" / "leftImg8bit")):
        (tmp_path / "nothing").mkdir()
        CityscapesSource(tmp_path / "nothing", "train")
    gt = cs_root / "gtFine" / "val" / "lindau"
    for p in gt.iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match="lindau_000000_000019"):
        CityscapesSource(cs_root, "val")


def test_cityscapes_incremental_cil_step1(cs_root: Path, tmp_path: Path) -> None:
    task = load_task("cityscapes", "5-6-8")  # step 1 = building, wall, fence, pole, traffic light, traffic sign
    src = CityscapesSource(cs_root, "train", cities=["aachen", "hanover"])
    ds = IncrementalDataset(src, task, 1, mode="train", overlap=True, cache_dir=tmp_path / "cache")
    assert [src.ids[i] for i in ds.indices] == ["aachen/aachen_000000_000019", "aachen/aachen_000001_000019"]
    # seen(1) = (0, 1, 8, 9, 10, 2, 3, ...): building (trainId 2) -> channel 5; no background, so the old class
    # road and the future class car become 255.
    np.testing.assert_array_equal(_item_label(ds, 0), _stripes([255, 5, 255]))
    assert ds[0]["image_labels"].tolist() == [1, 0, 0, 0, 0, 0]
    test = IncrementalDataset(CityscapesSource(cs_root, "val"), task, 1, mode="test", cache_dir=tmp_path / "cache")
    assert len(test) == 2  # both val images hold a seen class (road / building)


# ------------------------------------------------------------------------------------------------ COCO (coco-voc)

COCO_TRAIN = {"000000000009": [0, 8, 1], "000000000025": [0, 12, 91, 255], "000000000030": [0, 44, 10]}
COCO_VAL = {"000000000139": [0, 1, 62], "000000000285": [0, 23], "000000000632": [0, 90, 83]}


@pytest.fixture()
def coco_root(tmp_path: Path) -> Path:
    root = tmp_path / "coco"
    for split, sets in (("train2017", COCO_TRAIN), ("val2017", COCO_VAL)):
        for n, (stem, values) in enumerate(sets.items()):
            _image(root / "images" / split / f"{stem}.jpg", n)
            _gray(root / "annotations" / split / f"{stem}.png", _stripes(values))
    return root


def test_coco_ignore_ids_match_task_file() -> None:
    task = load_task("coco-voc", "voc")
    assert COCO_IGNORE_IDS == task.ignore_ids and len(task.class_names) == 91


def test_coco_ids_labels_and_ignored_ids(coco_root: Path) -> None:
    src = build_source("coco-voc", coco_root, "train")
    assert isinstance(src, COCOSource) and src.num_classes == 91
    assert src.ids == sorted(COCO_TRAIN)  # no split/train.txt: sorted listing
    assert src.image_path(0) == coco_root / "images/train2017/000000000009.jpg"
    assert src.label_path(0) == coco_root / "annotations/train2017/000000000009.png"
    assert src.load_image(0).size == (W, H)
    np.testing.assert_array_equal(src.load_label(0), _stripes([0, 8, 1]))
    np.testing.assert_array_equal(src.load_label(1), _stripes([0, 255, 255, 255]))  # 12 unused, 91 >= 91, void
    lut = src.lut
    assert [int(lut[c]) for c in COCO_IGNORE_IDS] == [255] * len(COCO_IGNORE_IDS)
    assert (lut[91:] == 255).all() and lut[90] == 90 and lut[0] == 0 and lut[1] == 1


def test_coco_prefers_wilsons_converted_annotations_my_over_its_raw_annotations(coco_root: Path) -> None:
    """WILSON's own data/coco: annotations/ holds the raw 0-based COCO-stuff maps, annotations_my/ what
    make_annotation.py converted; reading annotations/ there would be one class off, silently."""
    for stem, values in COCO_TRAIN.items():
        _gray(coco_root / "annotations_my" / "train2017" / f"{stem}.png", _stripes(values))
        raw = [v - 1 if 0 < v < 255 else v for v in values]
        _gray(coco_root / "annotations" / "train2017" / f"{stem}.png", _stripes(raw))
    src = build_source("coco-voc", coco_root, "train")
    assert src.label_path(0) == coco_root / "annotations_my/train2017/000000000009.png"
    np.testing.assert_array_equal(src.load_label(0), _stripes([0, 8, 1]))


def test_coco_split_file_and_errors(coco_root: Path, tmp_path: Path) -> None:
    (coco_root / "split").mkdir()
    (coco_root / "split" / "val.txt").write_text("000000000632\n000000000139\n")  # WILSON's list: ids, any order
    val = COCOSource(tmp_path, "val")  # root may be the folder holding coco/
    assert val.ids == ["000000000632", "000000000139"]
    np.testing.assert_array_equal(val.load_label(0), _stripes([0, 90, 255]))
    ann = coco_root / "annotations" / "train2017"
    for p in ann.iterdir():
        p.unlink()
    ann.rmdir()
    with pytest.raises(DatasetError, match=str(ann)):
        COCOSource(coco_root, "train")
    with pytest.raises(DatasetError, match="make_annotation.py"):
        COCOSource(tmp_path / "missing", "train")


def test_coco_incremental_voc_step0(coco_root: Path, tmp_path: Path) -> None:
    task = load_task("coco-voc", "voc")
    src = COCOSource(coco_root, "train")
    ds = IncrementalDataset(src, task, 0, mode="train", overlap=True, cache_dir=tmp_path / "cache")
    # step 0 = background + 60 non-VOC things: truck (8) and traffic light (10) are in it; image 25 has only void.
    assert [src.ids[i] for i in ds.indices] == ["000000000009", "000000000030"]
    order = task.seen_classes(0)
    # truck -> its channel; person (1, a future VOC class) -> background in train
    np.testing.assert_array_equal(_item_label(ds, 0), _stripes([0, order.index(8), 0]))
    np.testing.assert_array_equal(_item_label(ds, 2), _stripes([0, 0, order.index(10)]))  # bottle 44 is future


# ------------------------------------------------------------------------------------------------ VOC in COCO ids

@pytest.fixture()
def voc_root(tmp_path: Path) -> Path:
    root = tmp_path / "voc"
    sets = {"2007_000032": [0, 1, 15, 255], "2007_000033": [0, 5], "2007_000039": [0, 20, 12]}
    for n, (stem, values) in enumerate(sets.items()):
        _image(root / "JPEGImages" / f"{stem}.jpg", n)
        lbl = Image.fromarray(_stripes(values), mode="P")
        lbl.putpalette(palette())
        (root / "SegmentationClassAug").mkdir(exist_ok=True)
        lbl.save(root / "SegmentationClassAug" / f"{stem}.png")
    (root / "splits").mkdir()
    (root / "splits" / "train_aug.txt").write_text("\n".join(sets) + "\n")
    return root


def test_voc_in_coco_ids_mapping(voc_root: Path) -> None:
    src = VOCInCocoIds(voc_root, "train")
    assert src.num_classes == 91 and src.name != "voc"
    # aeroplane 1 -> COCO 5, person 15 -> COCO 1, 255 kept; bottle 5 -> 44; tv 20 -> 72, dog 12 -> 18
    np.testing.assert_array_equal(src.load_label(0), _stripes([0, 5, 1, 255]))
    np.testing.assert_array_equal(src.load_label(1), _stripes([0, 44]))
    np.testing.assert_array_equal(src.load_label(2), _stripes([0, 72, 18]))
    voc_ids = {v for k, v in VOC_TO_COCO.items() if k not in (0, 255)}
    assert voc_ids == set(load_task("coco-voc", "voc").steps[1])  # exactly the step-1 classes


def test_voc_in_coco_incremental_step1(voc_root: Path, tmp_path: Path) -> None:
    task = load_task("coco-voc", "voc")
    src = VOCInCocoIds(voc_root, "train")
    ds = IncrementalDataset(src, task, 1, mode="train", overlap=True, cache_dir=tmp_path / "cache")
    assert len(ds) == 3
    order = task.seen_classes(1)
    np.testing.assert_array_equal(_item_label(ds, 0), _stripes([0, order.index(5), order.index(1), 255]))
    assert ds[0]["image_labels"].shape == (20,)
