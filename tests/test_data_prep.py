"""data/prepare_*.py on small fixtures written in each official download's own layout and archive format (VOC's
.tar, SBD's .tgz with real MATLAB files, zips for SegmentationClassAug, ADE20K, COCO and Cityscapes). Each script
runs as a user runs it (a subprocess), is interrupted mid-way and resumed, and its output is read by the
pipeline's own loader: the point is that the scripts write exactly what the loaders read."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segmentation.datasets import VOCInCocoIds, build_source
from segmentation.datasets.cityscapes import TRAIN_ID_LUT
from segmentation.datasets.voc import palette

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
FAIL_ENV = "DATAPREP_FAIL_AFTER"


# ------------------------------------------------------------------------------------------------ helpers

def _jpeg(seed: int, h: int, w: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def _png(arr: np.ndarray, pal: list[int] | None = None) -> bytes:
    img = Image.fromarray(arr.astype(np.uint8))
    if pal is not None:
        img.putpalette(pal)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _label(seed: int, h: int, w: int, values: list[int]) -> np.ndarray:
    return np.random.default_rng(seed).choice(np.array(values, np.uint8), size=(h, w))


def _tar(path: Path, files: dict[str, bytes], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _run(script: str, *args: object, fail_after: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop(FAIL_ENV, None)
    if fail_after is not None:
        env[FAIL_ENV] = str(fail_after)
    return subprocess.run([sys.executable, str(DATA / script), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120, cwd=REPO)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _tree(root: Path) -> dict[str, bytes]:
    """Every output file and its bytes, without the marker (it holds a time stamp) and the loader's .cache."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".prepared.json" and ".cache" not in p.parts}


def _no_temp_left(root: Path) -> None:
    assert not list(root.rglob(".partial")), "the temp folder of an interrupted run was left behind"


def _resume_equals_clean(script: str, args: list[object], clean: Path, broken: Path, workers: int,
                         fail_after: int) -> None:
    """A run killed after `fail_after` writes (half a file left in .partial), then the same command again, gives
    byte for byte what one uninterrupted run gives."""
    _ok(_run(script, *args, "--out", clean, "--workers", workers, "--no-expect_official"))
    killed = _run(script, *args, "--out", broken, "--workers", workers, "--no-expect_official",
                  fail_after=fail_after)
    assert killed.returncode != 0, killed.stdout + killed.stderr
    assert list((broken).rglob(".partial/*")), "the kill hook should have left a half-written temp file"
    assert not list(broken.rglob(".prepared.json")), "an interrupted run must not write the marker"
    resumed = _ok(_run(script, *args, "--out", broken, "--workers", workers, "--no-expect_official"))
    assert "already done" in resumed.stderr
    assert _tree(broken) == _tree(clean)
    _no_temp_left(broken)
    _no_temp_left(clean)


def _data_root(proc: subprocess.CompletedProcess) -> tuple[str, Path]:
    """The --dataset and --data_root the script tells the user to pass to run.py (its last line)."""
    words = proc.stdout.strip().splitlines()[-1].split()
    assert words[:3] == ["python", "run.py", "--dataset"] and words[4] == "--data_root", proc.stdout
    return words[3], Path(words[5])


# ------------------------------------------------------------------------------------------------ VOC + SBD

VOC_TRAIN = ["2007_000032", "2007_000039"]
VOC_VAL = ["2007_000033", "2007_000042"]
SBD_TRAIN = ["2007_000032", "2008_000002", "2008_000003"]
SBD_VAL = ["2007_000033", "2008_000005"]
ALL_IDS = sorted(set(VOC_TRAIN + VOC_VAL + SBD_TRAIN + SBD_VAL))
TRAIN_AUG = ["2007_000032", "2007_000039", "2008_000002", "2008_000003", "2008_000005"]


def _size(i: str) -> tuple[int, int]:
    return (12, 16) if int(i[-1]) % 2 else (10, 14)


def _voc_label(i: str) -> np.ndarray:
    """VOC 2012's own label: classes plus a 255 border."""
    h, w = _size(i)
    lbl = _label(int(i.replace("_", "")) % 1000, h, w, [0, 15, 3])
    lbl[0, :] = 255
    return lbl


def _sbd_label(i: str) -> np.ndarray:
    h, w = _size(i)
    return _label(int(i[-3:]), h, w, [0, 7, 20])


def _mat(seg: np.ndarray) -> bytes:
    """An SBD cls/*.mat: struct GTcls with Segmentation, Boundaries (cell of sparse maps), CategoriesPresent."""
    from scipy import sparse
    from scipy.io import savemat

    boundaries = np.empty((20, 1), dtype=object)
    for k in range(20):
        boundaries[k, 0] = sparse.csc_matrix(seg == k + 1, dtype=np.float64)
    buf = io.BytesIO()
    present = np.unique(seg[seg > 0]).astype(np.uint8).reshape(-1, 1)
    savemat(buf, {"GTcls": {"Segmentation": seg, "Boundaries": boundaries, "CategoriesPresent": present}})
    return buf.getvalue()


def _voc_tar(tmp: Path) -> Path:
    base = "VOCdevkit/VOC2012/"
    files = {f"{base}ImageSets/Segmentation/train.txt": "".join(f"{i}\n" for i in VOC_TRAIN).encode(),
             f"{base}ImageSets/Segmentation/val.txt": "".join(f"{i}\n" for i in VOC_VAL).encode(),
             f"{base}ImageSets/Segmentation/trainval.txt": "".join(f"{i}\n" for i in VOC_TRAIN + VOC_VAL).encode()}
    for n, i in enumerate(ALL_IDS + ["2009_000001"]):  # the last one is in no list: not copied
        files[f"{base}JPEGImages/{i}.jpg"] = _jpeg(n, *_size(i))
        files[f"{base}Annotations/{i}.xml"] = b"<annotation/>"
    for i in VOC_TRAIN + VOC_VAL:
        files[f"{base}SegmentationClass/{i}.png"] = _png(_voc_label(i), palette())
    return _tar(tmp / "VOCtrainval_11-May-2012.tar", files)


def _sbd_tgz(tmp: Path) -> Path:
    base = "benchmark_RELEASE/dataset/"
    files = {f"{base}train.txt": "".join(f"{i}\n" for i in SBD_TRAIN).encode(),
             f"{base}val.txt": "".join(f"{i}\n" for i in SBD_VAL).encode()}
    for n, i in enumerate(SBD_TRAIN + SBD_VAL):
        files[f"{base}img/{i}.jpg"] = _jpeg(100 + n, *_size(i))
        files[f"{base}cls/{i}.mat"] = _mat(_sbd_label(i))
        files[f"{base}inst/{i}.mat"] = _mat(_sbd_label(i))  # instance maps: not used
    return _tar(tmp / "benchmark.tgz", files, "w:gz")


def _aug_zip(tmp: Path) -> Path:
    """SegmentationClassAug.zip: gray PNGs, VOC's labels where VOC has one, SBD's elsewhere (and macOS junk)."""
    files = {f"SegmentationClassAug/{i}.png": _png(_voc_label(i) if i in VOC_TRAIN + VOC_VAL else _sbd_label(i))
             for i in ALL_IDS}
    files["__MACOSX/SegmentationClassAug/._2007_000032.png"] = b"junk"
    return _zip(tmp / "SegmentationClassAug.zip", files)


@pytest.fixture(scope="module")
def voc_downloads(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("voc_dl")
    return {"voc": _voc_tar(tmp), "sbd": _sbd_tgz(tmp), "aug": _aug_zip(tmp)}


def test_voc_palette_matches_the_loader():
    sys.path.insert(0, str(DATA))
    try:
        import prepare_voc
    finally:
        sys.path.remove(str(DATA))
    assert prepare_voc.PALETTE == palette()


def test_voc_sbd_prepares_what_the_loader_reads(voc_downloads, tmp_path):
    out = tmp_path / "voc"
    proc = _ok(_run("prepare_voc.py", "--voc", voc_downloads["voc"], "--sbd", voc_downloads["sbd"], "--out", out,
                    "--workers", 2, "--no-expect_official"))
    assert _data_root(proc) == ("voc", out.resolve())
    assert (out / "splits" / "train_aug.txt").read_text().split() == TRAIN_AUG
    assert (out / "splits" / "val.txt").read_text().split() == VOC_VAL
    assert sorted(p.stem for p in (out / "JPEGImages").iterdir()) == sorted(TRAIN_AUG + VOC_VAL)
    train = build_source("voc", out, "train")
    val = build_source("voc", out, "val")
    assert train.ids == TRAIN_AUG and val.ids == VOC_VAL
    for k, i in enumerate(TRAIN_AUG):
        # VOC's own label (with its 255 border) where VOC has one, SBD's .mat elsewhere.
        expected = _voc_label(i) if i in VOC_TRAIN else _sbd_label(i)
        np.testing.assert_array_equal(train.load_label(k), expected)
        assert train.load_image(k).size == _size(i)[::-1]
    np.testing.assert_array_equal(val.load_label(1), _voc_label(VOC_VAL[1]))
    marker = json.loads((out / ".prepared.json").read_text())
    assert marker["counts"] == {"train_aug": 5, "val": 2} and marker["official_counts"] is False
    _no_temp_left(out)
    # A re-run sees the marker and does nothing.
    again = _ok(_run("prepare_voc.py", "--voc", voc_downloads["voc"], "--sbd", voc_downloads["sbd"], "--out", out))
    assert "already prepared" in again.stdout


def test_voc_aug_zip_gives_the_same_dataset(voc_downloads, tmp_path):
    sbd_out, aug_out = tmp_path / "sbd", tmp_path / "aug"
    _ok(_run("prepare_voc.py", "--voc", voc_downloads["voc"], "--sbd", voc_downloads["sbd"], "--out", sbd_out,
             "--workers", 1, "--no-expect_official"))
    _ok(_run("prepare_voc.py", "--voc", voc_downloads["voc"], "--aug", voc_downloads["aug"], "--out", aug_out,
             "--workers", 1, "--no-expect_official"))
    a, b = build_source("voc", sbd_out, "train"), build_source("voc", aug_out, "train")
    assert a.ids == b.ids == TRAIN_AUG
    for k in range(len(a)):
        np.testing.assert_array_equal(a.load_label(k), b.load_label(k))
    # WILSON's COCO-to-VOC step 1 reads the same folder with its labels in COCO ids.
    coco_ids = VOCInCocoIds(aug_out, "train").load_label(0)
    assert set(np.unique(coco_ids)) <= {0, 1, 16, 255}  # VOC 15 person -> COCO 1, VOC 3 bird -> COCO 16


def test_voc_interrupted_run_resumes_to_the_same_result(voc_downloads, tmp_path):
    _resume_equals_clean("prepare_voc.py", ["--voc", voc_downloads["voc"], "--sbd", voc_downloads["sbd"]],
                         tmp_path / "clean", tmp_path / "broken", workers=2, fail_after=3)


def test_voc_checks_official_counts_and_names_missing_downloads(voc_downloads, tmp_path):
    proc = _run("prepare_voc.py", "--voc", voc_downloads["voc"], "--sbd", voc_downloads["sbd"], "--out",
                tmp_path / "o")
    assert proc.returncode == 2
    assert "train_aug: 5 images, the official set has 10582" in proc.stderr and "--no-expect_official" in proc.stderr
    assert not (tmp_path / "o" / ".prepared.json").exists()
    proc = _run("prepare_voc.py", "--voc", tmp_path / "nope.tar", "--aug", voc_downloads["aug"], "--out",
                tmp_path / "o")
    assert proc.returncode == 2 and "nope.tar not found" in proc.stderr and "VOCtrainval_11-May-2012.tar" in proc.stderr
    proc = _run("prepare_voc.py", "--voc", voc_downloads["voc"], "--out", tmp_path / "o")
    assert proc.returncode == 2 and "--sbd benchmark.tgz" in proc.stderr


@pytest.mark.parametrize("which", ["voc", "sbd"])  # the plain VOC tar, and SBD's benchmark.tgz
def test_a_truncated_archive_says_the_download_is_incomplete(voc_downloads, tmp_path, which):
    data = voc_downloads[which].read_bytes()
    short = tmp_path / voc_downloads[which].name
    short.write_bytes(data[:int(len(data) * 0.6)])
    given = {**voc_downloads, which: short}
    proc = _run("prepare_voc.py", "--voc", given["voc"], "--sbd", given["sbd"], "--out", tmp_path / "o",
                "--no-expect_official")
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{short} ends early or is damaged" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "download is incomplete" in errors[0]


def test_voc_from_extracted_folders_and_a_given_list(voc_downloads, tmp_path):
    """Extracted downloads work like the archives; --train_aug_list keeps an anchor's list order verbatim; a
    truncated output (machine crash) is detected by its size and written again."""
    ext = tmp_path / "ext"
    with tarfile.open(voc_downloads["voc"]) as tf:
        tf.extractall(ext, filter="data")
    with zipfile.ZipFile(voc_downloads["aug"]) as zf:
        zf.extractall(ext)
    order = ["2008_000005", "2007_000032", "2008_000002"]
    listing = tmp_path / "train_aug.txt"
    listing.write_text("".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in order))
    out = tmp_path / "out"
    args = ["--voc", ext / "VOCdevkit", "--aug", ext / "SegmentationClassAug", "--train_aug_list", listing,
            "--out", out, "--no-expect_official", "--workers", 2]
    _ok(_run("prepare_voc.py", *args))
    assert build_source("voc", out, "train").ids == order
    jpeg = out / "JPEGImages" / f"{order[0]}.jpg"
    good = jpeg.read_bytes()
    jpeg.write_bytes(good[:10])
    _ok(_run("prepare_voc.py", *args, "--recheck"))
    assert jpeg.read_bytes() == good


# ------------------------------------------------------------------------------------------------ ADE20K

ADE = {"training": ["ADE_train_00000002", "ADE_train_00000001", "ADE_train_00000003"],
       "validation": ["ADE_val_00000001", "ADE_val_00000002"]}


def _ade_label(stem: str) -> np.ndarray:
    return _label(int(stem[-3:]) + len(stem), 12, 16, [0, 5, 120, 150])


@pytest.fixture(scope="module")
def ade_zip(tmp_path_factory) -> Path:
    base = "ADEChallengeData2016/"
    files = {f"{base}objectInfo150.txt": b"Idx\tRatio\tTrain\tVal\tName\n", f"{base}sceneCategories.txt": b""}
    for split, stems in ADE.items():
        for n, stem in enumerate(stems):
            files[f"{base}images/{split}/{stem}.jpg"] = _jpeg(n, 12, 16)
            files[f"{base}annotations/{split}/{stem}.png"] = _png(_ade_label(stem))
    return _zip(tmp_path_factory.mktemp("ade_dl") / "ADEChallengeData2016.zip", files)


def test_ade_prepares_what_the_loader_reads(ade_zip, tmp_path):
    out = tmp_path / "ade"
    proc = _ok(_run("prepare_ade.py", "--ade", ade_zip, "--out", out, "--no-expect_official", "--workers", 2))
    dataset, root = _data_root(proc)
    assert (dataset, root) == ("ade", out.resolve())
    train = build_source(dataset, root, "train")
    assert train.ids == sorted(ADE["training"]) and len(build_source(dataset, root, "val")) == 2
    np.testing.assert_array_equal(train.load_label(0), _ade_label(sorted(ADE["training"])[0]))
    assert (out / "ADEChallengeData2016" / "objectInfo150.txt").is_file()
    # An image that is not from the download would join the sorted listing: the check refuses it.
    stray = out / "ADEChallengeData2016" / "images" / "training" / "ADE_train_00000009.jpg"
    stray.write_bytes(_jpeg(9, 12, 16))
    proc = _run("prepare_ade.py", "--ade", ade_zip, "--out", out, "--no-expect_official", "--recheck")
    assert proc.returncode == 2 and "ADE_train_00000009.jpg: not from these downloads" in proc.stderr
    assert not (out / "ADEChallengeData2016" / ".prepared.json").exists()


def test_ade_interrupted_inline_run_resumes(ade_zip, tmp_path):
    # --workers 1: the kill hits the main process itself, as a kill -9 of the whole job would.
    _resume_equals_clean("prepare_ade.py", ["--ade", ade_zip], tmp_path / "clean", tmp_path / "broken",
                         workers=1, fail_after=4)


def test_ade_rejects_bad_labels_and_counts(tmp_path):
    base = "ADEChallengeData2016/"
    files = {f"{base}images/training/ADE_train_00000001.jpg": _jpeg(0, 12, 16),
             f"{base}annotations/training/ADE_train_00000001.png": _png(np.full((12, 16), 200)),  # > 150
             f"{base}images/validation/ADE_val_00000001.jpg": _jpeg(1, 12, 16),
             f"{base}annotations/validation/ADE_val_00000001.png": _png(np.zeros((10, 16)))}  # wrong size
    bad = _zip(tmp_path / "ADEChallengeData2016.zip", files)
    proc = _run("prepare_ade.py", "--ade", bad, "--out", tmp_path / "o")
    assert proc.returncode == 2 and "training: 1 images, the official set has 20210" in proc.stderr
    proc = _run("prepare_ade.py", "--ade", bad, "--out", tmp_path / "o", "--no-expect_official")
    assert proc.returncode == 2
    assert "label values [200] are not allowed" in proc.stderr and "differs from its image" in proc.stderr


# ------------------------------------------------------------------------------------------------ COCO

COCO = {"train2017": ["000000000009", "000000000025", "000000000030"], "val2017": ["000000000139"]}


def _stuffthing(stem: str) -> np.ndarray:
    """0-based COCO-Stuff ids: 0 person, 1 bicycle, 11 an unused thing id (COCO 12), 91.. stuff, 255 unlabelled."""
    return _label(int(stem), 12, 16, [0, 1, 11, 91, 150, 181, 255])


def _coco_zips(tmp: Path) -> dict[str, Path]:
    zips = {split: _zip(tmp / f"{split}.zip", {f"{split}/{s}.jpg": _jpeg(int(s), 12, 16) for s in stems})
            for split, stems in COCO.items()}
    maps = {f"{split}/{s}.png": _png(_stuffthing(s)) for split, stems in COCO.items() for s in stems}
    zips["stuff"] = _zip(tmp / "stuffthingmaps_trainval2017.zip", maps)
    return zips


def _coco_args(z: dict[str, Path]) -> list[object]:
    return ["--train2017", z["train2017"], "--val2017", z["val2017"], "--stuffthingmaps", z["stuff"]]


def test_coco_prepares_what_the_loader_reads(voc_downloads, tmp_path):
    z = _coco_zips(tmp_path)
    voc = tmp_path / "voc_prepared"
    _ok(_run("prepare_voc.py", "--voc", voc_downloads["voc"], "--sbd", voc_downloads["sbd"], "--out", voc,
             "--no-expect_official", "--workers", 1))
    out = tmp_path / "data"
    proc = _ok(_run("prepare_coco.py", *_coco_args(z), "--voc", voc, "--out", out, "--no-expect_official"))
    dataset, root = _data_root(proc)
    assert (dataset, root) == ("coco-voc", out.resolve())
    label = np.asarray(Image.open(out / "coco" / "annotations" / "train2017" / "000000000009.png"))
    raw = _stuffthing("000000000009")
    # WILSON's make_annotation.py: thing t -> t + 1, stuff -> 0, 255 kept.
    expected = np.where(raw < 91, raw + 1, np.where(raw == 255, 255, 0))
    np.testing.assert_array_equal(label, expected)
    train = build_source(dataset, root, "train")
    assert train.ids == COCO["train2017"]
    loaded = train.load_label(0)
    np.testing.assert_array_equal(loaded, np.where(expected == 12, 255, expected))  # the loader voids id 12
    assert set(np.unique(loaded)) == {0, 1, 2, 255}
    # Step 1 of COCO-to-VOC finds VOC through the link, in COCO ids.
    from segmentation.datasets import step_sources
    sources = step_sources(dataset, root, 1)
    assert len(sources.train) == len(TRAIN_AUG) and "voc" in sources.extra_tests
    assert set(np.unique(sources.train.load_label(0))) <= {0, 1, 16, 255}


def test_coco_interrupted_run_resumes_and_split_lists(tmp_path):
    z = _coco_zips(tmp_path)
    _resume_equals_clean("prepare_coco.py", _coco_args(z), tmp_path / "clean", tmp_path / "broken", workers=2,
                         fail_after=2)
    split = tmp_path / "split"
    split.mkdir()
    (split / "train.txt").write_text("000000000030\n000000000009\n000000000025\n")
    (split / "val.txt").write_text("000000000139\n")
    out = tmp_path / "wilson"
    _ok(_run("prepare_coco.py", *_coco_args(z), "--split_dir", split, "--out", out, "--no-expect_official"))
    assert build_source("coco-voc", out, "train").ids == ["000000000030", "000000000009", "000000000025"]


def test_coco_rejects_maps_that_are_not_coco_stuff(tmp_path):
    z = _coco_zips(tmp_path)
    z["stuff"] = _zip(tmp_path / "bad.zip", {f"{split}/{s}.png": _png(np.full((12, 16), 200))
                                             for split, stems in COCO.items() for s in stems})
    proc = _run("prepare_coco.py", *_coco_args(z), "--out", tmp_path / "o", "--no-expect_official")
    assert proc.returncode == 2 and "values [200] are not COCO-Stuff ids" in proc.stderr
    proc = _run("prepare_coco.py", *_coco_args(z), "--out", tmp_path / "o")
    assert proc.returncode == 2 and "train2017: 3 images, the official set has 118287" in proc.stderr


# ------------------------------------------------------------------------------------------------ Cityscapes

CITY = {"train": {"aachen": ["000000_000019", "000001_000019"], "bremen": ["000000_000019"]},
        "val": {"frankfurt": ["000000_000294"]}}


def _city_label(city: str, frame: str) -> np.ndarray:
    return _label(len(city) + int(frame[:6]), 8, 16, [0, 1, 7, 8, 26, 33])  # labelIds, some void (0, 1)


@pytest.fixture(scope="module")
def city_zips(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("city_dl")
    images = {"README": b"", "license.txt": b""}
    labels = {"README": b"", "license.txt": b""}
    for split, cities in {**CITY, "test": {"berlin": ["000000_000019"]}}.items():
        for city, frames in cities.items():
            for frame in frames:
                stem = f"{city}_{frame}"
                images[f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"] = _png(
                    np.random.default_rng(len(stem)).integers(0, 256, (8, 16, 3)))
                for kind in ("color", "instanceIds"):
                    labels[f"gtFine/{split}/{city}/{stem}_gtFine_{kind}.png"] = _png(np.zeros((8, 16)))
                labels[f"gtFine/{split}/{city}/{stem}_gtFine_polygons.json"] = b"{}"
                labels[f"gtFine/{split}/{city}/{stem}_gtFine_labelIds.png"] = _png(_city_label(city, frame))
    return {"images": _zip(tmp / "leftImg8bit_trainvaltest.zip", images),
            "labels": _zip(tmp / "gtFine_trainvaltest.zip", labels)}


def test_cityscapes_prepares_what_the_loader_reads(city_zips, tmp_path):
    out = tmp_path / "cityscapes"
    proc = _ok(_run("prepare_cityscapes.py", "--images", city_zips["images"], "--labels", city_zips["labels"],
                    "--out", out, "--no-expect_official", "--workers", 2))
    dataset, root = _data_root(proc)
    assert (dataset, root) == ("cityscapes", out.resolve())
    train = build_source(dataset, root, "train")
    assert train.ids == ["aachen/aachen_000000_000019", "aachen/aachen_000001_000019", "bremen/bremen_000000_000019"]
    np.testing.assert_array_equal(train.load_label(2), TRAIN_ID_LUT[_city_label("bremen", "000000_000019")])
    assert build_source(dataset, root, "train", cities=["bremen"]).ids == ["bremen/bremen_000000_000019"]
    assert build_source(dataset, root, "val").ids == ["frankfurt/frankfurt_000000_000294"]
    assert not (out / "leftImg8bit" / "test").exists()  # no labels: not prepared
    assert sorted(p.name for p in (out / "gtFine" / "val" / "frankfurt").iterdir()) == [
        "frankfurt_000000_000294_gtFine_labelIds.png"]
    proc = _run("prepare_cityscapes.py", "--images", city_zips["images"], "--labels", city_zips["labels"],
                "--out", tmp_path / "o")
    assert proc.returncode == 2 and "the official set has" in proc.stderr


def test_cityscapes_interrupted_run_resumes(city_zips, tmp_path):
    _resume_equals_clean("prepare_cityscapes.py", ["--images", city_zips["images"], "--labels", city_zips["labels"]],
                         tmp_path / "clean", tmp_path / "broken", workers=2, fail_after=2)


def test_cityscapes_from_one_extracted_folder_with_links(city_zips, tmp_path):
    """Both zips extracted into one folder (as cityscapes' docs say) and --link: the outputs are hard links."""
    ext = tmp_path / "extracted"
    for z in city_zips.values():
        with zipfile.ZipFile(z) as zf:
            zf.extractall(ext)
    out = tmp_path / "out"
    _ok(_run("prepare_cityscapes.py", "--images", ext, "--labels", ext, "--out", out, "--no-expect_official",
             "--link", "--workers", 2))
    rel = "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    assert (out / rel).stat().st_ino == (ext / rel).stat().st_ino
    assert len(build_source("cityscapes", out, "train")) == 3
