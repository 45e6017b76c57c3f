"""launch/benchmark.py: which methods share a step 0, the table from step results, the SLURM chains, one tiny run.

All but the last test run no training: the step results are written by step.finish.write_results (the real format) from
made-up confusion matrices, and the SLURM jobs go to a recording stand-in for sbatch.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "launch"))

import benchmark  # noqa: E402
from segmentation.config import config_to_dict, parse_config  # noqa: E402
from segmentation.engine.checkpoint import save_step_artifact, step_artifact_path  # noqa: E402
from segmentation.engine.metrics import ConfusionMatrix  # noqa: E402
from segmentation.step.finish import write_results  # noqa: E402
from segmentation.tasks import load_task  # noqa: E402

ALL_METHODS = "FT,LwF,LwF-MC,ILT,EWC,PI,RW,MiB,CIL,WILSON"
# The Makefile's demo flags (parsing only: nothing is trained with them).
DEMO = ["--dataset", "shapes", "--data_root", "data", "--backbone", "resnet18", "--output_stride", "8", "--norm_act",
        "iabn", "--channels_last", "--crop_size", "64", "--batch_size", "16", "--epochs", "2", "--lr", "0.01",
        "--num_workers", "0", "--val_interval", "0", "--print_interval", "25", "--student_init", "previous"]


def bench_argv(ck: Path, methods: str = ALL_METHODS, *own: str, task: str = "6-2") -> list[str]:
    return ["--methods", methods, "--initial_epochs", "4", "--initial_lr", "0.05", *own, "--",
            *DEMO, "--task", task, "--checkpoint_dir", str(ck)]


def make_plan(argv: list[str]) -> benchmark.Plan:
    return benchmark.plan_from_argv(argv)[1]


def members(plan: benchmark.Plan) -> list[set[str]]:
    return [set(g.members) for g in plan.groups]


def test_step0_groups_follow_the_methods_step0_keys(tmp_path):
    plan = make_plan(bench_argv(tmp_path))
    # CE for the MiB family without a regularizer and for CIL (CIL's --student_init only matters at t>0); BCE for
    # LwF-MC and WILSON (WILSON's preset --warmup_epochs is unread under step 0's poly schedule); EWC, PI and RW
    # share the step 0 that gathers every regularizer's statistics while it trains.
    assert members(plan) == [{"FT", "LwF", "ILT", "MiB", "CIL"}, {"LwF-MC", "WILSON"}, {"EWC", "PI", "RW"}]
    assert all(re.fullmatch(r"step0-[0-9a-f]{8}", g.name) for g in plan.groups)
    assert len({g.name for g in plan.groups}) == 3
    ce = plan.group_of("MiB")
    assert ce.members[0] == "FT" and ce.flags[-2:] == ("--name", ce.name)
    # Each method's step 1 starts from its group's step 0; step 2 from its own step 1 (run.py's default).
    (one, flags1), (two, flags2) = plan.later_steps(plan.methods[-1])  # WILSON
    assert (one, two) == (1, 2)
    shared = str(step_artifact_path(tmp_path, "shapes", "6-2", False, plan.group_of("WILSON").name, 0))
    assert flags1[flags1.index("--step_ckpt") + 1] == shared and "--step_ckpt" not in flags2
    assert parse_config(flags2).name == "WILSON" and parse_config(flags2).epochs == 2
    # one test set for every method: MiB's selection, unless the run's flags choose (WILSON's preset says "all")
    assert {parse_config(flags).test_images for m in plan.methods for _, flags in plan.later_steps(m)} == {"seen"}
    everything = make_plan([*bench_argv(tmp_path, "FT,WILSON"), "--test_images", "all"])
    assert {parse_config(flags).test_images for m in everything.methods for _, flags in everything.later_steps(m)} \
        == {"all"} and "every val image" in benchmark.caption(everything)


def test_step0_groups_split_only_on_what_step0_computes(tmp_path):
    flags = ["--method_flags", "FT=--val_interval 1 --num_workers 2",   # logging and loading: still shared
             "--method_flags", "MiB=--lr 0.02",        # later steps' lr: step 0 runs at --initial_lr anyway
             "--method_flags", "LwF=--batch_size 8",   # another step 0
             "--method_flags", "WILSON=--pseudo_ep 1"]  # a WILSON option step 0 does not read
    plan = make_plan(bench_argv(tmp_path, "FT,LwF,MiB,LwF-MC,WILSON", *flags))
    assert members(plan) == [{"FT", "MiB"}, {"LwF"}, {"LwF-MC", "WILSON"}]
    # The shared name depends on the step-0 configuration, not on which method comes first.
    again = make_plan(bench_argv(tmp_path, "MiB,FT,WILSON,LwF-MC,LwF", *flags))
    assert {g.name for g in again.groups} == {g.name for g in plan.groups}
    assert again.group_of("FT").members[0] == "MiB"


def test_bad_benchmark_flags_fail_before_anything_runs(tmp_path, capsys):
    assert benchmark.main(bench_argv(tmp_path, "FT,MiB") + ["--step_ckpt", "x.pth"]) == 2
    assert "--step_ckpt" in capsys.readouterr().err
    assert benchmark.main(bench_argv(tmp_path, "FT,FT")) == 2
    assert benchmark.main(bench_argv(tmp_path, "FT,Joint")) == 2
    # a method flag the method does not read is refused by run.py's own check, at planning time
    assert benchmark.main(bench_argv(tmp_path, "FT,MiB", "--method_flags", "FT=--pseudo_ep 1")) == 2
    assert "does not read --pseudo_ep" in capsys.readouterr().err


def fake_step(ck: Path, flags: list[str], step: int, seed: int) -> dict:
    """One step's <name>_<step>.json as run.py writes it, from a random confusion matrix."""
    cfg = parse_config([*flags, "--step", str(step), "--checkpoint_dir", str(ck)])
    task = load_task(cfg.dataset, cfg.task)
    n = sum(task.classes_per_step(step))
    generator = torch.Generator().manual_seed(seed)
    matrix = ConfusionMatrix(n)
    off_diagonal = torch.randint(0, 40, (n, n), generator=generator)
    matrix.matrix = off_diagonal + torch.diag(torch.randint(20, 400, (n,), generator=generator))
    results = matrix.compute(task.seen_class_names(step), task.classes_per_step(step)[0],
                             has_background=task.has_background)
    results["task_miou"] = {}
    artifact = step_artifact_path(ck, cfg.dataset, task.name, cfg.overlap, cfg.name, step)
    artifact.parent.mkdir(parents=True, exist_ok=True)
    write_results(artifact, results, {}, cfg, task)
    return json.loads(artifact.with_suffix(".json").read_text())


def fake_benchmark(ck: Path, plan: benchmark.Plan) -> dict[str, list[dict]]:
    """Results of every step of every method (step 0 under its group's name) and of Joint."""
    records = {}
    for seed, group in enumerate(plan.groups):
        records[group.name] = [fake_step(ck, list(group.flags), 0, seed)]
    for seed, method in enumerate(plan.methods, start=10):
        step0 = records[plan.group_of(method.label).name][0]
        records[method.label] = [step0, *(fake_step(ck, list(method.flags), t, seed + t) for t in (1, 2))]
    for k, joint in enumerate(plan.joints):
        records[joint.label] = [fake_step(ck, list(joint.flags), 0, 99 + k)]
    return records


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def test_table_from_step_results(tmp_path, capsys):
    argv = bench_argv(tmp_path, "FT,LwF,MiB,WILSON")
    plan = make_plan(argv)
    records = fake_benchmark(tmp_path, plan)
    assert benchmark.main([*argv[:argv.index("--")], "--table_only", *argv[argv.index("--"):]]) == 0
    folder = tmp_path / "step" / "shapes-6-2"
    table = (folder / "benchmark.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split(" | ")[0][2:] for r in rows] == ["FT", "LwF", "MiB", "WILSON", "Joint"]  # Joint last
    for method in ("FT", "LwF", "MiB", "WILSON"):
        last = records[method][-1]
        avg = sum(r["miou_all"] for r in records[method]) / 3
        h = 2 * last["miou_old"] * last["miou_new"] / (last["miou_old"] + last["miou_new"])
        assert f"| {method} | {pct(last['miou_old'])} | {pct(last['miou_new'])} | {pct(last['miou_all'])} | " \
               f"{pct(h)} | {pct(avg)} |" in table
    # Joint: its per-class IoU over 6-2's groups (old = background + the 6 base shapes, new = the 4 others).
    joint = records["Joint"][0]
    iou = joint["class_iou"]
    old_names = ["background", "disc", "square", "triangle", "star", "cross", "ring"]
    new_names = ["hexagon", "crescent", "L-shape", "heart"]
    old = sum(iou[n] for n in old_names) / 7
    new = sum(iou[n] for n in new_names) / 4
    assert f"| Joint | {pct(old)} | {pct(new)} | {pct(joint['miou_all'])} | {pct(2 * old * new / (old + new))} | - |" \
        in table
    assert "old = the 7 step-0 classes (background included)" in table and "4 classes added later" in table
    assert "FT, LwF, MiB" in table and "LwF-MC" not in table  # the shared step 0s are listed

    with open(folder / "benchmark.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["method"] for r in csv_rows] == ["FT", "LwF", "MiB", "WILSON", "Joint"]
    mib = csv_rows[2]
    assert float(mib["all"]) == pytest.approx(100 * records["MiB"][-1]["miou_all"], abs=0.006)
    assert float(mib["all_step0"]) == pytest.approx(100 * records["MiB"][0]["miou_all"], abs=0.006)
    assert csv_rows[0]["all_step0"] == mib["all_step0"]  # FT and MiB share step 0
    assert float(csv_rows[-1]["old"]) == pytest.approx(100 * old, abs=0.006) and csv_rows[-1]["avg"] == ""
    assert (folder / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| Joint |" in capsys.readouterr().out

    (folder / "WILSON_2.json").unlink()  # a step without a result yet: its row says so instead of guessing
    assert benchmark.main([*argv[:argv.index("--")], "--table_only", *argv[argv.index("--"):]]) == 0
    assert "| WILSON | - | - | - | - | - |" in (folder / "benchmark.md").read_text()


def test_seeds_give_each_seed_its_runs_and_step0s(tmp_path):
    plan = make_plan(bench_argv(tmp_path, "FT,MiB,WILSON", "--seeds", "0,1"))
    assert [m.label for m in plan.methods] == ["FT-seed0", "MiB-seed0", "WILSON-seed0", "FT-seed1", "MiB-seed1",
                                               "WILSON-seed1"]
    assert [m.method for m in plan.methods] == ["FT", "MiB", "WILSON"] * 2 and plan.seeds == (0, 1)
    for run in plan.methods:
        cfg = parse_config(plan.step_flags(run.flags, 1))
        assert cfg.random_seed == run.seed and cfg.name == run.label
    # a step 0 per (step-0 key, seed): FT and MiB share theirs within a seed, never across seeds
    assert members(plan) == [{"FT-seed0", "MiB-seed0"}, {"WILSON-seed0"}, {"FT-seed1", "MiB-seed1"}, {"WILSON-seed1"}]
    assert [(j.label, j.method, j.seed) for j in plan.joints] == [("Joint-seed0", "Joint", 0), ("Joint-seed1", "Joint", 1)]
    assert parse_config(plan.step_flags(plan.joints[1].flags, 0)).random_seed == 1


@pytest.mark.parametrize("own, message", [
    (("--seeds", "0,0"), "distinct seeds"), (("--seeds", "a,b"), "comma-separated integers")])
def test_bad_seeds_are_refused(tmp_path, capsys, own, message):
    with pytest.raises(SystemExit):
        make_plan(bench_argv(tmp_path, "FT", *own))
    assert message in capsys.readouterr().err


def test_seeds_and_a_random_seed_after_the_separator_conflict(tmp_path, capsys):
    argv = bench_argv(tmp_path, "FT", "--seeds", "0,1")
    assert benchmark.main([*argv, "--random_seed", "3"]) == 2
    assert "--seeds sets each run's --random_seed" in capsys.readouterr().err


def test_seed_table_gives_means_and_standard_deviations(tmp_path):
    argv = bench_argv(tmp_path, "FT,MiB", "--seeds", "0,1,2")
    plan = make_plan(argv)
    records = fake_benchmark(tmp_path, plan)
    assert benchmark.main([*argv[:argv.index("--")], "--table_only", *argv[argv.index("--"):]]) == 0
    folder = tmp_path / "step" / "shapes-6-2"
    mib = [records[f"MiB-seed{s}"][-1]["miou_all"] for s in range(3)]
    mean = sum(mib) / 3
    sd = (sum((v - mean) ** 2 for v in mib) / 2) ** 0.5
    table = (folder / "benchmark.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| MiB |"))
    assert row.split(" | ")[3] == f"{pct(mean)} ± {pct(sd)}"
    assert "mean ± sample standard deviation over seeds 0, 1, 2" in table
    with open(folder / "benchmark.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["FT", "MiB", "Joint"]
    assert float(rows["MiB"]["all"]) == pytest.approx(100 * mean, abs=0.006)
    assert float(rows["MiB"]["all_sd"]) == pytest.approx(100 * sd, abs=0.006) and rows["MiB"]["seeds"] == "3"
    step0 = [records[f"MiB-seed{s}"][0]["miou_all"] for s in range(3)]
    assert float(rows["MiB"]["all_step0"]) == pytest.approx(100 * sum(step0) / 3, abs=0.006)
    last = [records[f"MiB-seed{s}"][-1] for s in range(3)]
    h = [2 * r["miou_old"] * r["miou_new"] / (r["miou_old"] + r["miou_new"]) for r in last]
    assert float(rows["MiB"]["hiou"]) == pytest.approx(100 * sum(h) / 3, abs=0.006)  # the mean of each run's hIoU
    assert rows["MiB"]["hiou_sd"] != ""
    joint = [records[f"Joint-seed{s}"][0]["miou_all"] for s in range(3)]
    assert float(rows["Joint"]["all"]) == pytest.approx(100 * sum(joint) / 3, abs=0.006)

    (folder / "MiB-seed2_2.json").unlink()  # a seed still running: the mean of the others, and the row says so
    assert benchmark.main([*argv[:argv.index("--")], "--table_only", *argv[argv.index("--"):]]) == 0
    row = next(line for line in (folder / "benchmark.md").read_text().splitlines() if line.startswith("| MiB"))
    assert row.startswith("| MiB (2 of 3 seeds) |")
    assert row.split(" | ")[3].startswith(pct(sum(mib[:2]) / 2) + " ± ")


def test_joint_row_uses_the_incremental_tasks_classes():
    task = load_task("shapes", "6-4")
    names = task.seen_class_names(1)
    iou: dict[str, float | None] = {n: k / 10 for k, n in enumerate(names)}
    iou["heart"] = None  # absent from the test set: left out of the means, as metrics.py does
    row = benchmark.joint_row("Joint", {"class_iou": iou}, task)
    assert row.old == pytest.approx(sum(k / 10 for k in range(7)) / 7)
    assert row.new == pytest.approx((0.7 + 0.8 + 0.9) / 3)
    assert row.all == pytest.approx(sum(k / 10 for k in range(10)) / 10) and row.avg is None
    assert benchmark.joint_row("Joint", None, task).all is None


class RecordingSbatch:
    """Stands in for sbatch: records each command line and hands out job ids 1000, 1001, ..."""

    def __init__(self) -> None:
        self.commands: dict[str, list[str]] = {}

    def __call__(self, job: benchmark.SlurmJob, command: list[str]) -> str:
        self.commands[job.key] = command
        return str(1000 + len(self.commands) - 1)

    def job_id(self, key: str) -> str:
        return str(1000 + list(self.commands).index(key))


def dependency(command: list[str]) -> str | None:
    deps = [a.split("=", 1)[1] for a in command if a.startswith("--dependency=")]
    return deps[0] if deps else None


def run_flags(command: list[str]) -> list[str]:
    return command[command.index(str(REPO / "slurm" / "step.sbatch")) + 1:]


def test_slurm_chains_wait_for_their_shared_step0(tmp_path):
    own = ("--slurm", "--gpus_per_node", "0", "--cpus_per_task", "2", "--time", "1:00:00", "--log_root",
           str(tmp_path / "logs"), "--signal", "USR2@60")
    argv = bench_argv(tmp_path / "ck", "FT,MiB,LwF-MC,WILSON,EWC", *own)
    args, plan = benchmark.plan_from_argv(argv)
    sbatch = RecordingSbatch()
    benchmark.submit_jobs(benchmark.slurm_jobs(plan), args, sbatch)
    ce, bce, ewc = (g.name for g in plan.groups)
    assert list(sbatch.commands) == [f"{ce}_0", f"{bce}_0", f"{ewc}_0", "FT_1", "FT_2", "MiB_1", "MiB_2",
                                     "LwF-MC_1", "LwF-MC_2", "WILSON_1", "WILSON_2", "EWC_1", "EWC_2", "Joint_0"]
    c = sbatch.commands
    for key in (f"{ce}_0", f"{bce}_0", f"{ewc}_0", "Joint_0"):
        assert dependency(c[key]) is None
    for method, group in (("FT", ce), ("MiB", ce), ("LwF-MC", bce), ("WILSON", bce), ("EWC", ewc)):
        assert dependency(c[f"{method}_1"]) == f"afterok:{sbatch.job_id(f'{group}_0')}"
        assert dependency(c[f"{method}_2"]) == f"afterok:{sbatch.job_id(f'{method}_1')}"
        assert "--kill-on-invalid-dep=yes" in c[f"{method}_1"]
        step1 = run_flags(c[f"{method}_1"])
        assert step1[step1.index("--step_ckpt") + 1] == str(plan.step0_artifact(plan.group_of(method)))
        assert parse_config(step1).step == 1 and parse_config(step1).name == method
        assert c[f"{method}_2"][2] == f"--job-name=shapes-6-2_{method}_step2"
    step0 = parse_config(run_flags(c[f"{bce}_0"]))
    assert (step0.step, step0.name, step0.method, step0.epochs, step0.lr) == (0, bce, "lwf-mc", 4, 0.05)
    joint = parse_config(run_flags(c["Joint_0"]))
    assert (joint.task, joint.name, joint.method, joint.epochs) == ("offline", "Joint", "ft", 4)
    assert c["Joint_0"][3] == f"--output={tmp_path / 'logs'}/shapes-offline/Joint/Joint_step0-%j.out"
    assert {"--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2", "--time=1:00:00", "--signal=USR2@60"} \
        <= set(c["FT_1"])
    assert "--preempt_signal USR2" in shlex.join(run_flags(c["FT_1"]))  # run.py catches what sbatch sends

    # The CE step 0 is complete (trained by MiB, an earlier benchmark's first CE method): its job is left out and
    # the CE methods' step 1 wait for nothing; FT's complete step 1 (same flags) is left out too.
    mib0 = parse_config([*plan.methods[1].flags, "--step", "0", "--epochs", "4", "--lr", "0.05", "--name", ce])
    save_step_artifact(plan.step0_artifact(plan.group_of("FT")), model_state={}, method_state={},
                       meta={"config": config_to_dict(mib0)})
    ft1 = parse_config(plan.later_steps(plan.methods[0])[0][1])
    save_step_artifact(step_artifact_path(ft1.checkpoint_dir, "shapes", "6-2", False, "FT", 1), model_state={},
                       method_state={}, meta={"config": config_to_dict(ft1)})
    again = RecordingSbatch()
    benchmark.submit_jobs(benchmark.slurm_jobs(plan), args, again)
    assert f"{ce}_0" not in again.commands and "FT_1" not in again.commands
    assert dependency(again.commands["FT_2"]) is None and dependency(again.commands["MiB_1"]) is None
    assert dependency(again.commands["MiB_2"]) == f"afterok:{again.job_id('MiB_1')}"
    assert dependency(again.commands["WILSON_1"]) == f"afterok:{again.job_id(f'{bce}_0')}"

    # The CE step 0 re-trained since FT's step 1 (written later): FT's step 1 is stale, submitted again, and its
    # old artifact kept aside (dated), or the job's run.py would skip it.
    ft1_path = step_artifact_path(ft1.checkpoint_dir, "shapes", "6-2", False, "FT", 1)
    age(ft1_path, 10)
    third = RecordingSbatch()
    benchmark.submit_jobs(benchmark.slurm_jobs(plan), args, third)
    assert dependency(third.commands["FT_1"]) is None and not ft1_path.exists()
    assert len(list(ft1_path.parent.glob("FT_1.replaced-*.pth"))) == 1  # kept aside, dated, not deleted
    assert dependency(third.commands["FT_2"]) == f"afterok:{third.job_id('FT_1')}"


def complete_artifact_for(flags: list[str]) -> Path:
    """A complete (weightless) artifact of the step these run.py flags train, made by exactly these flags."""
    cfg = parse_config(flags)
    path = step_artifact_path(cfg.checkpoint_dir, cfg.dataset, cfg.task, cfg.overlap, cfg.name, cfg.step)
    save_step_artifact(path, model_state={}, method_state={}, meta={"config": config_to_dict(cfg)})
    return path


def age(path: Path, seconds: float) -> None:
    """Make `path` look written `seconds` ago (artifacts are compared by modification time)."""
    stamp = path.stat().st_mtime - seconds
    os.utime(path, (stamp, stamp))


def test_local_run_reuses_complete_steps_and_retrains_stale_ones(tmp_path, monkeypatch):
    ran: list[str] = []
    run = lambda flags, what: ran.append(what) or 0  # noqa: E731
    plan = make_plan(bench_argv(tmp_path, "FT,MiB,WILSON"))
    ce, bce = (g.name for g in plan.groups)
    assert benchmark.run_local(plan, run) == 0
    assert ran == [f"step 0 {ce}", f"step 0 {bce}", "FT step 1", "FT step 2", "MiB step 1", "MiB step 2",
                   "WILSON step 1", "WILSON step 2", "Joint (offline)"]

    # Everything complete, each step written after the one it starts from: nothing runs.
    ft = plan.methods[0]
    paths = [complete_artifact_for(plan.step_flags(g.flags, 0)) for g in plan.groups]
    paths += [complete_artifact_for(flags) for m in plan.methods for _, flags in plan.later_steps(m)]
    paths.append(complete_artifact_for(plan.step_flags(plan.joints[0].flags, 0)))
    for k, path in enumerate(paths):
        age(path, 100 - k)
    ran.clear()
    assert benchmark.run_local(plan, run) == 0 and ran == []

    # FT's step 1 re-trained after its step 2 (e.g. by hand): step 2 is stale and runs again (its artifact is
    # kept aside first, dated, or run.py would skip it); a changed WILSON step 0 is trained and WILSON's chain follows.
    age(complete_artifact_for(plan.later_steps(ft)[0][1]), -10)
    (tmp_path / "step" / "shapes-6-2" / f"{bce}_0.pth").unlink()
    ran.clear()
    assert benchmark.run_local(plan, run) == 0
    assert ran == [f"step 0 {bce}", "FT step 2", "WILSON step 1", "WILSON step 2"]
    assert not (tmp_path / "step" / "shapes-6-2" / "FT_2.pth").exists()
    assert len(list((tmp_path / "step" / "shapes-6-2").glob("FT_2.replaced-*.pth"))) == 1  # kept aside, dated
    assert not (tmp_path / "step" / "shapes-6-2" / "WILSON_1.pth").exists()
    assert (tmp_path / "step" / "shapes-6-2" / "MiB_2.pth").exists()


def test_parallel_jobs_keep_each_chain_after_its_step0_and_a_failure_stops_only_its_own(tmp_path):
    import threading

    plan = make_plan(bench_argv(tmp_path, "FT,MiB,WILSON,EWC"))
    ce, bce, reg = (g.name for g in plan.groups)
    lock, ran, running, most = threading.Lock(), [], [0], [0]

    def run(flags: list[str], what: str) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        threading.Event().wait(0.02)  # long enough for the others to start, if they may
        with lock:
            running[0] -= 1
            ran.append(what)
        complete_artifact_for(flags)
        return 7 if what == f"step 0 {bce}" else 0

    slots = benchmark.queue.Queue()
    for _ in range(2):
        slots.put(None)

    def two_at_once(flags: list[str], what: str) -> int:  # LocalRunner's slot queue, without the subprocess
        slot = slots.get()
        try:
            return run(flags, what)
        finally:
            slots.put(slot)

    assert benchmark.run_local(plan, two_at_once, jobs=2) == 7
    assert most[0] == 2  # two at once, never more
    # WILSON's step 0 (BCE) failed: WILSON's chain did not run; every other chain ran after its own step 0.
    assert sorted(ran) == sorted([f"step 0 {ce}", f"step 0 {bce}", f"step 0 {reg}", "FT step 1", "FT step 2",
                                  "MiB step 1", "MiB step 2", "EWC step 1", "EWC step 2", "Joint (offline)"])
    for method, group in (("FT", ce), ("MiB", ce), ("EWC", reg)):
        assert ran.index(f"step 0 {group}") < ran.index(f"{method} step 1") < ran.index(f"{method} step 2")


def test_slot_environments_split_the_cores_or_the_gpus():
    one = benchmark.slot_environments(2, 1, environ={"A": "1"}, gpus=[], cores=2)
    assert one == [{"A": "1"}]  # one job: the environment as it is (torchrun sets the threads)
    cpu = benchmark.slot_environments(1, 2, environ={}, gpus=[], cores=2)
    assert cpu == [{"OMP_NUM_THREADS": "1"}] * 2
    assert benchmark.slot_environments(1, 2, environ={"OMP_NUM_THREADS": "4"}, gpus=[], cores=2)[0] == \
        {"OMP_NUM_THREADS": "4"}  # the user's own setting wins
    gpu = benchmark.slot_environments(2, 2, environ={}, gpus=["0", "1", "2", "3"])
    assert [e["CUDA_VISIBLE_DEVICES"] for e in gpu] == ["0,1", "2,3"]
    with pytest.raises(benchmark.ConfigError, match="--jobs 3 x --nproc_per_node 2 needs 6 GPUs"):
        benchmark.slot_environments(2, 3, environ={}, gpus=["0", "1", "2", "3"])


def test_slurm_dry_run_prints_sbatch_lines_and_the_table_command(tmp_path, capsys):
    argv = bench_argv(tmp_path / "ck", "FT,MiB", "--slurm", "--dry_run", "--gpus_per_node", "0",
                      "--log_root", str(tmp_path / "logs"))
    assert benchmark.main(argv) == 0
    out = capsys.readouterr().out
    lines = [shlex.split(line) for line in out.splitlines() if line.startswith("sbatch ")]
    assert len(lines) == 6 and "would submit 6 job(s)" in out  # one shared step 0, FT 1-2, MiB 1-2, Joint
    assert [dependency(line) for line in lines].count(None) == 2
    assert not (tmp_path / "logs").exists()
    hint = out.splitlines()[-1].strip()
    assert "--table_only" in hint and "--slurm" not in hint and "--dry_run" not in hint


def test_two_methods_share_one_trained_step0_end_to_end(shapes_root, tmp_path):
    """FT and MiB on shapes 6-4 with the tiny flags of test_pipeline.py, plus Joint: 4 trainings, 1 step 0."""
    tiny = ["--dataset", "shapes", "--backbone", "resnet18", "--crop_size", "32", "--num_workers", "0",
            "--val_interval", "0", "--print_interval", "5", "--random_seed", "3", "--norm_act", "bn",
            "--batch_size", "8", "--epochs", "1", "--data_root", str(shapes_root), "--task", "6-4",
            "--checkpoint_dir", str(tmp_path / "ck"), "--logdir", str(tmp_path / "tb")]
    command = [sys.executable, str(REPO / "launch/benchmark.py"), "--methods", "FT,MiB", "--nproc_per_node", "1",
               "--", *tiny]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    folder = tmp_path / "ck" / "step" / "shapes-6-4"
    step0 = sorted(p.name for p in folder.glob("*_0.pth"))
    assert len(step0) == 1 and step0[0].startswith("step0-")  # no FT_0 / MiB_0: one shared step 0
    for method in ("FT", "MiB"):
        config = torch.load(folder / f"{method}_1.pth", weights_only=True)["meta"]["config"]
        assert config["step_ckpt"] == str(folder / step0[0]) and config["name"] == method
    assert (tmp_path / "ck" / "step" / "shapes-offline" / "Joint_0.json").is_file()
    table = (folder / "benchmark.md").read_text()
    assert all(f"| {m} | " in table for m in ("FT", "MiB", "Joint")) and "| - |" in table
    assert first.stdout.count("torch.distributed.run") == 4

    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "torch.distributed.run" not in again.stdout and again.stdout.count("reused") == 4


@pytest.mark.parametrize("target, runs, groups", [("benchmark", 45, 21), ("benchmark-city", 12, 3)])
def test_the_makefiles_benchmarks_plan(tmp_path, target, runs, groups):
    """`make benchmark` / `make benchmark-city` as written: every flag parses, 3 seeds, each seed its own step 0s."""
    printed = subprocess.run(["make", "-s", "-n", target], cwd=REPO, capture_output=True, text=True, check=True).stdout
    line = next(x for x in printed.replace("\\\n", " ").splitlines() if "launch/benchmark.py" in x)  # not a venv rebuild
    argv = shlex.split(line)
    assert argv[1].endswith("launch/benchmark.py")
    plan = make_plan([*argv[2:], "--checkpoint_dir", str(tmp_path)])
    assert plan.seeds == (0, 1, 2) and len(plan.methods) == runs and len(plan.groups) == groups
    assert len(plan.joints) == 3
    if target == "benchmark":
        assert plan.cfg.dataset == "shapes-hue"
        ewc = parse_config(plan.step_flags(next(m for m in plan.methods if m.method == "EWC").flags, 1))
        assert ewc.method_options.reg_importance == 100.0
        # DKD, STAR and their -M variants: each its own step 0, at a tenth of the lr (their scripts' ratio to MiB's)
        star_m = next(m for m in plan.methods if m.method == "STAR-M")
        assert parse_config(plan.step_flags(plan.group_of(star_m.label).flags, 0)).lr == 0.005
        later = parse_config(plan.step_flags(star_m.flags, 1))
        assert later.lr == 0.0005 and later.method_options.mem_size == 8


def test_methods_trained_on_an_exemplar_memory_are_marked(tmp_path):
    """DKD-M sees images of earlier steps: its row carries a dagger and a footnote with its memory size, under
    --seeds too; DKD and FT do not."""
    argv = bench_argv(tmp_path, "FT,DKD,DKD-M", "--method_flags", "DKD-M=--mem_size 6", "--seeds", "0,1")
    plan = make_plan(argv)
    # The -M variant's step 0 carries its memory: it is not its parent's.
    assert not any({"DKD-seed0", "DKD-M-seed0"} <= group for group in members(plan))
    records = fake_benchmark(tmp_path, plan)
    assert records["FT-seed0"][-1]["old_data"] is None  # write_results: a method that uses no old data says so
    assert benchmark.main([*argv[:argv.index("--")], "--table_only", *argv[argv.index("--"):]]) == 0
    table = (tmp_path / "step" / "shapes-6-2" / "benchmark.md").read_text()
    labels = [line.split(" | ")[0][2:] for line in table.splitlines()
              if line.startswith("| ") and not line.startswith("| method")]
    assert labels == ["FT", "DKD", "DKD-M \u2020", "Joint"]
    assert "\u2020 DKD-M: trains on an exemplar memory of earlier steps' images (6 images)" in table
    assert table.count("\u2020") == 2  # the row and its footnote


def test_a_method_can_train_its_step0_at_its_own_lr(tmp_path):
    """`--method_flags "M=--initial_lr X --lr Y"`: M's step 0 at X (its own group, not shared with another lr), its
    later steps at Y; the other methods keep the benchmark's --initial_lr."""
    argv = bench_argv(tmp_path, "FT,DKD", "--method_flags", "DKD=--initial_lr 0.005 --lr 0.0005")
    plan = make_plan(argv)
    step0 = {g.members[0]: parse_config(plan.step_flags(g.flags, 0)) for g in plan.groups}
    assert step0["DKD"].lr == 0.005 and step0["FT"].lr == 0.05
    later = {m.label: parse_config(plan.later_steps(m)[0][1]) for m in plan.methods}
    assert later["DKD"].lr == 0.0005 and later["FT"].lr == later["FT"].lr != 0.0005
    assert all("--initial_lr" not in m.flags for m in plan.methods)  # the launcher's flag, not run.py's
