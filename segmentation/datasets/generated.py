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
            (tmp / "data" / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
            try:
                os.rename(tmp / "data", dest)
            except OSError:
                if not (dest / "meta.json").is_file():  # lost the race only counts if the winner finished
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    check_meta(dest, meta)
    return dest


def check_meta(dest: Path, want: dict[str, Any]) -> None:
    try:
        meta = json.loads((dest / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{dest} exists but has no valid meta.json ({exc}); delete the folder to regenerate") from exc
    diff = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
    if diff:
        raise DatasetError(f"{dest} was generated with other parameters (found, wanted): {diff}; "
                           f"delete the folder to regenerate")
