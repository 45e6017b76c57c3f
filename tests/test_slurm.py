"""slurm/submit.py and slurm/step.sbatch on a real single-node SLURM cluster (tests/slurm_cluster.py), tiny shapes.

Each step is a real job: sbatch -> slurmd -> step.sbatch -> srun -> run.py, chained with afterok.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from segmentation.config import config_to_dict, parse_config
from segmentation.engine.checkpoint import save_step_artifact
from slurm_cluster import SlurmCluster

REPO = Path(__file__).resolve().parents[1]
SUBMIT = REPO / "slurm" / "submit.py"
TINY = ["--backbone", "resnet18", "--output_stride", "16", "--norm_act", "bn", "--crop_size", "32",
        "--batch_size", "4", "--num_workers", "0", "--val_interval", "0", "--print_interval", "5", "--device", "cpu"]
JOB_LINE = re.compile(r"step (\d+): job (\d+), dependency (\S+), log (\S+)")


def submit(tmp: Path, name: str, *own: str, run_flags: tuple[str, ...] = (), env: dict[str, str] | None = None,
           data_root: Path | None = None) -> subprocess.CompletedProcess:
    """submit.py for shapes 6-4 (2 steps), one CPU task per step unless `own` says otherwise."""
    command = [sys.executable, str(SUBMIT), "--dataset", "shapes", "--task", "6-4", "--method", "FT", "--name", name,
               "--gpus_per_node", "0", "--cpus_per_task", "1", "--epochs", "1", "--python", sys.executable,
               "--log_root", str(tmp / "slurm-logs"), *own, "--",
               *TINY, "--data_root", str(data_root or tmp / "data"), "--checkpoint_dir", str(tmp / "ck"),
               "--logdir", str(tmp / "tb"), *run_flags]
    env = (env or dict(os.environ)) | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True, timeout=120)


def submitted_jobs(result: subprocess.CompletedProcess) -> dict[int, dict[str, str]]:
    """step -> {job, dependency, log} from submit.py's one line per submitted job."""
    assert result.returncode == 0, result.stdout + result.stderr
    return {int(m[1]): {"job": m[2], "dependency": m[3], "log": m[4]} for m in JOB_LINE.finditer(result.stdout)}


def artifact(tmp: Path, name: str, step: int) -> Path:
    return tmp / "ck" / "step" / "shapes-6-4" / f"{name}_{step}.pth"


def timestamp(info: dict[str, str], key: str) -> datetime:
    return datetime.fromisoformat(info[key])


def finished(cluster: SlurmCluster, job: str, log: str, timeout: float = 150) -> str:
    state = cluster.wait(job, timeout)
    return state if state == "COMPLETED" else f"{state}\n{Path(log).read_text(errors='replace')[-3000:]}"


@pytest.fixture(scope="module")
def chain(slurm_cluster: SlurmCluster, shapes_root: Path, tmp_path_factory) -> dict:
    """One 2-step chain run to the end; step 0 with 2 srun tasks, i.e. a 2-rank gloo process group from SLURM's
    variables. The node has nproc CPUs, so both tasks fit on this machine's 2 cores."""
    tmp = tmp_path_factory.mktemp("chain")
    first = submit(tmp, "chain", "--ntasks_per_node", "2", env=slurm_cluster.env, data_root=shapes_root)
    jobs = submitted_jobs(first)
    states = {step: finished(slurm_cluster, jobs[step]["job"], jobs[step]["log"]) for step in sorted(jobs)}
    return {"tmp": tmp, "result": first, "jobs": jobs, "states": states,
            "info": {step: slurm_cluster.job_info(jobs[step]["job"]) for step in jobs}}


@pytest.mark.slurm
def test_chain_runs_step1_after_step0(chain):
    jobs, info, tmp = chain["jobs"], chain["info"], chain["tmp"]
    assert sorted(jobs) == [0, 1]
    assert jobs[0]["dependency"] == "none" and jobs[1]["dependency"] == f"afterok:{jobs[0]['job']}"
    assert chain["states"] == {0: "COMPLETED", 1: "COMPLETED"}
    assert timestamp(info[1], "StartTime") >= timestamp(info[0], "EndTime")
    assert artifact(tmp, "chain", 0).is_file() and artifact(tmp, "chain", 1).is_file()
    # Logs land in one folder per protocol and name. srun ran 2 tasks that took ranks 0 and 1 from SLURM's
    # variables and trained as one process group, so only rank 0 reports the step (two runs that each thought
    # they were alone would both report it, and both write the artifact).
    log0 = Path(jobs[0]["log"])
    assert log0.parent == tmp / "slurm-logs" / "shapes-6-4" / "chain"
    assert log0.name == f"chain_step0-{jobs[0]['job']}.out"
    text = log0.read_text()
    assert "2 tasks" in text and text.count("step 0 done") == 1


@pytest.mark.slurm
def test_resubmission_skips_complete_steps(chain, slurm_cluster, shapes_root):
    tmp = chain["tmp"]
    again = submit(tmp, "chain", env=slurm_cluster.env, data_root=shapes_root)
    assert submitted_jobs(again) == {}
    assert again.stdout.count("skipped, complete artifact") == 2 and "submitted 0 job(s)" in again.stdout

    artifact(tmp, "chain", 1).unlink()  # as if step 1 had failed: only it is submitted, with nothing to wait for
    rerun = submit(tmp, "chain", env=slurm_cluster.env, data_root=shapes_root)
    jobs = submitted_jobs(rerun)
    assert sorted(jobs) == [1] and jobs[1]["dependency"] == "none"
    assert rerun.stdout.count("skipped, complete artifact") == 1
    assert finished(slurm_cluster, jobs[1]["job"], jobs[1]["log"]) == "COMPLETED"
    assert artifact(tmp, "chain", 1).is_file()


@pytest.mark.slurm
def test_failed_step0_cancels_step1(slurm_cluster, shapes_root, tmp_path):
    # --pretrained parses, then fails at run time in step 0 only (later steps start from step 0's artifact).
    result = submit(tmp_path, "broken", run_flags=("--pretrained", "/nonexistent.pth"), env=slurm_cluster.env,
                    data_root=shapes_root)
    jobs = submitted_jobs(result)
    assert slurm_cluster.wait(jobs[0]["job"], 150) == "FAILED"
    assert slurm_cluster.job_info(jobs[0]["job"])["ExitCode"] == "2:0"
    assert "/nonexistent.pth" in Path(jobs[0]["log"]).read_text()
    # --kill-on-invalid-dep=yes: cancelled as soon as step 0 failed, without ever starting.
    assert slurm_cluster.wait(jobs[1]["job"], 30) == "CANCELLED"
    info = slurm_cluster.job_info(jobs[1]["job"])
    assert info["Reason"] == "DependencyNeverSatisfied" and info["StartTime"] in ("Unknown", info["EndTime"])
    assert not Path(jobs[1]["log"]).exists()
    assert not artifact(tmp_path, "broken", 0).exists() and not artifact(tmp_path, "broken", 1).exists()


def test_dry_run_prints_the_chain_and_skips_only_complete_steps(tmp_path):
    """No cluster needed: nothing is submitted, and no log folder is created."""
    step0 = artifact(tmp_path, "dry", 0)
    step0.parent.mkdir(parents=True)
    step0.write_bytes(b"truncated")  # not a complete artifact: step 0 must run again
    result = submit(tmp_path, "dry", "--dry_run", "--time", "0:10:00", "--partition", "debug")
    assert result.returncode == 0, result.stderr
    lines = [shlex.split(line) for line in result.stdout.splitlines() if line.startswith("sbatch ")]
    assert len(lines) == 2
    logs = tmp_path / "slurm-logs" / "shapes-6-4" / "dry"
    for step, line in enumerate(lines):
        assert line[:4] == ["sbatch", "--parsable", f"--job-name=shapes-6-4_dry_step{step}",
                            f"--output={logs}/dry_step{step}-%j.out"]
        assert {"--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=0:10:00", "--partition=debug",
                f"--export=ALL,CISS_REPO={REPO},CISS_PYTHON={sys.executable}"} <= set(line)
        assert not any(arg.startswith("--gpus") for arg in line)
        script = line.index(str(REPO / "slurm" / "step.sbatch"))
        run_args = line[script + 1:]
        assert run_args[-2:] == ["--step", str(step)] and "--dataset" in run_args and "--name" in run_args
    assert "--dependency=afterok:<job id of step 0>" in lines[1] and "--kill-on-invalid-dep=yes" in lines[1]
    assert not any(arg.startswith("--dependency") for arg in lines[0])
    assert "would submit 2 job(s)" in result.stdout and not (tmp_path / "slurm-logs").exists()

    # complete, but made by other flags: not what run.py would skip, so step 0 is submitted again (its job then
    # refuses it unless --replace is among the run.py flags)
    save_step_artifact(step0, model_state={}, method_state={}, meta={})
    again = submit(tmp_path, "dry", "--dry_run")
    assert len([line for line in again.stdout.splitlines() if line.startswith("sbatch ")]) == 2

    step0_flags = lines[0][lines[0].index(str(REPO / "slurm" / "step.sbatch")) + 1:]
    save_step_artifact(step0, model_state={}, method_state={},  # made by step 0's own flags: skipped
                       meta={"config": config_to_dict(parse_config(step0_flags))})
    result = submit(tmp_path, "dry", "--dry_run")
    lines = [shlex.split(line) for line in result.stdout.splitlines() if line.startswith("sbatch ")]
    assert len(lines) == 1 and lines[0][-2:] == ["--step", "1"]
    assert not any(arg.startswith("--dependency") for arg in lines[0])
    assert "skipped 1 complete step(s)" in result.stdout

    # step 0 to be re-run (truncated) while step 1 has an artifact: that one is stale, its job gets --replace
    save_step_artifact(artifact(tmp_path, "dry", 1), model_state={}, method_state={}, meta={})
    step0.write_bytes(b"truncated")
    result = submit(tmp_path, "dry", "--dry_run")
    lines = [shlex.split(line) for line in result.stdout.splitlines() if line.startswith("sbatch ")]
    assert len(lines) == 2 and "--replace" not in lines[0] and lines[1][-3:] == ["--step", "1", "--replace"]
    assert "step 1: its artifact was trained from a step that is re-run now" in result.stdout
