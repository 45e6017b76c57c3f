"""WILSON through run.py on tiny shapes: a fully supervised --bce step 0, then weak steps that see no pixel label."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segmentation.datasets import ShapesSource
from segmentation.tasks import load_task
from test_pipeline import TINY, load_weights, run_py, torchrun

STEP = [*TINY, "--task", "6-4", "--batch_size", "4", "--norm_act", "iabn_sync", "--method", "WILSON",
        "--lr", "0.01", "--epochs", "2", "--pseudo_ep", "1"]


def step(root: Path, tmp: Path, name: str, step_: int, *extra: str, nproc: int = 0):
    args = [*STEP, "--data_root", str(root), "--checkpoint_dir", str(tmp / "ck"), "--logdir", str(tmp / "tb"),
            "--name", name, "--step", str(step_), *extra]
    result = torchrun(nproc, *args, cwd=tmp) if nproc else run_py(*args, cwd=tmp)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


@pytest.fixture(scope="module")
def base(shapes_root: Path, tmp_path_factory) -> Path:
    """Step 0 (--bce, WILSON's preset), shared by the tests below as --step_ckpt."""
    tmp = tmp_path_factory.mktemp("wilson0")
    step(shapes_root, tmp, "w", 0)
    return tmp / "ck/step/shapes-6-4/w_0.pth"


def copy_data(shapes_root: Path, dest: Path) -> Path:
    shutil.copytree(shapes_root, dest)
    shutil.rmtree(dest / ".cache", ignore_errors=True)
    return dest


def test_a_weak_step_cannot_see_pixel_labels(shapes_root, tmp_path, base):
    """Bit-identical weights and metrics when every training mask is replaced by another mask with the same set
    of classes (proof that no pixel label of the training images reaches the method)."""
    step(shapes_root, tmp_path, "a", 1, "--step_ckpt", str(base))
    other = copy_data(shapes_root, tmp_path / "other")
    source = ShapesSource(other, "train")
    for i in range(len(source)):
        label = source.load_label(i)
        moved = np.roll(label[::-1, ::-1], shift=(5, 9), axis=(0, 1))  # same classes, other places
        assert set(np.unique(moved)) == set(np.unique(label))
        with Image.open(source.label_path(i)) as original:
            palette = original.getpalette()
        out = Image.fromarray(np.ascontiguousarray(moved), mode="P")
        out.putpalette(palette)
        out.save(source.label_path(i))
    step(other, tmp_path, "b", 1, "--step_ckpt", str(base))
    folder = tmp_path / "ck/step/shapes-6-4"
    a, b = load_weights(folder / "a_1.pth"), load_weights(folder / "b_1.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((folder / f"{n}_1.json").read_text()) for n in "ab")
    assert ra["confusion_matrix"] == rb["confusion_matrix"] and ra["weak"] is True
    assert any(key.startswith("cls.1.") for key in a)


def test_image_label_file_trains_with_no_training_mask_on_disk(shapes_root, tmp_path, base):
    data = copy_data(shapes_root, tmp_path / "tagged")
    task, source = load_task("shapes", "6-4"), ShapesSource(data, "train")
    lines = ["image,labels"]
    for i, image_id in enumerate(source.ids):
        classes = sorted(set(np.unique(source.load_label(i)).tolist()) - {0, 255})
        lines.append(",".join([image_id, *(task.class_names[c] for c in classes)]))
    tags = tmp_path / "tags.csv"
    tags.write_text("\n".join(lines) + "\n")
    for i in range(len(source)):
        source.label_path(i).unlink()  # no training mask at all; val masks stay for the evaluation
    # A deliberate edit of the generated copy: drop its file count, or the loader reports the files as lost.
    meta = json.loads((data / "meta.json").read_text())
    meta.pop("files", None)
    (data / "meta.json").write_text(json.dumps(meta))
    result = step(data, tmp_path, "tags", 1, "--step_ckpt", str(base), "--image_labels", str(tags))
    assert "epoch 2/2" in result.stdout and (tmp_path / "ck/step/shapes-6-4/tags_1.pth").is_file()


def test_weak_step_under_two_gloo_ranks_wraps_the_localizer(shapes_root, tmp_path, base):
    result = step(shapes_root, tmp_path, "ddp", 1, "--step_ckpt", str(base), "--batch_size", "8", nproc=2)
    assert "cam=" in result.stdout and "seg=" in result.stdout and "cls=" in result.stdout
    record = json.loads((tmp_path / "ck/step/shapes-6-4/ddp_1.json").read_text())
    assert record["weak"] is True and record["miou_new"] is not None


def test_weak_flags_are_refused_where_they_cannot_work(shapes_root, tmp_path):
    mib = run_py(*TINY, "--data_root", str(shapes_root), "--task", "6-4", "--step", "1", "--method", "MiB",
                 "--weakly", cwd=tmp_path)
    assert mib.returncode == 2 and "--method mib needs pixel labels" in mib.stderr and "wilson" in mib.stderr
    zero = run_py(*TINY, "--data_root", str(shapes_root), "--task", "6-4", "--method", "WILSON", "--weakly",
                  cwd=tmp_path)
    assert zero.returncode == 2 and "--weakly applies to steps t>0" in zero.stderr
    tags = run_py(*TINY, "--data_root", str(shapes_root), "--task", "6-4", "--method", "WILSON", "--image_labels",
                  str(tmp_path / "tags.csv"), cwd=tmp_path)
    assert tags.returncode == 2 and "--image_labels applies to steps t>0" in tags.stderr


def test_a_killed_weak_step_resumes_exactly_localizer_included(shapes_root, tmp_path, base):
    """SIGKILL mid-step (2 gloo ranks), restart the same command: bit-identical to the uninterrupted step, the
    localizer (an extra module, in its own DDP) included; the artifact keeps the localizer."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from test_resume import ENV, children
    from test_pipeline import REPO

    def command(name: str) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                str(REPO / "run.py"), *STEP, "--data_root", str(shapes_root), "--checkpoint_dir", str(tmp_path / "ck"),
                "--logdir", str(tmp_path / "tb"), "--step", "1", "--step_ckpt", str(base), "--batch_size", "8",
                "--save_interval", "3", "--name", name]

    reference = subprocess.run(command("ref"), cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    states = tmp_path / "ck/run/shapes-6-4/kill_1"
    proc = subprocess.Popen(command("kill"), cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while len(list(states.glob("iter_*.pth"))) < 2:  # past the first epoch end: pseudo-labels are in use
        assert proc.poll() is None, "the run ended before the test could kill it"
        time.sleep(0.05)
    for pid in [*children(proc.pid), proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(command("kill"), cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-3000:]
    folder = tmp_path / "ck/step/shapes-6-4"
    ref, mine = (torch.load(folder / f"{n}_1.pth", weights_only=True) for n in ("ref", "kill"))
    for a, b in ((ref["model_state"], mine["model_state"]),
                 (ref["extra_modules"]["localizer"], mine["extra_modules"]["localizer"])):
        assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_validation_scores_and_draws_the_localizer_under_bf16_autocast(shapes_root, tmp_path, base):
    """--val_interval 1: WILSON's Val_CAM (the localizer against the label with old classes as background) is logged
    beside the model's val mIoU, and the val pictures hold image | ground truth | prediction | CAM | pseudo-label.
    --amp (bf16 autocast on CPU) runs the localizer on the model's bf16 features, as on a GPU by default."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = step(shapes_root, tmp_path, "val", 1, "--step_ckpt", str(base), "--val_interval", "1", "--amp")
    assert "val_cam after epoch 2: mIoU all" in result.stdout and "val after epoch 2" in result.stdout
    events = EventAccumulator(str(tmp_path / "tb/shapes-6-4/val_1"), size_guidance={"images": 0}).Reload()
    assert {"val_cam/miou_all", "val_cam/miou_new", "val/miou_all", "train/cam", "train/seg"} <= set(
        events.Tags()["scalars"])
    assert len(events.Scalars("val_cam/miou_new")) == 2  # one per epoch
    picture = events.Images("val/sample_0")[-1]
    assert (picture.width, picture.height) == (5 * 32, 32)
    assert "image | ground truth | prediction | cam | pseudo" in str(events.Tensors("val/sample_columns/text_summary")[-1])


# ------------------------------------------------------------------------------------------------ COCO-to-VOC

def _blob_image(path: Path, label: np.ndarray, seed: int) -> None:
    """A colour per class plus noise, so that the picture matches its mask."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (256, 3))
    pixels = np.clip(colours[label] + rng.integers(-20, 20, (*label.shape, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _two_objects(a: int, b: int, size: int = 32) -> np.ndarray:
    label = np.zeros((size, size), np.uint8)
    label[4:14, 4:14] = a
    label[18:28, 16:30] = b
    label[14, 4:14] = 255
    return label


def write_coco_voc(root: Path) -> Path:
    """WILSON's data/ folder in miniature: data/coco (COCO 2017 images + thing-id PNGs) and data/voc (VOC layout)."""
    from segmentation.datasets.voc import palette

    def coco(split: str, pairs: list[tuple[int, int]]) -> None:
        for n, (a, b) in enumerate(pairs):
            stem = f"{n + 1:012d}"
            label = _two_objects(a, b)
            _blob_image(root / "coco/images" / split / f"{stem}.jpg", label, n)
            (root / "coco/annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(label, mode="L").save(root / "coco/annotations" / split / f"{stem}.png")

    def voc(split: str, pairs: list[tuple[int, int]], offset: int) -> list[str]:
        stems = []
        for n, (a, b) in enumerate(pairs):
            stem = f"2008_{offset + n:06d}"
            label = Image.fromarray(_two_objects(a, b), mode="P")
            label.putpalette(palette())
            _blob_image(root / "voc/JPEGImages" / f"{stem}.jpg", np.asarray(label), offset + n)
            (root / "voc/SegmentationClassAug").mkdir(parents=True, exist_ok=True)
            label.save(root / "voc/SegmentationClassAug" / f"{stem}.png")
            stems.append(stem)
        (root / "voc/splits").mkdir(parents=True, exist_ok=True)
        (root / "voc/splits" / f"{split}.txt").write_text("\n".join(stems) + "\n")
        return stems

    # COCO ids: truck 8, traffic light 10, elephant 22 are step-0 classes; person 1, chair 62 are VOC classes.
    coco("train2017", [(8, 10), (22, 8), (10, 22), (8, 22)] * 2)
    coco("val2017", [(8, 1), (22, 62), (10, 1), (62, 8)])
    # VOC ids: person 15 (COCO 1), chair 9 (COCO 62), dog 12 (COCO 18).
    voc("train_aug", [(15, 9), (12, 15), (9, 12), (15, 12)] * 2, 0)
    voc("val", [(15, 9), (12, 9), (15, 12)], 100)
    return root


def test_coco_to_voc_end_to_end_with_the_voc_test_in_coco_ids(tmp_path):
    """--dataset coco-voc --task voc: step 0 on COCO's non-VOC things, step 1 weak on VOC images in COCO ids; both
    tested on COCO val (all classes seen), step 1 also on VOC val in COCO ids (the paper's last column)."""
    data = write_coco_voc(tmp_path / "data")
    common = ["--dataset", "coco-voc", "--task", "voc", "--backbone", "resnet18", "--crop_size", "32",
              "--num_workers", "0", "--val_interval", "0", "--print_interval", "5", "--batch_size", "4",
              "--norm_act", "iabn_sync", "--method", "WILSON", "--lr", "0.01", "--data_root", str(data),
              "--checkpoint_dir", str(tmp_path / "ck"), "--logdir", str(tmp_path / "tb"), "--name", "cv"]
    zero = run_py(*common, "--step", "0", "--epochs", "1", cwd=tmp_path)
    assert zero.returncode == 0, (zero.stdout + zero.stderr)[-3000:]
    one = run_py(*common, "--step", "1", "--epochs", "2", "--pseudo_ep", "1", cwd=tmp_path)
    assert one.returncode == 0, (one.stdout + one.stderr)[-3000:]
    assert "test on voc after step 1" in one.stdout
    folder = tmp_path / "ck/step/coco-voc-voc"
    step0, step1 = (json.loads((folder / f"cv_{s}.json").read_text()) for s in (0, 1))
    assert step0["weak"] is False and "tests" not in step0 and len(step0["class_iou"]) == 61
    assert step1["weak"] is True and len(step1["class_iou"]) == 81
    voc = step1["tests"]["voc"]
    assert voc["miou_new"] is not None and len(voc["class_iou"]) == 81
    present = {name for name, iou in voc["class_iou"].items() if iou is not None}
    assert present == {"background", "person", "chair", "dog"}  # VOC val holds exactly these
    # The 4 COCO val images hold person and chair (learnt at step 1) and step-0 things.
    coco_present = {name for name, iou in step1["class_iou"].items() if iou is not None}
    assert {"person", "chair", "truck", "elephant"} <= coco_present and "dog" not in coco_present

    tested = run_py("--test", "--ckpt", str(folder / "cv_1.pth"), "--data_root", str(data), "--crop_size", "32",
                    "--num_workers", "0", "--batch_size", "4", "--backbone", "resnet18", cwd=tmp_path)
    assert tested.returncode == 0, (tested.stdout + tested.stderr)[-3000:]
    again = json.loads((folder / "cv_1_test.json").read_text())
    assert again["tests"]["voc"]["class_iou"] == voc["class_iou"] and again["class_iou"] == step1["class_iou"]


def test_coco_to_voc_without_the_voc_folder_says_where_it_looked(tmp_path):
    data = write_coco_voc(tmp_path / "data")
    shutil.rmtree(data / "voc")
    from segmentation.datasets import step_sources
    from segmentation.datasets.base import DatasetError

    step_sources("coco-voc", data, 0)  # step 0 needs COCO only
    with pytest.raises(DatasetError, match=r"data/voc.*beside <data_root>/coco"):
        step_sources("coco-voc", data, 1)
    with pytest.raises(DatasetError, match="data/voc"):  # --data_root = the coco folder: the sibling is tried too
        step_sources("coco-voc", data / "coco", 1)
