"""`run.py`'s main: one step of a protocol, or `--test --ckpt` of an artifact. Errors a user can fix exit with 2."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

import torch

from segmentation.config import Config, ConfigError, parse_config
from segmentation.datasets.base import DatasetError
from segmentation.engine.checkpoint import CheckpointError
from segmentation.engine.preemption import INTERRUPTED, PREEMPTED, Preempted
from segmentation.engine.trainer import NonFiniteLossError
from segmentation.tasks import TaskError
from segmentation.utils import dist
from segmentation.utils.io import SaveError
from segmentation.utils.logging import setup_logging

log = logging.getLogger("segmentation")

USER_ERROR = 2        # bad flags, data or artifact: fix the input and re-run
NON_FINITE_LOSS = 3   # NaN/Inf loss: re-running the same command would only repeat it; never requeued
# PREEMPTED = 4: the run state is saved (and the SLURM job requeued); the same command resumes


def finishing(code: int) -> int:
    """Every rank leaves a failed or preempted step with its own code: srun --kill-on-bad-exit (and torchrun)
    SIGTERM the other ranks as soon as the first one exits, and a rank killed while it shuts down reports 143, not
    the 3 or 4 that say what happened (a NaN job once ended 143 that way). All ranks reach this point together,
    after the collective that decided it, so ignoring SIGTERM from here on only lets each finish its exit."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return code


def resume_point(cfg: Config) -> str:
    """Where the same command would continue: the newest run state of the step, or its start."""
    from segmentation.engine.runstate import list_run_states, run_state_dir
    from segmentation.tasks import TaskError, load_task

    try:
        task = load_task(cfg.dataset, cfg.task)
    except TaskError:
        return "the start of the step"
    states = list_run_states(run_state_dir(cfg.checkpoint_dir, cfg.dataset, task.name, cfg.overlap, cfg.name,
                                           cfg.step))
    if cfg.test or cfg.infer is not None or not states:
        return "the start" + ("" if cfg.test or cfg.infer is not None else f" of step {cfg.step}")
    iteration = int(states[0].stem.split("_")[1])
    return f"iteration {iteration} of step {cfg.step} ({states[0]})"


def check_device(cfg: Config, device_kind: str) -> None:
    """Flags that this machine cannot honour, refused before the process group forms."""
    if device_kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to this process (check CUDA_VISIBLE_DEVICES and "
                          "the driver); use --device cpu, or --device auto to take a GPU when there is one")
    if cfg.amp_enabled(device_kind) and cfg.amp_dtype == "fp16" and device_kind != "cuda":
        raise ConfigError("--amp_dtype fp16 needs a GPU (its loss scaling is CUDA's); on the CPU use --amp_dtype bf16 "
                          "or --no-amp")


EXIT_STATUS_ENV = "SEGMENTATION_EXIT_STATUS"


def report_exit(code: int) -> int:
    """torchrun turns every failing worker's exit code into 1. A launcher that wants the real one (2 bad input,
    3 diverged, 4 preempted: launch/run_protocol.py, the benchmark) names a file prefix in $SEGMENTATION_EXIT_STATUS;
    each rank writes its code to <prefix>.<rank>."""
    prefix = os.environ.get(EXIT_STATUS_ENV)
    if prefix:
        try:
            Path(f"{prefix}.{os.environ.get('RANK', '0')}").write_text(f"{code}\n")
        except OSError:  # the launcher then reports torchrun's own code
            pass
    return code


def main(argv: Sequence[str] | None = None) -> int:
    previous = interrupt_on_sigterm()
    try:
        return report_exit(run(argv))
    finally:
        # main() may run inside another program (the tests): give it back its SIGTERM handling, unless finishing()
        # chose to ignore SIGTERM while this process exits.
        if previous is not None and signal.getsignal(signal.SIGTERM) is sigterm_as_interrupt:
            signal.signal(signal.SIGTERM, previous)


def sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def interrupt_on_sigterm() -> object | None:
    """SIGTERM ends run.py like Ctrl-C (with the message that says where the same command resumes), not silently.
    Inside the training loop the step's own handlers take over (a run state is saved first). Returns the previous
    handler."""
    if threading.current_thread() is threading.main_thread():
        return signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    return None


def watch_launcher(interval: float = 2.0) -> None:
    """Under torchrun: when the launcher process dies (killed, its terminal closed), its workers would train on as
    orphans, writing into the step's folders. A daemon thread notices the new parent and sends this process
    SIGTERM, which saves a run state at the next iteration and stops, as Ctrl-C does."""
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(interval)
        log.warning("the launcher (pid %d) is gone: stopping this worker", launcher)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def run(argv: Sequence[str] | None = None) -> int:
    if dist.read_dist_env().launcher == "torchrun":
        watch_launcher()
    try:
        cfg = parse_config(argv)
    except ConfigError as exc:
        print(f"run.py: error: {exc}", file=sys.stderr)
        return USER_ERROR
    device_kind = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
    try:
        check_device(cfg, device_kind)
    except ConfigError as exc:
        print(f"run.py: error: {exc}", file=sys.stderr)
        return USER_ERROR
    env, device = dist.init_distributed(device_kind)
    setup_logging(env.rank)
    if device.type == "cuda":
        # Training crops and --crop_val evaluation have fixed shapes: let cuDNN pick its fastest kernels once.
        torch.backends.cudnn.benchmark = True
    from segmentation.infer import run_inference  # after logging is set up: imports torchvision etc.
    from segmentation.steps import run_step, run_test

    try:
        if cfg.infer is not None:
            run_inference(cfg, device)
        elif cfg.test:
            run_test(cfg, device)
        else:
            run_step(cfg, device)
        return 0
    except (ConfigError, TaskError, DatasetError, CheckpointError, SaveError) as exc:
        if env.rank == 0:
            print(f"run.py: error: {exc}", file=sys.stderr)
        return USER_ERROR
    except NonFiniteLossError as exc:
        code = finishing(NON_FINITE_LOSS)
        print(f"run.py: rank {env.rank}: {exc}. No checkpoint was written.", file=sys.stderr)
        return code
    except Preempted as exc:  # the step already requeued the job (requeue_on_rank0), before any rank exits
        code = finishing(INTERRUPTED if exc.interrupted else PREEMPTED)
        if env.rank == 0:
            print(f"run.py: {exc}; " + ("the SLURM job is requeued and will resume." if exc.requeued else
                                        "run the same command again to resume from there."), file=sys.stderr)
        return code
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop: nothing saved now
        code = finishing(INTERRUPTED)
        if env.rank == 0:
            print(f"run.py: interrupted; run the same command again to resume from {resume_point(cfg)}.",
                  file=sys.stderr)
        return code
    finally:
        dist.cleanup()
