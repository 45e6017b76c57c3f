"""Preemption and timeouts: the warning signal only sets a flag; the training loop acts on it.

SLURM sends `--signal=USR2@120` to every task of a job some time before it kills it (timeout or preemption). Doing
I/O or collectives inside a signal handler is unsafe, so the handler only records the request. At the next
iteration boundary all ranks agree on it (trainer.Updater), save the run state together, and then rank 0 requeues
the SLURM job while the others wait (requeue_on_rank0); the requeued job resumes from that state. USR1 is refused because NCCL may use it.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading

log = logging.getLogger("segmentation")

PREEMPTED = 4     # exit code: the run state is saved; the job was requeued, or the same command resumes it
INTERRUPTED = 130  # exit code: Ctrl-C or SIGTERM (a run state saved, or the newest one kept): the same command resumes
INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Preempted(Exception):
    """Raised after the run state has been saved because a preemption signal arrived; `requeued` says whether
    the SLURM job was put back in the queue; `interrupted`: it was Ctrl-C or SIGTERM, not the preemption signal."""

    def __init__(self, message: str, requeued: bool = False, interrupted: bool = False) -> None:
        super().__init__(message)
        self.requeued = requeued
        self.interrupted = interrupted


def parse_signal(name: str) -> signal.Signals | None:
    """'USR2', 'SIGUSR2', 'TERM', ... -> the signal; 'none' -> None. ValueError names the problem."""
    if name.lower() == "none":
        return None
    key = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
    if key == "SIGUSR1":
        raise ValueError("SIGUSR1 may be used by NCCL; use USR2 (the default) and `#SBATCH --signal=USR2@120`")
    if key in ("SIGKILL", "SIGSTOP") or not hasattr(signal, key):
        raise ValueError(f"{name!r} is not a signal that can be caught (e.g. USR2, TERM, or none)")
    return signal.Signals[key]


class PreemptionFlag:
    """Callable flag set by the warning signal, and by Ctrl-C (SIGINT) or SIGTERM (`interrupted`): the training
    loop then saves a run state at the next iteration and stops. A second Ctrl-C / SIGTERM does not wait for that:
    it raises KeyboardInterrupt at once. install() on every rank before the data loader forks workers, so the
    workers inherit these harmless handlers instead of dying on the signal."""

    def __init__(self, signum: signal.Signals | None) -> None:
        self.signum = signum
        self.requested = False
        self.interrupted = False
        self._previous: dict[int, object] = {}

    def install(self) -> "PreemptionFlag":
        if threading.current_thread() is not threading.main_thread():
            return self
        if self.signum is not None:
            self._previous[self.signum] = signal.signal(self.signum, self._handle)
        for signum in INTERRUPT_SIGNALS:
            if signum != self.signum:
                self._previous[signum] = signal.signal(signum, self._interrupt)
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True

    def _interrupt(self, signum: int, frame: object) -> None:
        if self.interrupted:
            raise KeyboardInterrupt
        self.requested = self.interrupted = True

    def __call__(self) -> bool:
        return self.requested


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` needs; array jobs are addressed as ARRAYID_TASKID."""
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def requeue_slurm_job() -> bool:
    """Rank 0, after the run state is saved: put this job back in the queue. False when not under SLURM or when
    scontrol refuses (e.g. the job was submitted with --no-requeue); the saved state still lets a re-run resume."""
    job = slurm_job_id()
    if job is None:
        return False
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job, (result.stderr or result.stdout).strip())
        return False
    log.info("requeued SLURM job %s; it resumes from the saved run state", job)
    return True


def requeue_on_rank0() -> bool:
    """Collective: rank 0 requeues the SLURM job while the other ranks wait for its answer, so nobody exits (and
    triggers srun's --kill-on-bad-exit) before the requeue is done. Returns whether the job was requeued."""
    from segmentation.utils import dist

    requeued = requeue_slurm_job() if dist.is_main_process() else None
    return bool(dist.broadcast_object(requeued))
