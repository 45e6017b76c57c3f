"""Submit a whole class-incremental protocol to SLURM: one job per step, each step waiting for the previous one.

    python slurm/submit.py --dataset voc --task 15-1 --method MiB --name MiB --overlap \
        --nodes 1 --gpus_per_node 2 --cpus_per_task 8 --time 24:00:00 --initial_epochs 30 --epochs 30 -- \
        --data_root data/voc --batch_size 24 --pretrained pretrained/resnet101_iabn_sync.pth.tar

Everything after `--` goes to run.py unchanged; the submitter adds --dataset, --task, --method, --name, --overlap,
--random_seed, --epochs and --step. Each step is `sbatch slurm/step.sbatch <run.py flags>` with
`--dependency=afterok:<previous step's job> --kill-on-invalid-dep=yes`: a step starts only after the previous one
ended with exit code 0, and is cancelled if it failed. Relative paths in the flags are relative to the directory you
submit from, for this script's checks and in the jobs alike (the jobs run there).

Re-submitting the same command after a failure continues the protocol: the leading steps that run.py would call
complete (an artifact that loads, is marked complete, and was made by the same flags from the same previous step) are
skipped, and the first step left is submitted without a dependency. Steps after a re-run step are always re-run,
since they must start from the new one: their old artifacts are kept aside, dated (their jobs get --replace). The
first step left, if its artifact is another run's, is refused by its job unless --replace is among the run.py flags.

Grids: --task, --method and --random_seed take comma-separated lists; every combination is an independent chain.
When a list has several entries the chains' names get a suffix so their artifacts do not collide:
`--name MiB --random_seed 1,2` gives MiB-s1 and MiB-s2; `--name exp --method FT,MiB` gives exp-FT and exp-MiB;
both give exp-FT-s1, exp-FT-s2, exp-MiB-s1, exp-MiB-s2. Without --name the method is the name. Tasks need no suffix:
each task has its own artifact folder.

Logs: one folder per protocol and name, logs/slurm/<dataset>-<task>[-ov]/<name>/<name>_step<t>-<jobid>.out
(--log_root moves logs/slurm). A requeued job keeps its id and appends to the same file.

Why plain sbatch and a template rather than submitit: the chained jobs then run exactly the script a user submits by
hand (slurm/step.sbatch, whose header shows how), the logs and the `squeue` view are ordinary SLURM ones, and nothing
is pickled between the login node and the jobs. Requeue on the time-limit signal is run.py's job, not the launcher's.
"""
from __future__ import annotations

import argparse
import itertools
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segmentation.config import Config, ConfigError, build_parser, parse_config  # noqa: E402
from segmentation.tasks import Task, TaskError, load_task  # noqa: E402

TEMPLATE = REPO / "slurm" / "step.sbatch"
# run.py flags the submitter sets itself (per chain or per step); passing them after `--` would be ambiguous.
OWN_RUN_FLAGS = ("--dataset", "--task", "--method", "--name", "--overlap", "--random_seed", "--step")
NOT_FOR_CHAINS = ("--step_ckpt", "--test", "--ckpt")


class SubmitError(Exception):
    """A problem the user can fix; the message names the flag."""


@dataclass(frozen=True)
class Chain:
    """One protocol run: every step of one task with one method, seed and name."""
    dataset: str
    task: Task
    method: str
    seed: int | None
    name: str
    overlap: bool

    @property
    def protocol(self) -> str:
        return f"{self.dataset}-{self.task.name}{'-ov' if self.overlap else ''}"


@dataclass(frozen=True)
class Job:
    chain: Chain
    step: int
    command: list[str]
    log: Path


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="submit.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    proto = p.add_argument_group("protocol (lists: comma-separated, one chain per combination)")
    proto.add_argument("--dataset", required=True, help="voc, ade, coco-voc, cityscapes or shapes")
    proto.add_argument("--task", required=True, help="task name(s), e.g. 15-1 or 15-1,10-1")
    proto.add_argument("--method", required=True, help="method(s), e.g. MiB or FT,MiB")
    proto.add_argument("--name", default=None, help="experiment name (default: the method)")
    proto.add_argument("--random_seed", default=None, help="seed(s), e.g. 1,2,3 (default: run.py's)")
    proto.add_argument("--overlap", action="store_true", help="overlapped protocol")
    proto.add_argument("--initial_epochs", type=int, default=None, help="epochs of step 0 (default: --epochs)")
    proto.add_argument("--epochs", type=int, default=None, help="epochs of every step (default: run.py's)")
    add_resource_args(p)
    add_submission_args(p)
    return p


def add_resource_args(p: argparse.ArgumentParser) -> None:
    """The sbatch resources of each step's job (shared with launch/benchmark.py --slurm)."""
    res = p.add_argument_group("resources, per step")
    res.add_argument("--nodes", type=int, default=1)
    res.add_argument("--gpus_per_node", type=int, default=1, help="0 for a CPU cluster")
    res.add_argument("--ntasks_per_node", type=int, default=None,
                     help="run.py processes per node (default: --gpus_per_node, or 1 without GPUs)")
    res.add_argument("--cpus_per_task", type=int, default=None, help="default: the cluster's")
    res.add_argument("--time", default=None, help="time limit per step, e.g. 24:00:00 (default: the partition's)")
    res.add_argument("--partition", default=None)
    res.add_argument("--account", default=None)
    res.add_argument("--signal", default=None,
                     help="warning signal before the time limit (default: step.sbatch's USR2@120)")
    res.add_argument("--sbatch_arg", action="append", default=[], metavar="ARG",
                     help="any other sbatch option, e.g. --sbatch_arg=--qos=high (repeatable)")


def add_submission_args(p: argparse.ArgumentParser) -> None:
    out = p.add_argument_group("submission")
    out.add_argument("--python", default=None,
                     help="interpreter the jobs run (default: the repo's .venv/bin/python, else python3)")
    out.add_argument("--log_root", type=Path, default=Path("logs/slurm"), help="job logs go below it")
    out.add_argument("--dry_run", action="store_true", help="print the sbatch commands, submit nothing")


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, []


def check_run_args(run_args: list[str]) -> None:
    for arg in run_args:
        flag = arg.split("=", 1)[0]
        if flag in OWN_RUN_FLAGS:
            raise SubmitError(f"{flag} after `--`: give it to submit.py itself (before `--`), which sets it per "
                              "chain and step")
        if flag in NOT_FOR_CHAINS:
            raise SubmitError(f"{flag} after `--`: it names one step's file; a chain trains every step from the "
                              "previous step's artifact (run run.py by hand for that)")


def comma_list(value: str | None, flag: str) -> list[str]:
    if value is None:
        return []
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise SubmitError(f"{flag} {value!r}: give at least one value")
    return items


def build_chains(args: argparse.Namespace) -> list[Chain]:
    tasks = []
    for name in comma_list(args.task, "--task"):
        try:
            tasks.append(load_task(args.dataset, name))
        except TaskError as exc:
            raise SubmitError(f"--task {name} (--dataset {args.dataset}): {exc}") from exc
    methods = comma_list(args.method, "--method")
    try:
        seeds: list[int | None] = [int(s) for s in comma_list(args.random_seed, "--random_seed")] or [None]
    except ValueError as exc:
        raise SubmitError(f"--random_seed {args.random_seed!r}: comma-separated integers, e.g. 1,2,3") from exc
    chains = []
    for task, method, seed in itertools.product(tasks, methods, seeds):
        chains.append(Chain(args.dataset, task, method, seed, chain_name(args.name, method, seed, methods, seeds),
                            args.overlap))
    return chains


def chain_name(base: str | None, method: str, seed: int | None, methods: list[str], seeds: list) -> str:
    """`base`, plus -<method> when several methods share one --name, plus -s<seed> when several seeds run."""
    name = base if base is not None else method
    if base is not None and len(methods) > 1:
        name += f"-{method}"
    if len(seeds) > 1:
        name += f"-s{seed}"
    return name


def run_flags(chain: Chain, args: argparse.Namespace, run_args: list[str], step: int) -> list[str]:
    flags = [*run_args, "--dataset", chain.dataset, "--task", chain.task.name, "--method", chain.method,
             "--name", chain.name]
    if chain.overlap:
        flags.append("--overlap")
    if chain.seed is not None:
        flags += ["--random_seed", str(chain.seed)]
    flags += preempt_signal_flag(args.signal, run_args)
    epochs = args.initial_epochs if step == 0 and args.initial_epochs is not None else args.epochs
    if epochs is not None:
        flags += ["--epochs", str(epochs)]  # after the user's: later flags win in argparse
    return flags + ["--step", str(step)]


def preempt_signal_flag(sbatch_signal: str | None, run_args: list[str]) -> list[str]:
    """run.py must catch the signal SLURM sends: `--signal USR1@90`-style values become `--preempt_signal USR1`,
    unless the flags after `--` set it or the signal goes to the batch shell only (`B:`)."""
    if sbatch_signal is None or sbatch_signal.upper().startswith("B:"):
        return []
    if any(arg.split("=", 1)[0] == "--preempt_signal" for arg in run_args):
        return []
    return ["--preempt_signal", sbatch_signal.split(":")[-1].split("@")[0]]


def validate_run_flags(flags: list[str]) -> Config:
    """Parse and check with run.py's own code now, so a typo fails here rather than in every job of the chain."""
    parser = build_parser()

    def fail(message: str) -> None:  # one line naming the flag, instead of argparse's usage dump and exit
        raise SubmitError(f"run.py flags: {message}")

    parser.error = fail  # type: ignore[method-assign]
    parser.parse_args(flags)
    try:
        return parse_config(flags)  # the value checks run.py makes before it starts (ConfigError names the flag)
    except ConfigError as exc:
        raise SubmitError(f"run.py flags: {exc}") from exc


def first_step_to_run(chain: Chain, configs: list[Config]) -> int:
    """Number of leading steps that run.py would call complete (a complete artifact made by the same flags from the
    same previous step); the chain restarts after them. A step with another run's artifact is submitted: its job
    then refuses it (exit 2, naming what differs) unless --replace is among the run.py flags."""
    from segmentation.step.existing import already_complete

    for step, cfg in enumerate(configs):
        path = already_complete(cfg, chain.task)
        if path is None:
            return step
        print(f"[submit] {chain.protocol}/{chain.name} step {step}: skipped, complete artifact {path}", flush=True)
    return chain.task.num_steps


def stale_artifact(chain: Chain, flags: list[str]) -> Path | None:
    """The step's complete artifact, if there is one (whatever made it)."""
    from segmentation.engine.checkpoint import CheckpointError, load_artifact, step_artifact_path

    cfg = parse_config(flags)
    path = step_artifact_path(cfg.checkpoint_dir, chain.dataset, chain.task.name, chain.overlap, chain.name, cfg.step)
    try:
        load_artifact(path)
    except CheckpointError:
        return None
    return path


def resource_flags(args: argparse.Namespace) -> list[str]:
    ntasks = args.ntasks_per_node or (args.gpus_per_node if args.gpus_per_node > 0 else 1)
    flags = [f"--nodes={args.nodes}", f"--ntasks-per-node={ntasks}"]
    if args.gpus_per_node > 0:
        flags.append(f"--gpus-per-node={args.gpus_per_node}")
    optional = {"--cpus-per-task": args.cpus_per_task, "--time": args.time, "--partition": args.partition,
                "--account": args.account, "--signal": args.signal}
    flags += [f"{flag}={value}" for flag, value in optional.items() if value is not None]
    return flags + list(args.sbatch_arg)


def export_flag(args: argparse.Namespace) -> str:
    """The job environment: everything of ours (ALL) plus where run.py lives (the job runs a spooled copy of the
    template, which cannot find the repository by itself) and, if asked, the interpreter."""
    values = {"CISS_REPO": str(REPO)}
    if args.python:
        values["CISS_PYTHON"] = args.python
    for key, value in values.items():
        if "," in value:
            raise SubmitError(f"{key} {value!r} contains a comma, which sbatch --export cannot carry")
    return "--export=" + ",".join(["ALL", *(f"{k}={v}" for k, v in values.items())])


def sbatch_command(chain: Chain, args: argparse.Namespace, step: int, flags: list[str], dependency: str | None,
                   log_dir: Path) -> tuple[list[str], Path]:
    log = log_dir / f"{chain.name}_step{step}-%j.out"
    command = ["sbatch", "--parsable", f"--job-name={chain.protocol}_{chain.name}_step{step}", f"--output={log}"]
    if dependency is not None:
        command += [f"--dependency=afterok:{dependency}", "--kill-on-invalid-dep=yes"]
    command += [*resource_flags(args), export_flag(args), str(TEMPLATE), *flags]
    return command, log


def submit(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except FileNotFoundError as exc:
        raise SubmitError("sbatch not found: submit from a machine with the SLURM clients, or use --dry_run") from exc
    if result.returncode != 0:
        raise SubmitError(f"sbatch failed (exit {result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]  # --parsable: "jobid" or "jobid;cluster"


def plan_chain(chain: Chain, args: argparse.Namespace, run_args: list[str]) -> int:
    """Check every step's run.py flags; return the first step to submit (after the complete ones)."""
    configs = [validate_run_flags(run_flags(chain, args, run_args, step)) for step in range(chain.task.num_steps)]
    return first_step_to_run(chain, configs)


def submit_chain(chain: Chain, first: int, args: argparse.Namespace, run_args: list[str],
                 submitted: list[str]) -> None:
    """Submit steps first..last, each after the previous one; the first waits for nothing."""
    log_dir = (args.log_root / chain.protocol / chain.name).resolve()
    if first < chain.task.num_steps and not args.dry_run:
        log_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output folder
    previous: str | None = None
    for step in range(first, chain.task.num_steps):
        flags = run_flags(chain, args, run_args, step)
        if step > first and stale_artifact(chain, flags) is not None:
            # Its previous step is re-run first, so an artifact there now is stale: kept aside by --replace.
            print(f"[submit] {chain.protocol}/{chain.name} step {step}: its artifact was trained from a step that "
                  f"is re-run now; the job keeps it aside (dated) and trains the step again", flush=True)
            flags.append("--replace")
        if args.dry_run:
            placeholder = f"<job id of step {step - 1}>" if step > first else None
            print(shlex.join(sbatch_command(chain, args, step, flags, placeholder, log_dir)[0]), flush=True)
            continue
        command, log = sbatch_command(chain, args, step, flags, previous, log_dir)
        try:
            job = submit(command)
        except SubmitError as exc:
            raise SubmitError(f"{chain.protocol}/{chain.name} step {step}: {exc}") from exc
        submitted.append(job)
        after = f"afterok:{previous}" if previous else "none"
        print(f"[submit] {chain.protocol}/{chain.name} step {step}: job {job}, dependency {after}, "
              f"log {str(log).replace('%j', job)}", flush=True)
        previous = job


def main(argv: list[str] | None = None) -> int:
    own, run_args = split_argv(sys.argv[1:] if argv is None else argv)
    args = build_arg_parser().parse_args(own)
    submitted: list[str] = []
    try:
        check_run_args(run_args)
        chains = build_chains(args)
        # Every chain is checked before anything is submitted, so a bad flag never leaves half a grid queued.
        firsts = [plan_chain(chain, args, run_args) for chain in chains]
        for chain, first in zip(chains, firsts):
            submit_chain(chain, first, args, run_args, submitted)
    except SubmitError as exc:
        print(f"submit.py: error: {exc}", file=sys.stderr)
        if submitted:
            print(f"submit.py: jobs submitted before the error: {' '.join(submitted)} (scancel them, or let them "
                  "run and re-run this command to submit the rest)", file=sys.stderr)
        return 2
    skipped = sum(firsts)
    jobs = sum(chain.task.num_steps for chain in chains) - skipped
    verb = "would submit" if args.dry_run else "submitted"
    print(f"[submit] {verb} {jobs} job(s) in {len(chains)} chain(s); skipped {skipped} complete step(s)"
          + (f"; job ids {' '.join(submitted)}" if submitted else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
