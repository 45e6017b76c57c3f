"""Your own dataset with no Python: one tasks/<name>.toml with a [layout] table, --data_root at the files; exactly
the README's "Your own dataset" walk-through, on a tiny dataset written here."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_pipeline import REPO

TOML = '''dataset = "fruit"
has_background = true
classes = ["background", "apple", "pear", "plum"]

[tasks."2-1"]
steps = ["0-2", [3]]

[tasks."offline"]
steps = ["0-3"]

[layout]
kind = "folders"

[defaults]
backbone = "resnet18"
crop_size = 32
'''


def write_fruit(root: Path, layout: str) -> None:
    """Discs of class 1..3 on background, 255 on their rims; `layout`: folders (images/ masks/ per split) or voc."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("val", 8)):
        ids = []
        for i in range(count):
            stem = f"{split}_{i:03d}"
            ids.append(stem)
            label = np.zeros((40, 40), np.uint8)
            yy, xx = np.mgrid[:40, :40]
            for c in rng.choice([1, 2, 3], size=2, replace=False):
                cy, cx, r = rng.integers(10, 30), rng.integers(10, 30), rng.integers(5, 9)
                d = np.hypot(yy - cy, xx - cx)
                label[d < r] = c
                label[(d >= r) & (d < r + 1)] = 255
            colour = np.where(label == 255, 0, label).astype(np.float64)[..., None] * 60
            image = (rng.random((40, 40, 3)) * 60 + colour).astype(np.uint8)
            if layout == "folders":
                image_path, mask_path = root / "images" / split / f"{stem}.jpg", root / "masks" / split / f"{stem}.png"
            else:
                image_path, mask_path = root / "JPEGImages" / f"{stem}.jpg", root / "SegmentationClass" / f"{stem}.png"
            image_path.parent.mkdir(parents=True, exist_ok=True)
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(image_path)
            Image.fromarray(label, mode="L").save(mask_path)
        if layout == "voc":
            (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
            (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")


@pytest.fixture
def tasks_dir(tmp_path) -> Path:
    """The repository's tasks/ plus the user's new file (CISS_TASKS_DIR points run.py at it)."""
    folder = tmp_path / "tasks"
    shutil.copytree(REPO / "tasks", folder)
    return folder


@pytest.mark.parametrize("layout", ["folders", "voc"])
def test_a_dataset_from_its_toml_alone_trains_two_steps(tmp_path, tasks_dir, layout):
    (tasks_dir / "fruit.toml").write_text(TOML.replace('kind = "folders"', f'kind = "{layout}"'))
    write_fruit(tmp_path / "fruit", layout)
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CISS_TASKS_DIR": str(tasks_dir)}
    for step in (0, 1):
        result = subprocess.run(
            [sys.executable, str(REPO / "run.py"), "--dataset", "fruit", "--task", "2-1", "--step", str(step),
             "--data_root", str(tmp_path / "fruit"), "--method", "MiB", "--name", "mine", "--epochs", "1",
             "--batch_size", "4", "--num_workers", "0", "--val_interval", "0", "--norm_act", "bn",
             "--checkpoint_dir", str(tmp_path / "ck")], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "fruit 2-1 step 1" in log and "classes plum" in log
    assert (tmp_path / "ck/step/fruit-2-1/mine_1.json").is_file()


def test_a_wrong_layout_or_a_missing_mask_is_named(tmp_path, tasks_dir):
    from segmentation.datasets import DatasetError, build_source
    from segmentation.tasks import TaskError, load_task

    (tasks_dir / "fruit.toml").write_text(TOML.replace('kind = "folders"', 'kind = "folders"\nimage = "x"'))
    os.environ["CISS_TASKS_DIR"] = str(tasks_dir)
    try:
        with pytest.raises(TaskError, match=r"\[layout\] keys \['image'\]"):
            load_task("fruit", "2-1")
        (tasks_dir / "fruit.toml").write_text(TOML)
        write_fruit(tmp_path / "fruit", "folders")
        assert len(build_source("fruit", tmp_path / "fruit", "train")) == 24
        (tmp_path / "fruit/masks/train/train_003.png").unlink()
        with pytest.raises(DatasetError, match="1 of 24 images .* have no mask .*train_003"):
            build_source("fruit", tmp_path / "fruit", "train")
    finally:
        del os.environ["CISS_TASKS_DIR"]
