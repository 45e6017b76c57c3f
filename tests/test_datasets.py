"""Datasets: VOC layout reading, MiB-family filtering, learning-order remapping, caching, shapes, transforms."""
from __future__ import annotations

import json
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segmentation.datasets import (DATASETS, DatasetError, EvalTransform, IncrementalDataset, TrainTransform,
                                   VOCSource, build_source, ensure_shapes, prepare_index)
from segmentation.datasets.incremental import class_matrix
from segmentation.datasets.shapes import SHAPES_CLASSES, ShapesSource
from segmentation.datasets.voc import palette


@dataclass(frozen=True)
class FakeTask:
    """Stand-in with the attributes of segmentation.tasks.Task that the datasets use."""
    dataset: str
    name: str
    steps: tuple[tuple[int, ...], ...]
    has_background: bool = True

    def new_classes(self, step: int) -> tuple[int, ...]:
        return self.steps[step]

    def old_classes(self, step: int) -> tuple[int, ...]:
        return tuple(c for s in self.steps[:step] for c in s)

    def seen_classes(self, step: int) -> tuple[int, ...]:
        return self.old_classes(step) + self.new_classes(step)


# A shuffled learning order, so remapping is visible: seen(1) = (0, 2, 1, 4, 3).
TASK = FakeTask("voc", "mini", ((0, 2, 1), (4, 3), (5,)))

# Raw classes present in each fixture image (0 = background, always present; 255 = void band).
TRAIN = [{0, 1}, {0, 1, 3}, {0, 3, 255}, {0, 5}, {0, 2, 4, 255}, {0, 3, 5}, {0, 7}, {0}]
VAL = [{0, 1}, {0, 3}, {0, 5, 255}, {0, 2, 4}]
H, W = 12, 16


def _label(classes: set[int]) -> np.ndarray:
    """Background everywhere, one vertical stripe per other value."""
    lbl = np.zeros((H, W), np.uint8)
    for k, c in enumerate(sorted(classes - {0})):
        lbl[:, 2 + 3 * k: 4 + 3 * k] = c
    return lbl


def _write_voc(root: Path, train=TRAIN, val=VAL, list_style: str = "ids") -> Path:
    for sub in ("JPEGImages", "SegmentationClassAug", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, sets in (("train_aug", train), ("val", val)):
        ids = []
        for i, classes in enumerate(sets):
            name = f"{split}_{i}"
            Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
            p = Image.frombytes("P", (W, H), _label(classes).tobytes())
            p.putpalette(palette())
            p.save(root / "SegmentationClassAug" / f"{name}.png")
            ids.append(name if list_style == "ids" else f"/JPEGImages/{name}.jpg /SegmentationClassAug/{name}.png")
        (root / "splits" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


@pytest.fixture()
def voc(tmp_path: Path) -> Path:
    return _write_voc(tmp_path / "VOC")


def _ds(root: Path, split: str, step: int, mode: str, overlap: bool = True, **kw) -> IncrementalDataset:
    kw.setdefault("transform", EvalTransform(crop_val=False))
    return IncrementalDataset(VOCSource(root, split), TASK, step, mode, overlap, **kw)


# ---------------------------------------------------------------- source / layout

def test_voc_source_reads_layout_and_mib_lists(tmp_path: Path) -> None:
    a = VOCSource(_write_voc(tmp_path / "a"), "train")
    b = VOCSource(_write_voc(tmp_path / "b", list_style="mib"), "train")
    assert a.ids == b.ids == [f"train_aug_{i}" for i in range(len(TRAIN))]
    assert a.num_classes == 21 and len(VOCSource(tmp_path / "a", "val")) == len(VAL)
    assert set(np.unique(a.load_label(4)).tolist()) == {0, 2, 4, 255}
    assert a.load_image(0).mode == "RGB"


def test_split_list_in_imagesets(tmp_path: Path) -> None:
    root = _write_voc(tmp_path / "v")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "splits" / "val.txt").rename(root / "ImageSets" / "Segmentation" / "val.txt")
    assert len(VOCSource(root, "val")) == len(VAL)


def test_missing_root_and_split_list_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist.*--data_root"):
        VOCSource(tmp_path / "nope", "train")
    root = _write_voc(tmp_path / "v")
    (root / "splits" / "train_aug.txt").unlink()
    with pytest.raises(DatasetError, match=r"splits/train_aug\.txt.*train_aug\.txt"):
        VOCSource(root, "train")


def test_build_source_registry(voc: Path) -> None:
    assert {"voc", "shapes"} <= set(DATASETS)
    assert isinstance(build_source("voc", voc, "val"), VOCSource)
    with pytest.raises(DatasetError, match="valid datasets: .*shapes.*voc"):
        build_source("pascal", voc, "train")


# ---------------------------------------------------------------- filtering (worked out by hand from TRAIN/VAL)

@pytest.mark.parametrize("step,overlap,expected", [
    (0, True, [0, 1, 4]), (0, False, [0]),              # labels {1,2}; disjoint drops 3 and 4 (future)
    (1, True, [1, 2, 4, 5]), (1, False, [1, 2, 4]),     # labels {3,4}; image 5 has future class 5
    (2, True, [3, 5]), (2, False, [3, 5]),              # labels {5}; nothing is future at the last step
])
def test_train_filter(voc: Path, step: int, overlap: bool, expected: list[int]) -> None:
    assert _ds(voc, "train", step, "train", overlap).indices.tolist() == expected


@pytest.mark.parametrize("step,mode,expected", [
    (0, "val", [0, 3]), (1, "val", [1, 3]), (2, "val", [2]),        # any current class
    (0, "test", [0, 3]), (1, "test", [0, 1, 3]), (2, "test", [0, 1, 2, 3]),  # any seen class
])
def test_val_test_filter(voc: Path, step: int, mode: str, expected: list[int]) -> None:
    assert _ds(voc, "val", step, mode, overlap=False).indices.tolist() == expected


@pytest.mark.parametrize("step,overlap,expected", [
    (0, True, list(range(8))), (0, False, [0, 7]),         # disjoint still drops images with a future class
    (1, False, [0, 1, 2, 4, 7]), (2, False, [0, 1, 2, 3, 4, 5, 7]),  # (7 is in no step: never allowed)
])
def test_every_training_image_with_train_images_all(voc: Path, step: int, overlap: bool, expected: list[int]) -> None:
    """CIL trains a stage on every image of its cities, also those without a pixel of the stage's classes."""
    assert _ds(voc, "train", step, "train", overlap, every_image=True).indices.tolist() == expected


def test_every_val_image_is_tested_with_test_images_all(voc: Path) -> None:
    """WILSON tests every step on all val images; the step's own val images (validation) stay filtered."""
    for step in range(3):
        assert _ds(voc, "val", step, "test", every_image=True).indices.tolist() == [0, 1, 2, 3]
    assert _ds(voc, "val", 0, "val", every_image=True).indices.tolist() == [0, 3]
    # the two selections are cached apart
    assert _ds(voc, "val", 0, "test").indices.tolist() == [0, 3]


def test_image_selection_presets() -> None:
    from segmentation.config import parse_config

    def chosen(*argv: str) -> tuple[str, str]:
        cfg = parse_config(list(argv))
        return cfg.train_images, cfg.test_images

    assert chosen("--method", "MiB") == chosen("--method", "PLOP") == ("new", "seen")
    assert chosen("--method", "WILSON", "--step", "1") == ("new", "all")
    assert chosen("--method", "WILSON", "--test_images", "seen") == ("new", "seen")
    assert chosen("--dataset", "city-shapes", "--task", "cil") == ("all", "seen")
    assert chosen("--dataset", "cityscapes", "--task", "cil", "--method", "CIL") == ("all", "seen")
    assert chosen("--dataset", "cityscapes", "--train_images", "new") == ("new", "seen")


# ---------------------------------------------------------------- remapping

def _expected(raw_classes: set[int], mapping: dict[int, int]) -> np.ndarray:
    return np.vectorize(lambda v: mapping[int(v)])(_label(raw_classes))


def test_train_remap_step1(voc: Path) -> None:
    ds = _ds(voc, "train", 1, "train")
    # learning order (0, 2, 1, 4, 3): new 4 -> 3, 3 -> 4; old 1, 2 and future 5 -> 0; 255 stays 255
    m = {0: 0, 1: 0, 2: 0, 3: 4, 4: 3, 5: 0, 255: 255}
    for k, i in enumerate(ds.indices):
        item = ds[k]
        assert item["index"] == i and item["label"].dtype == torch.uint8 and item["image"].dtype == torch.uint8
        assert np.array_equal(item["label"].numpy(), _expected(TRAIN[i], m)), i
    item = ds[list(ds.indices).index(4)]  # raw {0, 2, 4, 255}
    assert set(item["label"].unique().tolist()) == {0, 3, 255}
    assert item["image_labels"].tolist() == [1.0, 0.0]  # over new classes (4, 3)
    assert ds[list(ds.indices).index(1)]["image_labels"].tolist() == [0.0, 1.0]


@pytest.mark.parametrize("future,fill", [("background", 0), ("ignore", 255)])
def test_test_remap_future_conventions(voc: Path, future: str, fill: int) -> None:
    ds = _ds(voc, "val", 1, "test", test_future=future)
    m = {0: 0, 2: 1, 1: 2, 4: 3, 3: 4, 5: fill, 255: 255}
    for k, i in enumerate(ds.indices):
        assert np.array_equal(ds[k]["label"].numpy(), _expected(VAL[i], m)), i
    ds2 = _ds(voc, "val", 1, "val", test_future=future)  # val keeps seen classes too; future as in test
    assert np.array_equal(ds2[1]["label"].numpy(), _expected(VAL[3], m))


@pytest.mark.parametrize("future", ["background", "ignore"])
def test_ignore_test_bg_ignores_what_reads_as_background_at_val_and_test_only(voc: Path, future: str) -> None:
    """--ignore_test_bg (PLOP's flag): background pixels, and with --test_future background the future classes
    that read as background, are ignored at val/test; with --test_future ignore it is MiB's ADE evaluation (raw 0
    ignored); training labels are untouched."""
    m = {0: 255, 2: 1, 1: 2, 4: 3, 3: 4, 5: 255, 255: 255}
    for mode in ("val", "test"):
        ds = _ds(voc, "val", 1, mode, test_future=future, ignore_test_bg=True)
        for k, i in enumerate(ds.indices):
            assert np.array_equal(ds[k]["label"].numpy(), _expected(VAL[i], m)), (mode, i)
    train = _ds(voc, "train", 1, "train", ignore_test_bg=True)
    plain = _ds(voc, "train", 1, "train")
    assert all(np.array_equal(train[k]["label"].numpy(), plain[k]["label"].numpy()) for k in range(len(plain)))


def test_no_background_task_maps_unseen_to_ignore(voc: Path) -> None:
    task = FakeTask("voc", "nobg", ((1, 2), (3, 4)), has_background=False)
    ds = IncrementalDataset(VOCSource(voc, "train"), task, 1, "train", True, EvalTransform(crop_val=False))
    item = ds[list(ds.indices).index(1)]  # raw {0, 1, 3}: 0 and 1 are not visible -> 255, 3 -> 2
    assert np.array_equal(item["label"].numpy(), _expected(TRAIN[1], {0: 255, 1: 255, 3: 2}))


# ---------------------------------------------------------------- bad data

def test_bad_label_value_names_file(tmp_path: Path) -> None:
    root = _write_voc(tmp_path / "v")
    bad = root / "SegmentationClassAug" / "train_aug_2.png"
    lbl = _label({0, 3}); lbl[0, 0] = 30
    Image.fromarray(lbl).save(bad)
    with pytest.raises(DatasetError, match=r"train_aug_2\.png.*\[30\]"):
        _ds(root, "train", 1, "train")


def test_bad_label_value_caught_at_load_time_too(voc: Path) -> None:
    ds = _ds(voc, "train", 1, "train")  # index cached from good data
    path = voc / "SegmentationClassAug" / "train_aug_1.png"
    lbl = _label({0, 1, 3}); lbl[1, 1] = 99
    Image.fromarray(lbl).save(path)
    with pytest.raises(DatasetError, match=r"train_aug_1\.png"):
        ds[0]


def test_rgb_label_rejected(voc: Path) -> None:
    Image.new("RGB", (W, H)).save(voc / "SegmentationClassAug" / "train_aug_0.png")
    with pytest.raises(DatasetError, match=r"train_aug_0\.png has mode RGB"):
        VOCSource(voc, "train").load_label(0)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_image(voc: Path, damage: str) -> None:
    path = voc / "JPEGImages" / "train_aug_1.jpg"
    data = path.read_bytes()
    path.write_bytes(b"not a jpeg" if damage == "garbage" else data[: len(data) // 2])
    ds = _ds(voc, "train", 1, "train")
    with pytest.raises(DatasetError, match=r"train_aug_1\.jpg"):
        ds[0]


# ---------------------------------------------------------------- caching

def test_index_cache_written_and_reused(voc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    ds = _ds(voc, "train", 1, "train", overlap=False, cache_dir=cache)
    files = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*.npy"))
    assert len(files) == 2 and files[0].startswith("voc-mini/train-1-") and files[1].startswith("voc-train-")
    assert class_matrix(ds.source, cache).shape == (len(TRAIN), 256)

    def boom(self, i):  # any further label read would mean the cache was not used
        raise AssertionError("label read despite cache")
    monkeypatch.setattr(VOCSource, "load_label", boom)
    assert prepare_index(VOCSource(voc, "train"), TASK, 1, "train", False, cache).tolist() == [1, 2, 4]
    monkeypatch.undo()
    # another step / mode reuses the per-image class matrix: one more index file, no new class file
    _ds(voc, "train", 2, "train", overlap=True, cache_dir=cache)
    assert len(list(cache.glob("*-classes.npy"))) == 1 and (cache / "voc-mini-ov").is_dir()


def test_default_cache_under_root(voc: Path) -> None:
    _ds(voc, "val", 0, "test")
    assert list((voc / ".cache").rglob("test-0-*.npy"))


# ---------------------------------------------------------------- augmentation

def test_augmentation_reproducible_and_order_independent(voc: Path) -> None:
    def make():
        return _ds(voc, "train", 1, "train", transform=TrainTransform(crop_size=20), seed=3)
    a, b = make(), make()
    first = [a[k] for k in range(len(a))]
    second = [b[k] for k in reversed(range(len(b)))][::-1]
    for x, y in zip(first, second):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
        assert x["image"].shape == (3, 20, 20) and x["label"].shape == (20, 20)
    a.set_epoch(1)
    assert any(not torch.equal(a[k]["image"], first[k]["image"]) for k in range(len(a)))
    # the training sampler's (index, epoch) keys give the same as set_epoch
    assert all(torch.equal(a[(k, 1)]["image"], a[k]["image"]) for k in range(len(a)))
    assert all(torch.equal(a[(k, 0)]["image"], first[k]["image"]) for k in range(len(a)))


def _aligned_sample(tmp_path: Path, fmt: str, zoom: int = 1) -> tuple[Image.Image, np.ndarray]:
    """A 500x375 image whose colour encodes its label (big blocks), so geometry errors show as mismatches."""
    lbl = np.zeros((375, 500), np.uint8)
    lbl[50:200, 60:300] = 1
    lbl[220:360, 280:480] = 2
    lbl[:, :20] = 255
    lbl = np.kron(lbl, np.ones((zoom, zoom), np.uint8))
    colours = np.zeros((256, 3), np.uint8)
    colours[1], colours[2], colours[255] = (250, 10, 10), (10, 250, 10), (10, 10, 250)
    path = tmp_path / f"img.{fmt}"
    Image.fromarray(colours[lbl]).save(path, quality=95)
    return Image.open(path), lbl


def _agreement(img_t: torch.Tensor, lbl_t: torch.Tensor) -> float:
    """Fraction of labelled pixels whose colour says the same class (padding / void excluded)."""
    assert img_t.dtype == torch.uint8 and lbl_t.dtype == torch.uint8
    rgb = img_t.float()
    colour_cls = torch.where(rgb[0] > 128, 1, torch.where(rgb[1] > 128, 2, 0))
    valid = lbl_t != 255
    assert valid.float().mean() > 0.3
    return float((colour_cls == lbl_t)[valid].float().mean())


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_train_transform_keeps_image_and_label_aligned(tmp_path: Path, fmt: str) -> None:
    tf = TrainTransform(crop_size=128)
    for seed in range(12):  # covers down-scaling, up-scaling, padding and flips
        image, lbl = _aligned_sample(tmp_path, fmt)
        img_t, lbl_t, box = tf(image, lbl, np.random.default_rng(seed))
        assert img_t.shape == (3, 128, 128) and lbl_t.shape == (128, 128)
        assert _agreement(img_t, lbl_t) > 0.98, seed
        y0, y1, x0, x1 = box.tolist()  # outside the box: padding, ignored by the label
        outside = torch.ones(128, 128, dtype=torch.bool)
        outside[y0:y1, x0:x1] = False
        assert (lbl_t[outside] == 255).all() and (img_t[:, outside] == 0).all()
    # with scale 0.25 the JPEG is decoded at reduced size (draft); label regions must still line up
    image, lbl = _aligned_sample(tmp_path, "jpg", zoom=2)
    img_t, lbl_t, _ = TrainTransform(crop_size=200, scale=(0.25, 0.25))(image, lbl, np.random.default_rng(0))
    assert _agreement(img_t, lbl_t) > 0.98


def test_train_scale_divide_zooms_out_as_cils_random_rescale(tmp_path: Path) -> None:
    """CIL's RandomRescale divides the size by s: with s = 2 a 500x375 image becomes 250x188 (rounded), padded into a
    256x256 crop; without --train_scale_divide the same s doubles it to 1000x750, cropped."""
    image, lbl = _aligned_sample(tmp_path, "png")  # 500 x 375
    img_t, lbl_t, box = TrainTransform(crop_size=256, scale=(2.0, 2.0), divide_scale=True)(
        image, lbl, np.random.default_rng(0))
    y0, y1, x0, x1 = box.tolist()
    assert (y1 - y0, x1 - x0) == (188, 250) and _agreement(img_t, lbl_t) > 0.98
    _, _, box = TrainTransform(crop_size=256, scale=(2.0, 2.0))(image, lbl, np.random.default_rng(0))
    assert box.tolist() == [0, 256, 0, 256]


def test_eval_size_resizes_the_image_only_and_predictions_are_scored_at_the_label_size(tmp_path: Path) -> None:
    """CIL: the network sees 512x1024, the prediction is upsampled (nearest) to the label's 1024x2048."""
    from segmentation.engine.metrics import ConfusionMatrix, predictions_at_label_size
    from segmentation.datasets.transforms import collate_eval

    image, lbl = _aligned_sample(tmp_path, "png")  # 500 x 375
    img_t, lbl_t, box = EvalTransform(eval_size=(125, 250))(image, lbl)
    assert img_t.shape == (3, 125, 250) and torch.equal(lbl_t, torch.from_numpy(lbl))
    assert box.tolist() == [0, 125, 0, 250]
    # a 2x2 prediction against a 4x4 label: each predicted pixel covers a 2x2 block of the label
    pred = torch.tensor([[[0, 1], [1, 2]]])
    label = torch.tensor([[[0, 0, 1, 1], [0, 255, 1, 0], [1, 1, 2, 2], [1, 2, 2, 2]]])
    matrix = ConfusionMatrix(3)
    matrix.update(predictions_at_label_size(pred, label), label)
    # class 0: 4 pixels (one ignored 255 beside them), 3 in the block predicted 0, 1 in a block predicted 1;
    # class 1: 6 pixels, all in blocks predicted 1; class 2: 5 pixels, 4 in the block predicted 2, 1 in one of 1
    assert matrix.matrix.tolist() == [[3, 1, 0], [0, 6, 0], [0, 1, 4]]
    # labels of different sizes in one batch: padded with 255, each prediction resized to its own label
    items = [{"image": torch.zeros(3, 2, 2), "label": torch.zeros(4, 4, dtype=torch.uint8)},
             {"image": torch.zeros(3, 2, 2), "label": torch.ones(2, 6, dtype=torch.uint8)}]
    batch = collate_eval(items)
    assert batch["label"].shape == (2, 4, 6) and batch["label_size"].tolist() == [[4, 4], [2, 6]]
    assert (batch["label"][0, :, 4:] == 255).all() and (batch["label"][1, 2:] == 255).all()
    resized = predictions_at_label_size(torch.tensor([[[0, 1], [1, 0]], [[1, 0], [0, 1]]]), batch["label"],
                                        batch["label_size"])
    assert resized[0, :4, :4].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]
    assert resized[1, :2].tolist() == [[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]]


def test_eval_transform_jpeg_draft_aligned(tmp_path: Path) -> None:
    image, lbl = _aligned_sample(tmp_path, "jpg", zoom=2)  # 1000x750 -> short side 128: decoded at 1/4
    img_t, lbl_t, box = EvalTransform(crop_size=128)(image, lbl)
    assert box.tolist() == [0, 128, 0, 128]
    assert image.size == (250, 188)  # the draft really happened
    assert img_t.shape == (3, 128, 128) and _agreement(img_t, lbl_t) > 0.98


def test_eval_transform_crop_and_full(tmp_path: Path) -> None:
    image, lbl = _aligned_sample(tmp_path, "png")
    img_t, lbl_t, _ = EvalTransform(crop_size=64)(image, lbl)
    assert img_t.shape == (3, 64, 64) and lbl_t.shape == (64, 64)
    image, lbl = _aligned_sample(tmp_path, "png")
    img_t, lbl_t, box = EvalTransform(crop_val=False)(image, lbl)
    assert img_t.shape == (3, 375, 500) and torch.equal(lbl_t, torch.from_numpy(lbl))
    assert box.tolist() == [0, 375, 0, 500]


# ---------------------------------------------------------------- shapes

def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_shapes_deterministic_and_voc_readable(tmp_path: Path) -> None:
    kw = dict(seed=1, size=64, n_train=12, n_val=4)
    a = ensure_shapes(tmp_path / "a", **kw)
    b = ensure_shapes(tmp_path / "b", **kw)
    assert a == tmp_path / "a" / "shapes" and _tree_bytes(a) == _tree_bytes(b)
    src = ShapesSource(a, "train")
    assert len(src) == 12 and len(ShapesSource(a, "val")) == 4 and src.num_classes == len(SHAPES_CLASSES) == 11
    values = set()
    for i in range(len(src)):
        lbl = src.load_label(i)
        assert lbl.shape == (64, 64) and src.load_image(i).size == (64, 64)
        values |= set(np.unique(lbl).tolist())
    assert 0 in values and 255 in values and values <= set(range(11)) | {255} and len(values) > 5
    with Image.open(src.label_path(0)) as im:
        assert im.mode == "P"
    assert ensure_shapes(tmp_path / "a", **kw) == a  # reused, not regenerated
    with pytest.raises(DatasetError, match="other parameters"):
        ensure_shapes(tmp_path / "a", seed=2, size=64, n_train=12, n_val=4)


def test_shapes_hue_gives_each_class_its_hue_and_leaves_shapes_as_it_was(tmp_path: Path) -> None:
    import colorsys

    from segmentation.datasets.shapes import HUE_JITTER, render
    root = ensure_shapes(tmp_path, seed=0, size=64, n_train=6, n_val=2, hue_jitter=HUE_JITTER, folder="shapes-hue")
    src = build_source("shapes-hue", root, "train")
    assert root == tmp_path / "shapes-hue" and src.name == "shapes-hue" and len(src) == 6
    found = set()
    for i in range(len(src)):
        image, label = np.asarray(src.load_image(i), np.float64) / 255, src.load_label(i)
        for k in set(np.unique(label).tolist()) - {0, 255}:
            pixels = image[label == k]
            mean_rgb = pixels.mean(axis=0)  # the object's colour under its sensor noise
            hue = colorsys.rgb_to_hsv(*mean_rgb)[0]
            want = (k - 1) / 10
            distance = min(abs(hue - want), 1 - abs(hue - want))  # around the colour wheel
            assert distance < HUE_JITTER + 0.03, (i, k, hue)
            found.add(k)
    assert len(found) >= 4
    # the plain shapes keep their random hues and their exact bytes (the default draws are unchanged)
    a, b = render(np.random.default_rng((0, 0, 3)), 32), render(np.random.default_rng((0, 0, 3)), 32, None)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    with pytest.raises(DatasetError, match="other parameters"):  # a folder of other parameters is refused
        ensure_shapes(tmp_path, seed=0, size=64, n_train=6, n_val=2, folder="shapes-hue")


def test_shapes_concurrent_generation(tmp_path: Path) -> None:
    out, errors = [], []

    def run():
        try:
            out.append(ensure_shapes(tmp_path, size=32, n_train=6, n_val=2))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(out)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"]  # no temp folder left behind
    assert len(ShapesSource(out[0], "train")) == 6


def test_build_source_shapes_generates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import segmentation.datasets as D
    small = lambda root: ensure_shapes(root, size=32, n_train=4, n_val=2)  # noqa: E731
    monkeypatch.setattr(D, "ensure_shapes", small)
    src = build_source("shapes", tmp_path, "val")
    assert src.name == "shapes" and len(src) == 2 and (tmp_path / "shapes" / "meta.json").is_file()
    assert len(build_source("shapes", tmp_path / "shapes", "train")) == 4  # the folder itself works as root


def test_shapes_class_names_match_task_file() -> None:
    tasks = pytest.importorskip("segmentation.tasks")
    assert tasks.load_task("shapes", "6-4").class_names == SHAPES_CLASSES


def test_real_task_object_works(tmp_path: Path) -> None:
    tasks = pytest.importorskip("segmentation.tasks")
    root = ensure_shapes(tmp_path, size=48, n_train=30, n_val=6)
    task = tasks.load_task("shapes", "6-2")
    ds = IncrementalDataset(ShapesSource(root, "train"), task, 1, "train", False, TrainTransform(crop_size=32))
    item = ds[0]
    assert item["image_labels"].shape == (2,) and item["image_labels"].sum() >= 1
    assert set(item["label"].unique().tolist()) <= {0, 7, 8, 255}  # learning order: 7, 8 = raw 7, 8


# ---------------------------------------------------------------- weak (image-level) supervision

def _permuted_masks(root: Path, sets: list[set[int]]) -> None:
    """Rewrite every training mask with the same classes in other places (stripes reversed, borders of 255)."""
    for i, classes in enumerate(sets):
        lbl = _label(classes)[:, ::-1].copy()
        lbl[0] = 255 if 255 in classes else lbl[0]
        p = Image.frombytes("P", (W, H), np.ascontiguousarray(lbl).tobytes())
        p.putpalette(palette())
        p.save(root / "SegmentationClassAug" / f"train_aug_{i}.png")


def test_weak_items_hold_no_pixel_label_and_do_not_depend_on_the_masks(voc: Path) -> None:
    full = _ds(voc, "train", 1, "train", transform=TrainTransform(crop_size=20), seed=3)
    weak = _ds(voc, "train", 1, "train", transform=TrainTransform(crop_size=20), seed=3, weak=True)
    assert list(weak.indices) == list(full.indices)
    before = [weak[(k, 2)] for k in range(len(weak))]
    for item, ref in zip(before, (full[(k, 2)] for k in range(len(full)))):
        assert "label" not in item and set(item) == {"image", "valid_box", "image_labels", "index"}
        assert torch.equal(item["image"], ref["image"]) and torch.equal(item["valid_box"], ref["valid_box"])
        assert torch.equal(item["image_labels"], ref["image_labels"])
    _permuted_masks(voc, TRAIN)
    again = _ds(voc, "train", 1, "train", transform=TrainTransform(crop_size=20), seed=3, weak=True)
    for a, b in zip(before, (again[(k, 2)] for k in range(len(again)))):
        assert all(torch.equal(a[key], b[key]) for key in ("image", "valid_box", "image_labels")) and a["index"] == b["index"]


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_image_label_file_replaces_the_masks(voc: Path, tmp_path: Path, fmt: str) -> None:
    from segmentation.datasets.image_labels import read_image_labels

    names = [f"c{c}" for c in range(21)]
    tags = {f"train_aug_{i}": sorted(c for c in classes if c not in (0, 255)) for i, classes in enumerate(TRAIN)}
    path = tmp_path / f"tags.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps({k: [f"C{c}" for c in v] for k, v in tags.items()}))
    else:
        path.write_text("image,labels\n" + "".join(f"{k},{';'.join(f'c{c}' for c in v)}\n" for k, v in tags.items()))
    labels = read_image_labels(path, names)
    from_masks = _ds(voc, "train", 1, "train", weak=True)
    shutil.rmtree(voc / "SegmentationClassAug")  # tagged images need no mask on disk
    (voc / "SegmentationClassAug").mkdir()
    tagged = IncrementalDataset(VOCSource(voc, "train"), TASK, 1, "train", True, EvalTransform(crop_val=False),
                                image_labels=(path, labels))
    assert list(tagged.indices) == list(from_masks.indices)
    for k in range(len(tagged)):
        a, b = tagged[k], from_masks[k]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["image_labels"], b["image_labels"])


def test_image_label_file_errors_name_the_problem(voc: Path, tmp_path: Path) -> None:
    from segmentation.datasets.image_labels import read_image_labels

    names = [f"c{c}" for c in range(21)]
    bad = tmp_path / "bad.csv"
    bad.write_text("train_aug_0,c1\ntrain_aug_1,dog\n")
    with pytest.raises(DatasetError, match=r"bad.csv:2: unknown class 'dog'"):
        read_image_labels(bad, names)
    partial = tmp_path / "partial.csv"
    partial.write_text("train_aug_0,c1\n")
    with pytest.raises(DatasetError, match="no entry for 7 image"):
        IncrementalDataset(VOCSource(voc, "train"), TASK, 1, "train", True,
                           image_labels=(partial, read_image_labels(partial, names)))
    with pytest.raises(DatasetError, match="no such file"):
        read_image_labels(tmp_path / "missing.json", names)
