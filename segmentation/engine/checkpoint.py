"""Step artifacts: written once, atomically, only when the step is complete; validated before they are trusted.

Layout (the anchors' naming, plus WILSON's -ov suffix so disjoint and overlap runs never overwrite each other):
    <checkpoint_dir>/step/<dataset>-<task>[-ov]/<name>_<step>.pth    weights + what they are (dataset, task, ...)
    <checkpoint_dir>/step/<dataset>-<task>[-ov]/<name>_<step>.json   the step's test metrics
"""
from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from segmentation.utils.io import atomic_write_bytes

ARTIFACT_FORMAT = 1


class CheckpointError(ValueError):
    """A missing, incomplete or mismatched artifact; the message names the file and what would fix it."""


def protocol_dir(checkpoint_dir: Path, dataset: str, task: str, overlap: bool) -> Path:
    return Path(checkpoint_dir) / "step" / f"{dataset}-{task}{'-ov' if overlap else ''}"


def step_artifact_path(checkpoint_dir: Path, dataset: str, task: str, overlap: bool, name: str, step: int) -> Path:
    return protocol_dir(checkpoint_dir, dataset, task, overlap) / f"{name}_{step}.pth"


def file_sha256(path: Path) -> str:
    """Hex digest of a file's bytes: a step records its parent artifact's, so that a step whose parent was trained
    again since is not taken for complete."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def kept_aside_path(path: Path, when: datetime | None = None) -> Path:
    """Where --replace keeps a replaced artifact: <name>_<step>.replaced-<YYYYmmdd-HHMMSS><suffix>."""
    stamp = (when or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return path.with_name(f"{path.stem}.replaced-{stamp}{path.suffix}")


def keep_aside(path: Path) -> list[Path]:
    """Rename an artifact and its results (.json, _samples.png) to dated names beside it; returns the new paths."""
    when = datetime.now()
    moved = []
    for file in (path, path.with_suffix(".json"), path.with_name(path.stem + "_samples.png")):
        if file.is_file():
            target = kept_aside_path(file, when)
            os.replace(file, target)
            moved.append(target)
    return moved


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested dict / list / tuple: about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save, atomically, after checking that the folder has room for it (the tensors plus 2 % and 1 MB)."""
    atomic_write_bytes(path, lambda f: torch.save(obj, f), size_hint=int(tensor_bytes(obj) * 1.02) + 2**20)


def atomic_json_dump(obj: Any, path: Path) -> None:
    atomic_write_bytes(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def save_step_artifact(path: Path, *, model_state: dict, method_state: dict, meta: dict[str, Any],
                       extra_modules: dict[str, dict] | None = None) -> None:
    """`meta` says what the weights are: dataset, task, overlap, step, classes_per_step, method, backbone, ...
    `extra_modules`: the trained state of a method's extra modules (WILSON's localizer), kept for inspection and
    for `--test`-style use; the next step builds its own."""
    artifact = {"format": ARTIFACT_FORMAT, "complete": True, "meta": meta,
                "model_state": model_state, "method_state": method_state, "extra_modules": extra_modules or {}}
    atomic_torch_save(artifact, path)


EXPECTED = ("--ckpt and --step_ckpt take the .pth file a step wrote, "
            "<checkpoint_dir>/step/<dataset>-<task>[-ov]/<name>_<step>.pth")


def describe_file(path: Path) -> str | None:
    """What a file that is not a PyTorch archive is, from its first bytes (None: it may be one)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch.save's zip, or a legacy pickle
        return None
    kinds = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
             b"\x1f\x8b": "a gzip archive", b"%PDF": "a PDF document"}
    for magic, kind in kinds.items():
        if head.startswith(magic):
            return kind
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "not a PyTorch file"


def load_artifact(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a step artifact: {EXPECTED}")
    if not path.is_file():
        raise CheckpointError(f"step artifact {path} does not exist")
    kind = describe_file(path)
    if kind is not None:
        raise CheckpointError(f"{path} is {kind}, not a step artifact: {EXPECTED}")
    try:
        artifact = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, ...: all mean "not a usable artifact"
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            # A pickle of arbitrary objects (another project's checkpoint): never loaded, since unpickling runs code.
            raise CheckpointError(f"{path} is a PyTorch file that holds Python objects, not a step artifact of this "
                                  f"project (only tensors and plain values are read): {EXPECTED}") from exc
        reason = str(exc).splitlines()[0].split(". ")[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"cannot read step artifact {path}, which is truncated or damaged ({reason}). "
                              f"Re-run the step that writes it.") from exc
    if not isinstance(artifact, dict) or artifact.get("format") != ARTIFACT_FORMAT or "meta" not in artifact:
        raise CheckpointError(f"{path} is not a step artifact of this project (format {ARTIFACT_FORMAT})")
    if not artifact.get("complete", False):
        raise CheckpointError(f"{path} is not marked complete: its step did not finish. Re-run that step.")
    return artifact


def check_previous_artifact(path: Path, artifact: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse an artifact of another dataset, task, protocol or class count, naming what differs."""
    meta = artifact["meta"]
    wrong = [f"{key}: artifact has {meta.get(key)!r}, this run needs {value!r}"
             for key, value in expected.items() if meta.get(key) != value]
    if wrong:
        raise CheckpointError(
            f"previous-step artifact {path} does not match this run ({'; '.join(wrong)}). "
            "Pass the right file with --step_ckpt, or fix --dataset/--task/--overlap/--step/--name."
        )
