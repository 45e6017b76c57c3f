"""Exact resume inside a step: preemption signal, SIGKILL, a truncated run state, and a NaN on one rank.

Every test trains the same tiny step with 2 gloo ranks and compares against one uninterrupted run: a resumed run
must end with bit-identical weights and metrics (CPU, fixed seed), not merely close ones.
"""
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

from segmentation.engine.preemption import parse_signal
from test_pipeline import REPO, TINY, load_weights

STEP = [*TINY, "--task", "6-4", "--step", "0", "--epochs", "4", "--batch_size", "4", "--norm_act", "iabn_sync",
        "--save_interval", "2", "--keep_run_states", "2"]


def assert_iterations_per_epoch(root: Path, expected: int = 4) -> None:
    """The run-state expectations below are counted in iterations: with the conftest data, step 0 of 6-4 (disjoint)
    keeps 17 training images, i.e. 4 batches of 4 per epoch. Say so plainly if the generator changes that."""
    from segmentation.datasets import IncrementalDataset, ShapesSource
    from segmentation.tasks import load_task

    kept = len(IncrementalDataset(ShapesSource(root, "train"), load_task("shapes", "6-4"), 0, "train", False, None, 0))
    assert kept // 4 == expected, f"{kept} step-0 images give {kept // 4} iterations per epoch; update these tests"


def command(root: Path, tmp: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "run.py"),
            *STEP, "--data_root", str(root), "--checkpoint_dir", str(tmp / "ck"), "--logdir", str(tmp / "logs"),
            "--name", name]


ENV = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """stdout holds log lines and errors together (stderr merged into it)."""
    return subprocess.run(cmd, cwd=cwd, env=ENV | env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)


def run_states(tmp: Path, name: str) -> list[Path]:
    return sorted((tmp / "ck/run/shapes-6-4" / f"{name}_0").glob("iter_*.pth"))


def wait_for_states(proc: subprocess.Popen, tmp: Path, name: str, count: int) -> None:
    deadline = time.monotonic() + 300
    while len(run_states(tmp, name)) < count:
        assert proc.poll() is None, "the run ended before it saved the run states the test waits for"
        assert time.monotonic() < deadline
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    """Worker processes of a torchrun agent (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.fixture(scope="module")
def reference(shapes_root, tmp_path_factory):
    """One uninterrupted run: its weights and metrics."""
    tmp = tmp_path_factory.mktemp("reference")
    result = run(command(shapes_root, tmp, "ref"), tmp)
    assert result.returncode == 0, result.stdout[-3000:]
    folder = tmp / "ck/step/shapes-6-4"
    assert not (tmp / "ck/run/shapes-6-4/ref_0").exists(), "run states are removed once the artifact is written"
    return load_weights(folder / "ref_0.pth"), json.loads((folder / "ref_0.json").read_text())


def assert_identical(tmp: Path, name: str, reference) -> None:
    weights, metrics = reference
    folder = tmp / "ck/step/shapes-6-4"
    mine = load_weights(folder / f"{name}_0.pth")
    assert mine.keys() == weights.keys()
    for key in weights:
        assert torch.equal(mine[key], weights[key]), key
    got = json.loads((folder / f"{name}_0.json").read_text())
    for key in ("miou_all", "class_iou", "confusion_matrix", "pixel_acc"):
        assert got[key] == metrics[key], key


def test_preemption_signal_saves_and_the_same_command_resumes_exactly(shapes_root, tmp_path, reference):
    cmd = command(shapes_root, tmp_path, "pre")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    wait_for_states(proc, tmp_path, "pre", 1)
    for pid in children(proc.pid):  # srun delivers the signal to every task; here the workers are torchrun's
        os.kill(pid, signal.SIGUSR2)
    stderr, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "preemption signal: run state saved at iteration" in stderr, stderr[-3000:]
    assert "run the same command again to resume" in stderr
    assert not (tmp_path / "ck/step/shapes-6-4/pre_0.pth").exists()

    resumed = run(cmd, tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resuming from" in resumed.stdout
    assert_identical(tmp_path, "pre", reference)

    again = run(cmd, tmp_path)  # a requeue after the artifact was written has nothing left to do
    assert again.returncode == 0 and "already complete" in again.stdout


def test_ctrl_c_on_torchrun_saves_a_run_state_says_where_and_the_same_command_resumes_exactly(shapes_root, tmp_path,
                                                                                              reference):
    """Ctrl-C in a terminal reaches torchrun (its workers run in their own sessions), which SIGTERMs the workers."""
    cmd = command(shapes_root, tmp_path, "int")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_states(proc, tmp_path, "int", 1)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert "interrupted (Ctrl-C or SIGTERM): run state saved at iteration" in out, out[-3000:]
    assert "run the same command again to resume from there" in out
    assert not (tmp_path / "ck/step/shapes-6-4/int_0.pth").exists()
    resumed = run(cmd, tmp_path)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stdout[-3000:]
    assert_identical(tmp_path, "int", reference)


def test_ctrl_c_on_run_protocol_waits_for_the_step_to_save_and_says_how_to_continue(shapes_root, tmp_path):
    flags = [*STEP[:STEP.index("--step")], *STEP[STEP.index("--step") + 2:]]  # the launcher sets --step
    cmd = [sys.executable, str(REPO / "launch/run_protocol.py"), "--nproc_per_node", "2", "--last_step", "0", "--",
           *flags, "--data_root", str(shapes_root), "--checkpoint_dir", str(tmp_path / "ck"), "--logdir",
           str(tmp_path / "logs"), "--name", "launch"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, as a terminal gives a command
    wait_for_states(proc, tmp_path, "launch", 1)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the launcher and torchrun get it
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]
    assert "run state saved at iteration" in out and "[launch] interrupted during step 0" in out, out[-3000:]
    assert "Run the same command again to continue" in out and "Traceback (most recent call last)" not in \
        out.split("[launch] interrupted")[1]


def test_workers_whose_torchrun_was_killed_save_and_stop_instead_of_training_on(shapes_root, tmp_path, reference):
    cmd = command(shapes_root, tmp_path, "orphan")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_states(proc, tmp_path, "orphan", 1)
    workers = children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)  # the launcher only: its workers live in their own sessions
    out = proc.stdout.read()           # until the workers, which hold the pipe too, have exited
    proc.wait()
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2:3]
              for pid in workers):
        assert time.monotonic() < deadline, "orphaned workers are still running"
        time.sleep(0.1)
    assert "the launcher (pid" in out and "run state saved at iteration" in out, out[-3000:]
    assert not (tmp_path / "ck/step/shapes-6-4/orphan_0.pth").exists()
    resumed = run(cmd, tmp_path)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stdout[-3000:]
    assert_identical(tmp_path, "orphan", reference)


def test_sigkill_and_a_truncated_run_state_still_resume_exactly(shapes_root, tmp_path, reference):
    cmd = command(shapes_root, tmp_path, "kill")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_states(proc, tmp_path, "kill", 2)
    for pid in [*children(proc.pid), proc.pid]:  # torchrun's workers live in their own sessions: kill each
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    states = run_states(tmp_path, "kill")
    assert len(states) == 2 and not (tmp_path / "ck/step/shapes-6-4/kill_0.pth").exists()
    newest = states[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a crash in the middle of a copy

    resumed = run(cmd, tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"run state {newest} cannot be read" in resumed.stdout
    assert f"resuming from {states[0]}" in resumed.stdout
    assert_identical(tmp_path, "kill", reference)


def test_a_run_state_of_other_flags_is_refused(shapes_root, tmp_path):
    cmd = command(shapes_root, tmp_path, "flags")
    first = run(cmd, tmp_path, SEGMENTATION_INJECT_NAN="0:2")  # stops after saving the state of iteration 2
    assert len(run_states(tmp_path, "flags")) == 1
    other = run([*cmd, "--lr", "0.02"], tmp_path)
    assert other.returncode != 0 and "--lr: saved None, now 0.02" in other.stdout and "--no_resume" in other.stdout
    fresh = run([*cmd, "--lr", "0.02", "--no_resume"], tmp_path)
    assert fresh.returncode == 0, fresh.stdout[-3000:]
    assert "resuming" not in fresh.stdout and first.returncode != 0


def test_nan_on_one_rank_stops_every_rank_before_the_update(shapes_root, tmp_path):
    result = run(command(shapes_root, tmp_path, "nan"), tmp_path, SEGMENTATION_INJECT_NAN="1:5")
    assert result.returncode != 0
    assert result.stdout.count("non-finite loss on some rank") == 2, result.stdout[-3000:]  # both ranks say so
    assert "exitcode  : 3" in result.stdout or "exitcode: 3" in result.stdout
    # Run states of iterations 2 and 4 (--save_interval; 4 is also the epoch end, saved once) were saved before;
    # iteration 5's never was.
    assert_iterations_per_epoch(shapes_root)
    assert [p.name for p in run_states(tmp_path, "nan")] == ["iter_00000002.pth", "iter_00000004.pth"]
    assert not (tmp_path / "ck/step/shapes-6-4/nan_0.pth").exists()
    state = torch.load(run_states(tmp_path, "nan")[-1], weights_only=True)
    assert state["position"]["global_iter"] == 4


def test_preempt_signal_flag():
    assert parse_signal("USR2") == signal.SIGUSR2 and parse_signal("SIGTERM") == signal.SIGTERM
    assert parse_signal("none") is None
    for bad in ("USR1", "KILL", "NOPE"):
        with pytest.raises(ValueError):
            parse_signal(bad)
    result = run([sys.executable, str(REPO / "run.py"), "--preempt_signal", "USR1"], REPO)
    assert result.returncode == 2 and "--preempt_signal USR1" in result.stdout and "NCCL" in result.stdout
