"""One trainer per step: the step lock (segmentation/engine/steplock.py) on its own and through run.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from segmentation.engine import steplock
from segmentation.engine.steplock import StepLock, StepLockedError
from test_pipeline import REPO, TINY, load_weights


def write_holder(path: Path, **fields) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": "node7", "pid": 4242, "slurm_job": "9001", "token": "x",
                                "started": "2026-12-01 10:00:00"} | fields))


def test_a_second_holder_is_refused_with_the_first_named(tmp_path):
    path = tmp_path / "run" / "shapes-6-2" / "a_0.lock"
    with StepLock(path):
        with pytest.raises(StepLockedError) as info:
            StepLock(path).acquire()
        message = str(info.value)
        assert f"pid {os.getpid()}" in message and "another --name" in message
    assert not path.exists() and not (tmp_path / "run").exists()  # released, no empty folders left
    StepLock(path).acquire()  # free again


def test_stale_locks_are_taken_over_and_live_ones_are_not(tmp_path, monkeypatch):
    path = tmp_path / "a_0.lock"
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    write_holder(path)  # another node, fresh heartbeat: held
    with pytest.raises(StepLockedError, match="host node7, pid 4242, SLURM job 9001"):
        StepLock(path).acquire()

    monkeypatch.setenv("SLURM_JOB_ID", "9001")  # the same job, requeued: its previous run is over
    lock = StepLock(path)
    lock.acquire()
    assert json.loads(path.read_text())["token"] == lock.token
    lock.release()

    monkeypatch.delenv("SLURM_JOB_ID")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_holder(path, host=StepLock(path).me["host"], pid=dead.pid, slurm_job=None)  # gone from this host
    StepLock(path).acquire()

    write_holder(path)
    old = time.time() - steplock.STALE_SECONDS - 5  # a holder on another node that stopped beating
    os.utime(path, (old, old))
    StepLock(path).acquire()


def test_the_holder_keeps_its_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(steplock, "HEARTBEAT_SECONDS", 0.05)
    path = tmp_path / "a_0.lock"
    with StepLock(path):
        old = time.time() - 1000
        os.utime(path, (old, old))
        time.sleep(0.3)
        assert time.time() - path.stat().st_mtime < 5


def step_command(root: Path, tmp: Path, name: str) -> list[str]:
    return [sys.executable, str(REPO / "run.py"), *TINY, "--data_root", str(root), "--task", "6-4", "--step", "0",
            "--epochs", "3", "--batch_size", "8", "--norm_act", "bn", "--name", name,
            "--checkpoint_dir", str(tmp / "ck")]


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.1)


def test_a_concurrent_run_of_the_same_step_is_refused_and_the_first_is_unharmed(shapes_root, tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    lock = tmp_path / "ck/run/shapes-6-4/a_0.lock"
    first = subprocess.Popen(step_command(shapes_root, tmp_path, "a"), cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lock, first)
    second = subprocess.run(step_command(shapes_root, tmp_path, "a"), cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"pid {first.pid}" in second.stderr and "being trained by another run" in second.stderr
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    alone = subprocess.run(step_command(shapes_root, tmp_path, "alone"), cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    folder = tmp_path / "ck/step/shapes-6-4"
    a, b = load_weights(folder / "a_0.pth"), load_weights(folder / "alone_0.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the refused run touched nothing
    assert not lock.exists()


def test_the_lock_of_a_killed_run_is_taken_over(shapes_root, tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    lock = tmp_path / "ck/run/shapes-6-4/k_0.lock"
    killed = subprocess.Popen(step_command(shapes_root, tmp_path, "k"), cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lock, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert lock.exists()  # SIGKILL leaves it behind
    again = subprocess.run(step_command(shapes_root, tmp_path, "k"), cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert "taking over the step lock" in log and f"process {killed.pid}" in log
    assert (tmp_path / "ck/step/shapes-6-4/k_0.pth").is_file() and not lock.exists()
