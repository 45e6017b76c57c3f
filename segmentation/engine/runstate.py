"""Run states: everything needed to continue a step exactly where it stopped, saved while the step trains.

A step artifact (checkpoint.py) is the immutable result of a finished step. A run state is the scratch state of a
step in progress, written every `--save_interval` iterations, at each epoch end and when the job is preempted:

    <checkpoint_dir>/run/<dataset>-<task>[-ov]/<name>_<step>/iter_<global iteration, 8 digits>.pth

It holds the model, optimizer, scheduler, GradScaler, the method's state and extra modules, the position (epoch,
batches done in that epoch, global iteration) and the Python/NumPy/torch/CUDA random states of every rank. The data
order needs no state of its own: each epoch's order comes from (seed, epoch) and each sample's augmentation from
(seed, epoch, image index), so skipping the batches already done replays the same batches.

A restarted job with the same command line finds the newest state that loads and continues from it; a truncated or
corrupt newest file is reported and the one before it used. Only the newest `--keep_run_states` files are kept, and
the folder is removed once the step's artifact is written.
"""
from __future__ import annotations

import logging
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segmentation.engine.checkpoint import CheckpointError, atomic_torch_save
from segmentation.utils import dist

log = logging.getLogger("segmentation")

RUN_STATE_FORMAT = 1
_STATE_NAME = re.compile(r"^iter_(\d{8,})\.pth$")

# Flags that change what a step computes. A run state saved under other values of these cannot be continued: the
# result would be neither the old run nor the new one. The other flags (workers, logging, paths) may change freely.
RESUME_SENSITIVE_FLAGS = (
    "dataset", "task", "step", "overlap", "test_future", "crop_size", "crop_val", "method", "method_options",
    "epochs", "batch_size", "lr", "lr_policy", "lr_power", "lr_decay_step", "lr_decay_factor", "warmup_epochs",
    "momentum", "weight_decay", "amp", "amp_dtype", "backbone", "output_stride", "norm_act", "head", "pretrained",
    "random_seed", "step_ckpt", "weakly", "image_labels", "student_init", "optimizer", "eval_size", "train_base_size",
    "train_scale", "color_jitter", "train_images", "test_images", "train_scale_divide",
)


# Flags added after artifacts and run states were first written, with the value that a file written before them
# was made with: such a file is read as if it held them (it is not "made by other flags" for lacking them).
ADDED_FLAGS: dict[str, Any] = {"train_images": "new", "test_images": "seen", "train_scale_divide": False,
                               "head": "mib"}


def saved_config(saved: dict[str, Any]) -> dict[str, Any]:
    """The config stored in an artifact or run state, completed with ADDED_FLAGS where it predates them."""
    return {**ADDED_FLAGS, **saved}


@dataclass(frozen=True)
class Position:
    """Where training stands: `batch` batches of epoch `epoch` are done; `global_iter` counts all updates."""

    epoch: int
    batch: int
    global_iter: int


def run_state_dir(checkpoint_dir: Path, dataset: str, task: str, overlap: bool, name: str, step: int) -> Path:
    return Path(checkpoint_dir) / "run" / f"{dataset}-{task}{'-ov' if overlap else ''}" / f"{name}_{step}"


def list_run_states(folder: Path) -> list[Path]:
    """Run-state files in `folder`, newest (highest iteration) first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STATE_NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


# ---- random states --------------------------------------------------------------------------------------------

def capture_rng() -> dict[str, Any]:
    """This rank's random states, as plain types and tensors so that `weights_only=True` can load them."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- save / load ----------------------------------------------------------------------------------------------

def save_run_state(folder: Path, position: Position, payload: dict[str, Any], config: dict[str, Any],
                   keep: int) -> Path | None:
    """Collective: every rank contributes its random state; rank 0 writes the file atomically and prunes.

    `payload` (model, optimizer, ... state dicts) is the same on every rank under DDP, so rank 0's copy is saved.
    """
    rng = dist.all_gather_object(capture_rng())
    path = folder / f"iter_{position.global_iter:08d}.pth"

    def write() -> None:
        state = {"format": RUN_STATE_FORMAT, "position": vars(position).copy(), "config": config,
                 "world_size": dist.get_world_size(), "rng": rng, **payload}
        atomic_torch_save(state, path)
        prune_run_states(folder, keep)

    # Nobody runs ahead (or exits on preemption) before the file is in place; a failed write (no space) stops
    # every rank with rank 0's error.
    dist.on_main_process(write)
    return path if dist.is_main_process() else None


def prune_run_states(folder: Path, keep: int) -> None:
    for old in list_run_states(folder)[max(keep, 1):]:
        try:
            old.unlink()
        except OSError as exc:  # a failed delete costs disk space, not correctness
            log.warning("could not delete old run state %s: %s", old, exc)


def _read(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != RUN_STATE_FORMAT or "position" not in state:
        raise ValueError(f"not a run state of format {RUN_STATE_FORMAT}")
    return state


def find_resumable(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """Newest run state that loads, on rank 0; the other ranks then read the file rank 0 chose.

    Unreadable files (truncated by a crash during a copy, a full disk, ...) are reported and skipped.
    """
    chosen: str | None = None
    if dist.is_main_process():
        for path in list_run_states(folder):
            try:
                _read(path)
            except Exception as exc:  # any failure to read means "not usable"; say which and why
                log.warning("run state %s cannot be read (%s); trying the previous one", path, exc)
                continue
            chosen = str(path)
            break
    chosen = dist.broadcast_object(chosen)
    if chosen is None:
        return None
    return Path(chosen), _read(Path(chosen))


def check_resumable(path: Path, state: dict[str, Any], config: dict[str, Any]) -> None:
    """Refuse a run state saved by another configuration or number of ranks, naming what differs."""
    saved = saved_config(state["config"])
    wrong = [f"--{k}: saved {saved.get(k)!r}, now {config.get(k)!r}"
             for k in RESUME_SENSITIVE_FLAGS if saved.get(k) != config.get(k)]
    if wrong:
        raise CheckpointError(
            f"run state {path} belongs to another run of this step ({'; '.join(wrong)}). Re-run with the original "
            f"flags to continue it, or pass --no_resume to discard {path.parent} and train the step from the start.")


def restore_rank_rng(path: Path, state: dict[str, Any]) -> None:
    """Each rank takes back its own random states. With another number of ranks (a lost node) the run continues on
    the same data (the global batch order does not depend on the rank count) but not bit for bit."""
    if state["world_size"] == dist.get_world_size():
        restore_rng(state["rng"][dist.get_rank()])
    elif dist.is_main_process():
        log.warning("%s was saved by %d processes, this run has %d: continuing on the same batches, but random states "
                    "are not restored and results will differ in the last digits", path, state["world_size"],
                    dist.get_world_size())


def remove_run_states(folder: Path) -> None:
    """After the step artifact is written the run states are obsolete (rank 0 only)."""
    if dist.is_main_process() and folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)
        for parent in (folder.parent, folder.parent.parent):  # <protocol>/ and run/, when nothing else is left
            try:
                parent.rmdir()
            except OSError:
                break
