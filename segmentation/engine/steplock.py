"""One trainer per step at a time: a lock file beside the step's run states, held by rank 0 while the step trains.

Two runs of the same step and name (a chain submitted twice, a requeued job beside a manual re-run) would write the
same run states and artifact. The second one stops at once with a message that names the holder.

    <checkpoint_dir>/run/<dataset>-<task>[-ov]/<name>_<step>.lock    {"host", "pid", "slurm_job", "token", ...}

Why a lock file and not flock/fcntl: POSIX locks are not reliable on every shared filesystem a cluster uses (NFS
without lockd, Lustre mounted without flock), while creating a file with O_EXCL is atomic on all of them. A file
outlives a SIGKILLed or crashed holder, so the holder refreshes its modification time every HEARTBEAT_SECONDS from
a thread, and a lock is stale, and taken over, when
  - its SLURM job id is ours: a requeued job follows its own previous incarnation, which SLURM has ended;
  - it was taken on this host by a process that no longer exists;
  - or its heartbeat is older than STALE_SECONDS (a holder on another node that died).
A takeover renames the stale file away first: of two runs that both find it stale, only one rename succeeds.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from segmentation.engine.preemption import slurm_job_id

HEARTBEAT_SECONDS = 20.0
STALE_SECONDS = 120.0


class StepLockedError(RuntimeError):
    """Another run holds the step; the message names it and what to do."""


def step_lock_path(checkpoint_dir: Path, dataset: str, task: str, overlap: bool, name: str, step: int) -> Path:
    return Path(checkpoint_dir) / "run" / f"{dataset}-{task}{'-ov' if overlap else ''}" / f"{name}_{step}.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half-written by a holder killed while creating it: judged by its heartbeat alone


class StepLock:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.token = uuid.uuid4().hex
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": slurm_job_id(),
                   "token": self.token, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # ------------------------------------------------------------------ acquire / release

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                return
            holder = _read(self.path)
            if holder is None:
                continue  # released meanwhile: try again
            reason = self.stale_reason(holder)
            if reason is None:
                raise StepLockedError(self.held_message(holder))
            self._take_over(reason)
        raise StepLockedError(f"{self.path}: could not take the step lock (other runs keep taking it); check "
                              f"for runs of this step and name")

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        holder = _read(self.path)
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        for parent in (self.path.parent, self.path.parent.parent):  # as remove_run_states: no empty folders left
            try:
                parent.rmdir()
            except OSError:
                break

    def __enter__(self) -> StepLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------------ the rules

    def stale_reason(self, holder: dict[str, Any]) -> str | None:
        """Why the holder's lock may be taken over, or None while it holds the step."""
        if holder.get("slurm_job") and holder.get("slurm_job") == self.me["slurm_job"]:
            return f"held by this SLURM job's previous run (job {holder['slurm_job']}, requeued)"
        if holder.get("host") == self.me["host"] and isinstance(holder.get("pid"), int) \
                and not _pid_alive(holder["pid"]):
            return f"its process {holder['pid']} on {holder['host']} no longer exists"
        age = self.heartbeat_age()
        if age is not None and age > STALE_SECONDS:
            return f"no heartbeat for {age:.0f} s"
        return None

    def heartbeat_age(self) -> float | None:
        try:
            return time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None

    def held_message(self, holder: dict[str, Any]) -> str:
        job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
        age = self.heartbeat_age()
        return (f"this step is being trained by another run: host {holder.get('host', '?')}, pid "
                f"{holder.get('pid', '?')}{job}, since {holder.get('started', '?')} (lock {self.path}, heartbeat "
                f"{age:.0f} s ago). Wait for it (a complete step is then skipped), cancel it, or use another --name. "
                f"A dead holder's lock is taken over by itself: a requeued job follows its own previous run, a "
                f"process gone from this host at once, any other after {STALE_SECONDS:.0f} s without a heartbeat.")

    # ------------------------------------------------------------------ file operations

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _take_over(self, reason: str) -> None:
        import logging

        aside = self.path.with_name(f"{self.path.name}.stale-{self.token}")
        try:
            os.rename(self.path, aside)  # of two runs taking over, only one rename finds the file
        except FileNotFoundError:
            return
        aside.unlink(missing_ok=True)
        logging.getLogger("segmentation").warning("taking over the step lock %s: %s", self.path, reason)

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_SECONDS):
                try:
                    os.utime(self.path)
                except FileNotFoundError:
                    return

        self._beat = threading.Thread(target=beat, name="step-lock-heartbeat", daemon=True)
        self._beat.start()
