"""Whether a step needs to run: its complete artifact, if any, and whether this command made it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segmentation.config import Config, config_to_dict
from segmentation.engine import checkpoint as ckpt
from segmentation.engine import runstate
from segmentation.step.build import previous_artifact_path
from segmentation.tasks import Task
from segmentation.utils.io import ensure_writable


@dataclass(frozen=True)
class ExistingArtifact:
    path: Path
    conflict: str | None  # None: complete, made by these flags from this parent; else why it is not this step's


def existing_artifact(cfg: Config, task: Task) -> ExistingArtifact | None:
    """The step's complete artifact, if there is one, and whether it is this command's: made by the same flags
    and trained from the previous-step artifact that is there now. None: no artifact, or an incomplete or unreadable
    file, which is not a result (it is trained again and replaced)."""
    path = ckpt.step_artifact_path(cfg.checkpoint_dir, cfg.dataset, task.name, cfg.overlap, cfg.name, cfg.step)
    if not path.is_file():
        return None
    try:
        meta = ckpt.load_artifact(path)["meta"]
    except ckpt.CheckpointError:
        return None
    saved, mine = runstate.saved_config(meta.get("config", {})), config_to_dict(cfg)
    wrong = [f"--{k} {flag_value(saved.get(k))} there, {flag_value(mine.get(k))} now"
             for k in runstate.RESUME_SENSITIVE_FLAGS if saved.get(k) != mine.get(k)]
    if wrong:
        more = f" and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        return ExistingArtifact(path, f"it was made by other flags ({'; '.join(wrong[:3])}{more})")
    parent = meta.get("parent")
    previous = previous_artifact_path(cfg, task) if cfg.step > 0 else None
    if parent and previous is not None and previous.is_file() and ckpt.file_sha256(previous) != parent["sha256"]:
        return ExistingArtifact(path, f"it was trained from an earlier version of {previous} (step {cfg.step - 1} "
                                      f"was trained again since)")
    return ExistingArtifact(path, None)


def flag_value(value: Any) -> str:
    return "not given" if value is None else repr(value)


def already_complete(cfg: Config, task: Task) -> Path | None:
    """The step's artifact when this command would make it again: then re-running the same command (a requeued
    job, a re-submitted chain) has nothing left to do."""
    existing = existing_artifact(cfg, task)
    return existing.path if existing is not None and existing.conflict is None else None


def refuse_to_replace(existing: ExistingArtifact) -> str:
    return (f"{existing.path} is a complete step, but {existing.conflict}: nothing was trained. Pass --replace to "
            f"train it again (the old one is then kept beside it as {existing.path.stem}.replaced-<date>.pth), or "
            f"choose another --name.")


def ensure_step_folders(cfg: Config, task: Task, lock_folder: Path) -> None:
    """The folders a step writes to (artifacts, run states and locks, logs) exist and are writable."""
    protocol = ckpt.protocol_dir(cfg.checkpoint_dir, cfg.dataset, task.name, cfg.overlap)
    for folder, flag in ((protocol, "--checkpoint_dir"), (lock_folder, "--checkpoint_dir"), (cfg.logdir, "--logdir")):
        ensure_writable(folder, flag)


def already_there(path: Path) -> bool:
    """A complete artifact at `path` (an incomplete or unreadable file is no result: it is simply overwritten)."""
    try:
        ckpt.load_artifact(path)
    except ckpt.CheckpointError:
        return False
    return True


def check_existing(cfg: Config, task: Task) -> tuple[str | None, Path | None]:
    """(why the step is refused, or None; its complete artifact, or None)."""
    existing = existing_artifact(cfg, task)
    if existing is None:
        return None, None
    if existing.conflict is None:
        return None, existing.path
    return (None if cfg.replace else refuse_to_replace(existing)), None
