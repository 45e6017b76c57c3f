#!/usr/bin/env python3
"""Pascal VOC 2012 + SBD -> the folder segmentation/datasets/voc.py reads (MiB/PLOP/WILSON's data/voc).

    python data/prepare_voc.py --voc VOCtrainval_11-May-2012.tar --sbd benchmark.tgz --out data/voc
    python data/prepare_voc.py --voc VOCtrainval_11-May-2012.tar --aug SegmentationClassAug.zip --out data/voc

Each input is the download as it arrives or the folder it was extracted to. Writes

    <out>/JPEGImages/<id>.jpg              the images of train_aug and val only
    <out>/SegmentationClassAug/<id>.png    class ids 0..20, 255 = border/ignore
    <out>/splits/train_aug.txt             (VOC train + SBD train + SBD val) - VOC val: 10,582 ids, sorted
    <out>/splits/val.txt                   VOC2012 val: 1,449 ids, in VOC's order

The label of an image is VOC 2012's own SegmentationClass PNG when VOC has one (it keeps the 255 object borders),
else SBD's (benchmark_RELEASE/dataset/cls/<id>.mat, GTcls.Segmentation, written as a palette PNG; needs scipy),
or, with --aug, the SegmentationClassAug.zip PNG: the same rule that made SegmentationClassAug.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
SBD_URL = "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz"
AUG_URL = "http://cs.jhu.edu/~cxliu/data/SegmentationClassAug.zip (MiB's data/download_voc.sh)"
OFFICIAL = {"train_aug": 10582, "val": 1449}
ALLOWED = (*range(21), C.IGNORE)


def voc_palette() -> list[int]:
    """The standard VOC palette (same as segmentation/datasets/voc.py palette(); a test keeps them equal)."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


PALETTE = voc_palette()


def parse_ids(text: str) -> list[str]:
    """Ids of a list file: plain ids, or MiB/DeepLab lines "/JPEGImages/x.jpg /SegmentationClassAug/x.png"."""
    ids = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            first = line.split()[0]
            ids.append(Path(first).stem if ("/" in first or "." in first) else first)
    return ids


def sbd_mat_to_png(data: bytes, name: str) -> bytes:
    """SBD's cls/<id>.mat (a MATLAB struct GTcls with field Segmentation, HxW class ids) -> palette PNG."""
    from scipy.io import loadmat  # checked in build(); imported here so that workers need it only for SBD

    try:
        seg = np.asarray(loadmat(io.BytesIO(data), variable_names=["GTcls"])["GTcls"]["Segmentation"][0, 0])
    except Exception as exc:  # scipy raises many types for a broken or foreign file
        raise C.PrepError(f"{name}: not an SBD class label (struct GTcls with field Segmentation): {exc!r}; "
                          f"re-download benchmark.tgz ({SBD_URL})") from exc
    if seg.ndim != 2 or seg.size == 0 or seg.min() < 0 or seg.max() > 255:
        raise C.PrepError(f"{name}: GTcls.Segmentation has shape {seg.shape} and values {seg.min()}..{seg.max()}; "
                          f"expected an HxW map of class ids 0..20")
    return C.png_bytes(seg.astype(np.uint8), PALETTE)


def _read_list(download: C.Download, name: str) -> list[str]:
    if name not in download.entries and name not in download.small:
        raise C.PrepError(f"{download.path} has no {name}: is it {download.what}? (download: {download.url})")
    return parse_ids(download.read(name).decode())


Labels = dict[str, tuple[C.Download, C.Entry, C.Convert | None]]  # id -> where its label comes from
Images = dict[str, tuple[C.Download, C.Entry]]


def _add_sbd(path: Path, images: Images, labels: Labels) -> list[str]:
    """SBD's labels for the ids VOC has none for; returns SBD's train + val ids."""
    try:
        import scipy.io  # noqa: F401
    except ImportError:
        raise C.PrepError("SBD's labels are MATLAB .mat files: `pip install scipy`, or pass "
                          "--aug SegmentationClassAug.zip instead of --sbd") from None
    sbd = C.Download(path, "SBD's benchmark.tgz", SBD_URL)
    base = sbd.find_prefix(r"cls/[^/]+\.mat", "cls/*.mat (SBD class labels, benchmark_RELEASE/dataset/cls)")
    for i, e in sbd.files(f"{base}cls/", ".mat").items():
        labels.setdefault(i, (sbd, e, sbd_mat_to_png))  # VOC's own label wins: it has the 255 borders
    for i, e in sbd.files(f"{base}img/", ".jpg").items():
        images.setdefault(i, (sbd, e))  # VOC2012 trainval holds every SBD image; this is a fallback only
    return _read_list(sbd, f"{base}train.txt") + _read_list(sbd, f"{base}val.txt")


def _add_aug(path: Path, labels: Labels) -> list[str]:
    """SegmentationClassAug.zip's labels for the ids VOC has none for; returns all its ids."""
    aug = C.Download(path, "SegmentationClassAug.zip", AUG_URL)
    found = aug.files(aug.find_folder("SegmentationClassAug", ".png", "SegmentationClassAug/*.png"), ".png")
    for i, e in found.items():
        labels.setdefault(i, (aug, e, None))
    return sorted(found)


def build(args: argparse.Namespace) -> C.Plan:
    if (args.sbd is None) == (args.aug is None):
        raise C.PrepError("pass exactly one source of the augmented train labels: --sbd benchmark.tgz "
                          f"({SBD_URL}) or --aug SegmentationClassAug.zip ({AUG_URL})")
    voc = C.Download(args.voc, "VOCtrainval_11-May-2012.tar", VOC_URL)
    root = voc.find_prefix(r"ImageSets/Segmentation/val\.txt", "ImageSets/Segmentation/val.txt (VOC2012)")
    voc_train = _read_list(voc, f"{root}ImageSets/Segmentation/train.txt")
    val = _read_list(voc, f"{root}ImageSets/Segmentation/val.txt")
    images: Images = {i: (voc, e) for i, e in voc.files(f"{root}JPEGImages/", ".jpg").items()}
    labels: Labels = {i: (voc, e, None) for i, e in voc.files(f"{root}SegmentationClass/", ".png").items()}
    extra = _add_sbd(args.sbd, images, labels) if args.sbd else _add_aug(args.aug, labels)
    inputs = [str(Path(p).resolve()) for p in (args.voc, args.sbd or args.aug)]
    if args.train_aug_list is not None:
        train = _given_list(args.train_aug_list, set(val))
        inputs.append(str(args.train_aug_list.resolve()))
    else:
        train = sorted((set(voc_train) | set(extra)) - set(val))
    return _plan(args.out.resolve(), {"train_aug": train, "val": val}, images, labels, inputs,
                 args.train_aug_list is None)


def _given_list(where: Path, val: set[str]) -> list[str]:
    """An anchor's train_aug list, verbatim, once it is known not to repeat ids nor hold val ids."""
    if not where.is_file():
        raise C.PrepError(f"--train_aug_list {where} not found (e.g. MiB's data/voc/splits/train_aug.txt)")
    train = parse_ids(where.read_text())
    dup = len(train) - len(set(train))
    if dup:
        raise C.PrepError(f"{where} lists {dup} ids twice")
    leak = sorted(set(train) & val)
    if leak:
        raise C.PrepError(f"{where} has {len(leak)} VOC val ids (first: {', '.join(leak[:3])}): training on them "
                          f"would leak the test set")
    return train


def _plan(out: Path, splits: dict[str, list[str]], images: Images, labels: Labels, inputs: list[str],
          sorted_list: bool) -> C.Plan:
    jobs, pairs = [], {}
    for split, ids in splits.items():
        missing = [i for i in ids if i not in images or i not in labels]
        if missing:
            which = "image" if missing[0] not in images else "label"
            raise C.PrepError(f"{len(missing)} {split} ids have no image or label (first: {missing[0]}, no "
                              f"{which}): the downloads do not match (VOC 2012 trainval + SBD expected)")
        pairs[split] = [(out / "JPEGImages" / f"{i}.jpg", out / "SegmentationClassAug" / f"{i}.png") for i in ids]
    for i in dict.fromkeys(splits["train_aug"] + splits["val"]):
        jobs.append(C.job(*images[i], out / "JPEGImages" / f"{i}.jpg"))
        download, entry, convert = labels[i]
        jobs.append(C.job(download, entry, out / "SegmentationClassAug" / f"{i}.png", convert))
    texts = {out / "splits" / f"{s}.txt": "".join(f"{i}\n" for i in ids) for s, ids in splits.items()}
    notes = []
    if sorted_list:
        notes.append("splits/train_aug.txt is sorted. The anchors' index files (MiB/PLOP/WILSON "
                     "data/voc/<task>/train-<step>.npy) index THEIR train_aug.txt: to reuse those, re-run with "
                     "--train_aug_list <their data/voc/splits/train_aug.txt> (this pipeline computes its own).")
    return C.Plan(jobs, pairs, ALLOWED, OFFICIAL, texts=texts, notes=notes, inputs=inputs)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--voc", type=Path, required=True,
                   help=f"VOCtrainval_11-May-2012.tar or its extracted folder ({VOC_URL})")
    p.add_argument("--sbd", type=Path, help=f"SBD's benchmark.tgz or its extracted benchmark_RELEASE ({SBD_URL})")
    p.add_argument("--aug", type=Path, help=f"instead of --sbd: SegmentationClassAug.zip or its folder ({AUG_URL})")
    p.add_argument("--train_aug_list", type=Path,
                   help="use this train_aug list verbatim (e.g. MiB's data/voc/splits/train_aug.txt, whose order "
                        "the anchors' npy index files refer to) instead of computing a sorted one")
    C.common_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return C.main(lambda: C.prepare(args, "voc", args.out, args.out, lambda: build(args)))


if __name__ == "__main__":
    sys.exit(main())
