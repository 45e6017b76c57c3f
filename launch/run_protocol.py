"""Run every step of a protocol on one machine, one torchrun per step, then summarise.

    python launch/run_protocol.py --nproc_per_node 2 -- --dataset voc --task 15-1 --method MiB --name MiB --overlap

Everything after `--` goes to run.py unchanged (with `--step` added). A step that run.py would call complete (its
artifact made by the same flags from the same previous-step artifact) is skipped, so re-running the same command
after a crash continues where the protocol stopped; any other step runs, and run.py refuses to replace a complete
artifact of other flags unless `--replace` is among its flags. At the end it prints the
per-step table and writes, beside the artifacts: <name>_results.md, <name>_miou.png (old/new/all mIoU per step) and
the last step's <name>_<step>_samples.png (test images | ground truth | prediction).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segmentation.config import build_parser, parse_config  # noqa: E402
from segmentation.engine.checkpoint import protocol_dir  # noqa: E402
from segmentation.step.existing import already_complete  # noqa: E402
from segmentation.tasks import load_task  # noqa: E402


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str], argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc_per_node", type=int, default=1, help="processes per step (GPUs, or CPU processes)")
    parser.add_argument("--initial_epochs", type=int, default=None, help="epochs of step 0 (default: run.py's --epochs)")
    parser.add_argument("--initial_lr", type=float, default=None, help="lr of step 0 (default: run.py's rule)")
    parser.add_argument("--last_step", type=int, default=None, help="stop after this step (default: the task's last)")
    if "--" in argv:
        split = argv.index("--")
        own, run_args = argv[:split], argv[split + 1:]
    else:
        own, run_args = argv, []
    args = parser.parse_args(own)
    if any(a == "--step" or a.startswith("--step=") for a in run_args):
        parser.error("do not pass --step: the launcher runs every step of the task")
    run_cfg = build_parser().parse_args(run_args)  # validates run.py's flags before anything starts
    return args, run_args, run_cfg


def step_overrides(initial_epochs: int | None, initial_lr: float | None, step: int) -> list[str]:
    """`--step t`, and at step 0 --initial_epochs / --initial_lr as run.py's --epochs / --lr. They go after the
    user's flags: later flags win in argparse."""
    extra = ["--step", str(step)]
    if step == 0 and initial_epochs is not None:
        extra += ["--epochs", str(initial_epochs)]
    if step == 0 and initial_lr is not None:
        extra += ["--lr", str(initial_lr)]
    return extra


class StepInterrupted(Exception):
    """Ctrl-C or SIGTERM reached the launcher while a step ran; the step has stopped (saving a run state)."""


def call_step(command: list[str], env: dict[str, str], **popen: object) -> int:
    """Run one step's torchrun and return run.py's own exit code (2 bad input, 3 diverged, 4 preempted), which
    torchrun reports as 1: each rank writes its code to a status file (segmentation/cli.py, report_exit).
    Ctrl-C (which the step receives too) or SIGTERM (passed on to it) waits for the step to save its run state and
    stop, then raises StepInterrupted; a second one kills it."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="step-status-") as folder:
        prefix = str(Path(folder) / "code")
        proc = subprocess.Popen(command, env={**env, "SEGMENTATION_EXIT_STATUS": prefix}, **popen)
        previous = None
        if threading.current_thread() is threading.main_thread():
            def forward(signum: int, frame: object) -> None:
                proc.send_signal(signal.SIGTERM)
                raise KeyboardInterrupt

            previous = signal.signal(signal.SIGTERM, forward)
        try:
            try:
                code = proc.wait()
            except KeyboardInterrupt:
                try:
                    proc.wait()
                except KeyboardInterrupt:
                    proc.kill()
                    proc.wait()
                raise StepInterrupted() from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        if code == 0:
            return 0
        ranks = sorted(Path(folder).glob("code.*"), key=lambda p: int(p.suffix[1:]))
        codes = [int(p.read_text().strip() or 1) for p in ranks]
        return next((c for c in codes if c != 0), code)


def torchrun_command(nproc_per_node: int, run_flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
            str(REPO / "run.py"), *run_flags]


def step_command(args: argparse.Namespace, run_args: list[str], step: int) -> list[str]:
    return torchrun_command(args.nproc_per_node,
                            [*run_args, *step_overrides(args.initial_epochs, args.initial_lr, step)])


def collect_results(folder: Path, name: str, steps: int) -> list[dict]:
    rows = []
    for step in range(steps):
        path = folder / f"{name}_{step}.json"
        if path.is_file():
            rows.append(json.loads(path.read_text()))
    return rows


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def with_background(rows: list[dict]) -> bool:
    """Whether the steps' old classes include a background class (not on Cityscapes / city-shapes, where an "old
    w/o bg" column would only repeat "old")."""
    return all(r.get("old_classes_include_background", True) for r in rows)


def results_table(rows: list[dict]) -> str:
    bg = with_background(rows)
    lines = ["| step | old (0-base) | new | all |" + (" old w/o bg |" if bg else ""), "|---" * (5 if bg else 4) + "|"]
    for r in rows:
        lines.append(f"| {r['step']} | {percent(r['miou_old'])} | {percent(r['miou_new'])} | "
                     f"{percent(r['miou_all'])} |" + (f" {percent(r.get('miou_old_fg'))} |" if bg else ""))
    return "\n".join(lines)


def task_table(rows: list[dict]) -> str:
    """CIL's evaluation per step: each task's classes alone and their unions (metrics.named_groups)."""
    from segmentation.engine.metrics import group_title

    names = list(rows[-1].get("task_miou", {})) if rows else []
    lines = ["| step | " + " | ".join(group_title(n) for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for r in rows:
        values = r.get("task_miou", {})
        lines.append(f"| {r['step']} | " + " | ".join(percent(values.get(n)) for n in names) + " |")
    return "\n".join(lines)


def plot_results(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot(steps, [100 * r["miou_all"] for r in rows], "o-", label="all seen classes")
    ax.plot(steps, [100 * r["miou_old"] for r in rows], "s--", label="step-0 classes (old)")
    later = [r for r in rows if r.get("miou_new") is not None]
    ax.plot([r["step"] for r in later], [100 * r["miou_new"] for r in later], "^:", label="classes added later (new)")
    ax.set(xlabel="step", ylabel="mIoU (%)", title=title, ylim=(0, 100), xticks=steps)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    # Ctrl-C (SIGINT) must reach call_step as KeyboardInterrupt however the launcher was started: a shell starts
    # background jobs with SIGINT ignored, and Python then keeps ignoring it, so `kill -INT` would leave a running
    # step to finish unattended and be reported as failed.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    args, run_args, cfg = parse_args(sys.argv[1:] if argv is None else argv)
    task = load_task(cfg.dataset, cfg.task)
    last = task.num_steps - 1 if args.last_step is None else min(args.last_step, task.num_steps - 1)
    for step in range(last + 1):
        done = already_complete(parse_config([*run_args, *step_overrides(args.initial_epochs, args.initial_lr,
                                                                          step)]), task)
        if done is not None:  # what run.py itself would skip: same flags, a complete file, the same previous step
            print(f"[launch] step {step}: {done} is complete (same flags, same previous step), skipping", flush=True)
            continue
        command = step_command(args, run_args, step)
        print(f"[launch] step {step}: {' '.join(command)}", flush=True)
        try:
            code = call_step(command, os.environ.copy())
        except StepInterrupted:
            print(f"[launch] interrupted during step {step}; earlier artifacts are untouched. Run the same command "
                  "again to continue (the step resumes from its last run state).", file=sys.stderr)
            return 130
        if code != 0:
            print(f"[launch] step {step} failed with exit code {code}; earlier artifacts are untouched. "
                  "Fix the cause and re-run the same command to continue from this step.", file=sys.stderr)
            return code
    folder = protocol_dir(cfg.checkpoint_dir, cfg.dataset, task.name, cfg.overlap)
    rows = collect_results(folder, cfg.name, last + 1)
    title = f"{cfg.dataset} {task.name}{' overlap' if cfg.overlap else ''}: {cfg.method}"
    table = results_table(rows)
    tasks = task_table(rows)
    (folder / f"{cfg.name}_results.md").write_text(f"# {title}\n\n{table}\n\nPer task (CIL's evaluation: argmax "
                                                   f"within the task's classes):\n\n{tasks}\n")
    plot_results(rows, folder / f"{cfg.name}_miou.png", title)
    old = "step-0 classes incl. background" if task.has_background else "step-0 classes"
    print(f"\n{title} (mIoU %, old = {old})\n{table}\n")
    print(f"per task (CIL's evaluation: argmax within each task's classes, the other classes ignored)\n{tasks}\n")
    print(f"[launch] plot: {folder / f'{cfg.name}_miou.png'}")
    print(f"[launch] predictions: {folder / f'{cfg.name}_{last}_samples.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
