"""Distributed helpers that return the single-process answer when no process group exists.

As in detectron2's comm.py, every function works without torch.distributed being initialised, which keeps the CPU
tests and `python run.py` (no launcher) on the same code path as torchrun.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    launcher: str  # "torchrun", "slurm" or "none"


def read_dist_env() -> DistEnv:
    """Rank and world size from torchrun's variables, else SLURM's (srun without torchrun), else one process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env:
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]), "slurm")
    return DistEnv(0, 0, 1, "none")


def init_distributed(device_kind: str) -> tuple[DistEnv, torch.device]:
    """Join the process group (nccl on GPU, gloo on CPU) when launched with several processes."""
    info = read_dist_env()
    if device_kind == "cuda":
        device = torch.device("cuda", info.local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if info.world_size > 1 and not dist.is_initialized():
        if info.launcher == "slurm":
            _export_slurm_rendezvous(info)
        dist.init_process_group(
            backend="nccl" if device_kind == "cuda" else "gloo",
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(minutes=30),
            device_id=device if device_kind == "cuda" else None,
        )
    return info, device


def _export_slurm_rendezvous(info: DistEnv) -> None:
    """MASTER_ADDR/PORT for env:// init under plain srun: first host of the job, a port derived from the job id."""
    os.environ.setdefault("MASTER_ADDR", _first_slurm_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")))
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 40000))
    os.environ["RANK"], os.environ["WORLD_SIZE"] = str(info.rank), str(info.world_size)
    os.environ["LOCAL_RANK"] = str(info.local_rank)


def _first_slurm_host(nodelist: str) -> str:
    """First hostname of a SLURM nodelist such as 'gpu[01-04,07],cpu3' -> 'gpu01' (no scontrol needed)."""
    first = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist[: nodelist.index("]") + 1]
    if "[" not in first:
        return first
    prefix, ranges = first.split("[", 1)
    return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; returns the tensor for chaining."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_object(obj: T) -> list[T]:
    """[obj of rank 0, obj of rank 1, ...]"""
    if not is_initialized():
        return [obj]
    gathered: list = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: object, src: int = 0) -> object:
    if not is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def main_process_first(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0, then on the other ranks (which then reuse what rank 0 cached on disk).

    If rank 0 fails, the others raise the same error instead of waiting at a barrier until the timeout.
    """
    error: BaseException | None = None
    result: T | None = None
    if is_main_process():
        try:
            result = fn()
        except Exception as exc:  # re-raised below after telling the other ranks
            error = exc
    failure = broadcast_object(None if error is None else (type(error), str(error)))
    if error is not None:
        raise error
    if failure is not None:
        error_type, message = failure
        raise error_type(message)
    return result if is_main_process() else fn()


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()
