"""Training data path throughput per CPU core: ours vs a MiB-style reimplementation.

Writes ~50 synthetic VOC-sized samples (500x375 JPEG + palette PNG, VOC layout) to a temp dir, then times, in one
process with one torch thread: JPEG decode, random scale 0.5-2, pad + 512 random crop, flip, normalise and the
label remap to learning order (task 15-5 step 1 as the example). Run: python benchmarks/data_path.py
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segmentation.datasets.incremental import IncrementalDataset  # noqa: E402
from segmentation.datasets.transforms import EvalTransform, IMAGENET_MEAN, IMAGENET_STD, TrainTransform  # noqa: E402
from segmentation.datasets.voc import VOCSource, palette  # noqa: E402

ORDER = list(range(21))  # 15-5 step 1: learning order of seen classes
NEW = [16, 17, 18, 19, 20]


def write_fixture(root: Path, n: int) -> None:
    """VOC-like samples: smooth noisy image, a few rectangles and discs of random classes with 255 borders."""
    for sub in ("JPEGImages", "SegmentationClassAug", "splits"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    pal = palette()
    ids = []
    for i in range(n):
        w, h = (500, 375) if i % 3 else (375, 500)
        coarse = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        img = np.asarray(coarse, np.int16) + rng.integers(-20, 20, (h, w, 3))
        lbl = np.zeros((h, w), np.uint8)
        for k in range(3):  # the first object is always a class of step 1 (16..20), so every image is kept
            x0, y0 = rng.integers(0, w - 100), rng.integers(0, h - 100)
            x1, y1 = x0 + rng.integers(40, 100), y0 + rng.integers(40, 100)
            lbl[y0:y1, x0:x1] = rng.integers(16, 21) if k == 0 else rng.integers(1, 16)
            lbl[y0:y0 + 3, x0:x1] = 255
        name = f"2007_{i:06d}"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "JPEGImages" / f"{name}.jpg", quality=90)
        p = Image.frombytes("P", (w, h), lbl.tobytes())
        p.putpalette(pal)
        p.save(root / "SegmentationClassAug" / f"{name}.png")
        ids.append(name)
    (root / "splits" / "train_aug.txt").write_text("\n".join(ids) + "\n")


@dataclass(frozen=True)
class _Task:  # the attributes of segmentation.tasks.Task that the dataset uses (VOC 15-5, step 1)
    dataset: str = "voc"
    name: str = "15-5"
    steps: tuple = (tuple(range(16)), (16, 17, 18, 19, 20))
    has_background: bool = True

    def new_classes(self, step: int) -> tuple:
        return self.steps[step]

    def old_classes(self, step: int) -> tuple:
        return tuple(c for s in self.steps[:step] for c in s)

    def seen_classes(self, step: int) -> tuple:
        return self.old_classes(step) + self.new_classes(step)


def ours(ds: IncrementalDataset, n_iter: int) -> float:
    """The real IncrementalDataset.__getitem__: label read + validity check + LUT + image-level labels +
    TrainTransform (decode, scale, pad/crop, flip, normalise)."""
    t0 = time.perf_counter()
    for k in range(n_iter):
        item = ds[k % len(ds)]
    assert item["image"].shape == (3, 512, 512)
    return time.perf_counter() - t0


class MiBLike:
    """MiB's path: PIL open + convert, RandomResizedCrop-free 'RandomScale' + pad + crop via PIL/torchvision
    functional, ToTensor + Normalize, and the label remap as `Image.point(lambda)`-style per-pixel Python
    (MiB: `tmp_labels.apply_(lambda x: inverted_order[x] if x in labels else masking_value)` on the tensor)."""

    def __init__(self) -> None:
        import torchvision.transforms.functional as F
        self.F = F
        self.inverted = {c: k for k, c in enumerate(ORDER)}

    def __call__(self, img_path: Path, lbl_path: Path, rng: np.random.Generator) -> None:
        F = self.F
        img = Image.open(img_path).convert("RGB")
        lbl = Image.open(lbl_path)
        s = rng.uniform(0.5, 2.0)
        size = (int(img.size[1] * s), int(img.size[0] * s))
        img, lbl = F.resize(img, size, Image.BILINEAR), F.resize(lbl, size, Image.NEAREST)
        pw, ph = max(512 - img.size[0], 0), max(512 - img.size[1], 0)
        if pw or ph:
            img, lbl = F.pad(img, [0, 0, pw, ph], fill=0), F.pad(lbl, [0, 0, pw, ph], fill=255)
        x, y = rng.integers(0, img.size[0] - 511), rng.integers(0, img.size[1] - 511)
        img, lbl = F.crop(img, int(y), int(x), 512, 512), F.crop(lbl, int(y), int(x), 512, 512)
        if rng.random() < 0.5:
            img, lbl = F.hflip(img), F.hflip(lbl)
        t = F.normalize(F.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)
        target = torch.from_numpy(np.array(lbl, dtype=np.uint8)).long()
        inv, keep = self.inverted, set(NEW)
        target.apply_(lambda v: inv[v] if v in keep else 0)  # one Python call per pixel, as in MiB
        _ = t


def mib(source: VOCSource, n_iter: int) -> float:
    f = MiBLike()
    t0 = time.perf_counter()
    for k in range(n_iter):
        i = k % len(source)
        f(source.image_path(i), source.label_path(i), np.random.default_rng((0, 0, i)))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--iters", type=int, default=300, help="samples timed for our path")
    ap.add_argument("--mib_iters", type=int, default=20, help="samples timed for the (slow) MiB-like path")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "VOC"
        write_fixture(root, args.images)
        source = VOCSource(root, "train")
        ds = IncrementalDataset(source, _Task(), 1, "train", True, TrainTransform(512), cache_dir=Path(tmp) / "c")
        assert len(ds) == len(source)
        ours(ds, min(20, args.iters))  # warm-up (imports, page cache)
        rows = [("ours (IncrementalDataset + TrainTransform)", args.iters, ours(ds, args.iters)),
                ("MiB-like (PIL + torchvision F, per-pixel Python remap)", args.mib_iters, mib(source, args.mib_iters))]
        ds.transform = EvalTransform(512)
        rows.append(("ours eval (short side 512 + centre crop)", args.iters, ours(ds, args.iters)))
    print(f"\n{'path':58s} {'img/s/core':>10s} {'ms/img':>8s}")
    for name, n, dt in rows:
        print(f"{name:58s} {n / dt:10.1f} {1000 * dt / n:8.2f}")
    print(f"train speed-up vs MiB-like: {(rows[1][2] / rows[1][1]) / (rows[0][2] / rows[0][1]):.1f}x "
          f"(500x375 JPEG -> 512x512 crop, scale 0.5-2, 1 thread)")


if __name__ == "__main__":
    main()
