"""Atomic file writes shared by the step artifacts, run states, results and the dataset index caches."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Callable

AGAIN = "then run the same command again (a step continues from its last saved run state)"


class SaveError(RuntimeError):
    """A file that could not be written (no free space, no permission); the message names the file or folder and
    the fix. The file it would have replaced is untouched."""


def ensure_writable(folder: Path, flag: str) -> None:
    """Create `folder` if needed and write (and remove) a file in it: a read-only or foreign folder is refused before
    a step trains for hours, with the flag that chose it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise SaveError(f"{flag}: cannot write in {folder} ({exc.strerror or exc}); choose a folder this user can "
                        f"write to") from exc


def megabytes(size: int) -> str:
    return f"{size / 2**20:,.1f} MB"


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse before writing, rather than fail half way (PyTorch then reports "unexpected pos ..." and no more)."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise SaveError(f"not enough free space in {folder} to write {what}: it needs about {megabytes(needed)} and "
                        f"{megabytes(free)} are free. Free some space there (or choose another --checkpoint_dir), "
                        f"{AGAIN}")


def save_failure(path: Path, exc: OSError) -> SaveError | None:
    """The SaveError that names what went wrong writing `path`, for the causes a user fixes; None for others."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SaveError(f"the disk holding {path.parent} filled up while writing {path.name} ({exc.strerror}); "
                         f"nothing was replaced. Free some space there (or choose another --checkpoint_dir), {AGAIN}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return SaveError(f"cannot write {path} ({exc.strerror}): choose a folder this user can write to "
                         f"(--checkpoint_dir, --logdir), {AGAIN}")
    return None


def atomic_write_bytes(path: Path, write: Callable[[IO[bytes]], object], size_hint: int | None = None) -> None:
    """Write through a temporary file in the same folder, fsync, then os.replace: readers see old or new, never half.
    `size_hint`: about how many bytes will be written, checked against the free space first."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if size_hint is not None:
            check_free_space(path.parent, size_hint, path.name)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise (save_failure(path, exc) or exc) from exc
    try:
        # mkstemp makes the file owner-only (0600); an ordinary file gets 0666 minus the umask, which is what
        # teammates reading a shared project folder (umask 002 or 022) expect of artifacts and results.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException as exc:
        Path(tmp_name).unlink(missing_ok=True)
        failure = save_failure(path, exc) if isinstance(exc, OSError) else None
        if failure is not None:
            raise failure from exc
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def current_umask() -> int:
    """The process's umask, read from /proc on Linux (no change to it); elsewhere set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
