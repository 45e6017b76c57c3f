#!/usr/bin/env python3
"""ADE20K SceneParsing (ADEChallengeData2016.zip) -> the folder segmentation/datasets/ade.py reads.

    python data/prepare_ade.py --ade ADEChallengeData2016.zip --out data/ade

Writes <out>/ADEChallengeData2016/images/{training,validation}/*.jpg and .../annotations/{training,validation}/*.png
(gray class ids 0..150, 0 = "other") unchanged from the download, after checking that every image has its
annotation of the same size and that the official counts (20,210 training, 2,000 validation) are there.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
FOLDER = "ADEChallengeData2016"
SPLITS = ("training", "validation")
OFFICIAL = {"training": 20210, "validation": 2000}
ALLOWED = tuple(range(151))  # ADE has no 255: 0 is "other", which the tasks treat as background
EXTRAS = ("objectInfo150.txt", "sceneCategories.txt")  # class names, scene labels: small, kept for reference


def build(args: argparse.Namespace) -> C.Plan:
    ade = C.Download(args.ade, "ADEChallengeData2016.zip", URL)
    root = ade.find_prefix(r"images/training/[^/]+\.jpg", "images/training/*.jpg (ADEChallengeData2016)")
    out = (args.out / FOLDER).resolve()
    jobs, pairs = [], {}
    for split in SPLITS:
        images = ade.files(f"{root}images/{split}/", ".jpg")
        labels = ade.files(f"{root}annotations/{split}/", ".png")
        _check_matched(split, images, labels, ade)
        pairs[split] = []
        for stem in sorted(images):
            image, label = out / "images" / split / f"{stem}.jpg", out / "annotations" / split / f"{stem}.png"
            jobs += [C.job(ade, images[stem], image), C.job(ade, labels[stem], label)]
            pairs[split].append((image, label))
    for name in EXTRAS:
        if f"{root}{name}" in ade.entries:
            jobs.append(C.job(ade, ade.entries[f"{root}{name}"], out / name))
    listed = [(out / "images" / s, "*.jpg") for s in SPLITS]  # the loader's split = the sorted image listing
    return C.Plan(jobs, pairs, ALLOWED, OFFICIAL, listed=listed, inputs=[str(ade.path)])


def _check_matched(split: str, images: dict[str, C.Entry], labels: dict[str, C.Entry], ade: C.Download) -> None:
    if not images:
        raise C.PrepError(f"{ade.path} has no images/{split}/*.jpg: incomplete download? ({URL})")
    for what, missing in (("annotation", sorted(set(images) - set(labels))),
                          ("image", sorted(set(labels) - set(images)))):
        if missing:
            raise C.PrepError(f"{len(missing)} {split} files of {ade.path} have no {what} (first: {missing[0]}): "
                              f"incomplete download or extraction? ({URL})")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ade", type=Path, required=True, help=f"ADEChallengeData2016.zip or its extracted folder ({URL})")
    C.common_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # The loader takes the folder holding ADEChallengeData2016/ (or that folder itself) as --data_root.
    return C.main(lambda: C.prepare(args, "ade", args.out / FOLDER, args.out, lambda: build(args)))


if __name__ == "__main__":
    sys.exit(main())
