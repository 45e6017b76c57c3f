"""Preemption, requeue and NaN under a real SLURM (tests/slurm_cluster.py): slurm/step.sbatch -> srun -> 2 run.py
tasks that form their process group from SLURM's variables alone.

The reference is the same step run uninterrupted with torchrun (2 gloo ranks, same flags): a job that is signalled,
requeues itself and resumes must end with exactly the same weights and metrics.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slurm_cluster import SlurmCluster
from test_pipeline import REPO, TINY, load_weights
from test_resume import assert_iterations_per_epoch, run

STEP = [*TINY, "--task", "6-4", "--step", "0", "--epochs", "6", "--batch_size", "4", "--norm_act", "iabn_sync",
        "--save_interval", "2", "--device", "cpu"]


def flags(root: Path, tmp: Path, name: str) -> list[str]:
    return [*STEP, "--data_root", str(root), "--checkpoint_dir", str(tmp / "ck"), "--logdir", str(tmp / "tb"),
            "--name", name]


def submit_step(cluster: SlurmCluster, tmp: Path, run_flags: list[str], log: Path, **env: str) -> str:
    """sbatch slurm/step.sbatch with 2 CPU tasks on the one node, as submit.py would for --ntasks_per_node 2."""
    job_env = cluster.env | {"CISS_REPO": str(REPO), "CISS_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"} | env
    result = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1",
                             f"--output={log}", str(REPO / "slurm" / "step.sbatch"), *run_flags],
                            cwd=tmp, env=job_env, capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.strip().split(";")[0]


def wait_for_file(pattern_dir: Path, job: str, cluster: SlurmCluster, timeout: float = 200) -> None:
    deadline = time.monotonic() + timeout
    while not list(pattern_dir.glob("iter_*.pth")):
        state = cluster.job_info(job).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job ended ({state}) before its first run state"
        assert time.monotonic() < deadline, "no run state appeared"
        time.sleep(0.1)


def slow_requeue_path(cluster: SlurmCluster, tmp: Path, delay: float = 5.0) -> str:
    """PATH with an `scontrol` that takes `delay` seconds to requeue. srun's --kill-on-bad-exit ends every task once
    one exits non-zero, so if rank 1 exited (code 4) before rank 0's requeue returned, rank 0 would be killed
    mid-requeue and the job would end FAILED: the ranks must wait for the requeue before exiting."""
    wrapper_dir = tmp / "slow-scontrol"
    wrapper_dir.mkdir()
    real = shutil.which("scontrol", path=cluster.env["PATH"])
    wrapper = wrapper_dir / "scontrol"
    wrapper.write_text(f'#!/bin/bash\nif [ "$1" = requeue ]; then sleep {delay}; fi\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    return f"{wrapper_dir}{os.pathsep}{cluster.env['PATH']}"


@pytest.mark.slurm
def test_usr2_preemption_requeues_and_resumes_exactly(slurm_cluster, shapes_root, tmp_path):
    reference = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                     str(REPO / "run.py"), *flags(shapes_root, tmp_path, "ref")], tmp_path)
    assert reference.returncode == 0, reference.stdout[-3000:]

    log = tmp_path / "pre.out"
    job = submit_step(slurm_cluster, tmp_path, flags(shapes_root, tmp_path, "pre"), log,
                      PATH=slow_requeue_path(slurm_cluster, tmp_path))
    wait_for_file(tmp_path / "ck/run/shapes-6-4/pre_0", job, slurm_cluster)
    sent = time.strftime("%H:%M:%S")
    slurm_cluster.run(["scancel", "--signal=USR2", job])  # what `#SBATCH --signal=USR2@120` does before a timeout
    state = slurm_cluster.wait(job, timeout=400)
    text = log.read_text()
    assert state == "COMPLETED", f"{state}\n{text[-4000:]}"
    # Logged before the requeue: `scontrol requeue` ends the running step at once, so nothing printed after it is
    # sure to reach the log (CI once lost the exit message that way).
    assert "preemption signal: run state saved at iteration" in text, \
        f"no preemption logged for USR2 sent at {sent}:\n{text[-4000:]}"
    info = slurm_cluster.job_info(job)
    assert int(info["Restarts"]) == 1, info  # requeued once by run.py itself, same job id
    assert text.index("preemption signal: run state saved at iteration") < text.index("requeued SLURM job")
    assert "resuming from" in text and text.count("step 0 done") == 1

    folder = tmp_path / "ck/step/shapes-6-4"
    ref, mine = load_weights(folder / "ref_0.pth"), load_weights(folder / "pre_0.pth")
    assert ref.keys() == mine.keys()
    for key in ref:
        assert torch.equal(mine[key], ref[key]), key
    ref_metrics = json.loads((folder / "ref_0.json").read_text())
    metrics = json.loads((folder / "pre_0.json").read_text())
    assert metrics["confusion_matrix"] == ref_metrics["confusion_matrix"]


@pytest.mark.slurm
def test_nan_on_one_task_fails_the_job_with_its_exit_code_and_no_requeue(slurm_cluster, shapes_root, tmp_path):
    log = tmp_path / "nan.out"
    job = submit_step(slurm_cluster, tmp_path, flags(shapes_root, tmp_path, "nan"), log,
                      SEGMENTATION_INJECT_NAN="1:5")
    state = slurm_cluster.wait(job, timeout=300)
    info = slurm_cluster.job_info(job)
    text = log.read_text()
    assert state == "FAILED" and info["ExitCode"] == "3:0", f"{info}\n{text[-3000:]}"
    assert int(info["Restarts"]) == 0
    assert text.count("non-finite loss on some rank") == 2  # both tasks stopped, before the update
    assert not (tmp_path / "ck/step/shapes-6-4/nan_0.pth").exists()
    states = sorted((tmp_path / "ck/run/shapes-6-4/nan_0").glob("iter_*.pth"))
    # Iterations 2 and 4 (--save_interval; 4 is also the epoch end) were saved; the NaN came in the one after.
    assert_iterations_per_epoch(shapes_root)
    assert [p.name for p in states] == ["iter_00000002.pth", "iter_00000004.pth"]
    assert torch.load(states[-1], weights_only=True)["position"]["global_iter"] == 4
