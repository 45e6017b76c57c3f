"""A private single-node SLURM cluster for the tests: munged + slurmctld + slurmd, all state in one temporary folder.

    with SlurmCluster() as cluster:
        job = cluster.sbatch(["--wrap", "hostname"])
        assert cluster.wait(job, timeout=60) == "COMPLETED"

Nothing goes to /etc, /var or /run: slurm.conf, the munge key and socket, spool, state, logs and pid files all live
under `cluster.root`. Daemons and clients find the config through $SLURM_CONF (see `cluster.env`), and the clients
find munge's socket through slurm.conf's `AuthInfo=socket=...`. The daemons run in the foreground as children of
this process, so `stop()` ends exactly the processes `start()` started, by pid. It needs Debian's slurmctld, slurmd,
slurm-client and munge packages (tools/install_slurm.sh, run by `make test`) and, as the daemons launch jobs as
their user, is meant to run as root (as on the machines this project is tested on).
"""
from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Callable, Sequence

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
SBIN_DIRS = ("/usr/sbin", "/sbin")  # where Debian puts the daemons; a non-login PATH may lack them

# Job states after which a job will not run again (scontrol's JobState). Everything else (PENDING, RUNNING,
# COMPLETING, REQUEUED, SUSPENDED, ...) may still change.
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                          "DEADLINE", "OUT_OF_MEMORY", "SPECIAL_EXIT"})
PURGED = "PURGED"  # what wait() returns for a job slurmctld no longer knows (it ended more than MinJobAge ago)
MIN_JOB_AGE_S = 120  # finished jobs stay visible to `scontrol show job` this long: long enough for any test to look


class SlurmError(RuntimeError):
    """A daemon did not come up, or a client command failed; the message carries the output and log tails."""


def find_binary(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN_DIRS))


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if find_binary(name) is None]


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick), so the cluster never clashes with a real one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def total_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 4096


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({exc})"


def parse_scontrol_line(line: str) -> dict[str, str]:
    """`scontrol show job -o` prints `Key=Value` pairs separated by spaces; a value may itself hold spaces (a
    JobName or Command with arguments), so a token without '=' belongs to the previous value."""
    info: dict[str, str] = {}
    key = None
    for token in line.strip().split(" "):
        head, sep, value = token.partition("=")
        if sep and head and (head[0].isalpha()) and all(c.isalnum() or c in "_/:" for c in head):
            key = head
            info[key] = value
        elif key is not None:
            info[key] += " " + token
    return info


class SlurmCluster:
    """One node named after this host, one partition `debug`, CPUs = nproc, no accounting, no cgroups."""

    def __init__(self, root: Path | None = None, cpus: int | None = None, keep: bool = False) -> None:
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="slurm-"))
        self.cpus = cpus or os.cpu_count() or 1
        self.keep = keep  # keep the folder (logs) after stop(), for debugging
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.processes: dict[str, subprocess.Popen] = {}
        self.env: dict[str, str] = self._client_env()

    # --- set-up -------------------------------------------------------------------------------------------------

    def _client_env(self) -> dict[str, str]:
        """os.environ + SLURM_CONF, minus SLURM_* variables inherited from an enclosing job (tests run inside a
        SLURM job would otherwise aim sbatch/srun at that job's allocation)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), *SBIN_DIRS])
        return env

    def _write_files(self) -> None:
        for sub in ("munge", "state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged refuses a key or socket folder that others can write to, and warns unless all may enter the
        # folders on the socket's path (clients of other users connect through it). The key itself stays 0400.
        for folder in (self.root, self.root / "munge"):
            os.chmod(folder, 0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        (self.root / "plugstack.conf").write_text("")  # else slurm reads /etc/slurm/plugstack.conf
        self.conf.write_text(self._slurm_conf())

    def _slurm_conf(self) -> str:
        user = getpass.getuser()
        memory = max(256, int(total_memory_mb() * 0.8))  # below the real amount, else slurmd drains the node
        r = self.root
        return "\n".join([
            "ClusterName=private",
            f"SlurmctldHost={self.host}(127.0.0.1)",  # explicit address: no DNS lookups
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            f"PlugStackConfig={r / 'plugstack.conf'}",
            "ProctrackType=proctrack/linuxproc",  # no cgroups or systemd needed
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/backfill",
            # Schedule right after submissions and job ends, so a dependent step starts within a second or two.
            "SchedulerParameters=sched_min_interval=0,bf_interval=1",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "SlurmctldParameters=preempt_send_user_signal",  # signal jobs on preemption, as real clusters do
            "JobRequeue=1",
            "KillWait=5",  # seconds between SIGTERM and SIGKILL when a job is cancelled or times out
            f"MinJobAge={MIN_JOB_AGE_S}",
            "MailProg=/bin/true",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={memory} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    # --- life cycle ---------------------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        missing = missing_binaries()
        if missing:
            raise SlurmError(f"SLURM binaries missing: {', '.join(missing)}; run `make test` (it runs "
                             "tools/install_slurm.sh) or `bash tools/install_slurm.sh` as root")
        self._write_files()
        r = self.root
        try:
            self._spawn("munged", [find_binary("munged"), "--foreground", "--force",
                                   f"--key-file={r / 'munge' / 'munge.key'}", f"--socket={self.munge_socket}",
                                   f"--log-file={r / 'log' / 'munged.log'}", f"--pid-file={r / 'run' / 'munged.pid'}",
                                   f"--seed-file={r / 'munge' / 'munged.seed'}"])
            self._wait_for(lambda: self.munge_socket.exists(), timeout, "munged did not create its socket")
            self._spawn("slurmctld", [find_binary("slurmctld"), "-D", "-i"])
            self._spawn("slurmd", [find_binary("slurmd"), "-D", "-N", self.host])
            self._wait_for(self._node_idle, timeout, "the node did not become idle in sinfo")
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, command: Sequence[str | None]) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "wb")
        # A new session: Ctrl-C in the terminal running pytest reaches pytest, which then stops us in order.
        self.processes[name] = subprocess.Popen([str(c) for c in command], env=self.env, stdout=out,
                                                stderr=subprocess.STDOUT, start_new_session=True)
        out.close()

    def _wait_for(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise SlurmError(f"{name} exited with code {process.returncode}\n{self.log_tails()}")
            if ready():
                return
            time.sleep(0.3)
        raise SlurmError(f"{what} within {timeout:.0f} s\n{self.log_tails()}")

    def _node_idle(self) -> bool:
        result = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
        return result.returncode == 0 and result.stdout.split() == ["idle"]

    def log_tails(self) -> str:
        logs = sorted((self.root / "log").glob("*"))
        return "\n".join(f"--- {p.name} (last lines) ---\n{tail(p)}" for p in logs if p.stat().st_size)

    def stop(self) -> None:
        """Cancel what is still queued or running, then end the daemons this object started, newest first."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            self._cancel_all_jobs()
        for name in reversed(list(self.processes)):
            self._terminate(self.processes.pop(name))
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def _cancel_all_jobs(self, timeout: float = 30.0) -> None:
        """scancel every job and wait until none is left, so slurmd's job processes (slurmstepd and the job's own
        children, which are not our children) have ended before slurmd goes away."""
        jobs = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
        if jobs:
            self.run(["scancel", *jobs], check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split():
                return
            time.sleep(0.5)

    @staticmethod
    def _terminate(process: subprocess.Popen, timeout: float = 15.0) -> None:
        if process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # --- clients ------------------------------------------------------------------------------------------------

    def run(self, command: Sequence[str], check: bool = True, cwd: Path | None = None,
            timeout: float = 60.0) -> subprocess.CompletedProcess:
        result = subprocess.run(list(command), env=self.env, cwd=cwd, capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise SlurmError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def sbatch(self, args: Sequence[str], cwd: Path | None = None) -> str:
        """Submit; returns the job id (`--parsable` prints `id` or `id;cluster`)."""
        result = self.run(["sbatch", "--parsable", *args], cwd=cwd)
        return result.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, StartTime, EndTime, Reason, StdOut, ...); {} once
        slurmctld has forgotten the job (MinJobAge after it ended)."""
        result = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if result.returncode != 0:
            if "Invalid job id" in result.stderr:
                return {}
            raise SlurmError(f"scontrol show job {job_id} failed: {result.stderr.strip()}")
        return parse_scontrol_line(result.stdout.splitlines()[0])

    def wait(self, job_id: str, timeout: float = 120.0, poll: float = 0.5) -> str:
        """Wait for a final JobState (COMPLETED, FAILED, CANCELLED, ...) and return it; PURGED if the job is gone.
        Without accounting there is no sacct, so this polls scontrol, which keeps ended jobs for MinJobAge."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if not info:
                return PURGED
            if info.get("JobState") in FINAL_STATES:
                return info["JobState"]
            time.sleep(poll)
        out = Path(info.get("StdOut", "")) if info.get("StdOut") else None
        raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s "
                           f"(reason {info.get('Reason')})"
                           + (f"\n--- {out} ---\n{tail(out)}" if out else "") + f"\n{self.log_tails()}")
