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
