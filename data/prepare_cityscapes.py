#!/usr/bin/env python3
"""Cityscapes (leftImg8bit_trainvaltest.zip + gtFine_trainvaltest.zip) -> the folder
segmentation/datasets/cityscapes.py reads.

    python data/prepare_cityscapes.py --images leftImg8bit_trainvaltest.zip --labels gtFine_trainvaltest.zip \
        --out data/cityscapes

Writes <out>/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and <out>/gtFine/{train,val}/<city>/
*_gtFine_labelIds.png, unchanged. No *_labelTrainIds.png is written: the loader reads the labelIds files shipped in
the zip and maps them to the 19 trainIds itself (cityscapes.py LABEL_TO_TRAIN), so cityscapesScripts'
createTrainIdLabelImgs is not needed. The test split (no public labels) and the other gtFine files (_color,
_instanceIds, _polygons.json) are left out. Official counts: 2,975 train images in 18 cities, 500 val in 3.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

URL = "https://www.cityscapes-dataset.com/downloads/ (login required)"
SPLITS = ("train", "val")
OFFICIAL = {"train": 2975, "val": 500}
OFFICIAL_CITIES = {"train": 18, "val": 3}
IMAGE, LABEL = "_leftImg8bit.png", "_gtFine_labelIds.png"
# labelIds 0..33 (cityscapesScripts labels.py); 255 for the -1 id (license plate) should a tool have drawn it.
ALLOWED = (*range(34), C.IGNORE)


def _by_city(download: C.Download, root: str, top: str, split: str, suffix: str) -> dict[str, C.Entry]:
    """'<city>/<stem>' -> entry, for <root><top>/<split>/<city>/<stem><suffix>."""
    folder = f"{root}{top}/{split}/"
    out = {}
    for name, entry in download.entries.items():
        if name.startswith(folder) and name.endswith(suffix):
            rest = name[len(folder):-len(suffix)]
            if rest.count("/") == 1:
                out[rest] = entry
    return out


def build(args: argparse.Namespace) -> C.Plan:
    images = C.Download(args.images, "leftImg8bit_trainvaltest.zip", URL)
    labels = C.Download(args.labels, "gtFine_trainvaltest.zip", URL)
    iroot = images.find_prefix(rf"leftImg8bit/train/[^/]+/[^/]+{IMAGE}", f"leftImg8bit/train/<city>/*{IMAGE}")
    lroot = labels.find_prefix(rf"gtFine/train/[^/]+/[^/]+{LABEL}", f"gtFine/train/<city>/*{LABEL}")
    out = args.out.resolve()
    jobs, pairs, cities = [], {}, {}
    for split in SPLITS:
        imgs = _by_city(images, iroot, "leftImg8bit", split, IMAGE)
        lbls = _by_city(labels, lroot, "gtFine", split, LABEL)
        missing = sorted(set(imgs) - set(lbls)) or sorted(set(lbls) - set(imgs))
        if not imgs or missing:
            raise C.PrepError(f"{split}: {len(imgs)} images in {images.path}, {len(lbls)} labelIds in {labels.path}"
                              f"{f', unmatched: {missing[0]}' if missing else ''}: incomplete download or "
                              f"extraction? ({URL})")
        cities[split] = len({k.split("/")[0] for k in imgs})
        pairs[split] = []
        for key in sorted(imgs):
            image, label = out / "leftImg8bit" / split / f"{key}{IMAGE}", out / "gtFine" / split / f"{key}{LABEL}"
            jobs += [C.job(images, imgs[key], image), C.job(labels, lbls[key], label)]
            pairs[split].append((image, label))
    if args.expect_official and cities != OFFICIAL_CITIES:
        raise C.PrepError(f"cities per split {cities}, the official set has {OFFICIAL_CITIES}: incomplete "
                          f"download? To prepare a subset on purpose, add --no-expect_official.")
    listed = [(out / "leftImg8bit" / s, f"*/*{IMAGE}") for s in SPLITS]  # what the loader globs
    notes = ["the loader maps labelIds to the 19 trainIds itself; no *_labelTrainIds.png are needed"]
    return C.Plan(jobs, pairs, ALLOWED, OFFICIAL, listed=listed, notes=notes,
                  inputs=[str(images.path), str(labels.path)])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, required=True,
                   help=f"leftImg8bit_trainvaltest.zip or the folder holding its leftImg8bit/ ({URL})")
    p.add_argument("--labels", type=Path, required=True,
                   help=f"gtFine_trainvaltest.zip or the folder holding its gtFine/ ({URL})")
    C.common_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return C.main(lambda: C.prepare(args, "cityscapes", args.out, args.out, lambda: build(args)))


if __name__ == "__main__":
    sys.exit(main())
