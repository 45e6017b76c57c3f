"""Shared machinery of the data/prepare_*.py scripts.

Every script turns official downloads (archives as downloaded, or the folders they were extracted to) into exactly
the layout its loader in segmentation/datasets/ reads. The guarantees, the same for all of them:

* Atomic outputs: a file is written under <out>/.partial/ and renamed into place, so a file at its final name is
  complete. A killed run leaves at most files in .partial/, which the next run deletes.
* Resumable: a re-run skips outputs that exist (copies must also have the source's byte size), so it only does
  what is left.
* Checked: every image has its label, sizes match, label values are in the dataset's allowed set, and nothing
  else sits in folders the loader lists. With --expect_official (the default) the image counts must also equal
  the official release's, checked before any work so that a partial download fails in seconds.
* A marker <out>/.prepared.json is written only after all checks pass; a later run with the marker present
  stops at once (--recheck runs everything again, skipping finished files).

Deliberately free of torch and of the segmentation package: importing torch costs seconds in every worker process.
"""
from __future__ import annotations

import argparse
import gzip
import io
import itertools
import json
import os
import re
import shlex
import shutil
import sys
import tarfile
import time
import zipfile
import zlib
from collections import Counter
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import fcntl
import numpy as np
from PIL import Image
from tqdm import tqdm

MARKER = ".prepared.json"
PARTIAL = ".partial"
# Test hook: the process (main or worker) that writes its k-th file writes half of it to the temp file and dies,
# as a kill -9 would. Lets the tests check that an interrupted run resumes to the same result.
FAIL_AFTER_ENV = "DATAPREP_FAIL_AFTER"
FAIL_EXIT = 75
IGNORE = 255
# tqdm's monitor thread would be running while the pool forks its workers (a fork of a threaded process can
# deadlock on a lock held by that thread); the bars refresh on every update anyway.
tqdm.monitor_interval = 0


# What reading a truncated or corrupt .tar / .tar.gz raises (gzip's "Compressed file ended before the end-of-stream
# marker was reached" is an EOFError).
ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


class PrepError(Exception):
    """Bad or missing input, or a failed check; the message says which file and what to do."""


# ---------------------------------------------------------------------------------------------- downloads

@dataclass(frozen=True)
class Entry:
    """One file of a download. `offset`: where its bytes start in an uncompressed tar (read with one seek)."""

    name: str
    size: int
    offset: int | None = None


class Download:
    """An official download: a .zip, a .tar / .tar.gz / .tgz, or the folder it was extracted to."""

    def __init__(self, path: Path | str, what: str, url: str) -> None:
        self.path = Path(path).expanduser().resolve()
        self.what, self.url = what, url
        if not self.path.exists():
            raise PrepError(f"{self.path} not found: expected {what} (download: {url}) or the folder it was "
                            f"extracted to")
        self.small: dict[str, bytes] = {}  # text files captured while indexing a compressed tar
        self.kind = self._kind()
        self.entries = self._index()

    def __str__(self) -> str:
        return str(self.path)

    def _kind(self) -> str:
        if self.path.is_dir():
            return "dir"
        if zipfile.is_zipfile(self.path):
            return "zip"
        if tarfile.is_tarfile(self.path):
            try:  # "r:" opens only uncompressed tars, whose members can be read with a seek
                with tarfile.open(self.path, "r:"):
                    return "tar"
            except tarfile.ReadError:
                return "tgz"
        raise PrepError(f"{self.path} is neither a folder nor a zip/tar archive: expected {self.what} "
                        f"(download: {self.url}); re-download it if it is truncated")

    @property
    def random_access(self) -> bool:
        """Whether a worker can read any member by itself; a compressed tar must be streamed in order."""
        return self.kind != "tgz"

    def _index(self) -> dict[str, Entry]:
        print(f"indexing {self.path} ...", file=sys.stderr, flush=True)
        if self.kind == "dir":
            return {e.name: e for e in _walk(self.path)}
        if self.kind == "zip":
            with zipfile.ZipFile(self.path) as zf:
                return {i.filename: Entry(i.filename, i.file_size) for i in zf.infolist() if not i.is_dir()}
        entries = {}
        mode = "r:" if self.kind == "tar" else "r|*"
        try:
            with tarfile.open(self.path, mode) as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    entries[m.name] = Entry(m.name, m.size, m.offset_data if self.kind == "tar" else None)
                    if self.kind == "tgz" and m.name.endswith(".txt") and m.size < (8 << 20):
                        # The only chance to read it without decompressing the whole archive again.
                        self.small[m.name] = tf.extractfile(m).read()
                end = tf.offset  # where the end-of-archive marker must start
        except ARCHIVE_ERRORS as exc:
            raise self.damaged(exc) from exc
        if self.kind == "tar" and not self._tar_end_marker(end):
            # tarfile takes a plain tar cut at a header for its end and lists only the members before the cut.
            raise self.damaged(EOFError("no end-of-archive marker after its last member"))
        return entries

    def _tar_end_marker(self, offset: int) -> bool:
        """Whether the two zero blocks that end every tar follow its last member."""
        with open(self.path, "rb") as f:
            f.seek(offset)
            marker = f.read(1024)
        return len(marker) == 1024 and not any(marker)

    def damaged(self, exc: BaseException) -> "PrepError":
        return PrepError(f"{self.path} ends early or is damaged ({exc or type(exc).__name__}): the download is "
                         f"incomplete. Download {self.what} again ({self.url}) and run the same command")

    def read(self, name: str) -> bytes:
        """A member's bytes, read in this process (for the small list files)."""
        if name in self.small:
            return self.small[name]
        return read_entry(self.kind, str(self.path), self.entries[name])

    def find_prefix(self, tail: str, expected: str) -> str:
        """The folder prefix ("" or "a/b/") under which members match the regex `tail`. Archives and extracted
        folders nest the same tree at different depths (VOCdevkit/VOC2012/, benchmark_RELEASE/dataset/, ...)."""
        pattern = re.compile(rf"^(?P<prefix>(?:[^/]+/)*?){tail}$")
        found: Counter[str] = Counter()
        for name in self.entries:
            if name.startswith("__MACOSX/") or "/._" in name or name.startswith("._"):
                continue  # macOS resource forks some zips carry
            m = pattern.match(name)
            if m:
                found[m.group("prefix")] += 1
        if not found:
            raise PrepError(f"{self.path} has no {expected}: is it {self.what}? (download: {self.url})")
        # The prefix with most matches; on a tie the shortest, so a stray copy deeper down loses.
        return min(found, key=lambda p: (-found[p], len(p)))

    def find_folder(self, folder: str, suffix: str, expected: str) -> str:
        """The member prefix ".../<folder>/" of a folder of *<suffix> files, at any depth; "" when the download
        is that very folder, extracted."""
        if self.kind == "dir" and self.path.name == folder and self.files("", suffix):
            return ""
        return self.find_prefix(rf"{re.escape(folder)}/[^/]+{re.escape(suffix)}", expected) + folder + "/"

    def files(self, folder: str, suffix: str) -> dict[str, Entry]:
        """stem -> entry of the files directly in `folder` (a prefix ending in "/") whose name ends in `suffix`."""
        out = {}
        for name, entry in self.entries.items():
            if name.startswith(folder) and name.endswith(suffix):
                rest = name[len(folder):]
                if "/" not in rest and not rest.startswith("._"):
                    out[rest[: -len(suffix)]] = entry
        return out


def _walk(root: Path) -> Iterable[Entry]:
    stack = [root]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as it:
            for item in it:
                if item.is_dir(follow_symlinks=False):
                    stack.append(Path(item.path))
                elif item.is_file():
                    yield Entry(Path(item.path).relative_to(root).as_posix(), item.stat().st_size)


_open_archives: dict[tuple[str, int], object] = {}


def _archive(kind: str, path: str) -> object:
    """The archive opened once per process: a forked worker must not share the parent's file offset."""
    key = (path, os.getpid())
    if key not in _open_archives:
        _open_archives[key] = zipfile.ZipFile(path) if kind == "zip" else open(path, "rb")
    return _open_archives[key]


def read_entry(kind: str, path: str, entry: Entry) -> bytes:
    if kind == "dir":
        return (Path(path) / entry.name).read_bytes()
    if kind == "zip":
        return _archive(kind, path).read(entry.name)  # type: ignore[attr-defined]
    if kind == "tar":
        f = _archive(kind, path)
        f.seek(entry.offset)  # type: ignore[attr-defined]
        return f.read(entry.size)  # type: ignore[attr-defined]
    raise ValueError(f"{path}: a compressed tar cannot be read at random; it is streamed")


# ---------------------------------------------------------------------------------------------- writing

_writes = itertools.count(1)
_names = itertools.count()


def temp_path(tmp_dir: Path, dst: Path) -> Path:
    """A name no other process or write uses: pid + a per-process counter."""
    return tmp_dir / f"{os.getpid()}-{next(_names)}-{dst.name}"


def _fail_now() -> bool:
    limit = os.environ.get(FAIL_AFTER_ENV)
    return bool(limit) and next(_writes) >= int(limit)


def atomic_write(dst: Path, data: bytes, tmp_dir: Path) -> None:
    """dst appears complete or not at all: bytes go to a temp file in tmp_dir (same file system), then a rename."""
    tmp = temp_path(tmp_dir, dst)
    with open(tmp, "wb") as f:
        if _fail_now():
            f.write(data[: len(data) // 2])
            f.flush()
            os._exit(FAIL_EXIT)
        f.write(data)
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dst)


Convert = Callable[[bytes, str], bytes]  # (member bytes, member name for messages) -> output bytes


@dataclass(frozen=True)
class Job:
    """Write `dst` from one member of a download: a byte copy, or `convert(bytes)`."""

    kind: str
    archive: str
    entry: Entry
    dst: Path
    convert: Convert | None = None


def job(download: Download, entry: Entry, dst: Path, convert: Convert | None = None) -> Job:
    return Job(download.kind, str(download.path), entry, dst, convert)


def is_done(j: Job) -> bool:
    """Finished = present (renames are atomic); a copy must also have the member's size, which catches a file
    truncated by a machine crash between write and rename reaching the disk."""
    try:
        size = j.dst.stat().st_size
    except FileNotFoundError:
        return False
    return j.convert is not None or size == j.entry.size


def do_job(j: Job, data: bytes | None, tmp_dir: Path, link: bool) -> None:
    if link and j.kind == "dir" and j.convert is None:
        # Hard link instead of a copy (same file system only): COCO's images alone are 19 GB.
        tmp = temp_path(tmp_dir, j.dst)
        try:
            os.link(Path(j.archive) / j.entry.name, tmp)
            j.dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, j.dst)
            return
        except OSError:
            pass  # another file system: copy
    if data is None:
        data = read_entry(j.kind, j.archive, j.entry)
    atomic_write(j.dst, j.convert(data, j.entry.name) if j.convert else data, tmp_dir)


class _Runner:
    """Runs jobs inline (workers <= 1) or in a process pool, with a bounded number in flight (streamed archive
    bytes wait in memory) and a progress bar."""

    def __init__(self, workers: int, total: int, desc: str, tmp_dir: Path, link: bool) -> None:
        self.pool = ProcessPoolExecutor(workers) if workers > 1 else None
        self.limit = 4 * max(1, workers)
        self.inflight: set[Future] = set()
        self.bar = tqdm(total=total, desc=desc, unit="file", file=sys.stderr, mininterval=1.0)
        self.tmp_dir, self.link = tmp_dir, link

    def submit(self, j: Job, data: bytes | None) -> None:
        if self.pool is None:
            do_job(j, data, self.tmp_dir, self.link)
            self.bar.update()
            return
        while len(self.inflight) >= self.limit:
            self._collect(FIRST_COMPLETED)
        self.inflight.add(self.pool.submit(do_job, j, data, self.tmp_dir, self.link))

    def _collect(self, when: str) -> None:
        done, self.inflight = wait(self.inflight, return_when=when)
        for f in done:
            f.result()  # re-raises a worker's error here
        self.bar.update(len(done))

    def finish(self) -> None:
        if self.inflight:
            self._collect(ALL_COMPLETED)
        self.close()

    def close(self) -> None:
        self.bar.close()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def run_jobs(jobs: Sequence[Job], tmp_dir: Path, workers: int, link: bool, desc: str = "writing") -> None:
    pending = [j for j in jobs if not is_done(j)]
    print(f"{desc}: {len(jobs) - len(pending)} of {len(jobs)} files already done", file=sys.stderr, flush=True)
    if not pending:
        return
    runner = _Runner(workers, len(pending), desc, tmp_dir, link)
    try:
        by_archive: dict[str, list[Job]] = {}
        for j in pending:
            by_archive.setdefault(j.archive, []).append(j)
        for archive, group in by_archive.items():
            if group[0].kind != "tgz":
                for j in group:
                    runner.submit(j, None)
                continue
            wanted = {j.entry.name: j for j in group}
            try:
                with tarfile.open(archive, "r|*") as tf:  # one sequential pass; workers convert the bytes
                    for m in tf:
                        j = wanted.pop(m.name, None)
                        if j is not None:
                            runner.submit(j, tf.extractfile(m).read())
                        if not wanted:
                            break
            except ARCHIVE_ERRORS as exc:
                raise PrepError(f"{archive} ends early or is damaged ({exc or type(exc).__name__}): the download "
                                f"is incomplete. Download it again and run the same command (finished files are "
                                f"kept)") from exc
        runner.finish()
    except BaseException:
        runner.close()
        raise


# ---------------------------------------------------------------------------------------------- checks

def check_pair(image: Path, label: Path, allowed: bytes) -> str | None:
    """None, or what is wrong with one image/label pair. `allowed`: 256 flags, the label values permitted.
    An unreadable output is deleted, so that the next run writes it again."""
    try:
        with Image.open(image) as img:
            size = img.size  # header only: copies are byte-identical to the download
    except (OSError, ValueError) as exc:
        image.unlink(missing_ok=True)
        return f"{image}: unreadable ({exc}); deleted, re-run to write it again"
    try:
        with Image.open(label) as lbl:
            if lbl.mode not in ("L", "P"):
                return f"{label}: mode {lbl.mode}, not a gray or palette PNG of class ids"
            arr = np.asarray(lbl, dtype=np.uint8)
    except (OSError, ValueError) as exc:
        label.unlink(missing_ok=True)
        return f"{label}: unreadable ({exc}); deleted, re-run to write it again"
    if arr.shape[::-1] != size:
        return f"{label}: size {arr.shape[1]}x{arr.shape[0]} differs from its image {image} ({size[0]}x{size[1]})"
    present = np.flatnonzero(np.bincount(arr.ravel(), minlength=256))
    bad = [int(v) for v in present if not allowed[v]]
    if bad:
        return f"{label}: label values {bad} are not allowed for this dataset"
    return None


def _check_chunk(pairs: list[tuple[Path, Path]], allowed: bytes) -> list[str]:
    return [p for p in (check_pair(i, l, allowed) for i, l in pairs) if p]


def check_pairs(pairs: Sequence[tuple[Path, Path]], allowed: Iterable[int], workers: int) -> list[str]:
    """Problems over all pairs, checked in parallel (labels are decoded in full)."""
    ok = set(allowed)
    flags = bytes(1 if v in ok else 0 for v in range(256))
    chunks = [list(pairs[k:k + 64]) for k in range(0, len(pairs), 64)]
    problems: list[str] = []
    bar = tqdm(total=len(pairs), desc="checking", unit="pair", file=sys.stderr, mininterval=1.0)
    if workers <= 1:
        for c in chunks:
            problems += _check_chunk(c, flags)
            bar.update(len(c))
    else:
        with ProcessPoolExecutor(workers) as pool:
            for c, found in zip(chunks, pool.map(_check_chunk, chunks, itertools.repeat(flags))):
                problems += found
                bar.update(len(c))
    bar.close()
    return problems


def extra_files(folder: Path, pattern: str, expected: set[Path]) -> list[Path]:
    """Files the loader would list (`pattern` globbed in `folder`) that this preparation did not write: left
    from an earlier run on other inputs, they would silently join the dataset."""
    return sorted(p for p in folder.glob(pattern) if p.is_file() and p not in expected)


# ---------------------------------------------------------------------------------------------- the run

@dataclass
class Plan:
    """What one preparation writes and checks. `pairs`: split -> (image, label) outputs; `official`: split ->
    the official release's image count; `texts`: generated small files (split lists), written after the jobs so
    that a list never names a file that is not there yet; `listed`: (folder, glob) the loader lists its images
    with, where nothing but this preparation's outputs may match."""

    jobs: list[Job]
    pairs: dict[str, list[tuple[Path, Path]]]
    allowed_labels: Sequence[int]
    official: dict[str, int]
    texts: dict[Path, str] = field(default_factory=dict)
    listed: list[tuple[Path, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)


def available_cores() -> int:
    """The cores this process may run on (a SLURM/cgroup allocation), not all the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder; the script ends by printing the --data_root to pass to run.py")
    parser.add_argument("--workers", type=int, default=available_cores(),
                        help="processes (default: the cores this process may use); 1 runs everything in this "
                             "process")
    parser.add_argument("--expect_official", action=argparse.BooleanOptionalAction, default=True,
                        help="require the official image counts (default); --no-expect_official prepares a subset "
                             "or a test fixture, with every other check still on")
    parser.add_argument("--recheck", action="store_true",
                        help="run again although the marker says done (finished files are still skipped)")
    parser.add_argument("--link", action="store_true",
                        help="hard-link unchanged files from an extracted folder instead of copying them")


def _lock(folder: Path) -> int:
    """One run per output folder: two would delete each other's .partial files."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PrepError(f"another preparation is running on {folder}; wait for it or stop it") from None
    except OSError as exc:  # some network file systems cannot lock a folder: go on unguarded
        print(f"warning: cannot lock {folder} ({exc}); do not run two preparations on it at once", file=sys.stderr)
    return fd


def _check_counts(plan: Plan, dataset: str) -> None:
    wrong = {s: (len(plan.pairs.get(s, [])), n) for s, n in plan.official.items() if len(plan.pairs.get(s, [])) != n}
    if wrong:
        said = "; ".join(f"{s}: {got} images, the official set has {n}" for s, (got, n) in wrong.items())
        raise PrepError(f"{dataset} input is not the full official release ({said}). Incomplete download or "
                        f"extraction? To prepare a subset on purpose, add --no-expect_official.")


def _flags(dataset: str, data_root: Path) -> str:
    return f"--dataset {dataset} --data_root {shlex.quote(str(data_root))}"


def prepare(args: argparse.Namespace, dataset: str, out_dir: Path, data_root: Path,
            build: Callable[[], Plan]) -> int:
    """The common run: lock, marker, plan, count check, jobs, lists, checks, marker."""
    out_dir = out_dir.resolve()
    data_root = data_root.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock(out_dir)
    try:
        marker = out_dir / MARKER
        if marker.is_file() and not args.recheck:
            print(f"{dataset}: already prepared in {out_dir} ({MARKER} present; --recheck to check again).")
            print(f"python run.py {_flags(dataset, data_root)}")
            return 0
        marker.unlink(missing_ok=True)  # from here on the folder is "in progress" until every check passes
        tmp_dir = out_dir / PARTIAL
        shutil.rmtree(tmp_dir, ignore_errors=True)  # a killed run's half-written files
        tmp_dir.mkdir()
        started = time.time()
        plan = build()
        counts = {s: len(p) for s, p in plan.pairs.items()}
        print(f"{dataset}: {', '.join(f'{n} {s}' for s, n in counts.items())} images", file=sys.stderr)
        if args.expect_official:
            _check_counts(plan, dataset)
        workers = max(1, args.workers)
        run_jobs(plan.jobs, tmp_dir, workers, args.link)
        for path, text in plan.texts.items():
            atomic_write(path, text.encode(), tmp_dir)
        problems = check_pairs([p for ps in plan.pairs.values() for p in ps], plan.allowed_labels, workers)
        expected = {p for ps in plan.pairs.values() for pair in ps for p in pair}
        for folder, pattern in plan.listed:
            problems += [f"{p}: not from these downloads, but the loader would read it; remove it"
                         for p in extra_files(folder, pattern, expected)]
        if problems:
            shown = "\n  ".join(problems[:20])
            raise PrepError(f"{len(problems)} check(s) failed, no {MARKER} written:\n  {shown}")
        info = {"dataset": dataset, "data_root": str(data_root), "counts": counts,
                "official_counts": counts == {s: plan.official.get(s) for s in counts},
                "inputs": plan.inputs, "seconds": round(time.time() - started, 1),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write(marker, (json.dumps(info, indent=2) + "\n").encode(), tmp_dir)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        for note in plan.notes:
            print(f"note: {note}")
        print(f"{dataset}: ready in {out_dir} ({', '.join(f'{n} {s}' for s, n in counts.items())}).")
        print(f"python run.py {_flags(dataset, data_root)}")
        return 0
    finally:
        os.close(lock)


def main(run: Callable[[], int]) -> int:
    """Exit codes: 0 done, 2 bad input or failed check, 1 a worker died, 130 interrupted."""
    try:
        return run()
    except PrepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenProcessPool:
        print("error: a worker process died (killed, or out of memory?). Finished files are kept: run the same "
              "command again to resume.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted. Finished files are kept: run the same command again to resume.", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------------- images

def png_bytes(arr: np.ndarray, palette: list[int] | None = None) -> bytes:
    """A gray ('L') PNG of class ids, or a palette ('P') one when a palette is given (ids unchanged)."""
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8))
    if palette is not None:
        img.putpalette(palette)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def decode_label(data: bytes, name: str) -> np.ndarray:
    """A single-channel PNG's values (palette indices as they are, never converted to gray)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.mode not in ("L", "P"):
                raise PrepError(f"{name}: mode {img.mode}, expected a gray or palette PNG of class ids")
            return np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise PrepError(f"{name}: cannot decode ({exc}); re-download the archive") from exc
