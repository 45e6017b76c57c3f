#!/usr/bin/env python3
"""COCO 2017 + COCO-Stuff pixel maps -> WILSON's COCO layout, read by segmentation/datasets/coco.py ("coco-voc").

    python data/prepare_coco.py --train2017 train2017.zip --val2017 val2017.zip \
        --stuffthingmaps stuffthingmaps_trainval2017.zip --out data \
        [--voc data/voc] [--split_dir WILSON/data/coco/split]

Writes (WILSON's data/ folder: --data_root is <out>, holding coco/ and, for step 1, voc/)

    <out>/coco/images/{train2017,val2017}/<id>.jpg        unchanged
    <out>/coco/annotations/{train2017,val2017}/<id>.png   0 = background (every stuff class), 1..90 = COCO
                                                          thing ids, 255 = unlabelled (void)
    <out>/coco/split/{train,val}.txt                      only with --split_dir (WILSON's id lists)

The COCO-Stuff maps are 0-based (person = 0, stuff = 91..181, 255 = unlabelled). The conversion is WILSON's
data/coco/make_annotation.py: thing t -> t + 1 (its COCO category id), stuff -> 0, 255 kept. It writes
annotations/, not WILSON's annotations_my/ (both are read by the loader). The loader then maps the ids no
annotation uses (tasks/coco-voc.toml `ignore`) and 91 to 255 itself.

COCO-to-VOC step 1 trains on Pascal VOC with its labels read as COCO ids: the loader maps VOC ids on the fly
(coco.py VOC_TO_COCO, WILSON's make_cocovoc.py), so no SegmentationClassAugAsCoco is written; it only needs the
folder prepared by prepare_voc.py at <out>/voc: prepare it there, or pass --voc to link an existing one.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

IMAGES_URL = "http://images.cocodataset.org/zips/{split}.zip"
STUFF_URL = "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip"
SPLITS = ("train2017", "val2017")
LISTS = {"train2017": "train", "val2017": "val"}  # WILSON's split/<name>.txt per COCO folder
OFFICIAL = {"train2017": 118287, "val2017": 5000}
NUM_THINGS = 91  # 0-based thing ids 0..90 in COCO-Stuff (COCO category ids 1..91, 11 of them unused)
NUM_STUFFTHING = 182
ALLOWED = (*range(NUM_THINGS + 1), C.IGNORE)


def _shift_lut() -> np.ndarray:
    lut = np.zeros(256, np.uint8)  # stuff -> 0 (background)
    lut[:NUM_THINGS] = np.arange(1, NUM_THINGS + 1)
    lut[C.IGNORE] = C.IGNORE
    return lut


SHIFT = _shift_lut()
RAW_OK = np.zeros(256, bool)
RAW_OK[:NUM_STUFFTHING] = RAW_OK[C.IGNORE] = True


def stuffthing_to_wilson(data: bytes, name: str) -> bytes:
    raw = C.decode_label(data, name)
    present = np.flatnonzero(np.bincount(raw.ravel(), minlength=256))
    bad = [int(v) for v in present if not RAW_OK[v]]
    if bad:
        raise C.PrepError(f"{name}: values {bad} are not COCO-Stuff ids (0..181, 255 = unlabelled): is this "
                          f"stuffthingmaps_trainval2017.zip ({STUFF_URL})?")
    return C.png_bytes(SHIFT[raw])


def build(args: argparse.Namespace) -> C.Plan:
    stuff = C.Download(args.stuffthingmaps, "stuffthingmaps_trainval2017.zip (COCO-Stuff)", STUFF_URL)
    downloads = {"train2017": args.train2017, "val2017": args.val2017}
    out = (args.out / "coco").resolve()
    jobs, pairs, texts, inputs = [], {}, {}, [str(stuff.path)]
    for split in SPLITS:
        images = C.Download(downloads[split], f"{split}.zip (COCO 2017 images)", IMAGES_URL.format(split=split))
        inputs.append(str(images.path))
        jpgs = images.files(images.find_folder(split, ".jpg", f"{split}/*.jpg"), ".jpg")
        pngs = stuff.files(stuff.find_folder(split, ".png", f"{split}/*.png (COCO-Stuff pixel maps)"), ".png")
        for what, missing in (("pixel map", sorted(set(jpgs) - set(pngs))), ("image", sorted(set(pngs) - set(jpgs)))):
            if missing:
                raise C.PrepError(f"{len(missing)} {split} files have no {what} (first: {missing[0]}): "
                                  f"incomplete download or extraction of {images.path} or {stuff.path}?")
        pairs[split] = []
        for stem in sorted(jpgs):
            image, label = out / "images" / split / f"{stem}.jpg", out / "annotations" / split / f"{stem}.png"
            _refuse_in_place(stuff, pngs[stem], label)
            jobs += [C.job(images, jpgs[stem], image), C.job(stuff, pngs[stem], label, stuffthing_to_wilson)]
            pairs[split].append((image, label))
        if args.split_dir is not None:
            texts[out / "split" / f"{LISTS[split]}.txt"] = _split_list(args.split_dir, split, set(jpgs))
    listed = [] if args.split_dir else [(out / "images" / s, "*.jpg") for s in SPLITS]
    return C.Plan(jobs, pairs, ALLOWED, OFFICIAL, texts=texts, listed=listed, notes=_voc_note(args.out),
                  inputs=inputs)


def _refuse_in_place(stuff: C.Download, entry: C.Entry, label: Path) -> None:
    # Converting a raw folder onto itself would be skipped as "done" and leave raw ids in place.
    if stuff.kind == "dir" and stuff.path / entry.name == label:
        raise C.PrepError(f"--stuffthingmaps {stuff.path} is where the converted labels go ({label.parent}); "
                          f"move the raw maps elsewhere or choose another --out")


def _split_list(split_dir: Path, split: str, have: set[str]) -> str:
    """WILSON's split/{train,val}.txt verbatim: its data/coco/*/train-0.npy index files refer to this order."""
    path = Path(split_dir) / f"{LISTS[split]}.txt"
    if not path.is_file():
        raise C.PrepError(f"{path} not found: --split_dir is WILSON's data/coco/split folder (train.txt, val.txt)")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    missing = [i for i in ids if i not in have]
    if missing:
        raise C.PrepError(f"{path} lists {len(missing)} ids with no {split} image (first: {missing[0]})")
    return "".join(f"{i}\n" for i in ids)


def link_voc(out: Path, voc: Path) -> None:
    """<out>/voc -> a folder prepared by prepare_voc.py (COCO-to-VOC step 1 reads it there)."""
    voc = voc.expanduser().resolve()
    if not (voc / C.MARKER).is_file():
        raise C.PrepError(f"--voc {voc} is not a finished prepare_voc.py output (no {C.MARKER}); run "
                          f"data/prepare_voc.py --out {voc} first")
    target = out / "voc"
    if target.is_symlink() and target.resolve() == voc:
        return
    if target.exists() or target.is_symlink():
        raise C.PrepError(f"{target} exists already and is not a link to {voc}; remove it or leave out --voc")
    out.mkdir(parents=True, exist_ok=True)
    os.symlink(voc, target, target_is_directory=True)


def _voc_note(out: Path) -> list[str]:
    voc = out.resolve() / "voc"
    if (voc / C.MARKER).is_file():
        return [f"COCO-to-VOC step 1 will read Pascal VOC from {voc}"]
    return [f"COCO-to-VOC step 1 also needs Pascal VOC at {voc}: python data/prepare_voc.py --voc ... --sbd ... "
            f"--out {voc} (or re-run this with --voc <a prepared VOC folder>)"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for split in SPLITS:
        p.add_argument(f"--{split}", type=Path, required=True,
                       help=f"{split}.zip or the folder holding its {split}/ ({IMAGES_URL.format(split=split)})")
    p.add_argument("--stuffthingmaps", type=Path, required=True,
                   help=f"stuffthingmaps_trainval2017.zip or the folder holding its train2017/ val2017/ ({STUFF_URL})")
    p.add_argument("--voc", type=Path, help="link this prepare_voc.py output as <out>/voc (COCO-to-VOC step 1)")
    p.add_argument("--split_dir", type=Path,
                   help="WILSON's data/coco/split folder: write its train.txt/val.txt (their order is what WILSON's "
                        "npy index files refer to) instead of letting the loader sort the images")
    C.common_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def run() -> int:
        if args.voc is not None:
            link_voc(args.out.resolve(), args.voc)
        return C.prepare(args, "coco-voc", args.out / "coco", args.out, lambda: build(args))

    return C.main(run)


if __name__ == "__main__":
    sys.exit(main())
