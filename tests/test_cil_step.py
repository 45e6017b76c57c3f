"""CIL's three-stage protocol end to end on a tiny built-in city-shapes set: ERFNet, no background class, each
stage on its own cities, 2 gloo ranks, CIL's per-task evaluation in the step JSON and the protocol table."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segmentation.datasets import ensure_city_shapes
from test_pipeline import REPO


@pytest.fixture(scope="module")
def city_root(tmp_path_factory) -> Path:
    return ensure_city_shapes(tmp_path_factory.mktemp("data"), height=32, width=64, per_city=2, per_val_city=3)


def test_city_shapes_is_the_cityscapes_layout_with_every_pixel_a_class(city_root):
    from segmentation.datasets import build_source

    train = build_source("city-shapes", city_root, "train")
    assert len(train) == 17 * 2 and train.image_path(0).name.endswith("_leftImg8bit.png")
    assert train.label_path(0).name.endswith("_gtFine_labelIds.png")
    labels = np.stack([train.load_label(i) for i in range(len(train))])
    assert set(np.unique(labels)) - {255} <= set(range(19)) and (labels == 255).mean() < 0.01
    stage1 = build_source("city-shapes", city_root, "train", cities=("aachen", "hanover"))
    assert {i.split("/")[0] for i in stage1.ids} == {"aachen", "hanover"}


def test_three_cil_stages_under_two_gloo_ranks(city_root, tmp_path):
    command = [sys.executable, str(REPO / "launch/run_protocol.py"), "--nproc_per_node", "2", "--", "--dataset",
               "city-shapes", "--task", "cil", "--method", "CIL", "--name", "cil", "--data_root", str(city_root),
               "--crop_size", "32x64", "--eval_size", "16", "32", "--batch_size", "4", "--epochs", "1",
               "--num_workers", "0", "--val_interval", "0", "--student_init", "previous",
               "--checkpoint_dir", str(tmp_path / "ck"), "--logdir", str(tmp_path / "tb")]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    # Each stage trains on its own cities only: 4, 7 and 6 cities of 2 scenes.
    for step, count in enumerate((8, 14, 12)):
        assert f"5-6-8 step {step} (disjoint): {count} train" in result.stdout, result.stdout[-3000:]
    folder = tmp_path / "ck/step/city-shapes-5-6-8"
    last = json.loads((folder / "cil_2.json").read_text())
    assert list(last["task_miou"]) == ["1", "2", "1-2", "3", "1-3"]
    assert last["task_miou"]["1-3"] == last["miou_all"] and len(last["class_iou"]) == 19
    assert all(v is not None for v in last["task_miou"].values())
    # The network sees the val images at --eval_size 16x32, and is scored at the labels' own 32x64 (as CIL):
    # every labelled pixel of every val image counts.
    from segmentation.datasets import build_source

    val = build_source("city-shapes", city_root, "val")
    labelled = sum(int((val.load_label(i) != 255).sum()) for i in range(len(val)))
    assert np.asarray(last["confusion_matrix"]).sum() == labelled
    table = (folder / "cil_results.md").read_text()
    assert "| step | Task 1 | Task 2 | Task 1∪2 | Task 3 | Task 1∪2∪3 |" in table
    # no background class: no "old w/o bg" column repeating "old"
    assert "| step | old (0-base) | new | all |\n" in table and "w/o bg" not in table
    assert last["dataset"] == "city-shapes" and last["method"] == "cil"

    # --test and --infer take the model's flags (ERFNet, BN, the 16x32 evaluation) from the artifact itself.
    # Batches of 2, as each of the 2 ranks evaluated: the same convolutions, so the same predictions.
    run = [sys.executable, str(REPO / "run.py"), "--ckpt", str(folder / "cil_2.pth"), "--data_root", str(city_root),
           "--num_workers", "0", "--batch_size", "2"]
    tested = subprocess.run([*run, "--test"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert json.loads((folder / "cil_2_test.json").read_text())["class_iou"] == last["class_iou"]
    val_images = city_root / "leftImg8bit/val/lindau"
    inferred = subprocess.run([*run, "--infer", str(val_images), "--gt", str(city_root / "gtFine/val/lindau"),
                               "--infer_out", str(tmp_path / "pred")], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
    assert inferred.returncode == 0, inferred.stderr[-3000:]
    lines = [line for line in inferred.stdout.splitlines() if "_leftImg8bit.png:" in line]
    assert len(lines) == 3 and all("mIoU" in line for line in lines), inferred.stdout
    assert "mean mIoU over 3 images" in inferred.stdout
    stem = sorted(val_images.iterdir())[0].stem
    pred = np.asarray(Image.open(tmp_path / "pred" / f"{stem}_pred.png"))
    assert pred.shape == (32, 64, 3) and (tmp_path / "pred" / f"{stem}_overlay.png").is_file()
    # a file in the folder that is not an image is skipped with a warning; the images are still predicted
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.png").write_bytes((val_images / f"{stem}.png").read_bytes())
    (mixed / "notes.png").write_text("not an image\n")
    skipping = subprocess.run([*run, "--infer", str(mixed), "--infer_out", str(tmp_path / "mixed_out")],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert skipping.returncode == 0, skipping.stderr[-3000:]
    assert "skipping" in skipping.stdout + skipping.stderr and "notes.png" in skipping.stdout + skipping.stderr
    assert (tmp_path / "mixed_out" / "a_pred.png").is_file() and not (tmp_path / "mixed_out" / "notes_pred.png").exists()


def test_inference_errors_name_the_flag(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "run.py"), "--infer", str(tmp_path / "missing.png")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--infer needs --ckpt" in result.stderr
