"""Run one protocol for several methods and print their results side by side.

    python launch/compare.py --methods MiB,WILSON --nproc_per_node 2 -- --dataset shapes --task 6-4 ...

Each method runs as `launch/run_protocol.py` would run it (one torchrun per step, complete steps skipped), with
`--method M --name M` added to the run.py flags after `--`; `--method_flags "M=--flag value ..."` adds flags for one
method only (repeatable). At the end it prints one table (mIoU % per method and step: old = step-0 classes with
background, new, all, old without background) and writes it to <checkpoint_dir>/step/<protocol>/comparison.md.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "launch"))

import run_protocol  # noqa: E402
from segmentation.engine.checkpoint import protocol_dir  # noqa: E402
from segmentation.tasks import load_task  # noqa: E402


def add_method_args(parser: argparse.ArgumentParser) -> None:
    """The flags compare.py and benchmark.py share: which methods, their own flags, and run_protocol.py's."""
    parser.add_argument("--methods", required=True, help="comma-separated, e.g. MiB,WILSON")
    parser.add_argument("--method_flags", action="append", default=[], metavar="M=FLAGS",
                        help='run.py flags for one method only, e.g. "WILSON=--pseudo_ep 2"')
    parser.add_argument("--nproc_per_node", type=int, default=1)
    parser.add_argument("--initial_epochs", type=int, default=None)
    parser.add_argument("--initial_lr", type=float, default=None)


def split_run_args(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parse the launcher's own flags (before `--`); check the run.py flags after it, set args.methods (a list) and
    args.extra (method -> its --method_flags, split as a shell would)."""
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    run_args = argv[split + 1:]
    for flag in ("--method", "--name"):
        if any(a == flag or a.startswith(flag + "=") for a in run_args):
            parser.error(f"do not pass {flag} after --: each method runs as --method M --name M")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    extra: dict[str, list[str]] = {}
    for item in args.method_flags:
        method, sep, flags = item.partition("=")
        if not sep or method not in args.methods:
            parser.error(f"--method_flags {item!r}: expected M=FLAGS with M one of {', '.join(args.methods)}")
        extra.setdefault(method, []).extend(shlex.split(flags))
    args.extra = extra
    return args, run_args


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_method_args(parser)
    return split_run_args(parser, argv)


def comparison_table(results: dict[str, list[dict]]) -> str:
    pct = run_protocol.percent
    bg = run_protocol.with_background([r for rows in results.values() for r in rows])
    lines = ["| method | step | old (0-base) | new | all |" + (" old w/o bg |" if bg else ""),
             "|---" * (6 if bg else 5) + "|"]
    for method, rows in results.items():
        for r in rows:
            lines.append(f"| {method} | {r['step']} | {pct(r['miou_old'])} | {pct(r['miou_new'])} | "
                         f"{pct(r['miou_all'])} |" + (f" {pct(r.get('miou_old_fg'))} |" if bg else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args, run_args = parse_args(sys.argv[1:] if argv is None else argv)
    own = ["--nproc_per_node", str(args.nproc_per_node)]
    if args.initial_epochs is not None:
        own += ["--initial_epochs", str(args.initial_epochs)]
    if args.initial_lr is not None:
        own += ["--initial_lr", str(args.initial_lr)]
    cfg = None
    for method in args.methods:
        method_args = [*run_args, "--method", method, "--name", method, *args.extra.get(method, [])]
        code = run_protocol.main([*own, "--", *method_args])
        if code != 0:
            return code
        _, _, cfg = run_protocol.parse_args([*own, "--", *method_args])
    task = load_task(cfg.dataset, cfg.task)
    folder = protocol_dir(cfg.checkpoint_dir, cfg.dataset, task.name, cfg.overlap)
    results = {m: run_protocol.collect_results(folder, m, task.num_steps) for m in args.methods}
    title = f"{cfg.dataset} {task.name}{' overlap' if cfg.overlap else ''}: {', '.join(args.methods)}"
    table = comparison_table(results)
    (folder / "comparison.md").write_text(f"# {title}\n\n{table}\n")
    old = "step-0 classes incl. background" if task.has_background else "step-0 classes"
    print(f"\n{title} (mIoU %, old = {old})\n{table}\n")
    print(f"[compare] table: {folder / 'comparison.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
