"""Benchmark several methods on one protocol, against the joint (offline) upper bound, in one paper-style table.

    python launch/benchmark.py --methods FT,LwF,MiB,WILSON --nproc_per_node 2 --initial_epochs 4 --initial_lr 0.05 \
        --method_flags "WILSON=--pseudo_ep 1" -- --dataset shapes --task 6-2 --epochs 2 ...

Flags after `--` go to run.py for every method (as launch/compare.py: `--method M --name M` are added, and
`--method_flags "M=--flag value"` adds flags for one method only (`--initial_lr X` there: that method's step-0 lr,
e.g. DKD and STAR, whose lr is a tenth of MiB's); --initial_epochs / --initial_lr set step 0's
--epochs / --lr, as run_protocol.py). What it does:
  1. Step 0 is trained once per distinct step-0 configuration and shared. Methods are grouped by their class's
     step0_key(options) (FT, LwF, MiB: plain CE; LwF-MC, WILSON: BCE; EWC, PI, RW: CE gathering every regularizer's statistics)
     and by the step-0 run.py config without the fields that do not change what step 0 computes (the method, the
     name, logging, workers, the flags only steps t>0 read). A group's step 0 is trained by its first method under
     the name step0-<hash of that key>; each method's step 1 starts from it (--step_ckpt), its later steps follow
     its own chain <M>_<t>.pth.
  2. The joint upper bound (name Joint): task `offline` (one step, every class) with the same general flags and
     step 0's schedule, plain CE. Its old / new / all are means of its per-class IoU over the incremental task's
     step-0 classes, the classes added later, and both.
  3. A step whose artifact is complete, was made by the same flags (for the shared step 0: under the same step-0
     key, by whichever member) and is newer than the artifact it started from is not run again, so re-running the
     command continues a benchmark. Once a step of a method runs, its later steps run again too (a complete old
     artifact of theirs is first kept aside under a dated name, <name>_<step>.replaced-<date>.pth: run.py could skip
     it, as its flags did not change). Steps run with --replace: a complete artifact made by other flags under a
     benchmark name (a demo's FT, an earlier --epochs) is kept aside the same way, never deleted.
  4. Every method is tested on the same images: --test_images as given after `--`, else "seen" (MiB's selection;
     WILSON's preset "all" would score its intermediate steps on other images than the others').
  5. The table: per method the LAST step's old (step-0 classes, background included) / new / all mIoU, hIoU (their
     harmonic mean, 2 old new / (old + new), as DKD's and STAR's tables) and "avg", the mean over steps of the
     all-class mIoU; the methods in --methods order, Joint last. A method that trains on images of earlier steps
     (an exemplar memory: DKD-M, STAR-M) is marked with a dagger and a footnote giving the memory size. Written to
     <checkpoint_dir>/step/<dataset>-<task>[-ov]/benchmark.md, benchmark.csv and benchmark.png, and printed.
  6. --seeds 0,1,2: every method and Joint run once per seed (--random_seed s, runs named <M>-seed<s>, each seed
     with its own shared step 0s), and each cell of the table is the mean ± sample standard deviation over the
     seeds (the CSV: the means, all_step<t> per step, and old_sd, new_sd, all_sd, hiou_sd, avg_sd, seeds).

With --jobs N, up to N steps train at once on this machine (a chain still waits for its step 0): on 2 CPU cores,
two single-thread jobs do ~1.6x the work of one job on both cores.

On SLURM, the same command with --slurm (and slurm/submit.py's resource flags: --gpus_per_node, --time, ...)
submits each shared step 0 as a job, each method's later steps as a chain whose step 1 waits (afterok) for its
step 0's job, and Joint as one job; --dry_run prints the sbatch lines instead. When the jobs are done, the same
command with --table_only (instead of --slurm) writes the table.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import os
import queue
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "launch"))
sys.path.insert(0, str(REPO / "slurm"))

import compare  # noqa: E402
import run_protocol  # noqa: E402
import submit  # noqa: E402
from segmentation.config import Config, ConfigError, config_to_dict, parse_config  # noqa: E402
from segmentation.engine.checkpoint import (CheckpointError, keep_aside, load_artifact,  # noqa: E402
                                           protocol_dir, step_artifact_path)
from segmentation.engine.metrics import harmonic_iou  # noqa: E402
from segmentation.engine.runstate import saved_config  # noqa: E402
from segmentation.methods import METHODS  # noqa: E402
from segmentation.tasks import Task, TaskError, load_task  # noqa: E402

JOINT_TASK = "offline"
# Config fields that do not change what step 0 computes: who runs it and under which name, logging, loaders,
# run-state housekeeping, the test/infer modes, and the flags only steps t>0 read (run.py refuses --weakly and
# --image_labels at step 0; --student_init says where a step t>0 starts).
NOT_STEP0 = frozenset({
    "method", "method_options", "name", "step_ckpt", "logdir", "num_workers", "print_interval", "val_interval",
    "sample_num", "save_interval", "keep_run_states", "no_resume", "preempt_signal", "test", "ckpt", "infer", "gt",
    "infer_out", "student_init", "weakly", "image_labels", "replace",
})
OLD_DATA_MARK = "†"  # after the name of a method that trains on images of earlier steps (the -M variants)
WARMUP_POLICIES = ("warmup", "warm_poly")  # the lr policies that read --warmup_epochs (trainer.lr_factor_fn)


@dataclass(frozen=True)
class MethodRun:
    label: str               # its --name: the method as written in --methods, with -seed<s> under --seeds
    flags: tuple[str, ...]   # run.py flags of every step of it (--method, --name and its --method_flags included)
    method: str = ""         # the table row it belongs to (as written in --methods; the joint bound's name)
    seed: int | None = None  # its --random_seed under --seeds, else None (run.py's default)


@dataclass(frozen=True)
class Step0Group:
    name: str                # --name of the shared step 0: step0-<hash of signature>
    members: tuple[str, ...]  # method labels; the first one trains it
    flags: tuple[str, ...]   # the first member's flags with --name replaced (no --step)
    signature: str           # step0_key and the step-0 config that matters, as JSON


@dataclass(frozen=True)
class Plan:
    task: Task
    cfg: Config                       # step 0 of the first method: dataset, overlap, checkpoint_dir
    methods: tuple[MethodRun, ...]
    groups: tuple[Step0Group, ...]
    joints: tuple[MethodRun, ...]     # the offline runs (one step), one per seed; none with --no_joint
    initial_epochs: int | None
    initial_lr: float | None
    seeds: tuple[int | None, ...] = (None,)
    method_initial_lr: dict[str, float] = dataclasses.field(default_factory=dict)  # --method_flags "M=--initial_lr X"

    @property
    def folder(self) -> Path:
        return protocol_dir(self.cfg.checkpoint_dir, self.cfg.dataset, self.task.name, self.cfg.overlap)

    @property
    def joint_folder(self) -> Path:
        return protocol_dir(self.cfg.checkpoint_dir, self.cfg.dataset, JOINT_TASK, self.cfg.overlap)

    def group_of(self, label: str) -> Step0Group:
        return next(g for g in self.groups if label in g.members)

    def step0_artifact(self, group: Step0Group) -> Path:
        return step_artifact_path(self.cfg.checkpoint_dir, self.cfg.dataset, self.task.name, self.cfg.overlap,
                                  group.name, 0)

    def step_flags(self, flags: Sequence[str], step: int, step_ckpt: Path | None = None) -> list[str]:
        """run.py's flags of one step. --replace: the benchmark owns its names, so a complete artifact of other
        flags under one of them (a demo's `FT`, an earlier --epochs) is kept aside, dated, and the step trained."""
        extra = run_protocol.step_overrides(self.initial_epochs, step0_lr(flags, self.initial_lr,
                                                                         self.method_initial_lr), step)
        return [*flags, *extra, *(["--step_ckpt", str(step_ckpt)] if step_ckpt is not None else []), "--replace"]

    def previous_artifact(self, method: MethodRun, step: int) -> Path:
        """The artifact step `step` (>= 1) of `method` starts from."""
        if step == 1:
            return self.step0_artifact(self.group_of(method.label))
        return step_artifact_path(self.cfg.checkpoint_dir, self.cfg.dataset, self.task.name, self.cfg.overlap,
                                  method.label, step - 1)

    def later_steps(self, method: MethodRun) -> list[tuple[int, list[str]]]:
        """Steps 1.. of one method with their run.py flags; step 1 starts from its group's shared step 0."""
        shared = self.step0_artifact(self.group_of(method.label))
        return [(step, self.step_flags(method.flags, step, shared if step == 1 else None))
                for step in range(1, self.task.num_steps)]


# ---------------------------------------------------------------------------------------------- planning


def pop_initial_lr(flags: list[str]) -> float | None:
    """A method's own step-0 lr, given as `--initial_lr X` in its --method_flags (removed from them: it is this
    launcher's flag, not run.py's)."""
    for k, arg in enumerate(flags):
        if arg == "--initial_lr" and k + 1 < len(flags):
            value = flags[k + 1]
            del flags[k:k + 2]
            return float(value)
        if arg.startswith("--initial_lr="):
            del flags[k]
            return float(arg.split("=", 1)[1])
    return None


def step0_lr(flags: Sequence[str], default: float | None, per_method: dict[str, float]) -> float | None:
    """Step 0's lr for a run with these run.py flags: its method's own --initial_lr, else the benchmark's."""
    methods = [flags[k + 1] for k, arg in enumerate(flags[:-1]) if arg == "--method"]
    return per_method.get(methods[-1], default) if methods else default


def step0_signature(config: dict[str, Any], key: tuple) -> str:
    """What a step 0 computes, as one string: equal strings train the same step 0."""
    kept = {k: v for k, v in config.items() if k not in NOT_STEP0}
    if kept.get("lr_policy") not in WARMUP_POLICIES:
        kept.pop("warmup_epochs", None)  # WILSON's preset sets it to --pseudo_ep; step 0's poly schedule ignores it
    return json.dumps({"step0_key": list(key), "config": kept}, sort_keys=True, default=str)


def config_signature(cfg: Config) -> str:
    return step0_signature(config_to_dict(cfg), METHODS[cfg.method].step0_key(cfg.method_options))


def group_step0(plan_flags: Callable[[Sequence[str]], list[str]], methods: Sequence[MethodRun]
                ) -> tuple[Step0Group, ...]:
    """Methods with equal step-0 signatures share one group, in the order of their first member."""
    members: dict[str, list[MethodRun]] = {}
    for method in methods:
        members.setdefault(config_signature(parse_config(plan_flags(method.flags))), []).append(method)
    groups = []
    for signature, runs in members.items():
        name = "step0-" + hashlib.sha1(signature.encode()).hexdigest()[:8]
        groups.append(Step0Group(name, tuple(r.label for r in runs), (*runs[0].flags, "--name", name), signature))
    return tuple(groups)


def build_plan(args: argparse.Namespace, run_args: list[str]) -> Plan:
    for arg in run_args:
        if arg.split("=", 1)[0] in ("--step", "--step_ckpt", "--test", "--ckpt"):
            raise ConfigError(f"do not pass {arg} after --: the benchmark sets every step and where it starts from")
    if len(set(args.methods)) != len(args.methods) or not args.methods:
        raise ConfigError(f"--methods {','.join(args.methods)}: give each method once")
    if not any(arg.split("=", 1)[0] == "--test_images" for arg in run_args):
        run_args = [*run_args, "--test_images", "seen"]  # one test set for every method (docstring, 4)
    seeds: tuple[int | None, ...] = tuple(args.seeds) if args.seeds else (None,)
    if args.seeds and any(arg.split("=", 1)[0] == "--random_seed" for arg in run_args):
        raise ConfigError("--seeds sets each run's --random_seed: do not pass --random_seed after --")

    def seeded(label: str, seed: int | None) -> tuple[str, tuple[str, ...]]:
        """The run's --name and its seed flag: <label>-seed<s> under --seeds, the label alone otherwise."""
        return (label, ()) if seed is None else (f"{label}-seed{seed}", ("--random_seed", str(seed)))

    method_initial_lr = {}
    for m in args.methods:
        lr = pop_initial_lr(args.extra.get(m, []))
        if lr is not None:
            method_initial_lr[m] = lr
    methods = []
    for seed in seeds:  # seed by seed: with --jobs, the first seed's runs are asked for first
        for m in args.methods:
            name, seed_flags = seeded(m, seed)
            methods.append(MethodRun(name, (*run_args, *seed_flags, "--method", m, "--name", name,
                                            *args.extra.get(m, [])), m, seed))
    methods = tuple(methods)

    def at_step0(flags: Sequence[str]) -> list[str]:
        lr = step0_lr(flags, args.initial_lr, method_initial_lr)
        return [*flags, *run_protocol.step_overrides(args.initial_epochs, lr, 0)]

    first = parse_config(at_step0(methods[0].flags))
    task = load_task(first.dataset, first.task)
    joints = []
    if not args.no_joint and task.name != JOINT_TASK:
        if args.joint_name in args.methods:
            raise ConfigError(f"--joint_name {args.joint_name} is also in --methods: choose another name")
        load_task(first.dataset, JOINT_TASK)  # every dataset file should have one; fail now if not
        for seed in seeds:
            name, seed_flags = seeded(args.joint_name, seed)
            joints.append(MethodRun(name, (*run_args, *seed_flags, "--task", JOINT_TASK, "--method", "ft",
                                           "--name", name), args.joint_name, seed))
    plan = Plan(task, first, methods, group_step0(at_step0, methods), tuple(joints), args.initial_epochs,
                args.initial_lr, seeds, method_initial_lr)
    for method in methods:  # every step's flags parse before anything runs, so a typo fails now
        for _, flags in plan.later_steps(method):
            parse_config(flags)
    for joint in plan.joints:
        parse_config(plan.step_flags(joint.flags, 0))
    return plan


def describe(plan: Plan) -> str:
    return "\n".join(f"[benchmark] step 0 {g.name} ({'shared by ' if len(g.members) > 1 else 'for '}"
                     f"{', '.join(g.members)}), trained as {g.members[0]}" for g in plan.groups)


def step0_complete(path: Path, signature: str) -> bool:
    """The shared step 0 exists, is complete, and was made under this signature, by any member of the group (the
    first member may change when --methods does; run.py's own check would then ask for the same step again)."""
    try:
        saved = saved_config(load_artifact(path)["meta"].get("config", {}))
        cls = METHODS[saved["method"]]
        options = cls.Options(**saved["method_options"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return False
    return step0_signature(saved, cls.step0_key(options)) == signature


def complete_artifact(flags: list[str]) -> Path | None:
    """The step's artifact if run.py would skip the step: complete and made by the same flags (its own test,
    step.existing.already_complete)."""
    from segmentation.step.existing import already_complete

    cfg = parse_config(flags)
    return already_complete(cfg, load_task(cfg.dataset, cfg.task))


def reusable(flags: list[str], previous: Path | None) -> bool:
    """Complete with the same flags, and trained from the `previous` artifact as it is now: written after it. A
    re-trained predecessor (a new shared step 0, a re-run step t-1) leaves the same flags but makes the step stale;
    run.py cannot tell, since --step_ckpt names a path, not a version."""
    path = complete_artifact(flags)
    if path is None:
        return False
    return previous is None or (previous.is_file() and path.stat().st_mtime >= previous.stat().st_mtime)


_say_lock = threading.Lock()


def say(message: str, file: TextIO | None = None) -> None:
    """print() a whole line at once: with --jobs, steps report from several threads, and print()'s separate writes
    of the text and the newline interleaved ("done in 150 s[benchmark] LwF step 1: started")."""
    with _say_lock:
        print(message, file=file or sys.stdout, flush=True)


def discard_stale(flags: list[str], what: str, dry_run: bool = False) -> Path | None:
    """Move aside (dated, never deleted) a complete artifact of a step that must train again (its predecessor was
    re-trained): run.py could otherwise skip the step, since its flags did not change. Returns the artifact (to be)
    moved."""
    path = complete_artifact(flags)
    if path is None:
        return None
    if dry_run:
        say(f"[benchmark] {what}: {path} was trained from an older predecessor; would keep it aside and train the "
            f"step again")
        return path
    kept = keep_aside(path)
    say(f"[benchmark] {what}: {path} was trained from an older predecessor; kept as {kept[0].name}, training the "
        f"step again")
    return path


# ------------------------------------------------------------------------------------------- on this machine


StepRunner = Callable[[list[str], str], int]  # (run.py flags of one step, what it is) -> exit code


def slot_environments(nproc_per_node: int, jobs: int, environ: dict[str, str] | None = None,
                      gpus: Sequence[str] | None = None, cores: int | None = None) -> list[dict[str, str]]:
    """One environment per job that may run at once. On GPUs, each job gets its own --nproc_per_node devices
    (CUDA_VISIBLE_DEVICES); on CPU, each of its processes cores / (jobs x nproc) threads, unless OMP_NUM_THREADS
    is set. Two single-thread jobs on 2 cores do ~1.6x the work of one 2-thread job at these small batches."""
    environ = dict(os.environ if environ is None else environ)
    if jobs == 1:
        return [environ]
    if gpus is None:
        gpus = visible_gpus(environ)
    if gpus:
        if jobs * nproc_per_node > len(gpus):
            raise ConfigError(f"--jobs {jobs} x --nproc_per_node {nproc_per_node} needs {jobs * nproc_per_node} "
                              f"GPUs, {len(gpus)} are visible: lower --jobs")
        return [environ | {"CUDA_VISIBLE_DEVICES": ",".join(gpus[k * nproc_per_node:(k + 1) * nproc_per_node])}
                for k in range(jobs)]
    threads = max(1, (cores or os.cpu_count() or 1) // (jobs * nproc_per_node))
    return [{"OMP_NUM_THREADS": str(threads)} | environ for _ in range(jobs)]


def visible_gpus(environ: dict[str, str]) -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    listed = environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [g for g in listed.split(",") if g.strip()]
    return [str(k) for k in range(torch.cuda.device_count())]


class LocalRunner:
    """Runs steps as torchrun subprocesses, at most `jobs` at once (a queue of slots, one environment each). With
    one job the steps print to this terminal; with more, each step writes its own log under `log_dir`, and a
    failed step's last lines are printed."""

    def __init__(self, nproc_per_node: int, jobs: int, log_dir: Path) -> None:
        self.nproc_per_node = nproc_per_node
        self.jobs = jobs
        self.log_dir = log_dir
        self.slots: queue.Queue[dict[str, str]] = queue.Queue()
        for env in slot_environments(nproc_per_node, jobs):
            self.slots.put(env)

    def __call__(self, flags: list[str], what: str) -> int:
        command = run_protocol.torchrun_command(self.nproc_per_node, flags)
        env = self.slots.get()
        try:
            started = time.monotonic()
            if self.jobs == 1:
                say(f"[benchmark] {what}: {shlex.join(command)}")
                code = run_protocol.call_step(command, env)
            else:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                log = self.log_dir / (what.replace(" ", "_").replace("(", "").replace(")", "") + ".log")
                say(f"[benchmark] {what}: started, log {log}")
                with open(log, "w") as out:
                    out.write(shlex.join(command) + "\n")
                    out.flush()
                    code = run_protocol.call_step(command, env, stdout=out, stderr=subprocess.STDOUT)
                if code != 0:
                    tail = log.read_text(errors="replace").splitlines()[-15:]
                    say("\n".join(f"  | {line}" for line in tail), file=sys.stderr)
        finally:
            self.slots.put(env)
        if code == 0:
            say(f"[benchmark] {what}: done in {time.monotonic() - started:.0f} s")
        else:
            say(f"[benchmark] {what} failed with exit code {code}; complete steps are kept. Fix the cause and "
                "re-run the same command to continue.", file=sys.stderr)
        return code


def run_group(plan: Plan, run: StepRunner, group: Step0Group) -> tuple[int, bool]:
    """A shared step 0, unless reusable; returns (exit code, whether it was trained now)."""
    what = f"step 0 {group.name}"
    if step0_complete(plan.step0_artifact(group), group.signature):
        say(f"[benchmark] {what}: complete, reused")
        return 0, False
    return run(plan.step_flags(group.flags, 0), what), True


def run_chain(plan: Plan, run: StepRunner, method: MethodRun, step0: tuple[int, bool]) -> int:
    """Steps 1.. of one method once its step 0 is there; reusable steps are not run again, and once a step runs
    (or its step 0 was trained now), the later steps run too."""
    code, redo = step0
    if code != 0:
        say(f"[benchmark] {method.label}: not run, its step 0 failed", file=sys.stderr)
        return code
    for step, flags in plan.later_steps(method):
        what = f"{method.label} step {step}"
        if not redo and reusable(flags, plan.previous_artifact(method, step)):
            say(f"[benchmark] {what}: complete, same flags, reused")
            continue
        redo = True
        discard_stale(flags, what)
        if code := run(flags, what):
            return code
    return 0


def run_joint(plan: Plan, run: StepRunner, joint: MethodRun) -> int:
    flags = plan.step_flags(joint.flags, 0)
    what = f"{joint.label} ({JOINT_TASK})"
    if reusable(flags, None):
        say(f"[benchmark] {what}: complete, same flags, reused")
        return 0
    return run(flags, what)


def run_local(plan: Plan, run: StepRunner, jobs: int = 1) -> int:
    """The shared step 0s, each method's chain after its step 0, and Joint; with jobs > 1 as threads that wait
    for their step 0 and then for a free slot of `run` (step 0s and Joint ask first). A failed chain does not stop
    the others; returns the first failure's exit code (0: all done)."""
    if jobs == 1:
        step0 = {g.name: run_group(plan, run, g) for g in plan.groups}
        codes = [run_chain(plan, run, m, step0[plan.group_of(m.label).name]) for m in plan.methods]
        codes += [run_joint(plan, run, joint) for joint in plan.joints]
    else:
        with ThreadPoolExecutor(max_workers=len(plan.groups) + len(plan.methods) + len(plan.joints)) as pool:
            groups = {g.name: pool.submit(run_group, plan, run, g) for g in plan.groups}
            joints = [pool.submit(run_joint, plan, run, joint) for joint in plan.joints]
            chains = [pool.submit(lambda m: run_chain(plan, run, m, groups[plan.group_of(m.label).name].result()), m)
                      for m in plan.methods]
            codes = [f.result() for f in (*chains, *joints)]
        codes += [f.result()[0] for f in groups.values()]
    return next((c for c in codes if c), 0)


# ------------------------------------------------------------------------------------------------- SLURM


@dataclass(frozen=True)
class SlurmJob:
    key: str                 # "<name>_<step>", what other jobs name in `after`
    chain: submit.Chain      # gives the job name and the log folder
    step: int
    flags: tuple[str, ...]   # run.py flags
    after: str | None        # key of the job this one waits for (afterok), None: nothing to wait for
    stale: bool = False      # a complete artifact with these flags exists but must be trained again


def slurm_jobs(plan: Plan) -> list[SlurmJob]:
    """The shared step 0s (without dependency), each method's steps 1.. (step 1 after its step 0's job, step t after
    step t-1's), and Joint. Reusable steps are left out, as slurm/submit.py does: a method's leading ones, as long
    as nothing before them is re-run."""
    cfg, jobs = plan.cfg, []
    step0_jobs: dict[str, str] = {}
    for group in plan.groups:
        if step0_complete(plan.step0_artifact(group), group.signature):
            print(f"[benchmark] step 0 {group.name}: skipped, complete artifact", flush=True)
            continue
        chain = submit.Chain(cfg.dataset, plan.task, group.members[0], None, group.name, cfg.overlap)
        job = SlurmJob(f"{group.name}_0", chain, 0, tuple(plan.step_flags(group.flags, 0)), None)
        jobs.append(job)
        step0_jobs[group.name] = job.key
    for method in plan.methods:
        chain = submit.Chain(cfg.dataset, plan.task, method.label, None, method.label, cfg.overlap)
        previous = step0_jobs.get(plan.group_of(method.label).name)
        for step, flags in plan.later_steps(method):
            if previous is None and reusable(flags, plan.previous_artifact(method, step)):
                print(f"[benchmark] {method.label} step {step}: skipped, complete artifact", flush=True)
                continue
            stale = complete_artifact(flags) is not None
            jobs.append(SlurmJob(f"{method.label}_{step}", chain, step, tuple(flags), previous, stale))
            previous = jobs[-1].key
    for joint in plan.joints:
        flags = plan.step_flags(joint.flags, 0)
        if reusable(flags, None):
            print(f"[benchmark] {joint.label}: skipped, complete artifact", flush=True)
        else:
            chain = submit.Chain(cfg.dataset, load_task(cfg.dataset, JOINT_TASK), "ft", None, joint.label, cfg.overlap)
            jobs.append(SlurmJob(f"{joint.label}_0", chain, 0, tuple(flags), None))
    return jobs


Sbatch = Callable[[SlurmJob, list[str]], str]


def submit_jobs(jobs: list[SlurmJob], args: argparse.Namespace, sbatch: Sbatch) -> dict[str, str]:
    """Submit in order (a job's dependency is always submitted before it); returns job key -> job id.
    `sbatch(job, command)` submits one job and returns its id (tests inject their own)."""
    ids: dict[str, str] = {}
    for job in jobs:
        log_dir = (args.log_root / job.chain.protocol / job.chain.name).resolve()
        if not args.dry_run:
            log_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output folder
        if job.stale:  # the job's run.py would skip it
            discard_stale(list(job.flags), f"{job.chain.name} step {job.step}", args.dry_run)
        dependency = ids[job.after] if job.after is not None else None
        command, log = submit.sbatch_command(job.chain, args, job.step, list(job.flags), dependency, log_dir)
        ids[job.key] = sbatch(job, command)
        if args.dry_run:
            continue  # the sbatch line itself was printed
        after = f"afterok:{dependency}" if dependency else "none"
        print(f"[benchmark] {job.chain.protocol}/{job.chain.name} step {job.step}: job {ids[job.key]}, "
              f"dependency {after}, log {str(log).replace('%j', ids[job.key])}", flush=True)
    return ids


def dry_run_sbatch(job: SlurmJob, command: list[str]) -> str:
    print(shlex.join(command), flush=True)
    return f"<job id of {job.key}>"


def real_sbatch(job: SlurmJob, command: list[str]) -> str:
    try:
        return submit.submit(command)
    except submit.SubmitError as exc:
        raise submit.SubmitError(f"{job.chain.protocol}/{job.chain.name} step {job.step}: {exc}") from exc


def table_command(argv: list[str]) -> str:
    """The command that writes the table once the jobs are done: this one, --table_only instead of --slurm."""
    split = argv.index("--") if "--" in argv else len(argv)
    own = [a for a in argv[:split] if a not in ("--slurm", "--dry_run")]
    return shlex.join([sys.executable, str(Path(__file__).resolve()), *own, "--table_only", *argv[split:]])


# ------------------------------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Row:
    label: str
    old: float | None         # last step: step-0 classes, background included
    new: float | None         # last step: the classes added after step 0
    all: float | None         # last step: every class seen
    h: float | None           # last step: hIoU, the harmonic mean of old and new (DKD's and STAR's tables)
    avg: float | None         # mean over steps of the all-class mIoU (None until every step has a result)
    per_step: tuple[float | None, ...]  # all-class mIoU of each step, for the plot
    bound: bool = False       # the joint upper bound (one step, no avg)
    # Under --seeds: the values above are means over the seeds' runs, `sd` their sample standard deviations
    # (old, new, all, h, avg; None with fewer than 2 results), `runs` how many runs have a last-step result, of
    # `seeds`.
    sd: tuple[float | None, ...] | None = None
    runs: int = 1
    seeds: int = 1
    memory: int | None = None  # --mem_size of a method that trains on earlier steps' images (the -M variants)


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def method_row(label: str, records: Sequence[dict[str, Any] | None], memory: int | None = None) -> Row:
    per_step = tuple(r.get("miou_all") if r else None for r in records)
    avg = sum(per_step) / len(per_step) if all(v is not None for v in per_step) else None  # type: ignore[arg-type]
    last = records[-1] or {}
    old, new = last.get("miou_old"), last.get("miou_new")  # hIoU from them: results before it was recorded too
    return Row(label, old, new, last.get("miou_all"), harmonic_iou(old, new), avg, per_step, memory=memory)


def exemplar_memory(plan: Plan, method: MethodRun) -> int | None:
    """The exemplar memory size of a method that trains on images of earlier steps (Method.uses_old_data), read
    from its step-1 flags; None for the others (and for a one-step task, where no step has earlier images)."""
    if plan.task.num_steps < 2:
        return None
    cfg = parse_config(plan.step_flags(method.flags, 1))
    if not METHODS[cfg.method].uses_old_data:
        return None
    return getattr(cfg.method_options, "mem_size", None)


def class_mean(class_iou: dict[str, float | None], names: Sequence[str]) -> float | None:
    """Mean IoU over the named classes present in the test set (IoU None: absent, left out as in metrics.py)."""
    values = [class_iou[n] for n in names if class_iou.get(n) is not None]
    return sum(values) / len(values) if values else None


def joint_row(label: str, record: dict[str, Any] | None, task: Task) -> Row:
    """The offline model scored on the incremental task's groups: old = its step-0 classes, new = the later ones."""
    if record is None:
        return Row(label, None, None, None, None, None, (None,), True)
    old_names = task.seen_class_names(0)
    seen = task.seen_class_names(task.num_steps - 1)
    iou = record["class_iou"]
    everything = class_mean(iou, seen)
    old, new = class_mean(iou, old_names), class_mean(iou, seen[len(old_names):])
    return Row(label, old, new, everything, harmonic_iou(old, new), None, (everything,), True)


def collect_rows(plan: Plan) -> list[Row]:
    """One row per method (and the joint bound); under --seeds, the mean and spread of its seeds' runs."""
    runs: dict[str, list[Row]] = {}
    for method in plan.methods:
        step0 = plan.folder / f"{plan.group_of(method.label).name}_0.json"
        later = [plan.folder / f"{method.label}_{step}.json" for step in range(1, plan.task.num_steps)]
        records = [read_json(p) for p in (step0, *later)]
        runs.setdefault(method.method, []).append(method_row(method.label, records, exemplar_memory(plan, method)))
    for joint in plan.joints:
        record = read_json(plan.joint_folder / f"{joint.label}_0.json")
        runs.setdefault(joint.method, []).append(joint_row(joint.label, record, plan.task))
    if plan.seeds == (None,):
        return [rows[0] for rows in runs.values()]
    return [seed_mean(label, rows) for label, rows in runs.items()]


def mean_sd(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the values there are (None: a run without a result yet)."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else None


def seed_mean(label: str, rows: Sequence[Row]) -> Row:
    """The seeds' runs of one method as one row: means, with the spread of old / new / all / avg."""
    fields = [mean_sd([getattr(r, name) for r in rows]) for name in ("old", "new", "all", "h", "avg")]
    steps = max(len(r.per_step) for r in rows)
    per_step = tuple(mean_sd([r.per_step[t] if t < len(r.per_step) else None for r in rows])[0] for t in range(steps))
    return Row(label, *(mean for mean, _ in fields), per_step, rows[0].bound, tuple(sd for _, sd in fields),
               sum(r.all is not None for r in rows), len(rows), rows[0].memory)


def markdown_table(rows: Sequence[Row]) -> str:
    pct = run_protocol.percent

    def cell(r: Row, k: int, value: float | None) -> str:
        if r.sd is None or value is None:
            return pct(value)
        return f"{pct(value)} ± {pct(r.sd[k])}" if r.sd[k] is not None else pct(value)

    def label(r: Row) -> str:
        name = r.label if r.memory is None else f"{r.label} {OLD_DATA_MARK}"
        return name if r.runs == r.seeds else f"{name} ({r.runs} of {r.seeds} seeds)"

    lines = ["| method | old | new | all | hIoU | avg |", "|---|---|---|---|---|---|"]
    lines += [f"| {label(r)} | " + " | ".join(cell(r, k, v) for k, v in enumerate((r.old, r.new, r.all, r.h, r.avg)))
              + " |" for r in rows]
    # Methods that see images of earlier steps are not comparable with those that see none: the table says so.
    notes = [f"{OLD_DATA_MARK} {r.label}: trains on an exemplar memory of earlier steps' images ({r.memory} images)"
             for r in rows if r.memory is not None]
    return "\n".join(lines + ([""] + notes if notes else []))


def csv_table(rows: Sequence[Row], num_steps: int) -> str:
    """One row per method: old, new, all, hiou, avg and all_step<t> (means under --seeds), then under --seeds the
    standard deviations old_sd .. avg_sd and the number of seeds with a result."""
    def cell(value: float | None) -> str:
        return "" if value is None else f"{100 * value:.2f}"

    seeded = any(r.sd is not None for r in rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["method", "old", "new", "all", "hiou", "avg", *(f"all_step{t}" for t in range(num_steps)),
                     *(["old_sd", "new_sd", "all_sd", "hiou_sd", "avg_sd", "seeds"] if seeded else [])])
    for r in rows:
        steps = list(r.per_step) + [None] * (num_steps - len(r.per_step))
        spread = [*(cell(v) for v in (r.sd or (None,) * 5)), r.runs] if seeded else []
        writer.writerow([r.label, *(cell(v) for v in (r.old, r.new, r.all, r.h, r.avg, *steps)), *spread])
    return out.getvalue()


def caption(plan: Plan) -> str:
    task, last = plan.task, plan.task.num_steps - 1
    old, seen = len(task.seen_classes(0)), len(task.seen_classes(last))
    background = " (background included)" if task.has_background else ""
    images = ("every val image" if plan.cfg.test_images == "all" else
              "the val images holding a class seen so far")
    text = (f"mIoU % after the last step ({last}): old = the {old} step-0 classes{background}, new = the "
            f"{seen - old} classes added later, all = all {seen}, hIoU = 2 old new / (old + new); avg = mean over "
            f"steps 0-{last} of the all-class mIoU, each step tested on {images}, for every method.")
    if plan.joints:
        text += (f" {plan.joints[0].method}: task {JOINT_TASK} (every class in one step, step 0's schedule), scored "
                 "on the same class groups.")
    if plan.seeds != (None,):
        text += (f" Each cell: mean ± sample standard deviation over seeds {', '.join(map(str, plan.seeds))} "
                 "(--random_seed: initialisation, data order, augmentation; each seed has its own step 0s).")
    return text


def title(plan: Plan) -> str:
    return f"{plan.cfg.dataset} {plan.task.name}{' overlap' if plan.cfg.overlap else ''}"


def plot_benchmark(rows: Sequence[Row], path: Path, heading: str) -> None:
    """Left: old / new / all of the last step per method; right: the all-class mIoU step by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, steps) = plt.subplots(1, 2, figsize=(11, 4), dpi=120, gridspec_kw={"width_ratios": [3, 2]})
    width = 0.27
    for k, (field, label) in enumerate((("old", "old"), ("new", "new"), ("all", "all"))):
        values = [100 * (getattr(r, field) or 0.0) for r in rows]
        errors = [100 * (r.sd[k] or 0.0) if r.sd else 0.0 for r in rows]  # the seeds' spread, where there is one
        bars.bar([i + (k - 1) * width for i in range(len(rows))], values, width, label=label,
                 yerr=errors if any(errors) else None, capsize=2)
    bars.set_xticks(range(len(rows)), [r.label for r in rows], rotation=30, ha="right")
    bars.set(ylabel="mIoU (%), last step", ylim=(0, 100), title=heading)
    bars.legend(fontsize=8)
    for r in rows:
        if r.bound:  # one step on every class: drawn as the level the methods would reach
            if r.all is not None:
                steps.axhline(100 * r.all, color="black", linestyle="--", linewidth=1, label=r.label)
            continue
        points = [(t, 100 * v) for t, v in enumerate(r.per_step) if v is not None]
        steps.plot([t for t, _ in points], [v for _, v in points], "o-", markersize=3, label=r.label)
    steps.set(xlabel="step", ylabel="mIoU (%), all seen classes", ylim=(0, 100))
    steps.xaxis.get_major_locator().set_params(integer=True)
    steps.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(plan: Plan, rows: Sequence[Row]) -> None:
    folder = plan.folder
    folder.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows)
    shared = "\n".join(f"- {g.name}: step 0 of {', '.join(g.members)}" for g in plan.groups)
    (folder / "benchmark.md").write_text(f"# {title(plan)}: benchmark\n\n{caption(plan)}\n\n{table}\n\n"
                                         f"Shared step 0s:\n{shared}\n")
    (folder / "benchmark.csv").write_text(csv_table(rows, plan.task.num_steps))
    plot_benchmark(rows, folder / "benchmark.png", title(plan))
    print(f"\n{title(plan)}: {caption(plan)}\n{table}\n")
    print(f"[benchmark] table: {folder / 'benchmark.md'}, {folder / 'benchmark.csv'}; plot: {folder / 'benchmark.png'}")


# -------------------------------------------------------------------------------------------------- main


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct seeds, 0 or more, e.g. 0,1,2")
    return seeds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmark.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.add_method_args(parser)
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--joint_name", default="Joint", help="name of the offline upper bound's run and row")
    bench.add_argument("--no_joint", action="store_true", help="leave the offline upper bound out")
    bench.add_argument("--seeds", type=seed_list, default=None, metavar="S,S,...",
                       help="run every method (and the bound) once per --random_seed, each seed with its own shared "
                       "step 0s, runs named <M>-seed<s>; the table gives each method's mean ± standard deviation")
    bench.add_argument("--table_only", action="store_true",
                       help="train and submit nothing: write the table from the results there are (after --slurm)")
    bench.add_argument("--jobs", type=int, default=1,
                       help="steps trained at once on this machine (each step 0, each method's chain and Joint are "
                       "independent but for a chain's wait on its step 0): on CPU each gets cores/(jobs x nproc) "
                       "threads, on GPUs its own --nproc_per_node devices; with more than 1, each step logs to "
                       "benchmark_logs/ in the task's checkpoint folder. Unused with --slurm")
    bench.add_argument("--slurm", action="store_true",
                       help="submit the steps as SLURM jobs (resource flags below) instead of running them here; "
                       "--nproc_per_node is then unused")
    submit.add_resource_args(parser)
    submit.add_submission_args(parser)
    return parser


def plan_from_argv(argv: list[str]) -> tuple[argparse.Namespace, Plan]:
    args, run_args = compare.split_run_args(build_parser(), argv)
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs}: give 1 or more steps to train at once")
    if args.slurm and not args.table_only:  # run.py must catch the signal sbatch --signal sends
        run_args = [*run_args, *submit.preempt_signal_flag(args.signal, run_args)]
    return args, build_plan(args, run_args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, plan = plan_from_argv(argv)
        print(describe(plan), flush=True)
        if args.slurm and not args.table_only:
            jobs = slurm_jobs(plan)
            submit_jobs(jobs, args, dry_run_sbatch if args.dry_run else real_sbatch)
            verb = "would submit" if args.dry_run else "submitted"
            print(f"[benchmark] {verb} {len(jobs)} job(s); when they are done, write the table with:\n"
                  f"  {table_command(argv)}", flush=True)
            return 0
        code = 0
        if not args.table_only:
            runner = LocalRunner(args.nproc_per_node, args.jobs, plan.folder / "benchmark_logs")
            code = run_local(plan, runner, args.jobs)
    except (ConfigError, TaskError, submit.SubmitError) as exc:
        print(f"benchmark.py: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, run_protocol.StepInterrupted):
        # With --jobs N the running steps got the Ctrl-C too (one terminal process group) and save their run states.
        print("[benchmark] interrupted; complete steps are kept. Run the same command again to continue (a stopped "
              "step resumes from its last run state).", file=sys.stderr)
        return 130
    write_outputs(plan, collect_rows(plan))  # with what there is, a failed method's row blank
    if code:
        print("[benchmark] some steps failed (see above); the table has what is done. Re-run the same command to "
              "continue.", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
