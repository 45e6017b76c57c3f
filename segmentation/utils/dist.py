"""Distributed helpers that return the single-process answer when no process group exists.

As in detectron2's comm.py, every function works without torch.distributed being initialised, which keeps the CPU
tests and `python run.py` (no launcher) on the same code path as torchrun.
"""
from __future__ import annotations

import datetime
import importlib
import os
import re
import subprocess
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
    """Join the process group (nccl on GPU, gloo on CPU) when started by a launcher.

    Under torchrun the group is formed even with one process, so that a single-GPU torchrun runs the same
    collectives (and DDP) as a multi-GPU one: a first multi-GPU run is then not the first run of that code.
    """
    info = read_dist_env()
    if device_kind == "cuda":
        device = torch.device("cuda", info.local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if info.launcher != "none" and not dist.is_initialized():
        if info.launcher == "slurm":
            _export_slurm_rendezvous(info)
        # DDP imports torch._dynamo on first use; imported after the group exists, it keeps references to the group
        # for good (torch 2.14: 10 more references, measured), so destroy_process_group cannot free it and gloo's
        # worker threads live on into interpreter teardown: the likely cause of a finished rank that aborted once in
        # CI ("terminate called without an active exception", exit -6; not reproduced on demand). Imported first,
        # it holds none: cleanup() frees the group and joins its threads (tests/test_dist_teardown.py).
        importlib.import_module("torch._dynamo")
        dist.init_process_group(
            backend="nccl" if device_kind == "cuda" else "gloo",
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(minutes=30),
            device_id=device if device_kind == "cuda" else None,
        )
    return info, device


def _export_slurm_rendezvous(info: DistEnv) -> None:
    """MASTER_ADDR/PORT for env:// init under plain srun.

    The address is the first host of the STEP's node list (a step may run on part of the allocation), expanded by
    `scontrol show hostnames`, SLURM's own parser; the port depends on the job AND the step id, so two srun steps
    inside one allocation (a grid in one job, a retried step) do not try to bind the same port.
    """
    env = os.environ
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    env.setdefault("MASTER_ADDR", first_slurm_host(nodelist))
    env.setdefault("MASTER_PORT", str(slurm_port(env.get("SLURM_JOB_ID", "0"), env.get("SLURM_STEP_ID", "0"))))
    env["RANK"], env["WORLD_SIZE"] = str(info.rank), str(info.world_size)
    env["LOCAL_RANK"] = str(info.local_rank)


def slurm_port(job_id: str, step_id: str) -> int:
    """A port in [20000, 60000) from (job id, step id); every task of a step computes the same one."""
    step = int(step_id) if step_id.isdigit() else 0  # "batch"/"extern" steps never form a group
    return 20000 + (int(job_id or 0) * 1009 + step) % 40000


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a SLURM node list: `scontrol show hostnames` when SLURM's tools are here, else our parser."""
    try:
        result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return parse_first_host(nodelist)
    hosts = result.stdout.split()
    return hosts[0] if result.returncode == 0 and hosts else parse_first_host(nodelist)


def parse_first_host(nodelist: str) -> str:
    """First host of a SLURM host list without scontrol: 'n[1-2]-ib,m3' -> 'n1-ib', 'r[2-3]n[07,09]' -> 'r2n07'.

    Each bracket group contributes its first number (zero padding kept); text between groups, suffixes included,
    is kept. Written by hand only as the fallback where scontrol is not installed (e.g. inside a container).
    """
    first, depth = [], 0
    for ch in nodelist:  # the first comma outside brackets ends the first host expression
        if ch == "," and depth == 0:
            break
        depth += ch == "["
        depth -= ch == "]"
        first.append(ch)
    expr = "".join(first).strip()
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], expr)


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


def all_gather_with_grad(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensor`, differentiable: the backward pass sends each rank the gradient of its own part
    (summed over the ranks' losses). One process: [tensor]."""
    if not is_initialized() or get_world_size() == 1:
        return [tensor]
    # torch.distributed.nn.functional.all_gather is the public collective with autograd; torch 2.x marks it
    # deprecated in favour of a private module, so we keep it and silence the per-call warning.
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return list(all_gather(tensor))


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


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Every rank takes rank 0's buffers (BN running statistics). DDP broadcasts them before each training forward,
    but the last forward updates each rank's unsynchronised norms locally: without this, ranks would evaluate with
    statistics that differ from the saved artifact's (rank 0's)."""
    if is_initialized() and get_world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def main_process_first(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0, then on the other ranks (which then reuse what rank 0 cached on disk).

    If rank 0 fails, the others raise the same error instead of waiting at a barrier until the timeout.
    """
    result = on_main_process(fn)
    return result if is_main_process() else fn()  # type: ignore[return-value]


def on_main_process(fn: Callable[[], T]) -> T | None:
    """Run `fn` on rank 0 only (a save); if it fails, every rank raises the same error, instead of the others
    waiting at the next collective until the timeout. Returns fn's result on rank 0, None elsewhere."""
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
    return result


def cleanup() -> None:
    if is_initialized():
        dist.destroy_process_group()
