"""The CUDA path under torchrun with NCCL: train, resume after a kill, --test (skipped on machines without CUDA).

CI has no GPU; these run where one is (see README, "GPU checks"). With one GPU torchrun forms a 1-process NCCL group,
so the same collectives and DDP run as on many GPUs.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_pipeline import REPO, TINY, load_weights
from test_resume import ENV, children, run, run_states, wait_for_states

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STEP = [*TINY, "--task", "6-4", "--step", "0", "--epochs", "3", "--batch_size", "4", "--norm_act", "iabn_sync",
        "--save_interval", "2", "--device", "cuda", "--channels_last"]


def command(root: Path, tmp: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(REPO / "run.py"),
            *STEP, "--data_root", str(root), "--checkpoint_dir", str(tmp / "ck"), "--logdir", str(tmp / "logs"),
            "--name", name, *extra]


@pytest.mark.parametrize("norm_impl", ["auto", "inplace_abn"])
def test_nccl_step_trains_tests_and_reports(shapes_root, tmp_path, norm_impl):
    if norm_impl == "inplace_abn":
        pytest.importorskip("inplace_abn")
    result = run(command(shapes_root, tmp_path, "gpu", "--norm_impl", norm_impl), tmp_path)
    assert result.returncode == 0, result.stdout[-4000:]
    artifact = tmp_path / "ck/step/shapes-6-4/gpu_0.pth"
    metrics = json.loads(artifact.with_suffix(".json").read_text())
    assert 0.0 <= metrics["miou_all"] <= 1.0 and all(torch.isfinite(v).all() for v in load_weights(artifact).values())
    tested = run([sys.executable, str(REPO / "run.py"), "--test", "--ckpt", str(artifact), "--dataset", "shapes",
                  "--data_root", str(shapes_root), "--crop_size", "32", "--batch_size", "4", "--device", "cuda",
                  "--num_workers", "0"], tmp_path)
    assert tested.returncode == 0, tested.stdout[-3000:]
    again = json.loads((tmp_path / "ck/step/shapes-6-4/gpu_0_test.json").read_text())
    assert again["confusion_matrix"] == metrics["confusion_matrix"]


def test_nccl_step_resumes_after_sigkill(shapes_root, tmp_path):
    cmd = command(shapes_root, tmp_path, "kill")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    wait_for_states(proc, tmp_path, "kill", 2)
    for pid in children(proc.pid):
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=120)
    saved = run_states(tmp_path, "kill")
    assert saved
    resumed = run(cmd, tmp_path)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stdout[-4000:]
    assert (tmp_path / "ck/step/shapes-6-4/kill_0.pth").is_file()
