"""End to end through run.py and the launcher, on a tiny generated `shapes` set, with real torchrun processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "shapes", "--backbone", "resnet18", "--output_stride", "16", "--crop_size", "32",
        "--num_workers", "0", "--val_interval", "0", "--print_interval", "5", "--random_seed", "3"]


def torchrun(nproc: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(REPO / "run.py"), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def run_py(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model_state"]


def test_two_ranks_equal_one_rank_of_the_same_global_batch(shapes_root, tmp_path):
    """Sync norm + per-sample augmentation seeds + global-batch loss normalisation make DDP a pure speed-up."""
    common = [*TINY, "--data_root", str(shapes_root), "--task", "6-4", "--step", "0", "--epochs", "1",
              "--batch_size", "8", "--norm_act", "iabn_sync", "--lr", "0.01"]
    one = torchrun(1, *common, "--name", "one", "--checkpoint_dir", str(tmp_path / "ck"), cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, *common, "--name", "two", "--checkpoint_dir", str(tmp_path / "ck"), cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    folder = tmp_path / "ck" / "step" / "shapes-6-4"
    w1, w2 = load_weights(folder / "one_0.pth"), load_weights(folder / "two_0.pth")
    assert w1.keys() == w2.keys()
    # Float32 sums in another order drift apart by up to ~1e-3 over a few SGD steps from random init; without
    # synchronised norm statistics the same comparison differs by well over 1e-2 (checked below).
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-2, atol=2e-3, msg=key)
    m1 = json.loads((folder / "one_0.json").read_text())
    m2 = json.loads((folder / "two_0.json").read_text())
    # Same pixels of each class evaluated (no image counted twice or missed); predictions within float noise.
    assert [sum(row) for row in m1["confusion_matrix"]] == [sum(row) for row in m2["confusion_matrix"]]
    assert m2["miou_all"] == pytest.approx(m1["miou_all"], abs=0.02)

    unsynced = [a if a != "iabn_sync" else "bn" for a in common]
    local = torchrun(2, *unsynced, "--name", "local", "--checkpoint_dir", str(tmp_path / "ck"), cwd=tmp_path)
    assert local.returncode == 0, local.stderr[-3000:]
    w3 = load_weights(folder / "local_0.pth")
    assert max((w3[k] - w1[k]).abs().max().item() for k in w1 if w1[k].is_floating_point()) > 1e-2

    # --channels_last only changes the memory order: the same training up to float rounding.
    nhwc = torchrun(1, *common, "--channels_last", "--name", "nhwc", "--checkpoint_dir", str(tmp_path / "ck"),
                    cwd=tmp_path)
    assert nhwc.returncode == 0, nhwc.stderr[-3000:]
    w4 = load_weights(folder / "nhwc_0.pth")
    # The flag took effect: the saved convolution weights (k > 1) keep the NHWC strides they were trained in.
    kernels = [k for k, v in w4.items() if v.dim() == 4 and v.shape[-1] > 1]
    assert kernels and all(w4[k].is_contiguous(memory_format=torch.channels_last) and not w4[k].is_contiguous()
                           for k in kernels)
    assert all(w1[k].is_contiguous() for k in kernels)
    for key in w1:
        torch.testing.assert_close(w4[key], w1[key], rtol=1e-2, atol=2e-3, msg=key)


def test_step1_loads_step0_and_rejects_mismatched_artifacts(shapes_root, tmp_path):
    base = [*TINY, "--data_root", str(shapes_root), "--batch_size", "4", "--epochs", "1",
            "--checkpoint_dir", str(tmp_path / "ck"), "--norm_act", "bn"]
    missing = run_py(*base, "--task", "6-4", "--step", "1", "--method", "mib", "--name", "x", cwd=tmp_path)
    assert missing.returncode == 2 and "Run --step 0 first" in missing.stderr

    assert run_py(*base, "--task", "6-4", "--step", "0", "--name", "x", cwd=tmp_path).returncode == 0
    step1 = run_py(*base, "--task", "6-4", "--step", "1", "--method", "MiB", "--name", "x", cwd=tmp_path)
    assert step1.returncode == 0, step1.stderr[-3000:]
    artifact = torch.load(tmp_path / "ck/step/shapes-6-4/x_1.pth", weights_only=True)
    assert artifact["meta"]["classes_per_step"] == [7, 4]
    metrics = json.loads((tmp_path / "ck/step/shapes-6-4/x_1.json").read_text())
    assert set(metrics["class_iou"]) == {"background", "disc", "square", "triangle", "star", "cross", "ring",
                                         "hexagon", "crescent", "L-shape", "heart"}
    for key in ("miou_all", "miou_old", "miou_new"):
        assert 0.0 <= metrics[key] <= 1.0

    other_task = tmp_path / "ck/step/shapes-6-2"
    other_task.mkdir(parents=True)
    (other_task / "x_0.pth").write_bytes((tmp_path / "ck/step/shapes-6-4/x_0.pth").read_bytes())
    wrong = run_py(*base, "--task", "6-2", "--step", "1", "--method", "mib", "--name", "x", cwd=tmp_path)
    assert wrong.returncode == 2 and "task: artifact has '6-4', this run needs '6-2'" in wrong.stderr
    assert not (other_task / "x_1.pth").exists()

    tested = run_py(*base, "--test", "--ckpt", str(tmp_path / "ck/step/shapes-6-4/x_1.pth"), cwd=tmp_path)
    assert tested.returncode == 0, tested.stderr[-3000:]
    retest = json.loads((tmp_path / "ck/step/shapes-6-4/x_1_test.json").read_text())
    assert retest["miou_all"] == pytest.approx(metrics["miou_all"])


@pytest.mark.parametrize("flags, message", [
    (["--dataset", "nope"], "valid datasets"),
    (["--task", "9-9"], "valid tasks"),
    (["--step", "3"], "beyond the last step"),
    (["--batch_size", "3"], "--batch_size"),
])
def test_bad_input_gets_one_clear_error(shapes_root, tmp_path, flags, message):
    args = [*TINY, "--data_root", str(shapes_root), "--task", "6-4", "--batch_size", "4", "--epochs", "1",
            "--checkpoint_dir", str(tmp_path / "ck"), *flags]
    result = torchrun(2, *args, cwd=tmp_path) if flags[0] == "--batch_size" else run_py(*args, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    if flags[0] != "--batch_size":  # torchrun adds its own failure report around ours
        assert "Traceback" not in result.stderr


def test_unknown_method_and_missing_data_root(tmp_path):
    result = run_py("--method", "nope", cwd=tmp_path)
    assert result.returncode == 2 and "invalid choice" in result.stderr
    result = run_py(*TINY, "--data_root", str(tmp_path / "missing"), "--dataset", "voc", "--batch_size", "2", cwd=tmp_path)
    assert result.returncode == 2 and str(tmp_path / "missing") in result.stderr


def test_launcher_runs_the_whole_protocol_and_skips_done_steps(shapes_root, tmp_path):
    command = [sys.executable, str(REPO / "launch/run_protocol.py"), "--nproc_per_node", "1", "--",
               *TINY, "--data_root", str(shapes_root), "--task", "6-2", "--method", "MiB", "--name", "demo",
               "--batch_size", "8", "--epochs", "1", "--checkpoint_dir", str(tmp_path / "ck"), "--norm_act", "bn"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    folder = tmp_path / "ck/step/shapes-6-2"
    for step in range(3):
        assert (folder / f"demo_{step}.pth").is_file() and (folder / f"demo_{step}.json").is_file()
    assert (folder / "demo_miou.png").stat().st_size > 0 and (folder / "demo_2_samples.png").stat().st_size > 0
    assert "| 2 |" in first.stdout
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("skipping") == 3


def test_compare_runs_each_method_and_prints_one_table(shapes_root, tmp_path):
    """launch/compare.py: one protocol per method (per-method flags where given), one side-by-side table."""
    command = [sys.executable, str(REPO / "launch/compare.py"), "--methods", "FT,MiB", "--nproc_per_node", "1",
               "--method_flags", "MiB=--loss_kd 5", "--", *TINY, "--data_root", str(shapes_root), "--task", "6-4",
               "--batch_size", "8", "--epochs", "1", "--checkpoint_dir", str(tmp_path / "ck"), "--norm_act", "bn"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "ck/step/shapes-6-4"
    table = (folder / "comparison.md").read_text()
    assert "| FT | 1 |" in table and "| MiB | 1 |" in table and "| MiB | 0 |" in table
    mib = torch.load(folder / "MiB_1.pth", weights_only=True)["meta"]["config"]
    ft = torch.load(folder / "FT_1.pth", weights_only=True)["meta"]["config"]
    assert mib["method_options"]["loss_kd"] == 5.0 and ft["method_options"]["loss_kd"] == 0.0 and mib["method"] == "mib"

    bad = subprocess.run([*command[:2], "--methods", "FT", "--", "--method", "MiB"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "do not pass --method" in bad.stderr
