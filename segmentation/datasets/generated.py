"""Built-in datasets generated on first use (shapes, city-shapes): written once, atomically, and checked.

Generation goes to a temporary sibling folder that is renamed into place at the end, with a meta.json of the
parameters: an interrupted run leaves no half dataset, when several processes (ranks) race the first rename wins
and the others discard theirs, and a folder generated with other parameters is refused rather than reused.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from .base import DatasetError


def ensure_generated(dest: Path, meta: dict[str, Any], generate: Callable[[Path], None]) -> Path:
    """`dest`, after `generate(folder)` has written it (once) and meta.json records `meta`."""
    dest = Path(dest).expanduser()
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-tmp-", dir=dest.parent))
        try:
            generate(tmp / "data")
            files = count_files(tmp / "data")  # recorded, so that files deleted later are noticed at start
            (tmp / "data" / "meta.json").write_text(json.dumps({**meta, "files": files}, indent=1) + "\n")
            try:
                os.rename(tmp / "data", dest)
            except OSError:
                if not (dest / "meta.json").is_file():  # lost the race only counts if the winner finished
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    check_meta(dest, meta)
    return dest


def count_files(folder: Path) -> int:
    """Generated files under `folder`: neither meta.json nor hidden folders (the kept-image caches, .cache/)."""
    total = 0
    for top, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        total += sum(1 for f in files if not (f == "meta.json" and Path(top) == Path(folder)))
    return total


def check_meta(dest: Path, want: dict[str, Any]) -> None:
    try:
        meta = json.loads((dest / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{dest} exists but has no valid meta.json ({exc}); delete the folder to regenerate") from exc
    diff = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
    if diff:
        raise DatasetError(f"{dest} was generated with other parameters (found, wanted): {diff}; "
                           f"delete the folder to regenerate")
    check_files(dest, meta)


def check_files(dest: Path, meta: dict[str, Any] | None = None) -> None:
    """A generated folder still holds every file it was generated with (a deleted image otherwise surfaced seconds
    into an epoch, with advice to re-download a dataset nobody downloaded)."""
    if meta is None:
        try:
            meta = json.loads((dest / "meta.json").read_text())
        except (OSError, ValueError):
            return  # check_meta says so when the folder is generated through ensure_generated
    expected = meta.get("files")
    if expected is None:  # generated before the count was recorded
        return
    found = count_files(dest)
    if found < expected:
        raise DatasetError(f"{dest} is a generated dataset missing {expected - found} of its {expected} files: "
                           f"delete the folder (rm -r {dest}) and the next run generates it again")
